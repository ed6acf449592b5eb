"""The local backend as a background process speaking the CLI JSON-lines protocol (DEVELOPERS.md).

``BackendProcess`` starts ``spine-ldm inpaint ... --progress json`` with ``subprocess.Popen`` (no QProcess, so it
works in PythonSlicer scripts and tests), reads stdout/stderr on two daemon threads into a queue, and hands the
parsed events to whoever polls it: the widget polls from a ``qt.QTimer`` (the Slicer GUI never blocks), batch
scripts call ``wait()``.

Events are dicts with an ``"event"`` key: ``start``, ``progress`` (``step``, ``of``, ``stage``), ``done``
(``outputs``, ``provenance``, ...), ``error`` (``kind``, ``message``), plus two made here: ``log`` (a non-JSON line;
``stream`` is ``stdout`` or ``stderr``) and ``cancelled``. A process that dies without an ``error`` line becomes an
``error`` event whose message names the exit code and the last stderr line, never a traceback dump.

Cancel kills the whole process tree (the backend and anything it spawned) on every platform: inside Slicer the
command is ``PythonSlicer``, a launcher that starts the real Python as a *child*, so terminating the launcher alone
would leave the backend running (Windows has no process groups to fall back on). The tree is collected with psutil
(as SlicerMONAIAuto3DSeg does) before anything is signalled, terminated, and killed after a grace period; without
psutil the fallback is the process group (POSIX) or ``taskkill /T`` (Windows). ``requestCancel()`` never blocks:
``poll()`` escalates and reports ``cancelled`` once every process of the tree is gone; ``cancel(timeout)`` is the
blocking form for scripts. Nothing is loaded into the scene for a cancelled or failed run.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "error", "cancelled"
EXIT_CODES = {0: "ok", 1: "error", 2: "input", 3: "model", 4: "device", 130: "cancelled"}
ERROR_TITLES = {
    "input": "Input problem",
    "model": "Model problem",
    "device": "Device problem",
    "cancelled": "Cancelled",
    "error": "Backend error",
}


# ---------------------------------------------------------------------------------------------- protocol
def parseEventLine(line: str, stream: str = "stdout") -> dict:
    """One output line -> event dict (non-JSON or JSON without 'event' becomes a 'log' event)."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return obj
    return {"event": "log", "stream": stream, "message": text}


def errorMessage(event: dict) -> str:
    """Plain one-line message for an error event: '<Title>: <message>'."""
    kind = str(event.get("kind") or "error")
    message = str(event.get("message") or "").strip().splitlines()
    message = message[0] if message else "unknown error"
    return f"{ERROR_TITLES.get(kind, 'Backend error')}: {message}"


def progressFraction(event: dict) -> Optional[float]:
    try:
        step, of = float(event["step"]), float(event["of"])
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, min(1.0, step / of)) if of > 0 else None


# ---------------------------------------------------------------------------------------------- command
def moduleDirectory() -> str:
    """Directory that holds ``spine_ldm`` and ``SpineInpaintLib`` (the scripted module directory)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pythonExecutable() -> str:
    """PythonSlicer inside Slicer (a launcher that sets Slicer's library paths), else this interpreter."""
    import shutil

    try:
        import slicer

        if hasattr(slicer, "app"):
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


def backendEnvironment(extra: Optional[dict] = None) -> dict:
    """Environment for the backend: Slicer's startup environment when available, module dir on PYTHONPATH."""
    env = None
    try:
        import slicer

        if hasattr(slicer, "app") and hasattr(slicer.util, "startupEnvironment"):
            env = dict(slicer.util.startupEnvironment())
    except ImportError:
        pass
    env = dict(os.environ if env is None else env)
    paths = [moduleDirectory()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env.update(extra or {})
    return env


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _vector(values) -> str:
    return ",".join(_fmt(float(v)) for v in values)


def inpaintCommand(payload: dict, inputPath: str, outputDir: str, python: Optional[str] = None,
                   registry: Optional[str] = None) -> list[str]:
    """``spine-ldm inpaint`` command line for one run (``payload`` = ``nodes.requestPayload``).

    Coordinates go as LPS (the CLI default) in ``--landmark=x,y,z`` form so negative values parse. Outputs are
    ``<outputDir>/sample.nrrd`` (one sample) or ``sample_1.nrrd`` .. ``sample_K.nrrd``; the ``done`` event lists them.
    """
    cmd = [python or pythonExecutable(), "-m", "spine_ldm.cli", "inpaint", str(inputPath),
           f"--landmark={_vector(payload['landmark_lps'])}", "--coords", "lps",
           "--level", payload["level"], "--condition", payload["condition"],
           "--method", payload["method"], "--samples", str(int(payload["samples"])),
           "--seed", str(int(payload["seed"])), "--steps", str(int(payload["steps"])),
           "--device", payload.get("device", "auto"),
           "--out", os.path.join(str(outputDir), "sample.nrrd"), "--progress", "json"]
    if payload.get("sigma_mm") is not None:  # absent: the model's own sigma
        cmd += ["--sigma-mm", _fmt(float(payload["sigma_mm"]))]
    if payload.get("guidance_scale") is not None:  # absent: the model's own guidance scale
        cmd += ["--guidance-scale", _fmt(float(payload["guidance_scale"]))]
    if payload.get("model"):
        cmd += ["--model", payload["model"]]
    if payload.get("disc_center_lps") is not None:
        cmd += [f"--disc-center={_vector(payload['disc_center_lps'])}"]
    if registry:
        cmd += ["--registry", str(registry)]
    return cmd


# ---------------------------------------------------------------------------------------------- process
def drainQueue(q: "queue.Queue") -> list:
    """Everything in ``q`` right now, without blocking."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def waitForRun(run, timeout: Optional[float] = None, pollInterval: float = 0.05,
               onEvent: Optional[Callable[[dict], None]] = None) -> str:
    """Poll ``run`` (a BackendProcess or RemoteBackend) until it leaves RUNNING or ``timeout`` passes;
    returns its final state."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for e in run.poll():
            if onEvent:
                onEvent(e)
        if run.state != RUNNING or (deadline is not None and time.monotonic() > deadline):
            return run.state
        time.sleep(pollInterval)


class BackendProcess:
    """One backend run. Poll it (``poll()``) from a timer, or block on ``wait()``.

    >>> proc = BackendProcess(cmd); proc.start()
    >>> while proc.isRunning(): events = proc.poll(); ...
    """

    STDERR_TAIL = 20
    DRAIN_SECONDS = 2.0  # after the process exited, how long its output may take to arrive

    def __init__(self, command: Sequence[str], env: Optional[dict] = None, cwd: Optional[str] = None,
                 onEvent: Optional[Callable[[dict], None]] = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.onEvent = onEvent
        self.state = IDLE
        self.returncode: Optional[int] = None
        self.result: Optional[dict] = None  # the 'done' event
        self.error: Optional[dict] = None  # the 'error' event
        self.lastProgress: Optional[dict] = None
        self.startTime: Optional[float] = None
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stderrTail: deque = deque(maxlen=self.STDERR_TAIL)
        self._cancelRequested = False
        self._killDeadline: Optional[float] = None
        self._exitSeen: Optional[float] = None
        self._tree: Optional[ProcessTree] = None
        self._finalized = False

    # -- lifecycle
    def start(self) -> "BackendProcess":
        if self.state != IDLE:
            raise RuntimeError("a BackendProcess can only be started once")
        self.startTime = time.monotonic()
        self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, text=True,
                                      encoding="utf-8", errors="replace", bufsize=1, **popenKwargs())
        self.state = RUNNING
        for stream, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            t = threading.Thread(target=self._reader, args=(stream, name), daemon=True, name=f"spine-ldm-{name}")
            t.start()
            self._threads.append(t)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def isRunning(self) -> bool:
        return self.state == RUNNING

    def elapsed(self) -> float:
        return 0.0 if self.startTime is None else time.monotonic() - self.startTime

    def _reader(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                event = parseEventLine(line, name)
                if name == "stderr" and line.strip():
                    self._stderrTail.append(line.strip())
                self._queue.put(event)
        except (ValueError, OSError):  # stream closed by a kill
            pass

    # -- polling
    def poll(self) -> list[dict]:
        """Events since the last call; updates ``state`` (the final event is ``done``/``error``/``cancelled``)."""
        events = [self._handle(e) for e in drainQueue(self._queue)]
        if self._cancelRequested and self.state == RUNNING:
            self._continueCancel()
        if self.state == RUNNING and self._proc is not None and self._proc.poll() is not None and \
                (self._tree is None or not self._tree.alive()):
            if self._exitSeen is None:
                self._exitSeen = time.monotonic()
            # finish once the readers reached the end of the output (never block the caller waiting for them)
            drained = not any(t.is_alive() for t in self._threads)
            if drained or time.monotonic() - self._exitSeen > self.DRAIN_SECONDS:
                events += [self._handle(e) for e in drainQueue(self._queue)]
                events += self._finalize(self._proc.returncode)
        if self.onEvent:
            for e in events:
                self.onEvent(e)
        return events

    def _handle(self, event: dict) -> dict:
        kind = event.get("event")
        if kind == "progress":
            self.lastProgress = event
        elif kind == "done":
            self.result = event
        elif kind == "error":
            self.error = event
        return event

    def _finalize(self, returncode: int) -> list[dict]:
        if self._finalized:
            return []
        self._finalized = True
        self.returncode = returncode
        if self._cancelRequested or returncode == 130 or (self.error or {}).get("kind") == "cancelled":
            self.state = CANCELLED
            return [{"event": "cancelled", "message": "cancelled by the user"}]
        if returncode == 0 and self.result is not None:
            self.state = DONE
            return []
        self.state = FAILED
        if self.error is None:
            tail = self._stderrTail[-1] if self._stderrTail else "no output"
            kind = EXIT_CODES.get(returncode, "error")
            if returncode == 0:
                message = "backend finished without reporting its outputs"
            elif returncode is not None and returncode < 0:
                message = f"backend was killed by signal {-returncode} ({tail})"
            else:
                message = f"backend exited with code {returncode} ({tail})"
            self.error = {"event": "error", "kind": kind if kind != "ok" else "error", "message": message}
            return [self.error]
        return []

    def wait(self, timeout: Optional[float] = None, pollInterval: float = 0.05,
             onEvent: Optional[Callable[[dict], None]] = None) -> str:
        """Block until the run ends (or ``timeout``); returns the final state."""
        return waitForRun(self, timeout, pollInterval, onEvent)

    # -- cancel
    def requestCancel(self, graceSeconds: float = 1.0) -> None:
        """Start cancelling without blocking: terminate the whole tree now, kill what is left after
        ``graceSeconds`` (from ``poll()``). The run reports ``cancelled`` once every process is gone."""
        if self._proc is None or self.state != RUNNING or self._cancelRequested:
            return
        self._cancelRequested = True
        self._killDeadline = time.monotonic() + graceSeconds
        self._tree = ProcessTree(self._proc)
        self._tree.signal(kill=False)

    def _continueCancel(self) -> None:
        if self._tree is None:
            return
        if self._killDeadline is not None and time.monotonic() >= self._killDeadline:
            self._killDeadline = None
            self._tree.signal(kill=True)

    def cancel(self, timeout: float = 2.0) -> bool:
        """Blocking cancel for scripts: the whole tree is gone within ``timeout`` s (SIGTERM, then SIGKILL at
        half the timeout); True when it is."""
        if self._proc is None or self.state != RUNNING:
            return True
        deadline = time.monotonic() + timeout
        self.requestCancel(graceSeconds=0.5 * timeout)
        while self.state == RUNNING and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.02)
        return self.state != RUNNING

    def kill(self) -> None:
        """Kill the whole tree at once (used when Slicer exits)."""
        if self._proc is not None and self._proc.poll() is None:
            ProcessTree(self._proc).signal(kill=True)

    def __del__(self):
        try:
            self.kill()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------- process tree
def popenKwargs() -> dict:
    """Platform flags for a backend process: its own session / process group, no console window on Windows."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess,
                                                                                          "CREATE_NO_WINDOW", 0)}


class ProcessTree:
    """A process and every descendant, collected (psutil) before any of them is signalled: once the launcher is
    gone its children can no longer be found from it."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.processes = []  # psutil.Process, root first
        try:
            import psutil
        except ImportError:
            self._psutil = None
            return
        self._psutil = psutil
        try:
            root = psutil.Process(popen.pid)
            self.processes = [root] + root.children(recursive=True)
        except psutil.Error:
            self.processes = []

    def signal(self, kill: bool) -> None:
        """Terminate (``kill=False``) or kill every process of the tree."""
        if self._psutil is not None and self.processes:
            for p in reversed(self.processes):  # descendants first
                try:
                    p.kill() if kill else p.terminate()
                except self._psutil.Error:
                    pass
            return
        if self.popen.poll() is not None:
            return
        try:  # no psutil: the process group (POSIX) or taskkill's tree walk (Windows)
            if os.name == "posix":
                os.killpg(self.popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
            elif not kill:
                self.popen.terminate()
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.popen.pid)], capture_output=True, check=False)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def alive(self) -> bool:
        """True while any process of the tree runs (zombies awaiting their reaper count as gone)."""
        if self.popen.poll() is None:
            return True
        for p in self.processes[1:]:
            try:
                if p.is_running() and p.status() != self._psutil.STATUS_ZOMBIE:
                    return True
            except self._psutil.Error:
                continue
        return False
