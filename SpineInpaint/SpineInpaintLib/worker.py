"""Warm local backend: one persistent ``spine-ldm serve`` process per Slicer session.

A one-shot ``spine-ldm inpaint`` process pays the Python + torch + MONAI imports and the model loading on every
Apply (seconds on a CPU, nearly all of the wait on a GPU). The first local Apply therefore starts the backend's own
HTTP server as a child process bound to 127.0.0.1 on a free port (``--port 0``), with a random bearer token handed
over in a private file (never on the command line); later Applies reuse it, and the server keeps the networks in
its in-process model cache. The panel talks to it with the same client as to a remote GPU server
(``remote.RemoteClient`` / ``RemoteJob``): one protocol, two places.

Lifecycle: ``getWorker()`` returns the session's worker (a new one when the interpreter or the registry changed);
``ensureStarted()`` (re)starts the process when it is not running, so a crashed worker is replaced on the next
Apply; the worker exits with Slicer (``shutdownWorkers`` on ``aboutToQuit`` and at interpreter exit, and the server's
own ``--parent-pid`` watchdog when Slicer is killed). Cancel of a job goes through the HTTP API (``DELETE /jobs``).
Nothing here blocks: ``poll()`` is called from the GUI's timer.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import shutil
import tempfile
import time
from typing import Callable, Optional

from .remote import RemoteClient, RemoteJob
from .runner import CANCELLED, DONE, FAILED, IDLE, RUNNING, BackendProcess, backendEnvironment, errorMessage, \
    pythonExecutable, waitForRun

STARTING, READY, STOPPED = "starting", "ready", "stopped"
#: packages the worker needs besides the backend's own (Resources/requirements.txt lists them for Slicer)
SERVER_MODULES = ("fastapi", "uvicorn", "python_multipart")


def serverAvailable() -> bool:
    """Whether this Python can run ``spine-ldm serve`` (the backend shares Slicer's site-packages)."""
    return all(importlib.util.find_spec(m) is not None for m in SERVER_MODULES)


def workerCommand(tokenFile: str, python: Optional[str] = None, registry: Optional[str] = None,
                  parentPid: Optional[int] = None) -> list[str]:
    """``spine-ldm serve`` on 127.0.0.1, any free port, token from ``tokenFile``, following ``parentPid``."""
    cmd = [python or pythonExecutable(), "-m", "spine_ldm.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--token-file", str(tokenFile), "--parent-pid", str(int(parentPid or os.getpid()))]
    if registry:
        cmd += ["--registry", str(registry)]
    return cmd


class LocalWorker:
    """The persistent local backend process and how to reach it."""

    START_TIMEOUT = 300.0  # imports on a slow first start (cold disk cache, antivirus) can take minutes

    def __init__(self, python: Optional[str] = None, env: Optional[dict] = None, registry: Optional[str] = None,
                 commandBuilder: Optional[Callable[..., list]] = None):
        self.python = python
        self.env = env
        self.registry = registry or None
        self.commandBuilder = commandBuilder or workerCommand
        self.process: Optional[BackendProcess] = None
        self.url = ""
        self.token = ""
        self.state = STOPPED
        self.message = ""  # why the last process ended (shown when a job could not use it)
        self.starts = 0
        self._tokenDir: Optional[str] = None
        self._startedAt = 0.0

    @property
    def key(self) -> tuple:
        return (self.python or pythonExecutable(), self.registry)

    # -- lifecycle
    def ensureStarted(self) -> "LocalWorker":
        """Start the process unless it is starting or running (a crashed one is replaced). Never blocks."""
        self.poll()
        if self.state in (STARTING, READY):
            return self
        self._cleanupToken()
        self._tokenDir = tempfile.mkdtemp(prefix="SpineInpaintWorker-")  # 0700: only this user
        tokenFile = os.path.join(self._tokenDir, "token")
        self.token = secrets.token_urlsafe(32)
        fd = os.open(tokenFile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.token)
        command = self.commandBuilder(tokenFile, python=self.python, registry=self.registry, parentPid=os.getpid())
        self.url = ""
        self.process = BackendProcess(command, env=self.env if self.env is not None else backendEnvironment())
        try:
            self.process.start()
        except OSError:
            self._cleanupToken()
            self.process, self.state = None, STOPPED
            raise
        self.state = STARTING
        self.starts += 1
        self._startedAt = time.monotonic()
        return self

    def poll(self) -> str:
        """Read the process's output; returns the state (``starting`` until the server announced its port)."""
        proc = self.process
        if proc is None:
            return self.state
        for event in proc.poll():
            if event.get("event") == "listening" and self.state == STARTING:
                self.url = str(event.get("url") or "")
                self.state = READY
                self._cleanupToken()  # the server has read it
        if proc.state != RUNNING:
            if self.state != STOPPED:
                self.message = self._exitMessage(proc)
            self.state = STOPPED
            self._cleanupToken()
        elif self.state == STARTING and time.monotonic() - self._startedAt > self.START_TIMEOUT:
            self.message = f"the backend worker did not start within {self.START_TIMEOUT:.0f} s"
            self.stop()
        return self.state

    @staticmethod
    def _exitMessage(proc: BackendProcess) -> str:
        if proc.error:
            return errorMessage(proc.error)
        return f"the backend worker exited with code {proc.returncode}"

    def client(self, timeout: float = 30.0) -> RemoteClient:
        if self.state != READY:
            raise RuntimeError("the backend worker is not ready")
        return RemoteClient(self.url, self.token, timeout=timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the process tree (graceful first: the server removes its temporary folder)."""
        if self.process is not None and self.process.state == RUNNING:
            self.process.cancel(timeout=timeout)
        self.state = STOPPED
        self._cleanupToken()

    def _cleanupToken(self) -> None:
        if self._tokenDir:
            shutil.rmtree(self._tokenDir, ignore_errors=True)
            self._tokenDir = None


_WORKERS: dict = {}


def getWorker(python: Optional[str] = None, env: Optional[dict] = None, registry: Optional[str] = None,
              commandBuilder: Optional[Callable[..., list]] = None) -> LocalWorker:
    """The session's worker for this interpreter and registry (one at a time: a different one stops the old)."""
    wanted = LocalWorker(python, env, registry, commandBuilder)
    current = _WORKERS.get("worker")
    if current is not None and current.key == wanted.key and current.commandBuilder is wanted.commandBuilder:
        if env is not None:
            current.env = env  # used at the next (re)start
        return current
    if current is not None:
        current.stop()
    _WORKERS["worker"] = wanted
    return wanted


def currentWorker() -> Optional[LocalWorker]:
    """The session's worker, if one was created (never creates or stops one)."""
    return _WORKERS.get("worker")


def shutdownWorkers() -> None:
    """Stop the session's worker (Slicer's aboutToQuit, interpreter exit)."""
    current = _WORKERS.pop("worker", None)
    if current is not None:
        current.stop(timeout=1.0)


atexit.register(shutdownWorkers)


class WorkerJob:
    """One run on the warm worker, with the ``BackendProcess`` interface: waits (without blocking) for the worker to
    be ready, then runs a ``RemoteJob`` against it."""

    POLL_INTERVAL = 0.05  # loopback: poll the job status often (the end of a run is noticed within 50 ms)

    def __init__(self, worker: LocalWorker, inputPath: str, payload: dict, outputDir: str,
                 onEvent: Optional[Callable[[dict], None]] = None):
        self.worker = worker
        self.inputPath = inputPath
        self.payload = dict(payload)
        self.outputDir = outputDir
        self.onEvent = onEvent
        self.state = IDLE
        self.result: Optional[dict] = None
        self.error: Optional[dict] = None
        self.lastProgress: Optional[dict] = None
        self.startTime: Optional[float] = None
        self.inner: Optional[RemoteJob] = None
        self._pending: list[dict] = []

    def start(self) -> "WorkerJob":
        if self.state != IDLE:
            raise RuntimeError("a WorkerJob can only be started once")
        restarted = self.worker.state == STOPPED and self.worker.starts > 0
        self.worker.ensureStarted()
        self.state = RUNNING
        self.startTime = time.monotonic()
        if self.worker.state != READY:
            note = f"backend worker restarted ({self.worker.message})" if restarted and self.worker.message else \
                "starting the warm backend (once per Slicer session)..."
            self._pending.append({"event": "log", "stream": "worker", "message": note})
        return self

    def isRunning(self) -> bool:
        return self.state == RUNNING

    def elapsed(self) -> float:
        return 0.0 if self.startTime is None else time.monotonic() - self.startTime

    def poll(self) -> list[dict]:
        events, self._pending = self._pending, []
        workerState = self.worker.poll()  # also drains the server's log output
        if self.state == RUNNING and self.inner is None:
            if workerState == READY:
                self.inner = RemoteJob(self.worker.client(), self.inputPath, self.payload, self.outputDir,
                                       pollInterval=self.POLL_INTERVAL, describe="warm backend")
                self.inner.start()
            elif workerState == STOPPED:
                self.error = {"event": "error", "kind": "error",
                              "message": f"{self.worker.message or 'the backend worker stopped'}; it restarts on "
                                         "the next Apply"}
                self.state = FAILED
                events.append(self.error)
        if self.inner is not None and self.state == RUNNING:
            for event in self.inner.poll():
                if event.get("event") == "error" and self.worker.poll() == STOPPED:  # the worker died mid-run
                    event = dict(event, message=f"{self.worker.message}; it restarts on the next Apply")
                events.append(event)
            self.lastProgress = self.inner.lastProgress
            if self.inner.state != RUNNING:
                self.state, self.result = self.inner.state, self.inner.result
                self.error = next((e for e in reversed(events) if e.get("event") == "error"), self.inner.error)
        if self.onEvent:
            for e in events:
                self.onEvent(e)
        return events

    def requestCancel(self) -> None:
        if self.state != RUNNING:
            return
        if self.inner is None:  # still starting: the worker keeps starting for the next Apply
            self.state = CANCELLED
            self._pending.append({"event": "cancelled", "message": "cancelled by the user"})
            return
        self.inner.requestCancel()

    def cancel(self, timeout: float = 2.0) -> bool:
        self.requestCancel()
        waitForRun(self, timeout)
        return self.state != RUNNING

    def wait(self, timeout: Optional[float] = None, pollInterval: float = 0.05,
             onEvent: Optional[Callable[[dict], None]] = None) -> str:
        return waitForRun(self, timeout, pollInterval, onEvent)


__all__ = ["LocalWorker", "WorkerJob", "getWorker", "currentWorker", "shutdownWorkers", "serverAvailable", "workerCommand",
           "STARTING", "READY", "STOPPED", "DONE"]
