"""Cancel kills the backend's whole process tree (``SpineInpaintLib.runner``), also behind a launcher.

Inside Slicer the backend command is ``PythonSlicer``: a launcher that starts the real Python as a child. On Windows
terminating the launcher leaves that child running (no process groups). The fake launcher here does the same on any
platform: it starts the real program in a session of its own (out of reach of the launcher's process group) and dies
on SIGTERM without passing it on.
"""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SpineInpaint"))
from SpineInpaintLib import runner  # noqa: E402

LAUNCHER = textwrap.dedent(r'''
    import os, subprocess, sys
    child = subprocess.Popen(sys.argv[1:], start_new_session=os.environ.get("SAME_GROUP") != "1")
    with open(os.environ["CHILD_PID_FILE"], "w") as f:
        f.write(str(child.pid))
    sys.exit(child.wait())
''')
BACKEND = textwrap.dedent(r'''
    import json, os, signal, sys, time
    if os.environ.get("IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a backend stuck in native code: needs the kill
    for step in range(1, 100000):
        print(json.dumps({"event": "progress", "step": step, "of": 100000}), flush=True)
        time.sleep(0.05)
''')


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def launched(tmp_path, monkeypatch):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "backend.py").write_text(BACKEND)
    started = []

    def start(platform, ignore_term=False, same_group=False):
        if platform == "nt":  # Windows: no session / process group to kill the tree through
            monkeypatch.setattr(runner, "popenKwargs", lambda: {})
        env = dict(os.environ, CHILD_PID_FILE=str(tmp_path / "child.pid"), IGNORE_TERM=str(int(ignore_term)),
                   SAME_GROUP=str(int(same_group)))
        proc = runner.BackendProcess([sys.executable, str(tmp_path / "launcher.py"), sys.executable,
                                      str(tmp_path / "backend.py")], env=env).start()
        started.append(proc)
        deadline = time.monotonic() + 30
        seen = False
        while time.monotonic() < deadline and not (seen and (tmp_path / "child.pid").exists()):
            seen |= any(e["event"] == "progress" for e in proc.poll())
            time.sleep(0.02)
        assert seen, "the fake backend never reported progress"
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(proc.pid) and _alive(child)
        return proc, child

    yield start
    for proc in started:  # never leave a process behind, whatever the test did
        proc.kill()
    if (tmp_path / "child.pid").exists():
        try:
            psutil.Process(int((tmp_path / "child.pid").read_text())).kill()
        except psutil.Error:
            pass


@pytest.mark.parametrize("ignore_term", [False, True], ids=["obeys-sigterm", "ignores-sigterm"])
@pytest.mark.parametrize("platform", ["posix", "nt"])
def test_cancel_kills_launcher_and_its_child(launched, platform, ignore_term):
    proc, child = launched(platform, ignore_term=ignore_term)
    t0 = time.monotonic()
    proc.requestCancel(graceSeconds=0.5)
    assert time.monotonic() - t0 < 0.1, "requestCancel must not block the GUI"
    deadline = time.monotonic() + 3.0
    while proc.state == runner.RUNNING and time.monotonic() < deadline:
        t1 = time.monotonic()
        proc.poll()
        assert time.monotonic() - t1 < 0.1, "poll must not block the GUI"
        time.sleep(0.02)
    assert proc.state == runner.CANCELLED
    assert time.monotonic() - t0 < 2.0
    assert not _alive(proc.pid) and not _alive(child), "the backend behind the launcher is still running"


def test_blocking_cancel_for_scripts(launched):
    proc, child = launched("nt", ignore_term=True)
    assert proc.cancel(timeout=2.0) is True and proc.state == runner.CANCELLED
    assert not _alive(child)


def test_without_psutil_the_process_group_is_the_fallback(launched, monkeypatch):
    proc, child = launched("posix", same_group=True)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
        assert proc.cancel(timeout=2.0) is True
    assert not _alive(child)
