"""Client of the ``spine-ldm serve`` HTTP backend (``spine_ldm/server.py``), standard library only.

``RemoteClient`` wraps the endpoints (bearer token in ``Authorization``):

- ``GET /health`` -> ``{"status": "ok", ...}`` (no token needed)
- ``GET /models`` -> ``{"models": [...]}``
- ``POST /jobs`` (multipart: ``image`` = NRRD file, ``params`` = JSON of ``pipeline.inpaint`` keyword arguments)
  -> ``{"id": ..., "status": "queued"}``
- ``GET /jobs/{id}`` -> status, ``step``/``of`` progress, ``error``, ``outputs`` count, ``provenance``
- ``GET /jobs/{id}/result/{k}`` -> NRRD bytes of sample ``k``
- ``DELETE /jobs/{id}`` -> cancel (or forget a finished job)

``RemoteJob`` runs one job with the same interface as ``runner.BackendProcess`` (``start``/``poll``/``wait``/
``cancel``/``state``/``result``/``error``), emitting the same JSON-lines events, so the widget and the logic treat
local and remote runs alike. All HTTP traffic happens on a worker thread; ``poll()`` never blocks the GUI.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Callable, Optional

from .runner import CANCELLED, DONE, FAILED, IDLE, RUNNING, drainQueue, waitForRun


class RemoteError(Exception):
    """One-line, user-facing message (HTTP status included when there is one)."""

    def __init__(self, message: str, status: Optional[int] = None, kind: str = "error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def readTokenFile(path: str) -> str:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise RemoteError(f"token file {path} is empty")
    return token


def encodeMultipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """(body, content type) for multipart/form-data. ``files``: name -> (filename, bytes)."""
    boundary = "----SpineInpaint" + uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
                     f"Content-Type: application/json\r\n\r\n".encode() + str(value).encode("utf-8") + b"\r\n")
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class RemoteClient:
    def __init__(self, url: str, token: str = "", timeout: float = 30.0):
        url = str(url).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise RemoteError(f"server URL must start with http:// or https:// (got {url!r})")
        self.url = url
        self.token = str(token or "").strip()
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Optional[bytes] = None, contentType: Optional[str] = None,
                 raw: bool = False, timeout: Optional[float] = None):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if contentType:
            req.add_header("Content-Type", contentType)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                payload = json.loads(e.read().decode("utf-8"))
                detail = payload.get("detail") or payload.get("message") or ""
                if isinstance(detail, dict):
                    detail = detail.get("message", json.dumps(detail))
            except Exception:
                pass
            hint = {401: "missing or wrong token", 413: "request too large for the server",
                    404: "not found on the server"}.get(e.code, e.reason)
            raise RemoteError(f"{self.url}{path}: HTTP {e.code} ({detail or hint})", status=e.code) from None
        except urllib.error.URLError as e:
            raise RemoteError(f"cannot reach {self.url}: {e.reason}") from None
        except OSError as e:  # timeouts, resets
            raise RemoteError(f"cannot reach {self.url}: {e}") from None
        if raw:
            return data
        try:
            return json.loads(data.decode("utf-8")) if data else {}
        except ValueError:
            raise RemoteError(f"{self.url}{path}: the server did not answer JSON") from None

    # -- endpoints
    def health(self) -> dict:
        return self._request("GET", "/health", timeout=min(self.timeout, 5.0))

    def models(self) -> list:
        return self._request("GET", "/models").get("models", [])

    def submit(self, inputPath: str, payload: dict) -> str:
        with open(inputPath, "rb") as f:
            data = f.read()
        body, ctype = encodeMultipart({"params": json.dumps(payload)},
                                      {"image": (os.path.basename(inputPath), data)})
        answer = self._request("POST", "/jobs", body=body, contentType=ctype, timeout=max(self.timeout, 120.0))
        if "id" not in answer:
            raise RemoteError(f"{self.url}/jobs: no job id in the answer")
        return str(answer["id"])

    def status(self, jobId: str) -> dict:
        return self._request("GET", f"/jobs/{urllib.parse.quote(jobId)}")

    def result(self, jobId: str, index: int, outputPath: str) -> str:
        data = self._request("GET", f"/jobs/{urllib.parse.quote(jobId)}/result/{int(index)}", raw=True,
                             timeout=max(self.timeout, 120.0))
        with open(outputPath, "wb") as f:
            f.write(data)
        return outputPath

    def cancel(self, jobId: str) -> dict:
        return self._request("DELETE", f"/jobs/{urllib.parse.quote(jobId)}")


class RemoteJob:
    """One remote run with the ``BackendProcess`` interface (events in the CLI JSON-lines format)."""

    POLL_INTERVAL = 0.5
    CANCEL_SECONDS = 2.0  # after this, a cancel the server did not confirm is final locally

    def __init__(self, client: RemoteClient, inputPath: str, payload: dict, outputDir: str,
                 onEvent: Optional[Callable[[dict], None]] = None, pollInterval: Optional[float] = None,
                 describe: str = ""):
        self.client = client
        self.inputPath = inputPath
        self.payload = dict(payload)
        self.outputDir = outputDir
        self.onEvent = onEvent
        self.pollInterval = self.POLL_INTERVAL if pollInterval is None else float(pollInterval)
        self.where = describe or client.url
        self._cancelAt: Optional[float] = None
        self.state = IDLE
        self.jobId: Optional[str] = None
        self.result: Optional[dict] = None
        self.error: Optional[dict] = None
        self.lastProgress: Optional[dict] = None
        self.startTime: Optional[float] = None
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "RemoteJob":
        if self.state != IDLE:
            raise RuntimeError("a RemoteJob can only be started once")
        self.state = RUNNING
        self.startTime = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spine-ldm-remote")
        self._thread.start()
        return self

    def isRunning(self) -> bool:
        return self.state == RUNNING

    def elapsed(self) -> float:
        return 0.0 if self.startTime is None else time.monotonic() - self.startTime

    def _emit(self, event: dict) -> None:
        self._queue.put(event)

    def _run(self) -> None:
        try:
            self._emit({"event": "log", "stream": "remote", "message": f"uploading to {self.where}"})
            self.jobId = self.client.submit(self.inputPath, self.payload)
            self._emit({"event": "start", "remote": self.client.url, "device_name": self.where, "job": self.jobId,
                        "samples": self.payload.get("samples"), "steps": self.payload.get("steps")})
            lastStep = None
            while True:
                if self._cancel.is_set():
                    try:
                        self.client.cancel(self.jobId)
                    finally:
                        self._emit({"event": "cancelled", "message": "cancelled by the user"})
                    return
                st = self.client.status(self.jobId)
                status = st.get("status")
                step = (st.get("step"), st.get("of"))
                if status == "running" and step != lastStep and st.get("of"):
                    lastStep = step
                    self._emit({"event": "progress", "step": st["step"], "of": st["of"],
                                "stage": st.get("stage", "sample")})
                if status == "done":
                    outputs = []
                    os.makedirs(self.outputDir, exist_ok=True)
                    for k in range(int(st.get("outputs", 0))):
                        outputs.append(self.client.result(self.jobId, k,
                                                          os.path.join(self.outputDir, f"sample_{k}.nrrd")))
                    done = {"event": "done", "outputs": outputs, "remote": self.client.url}
                    for key in ("provenance", "provenances", "nfe", "seconds", "device", "peak_memory_mb"):
                        if key in st:
                            done[key] = st[key]
                    self._emit(done)
                    try:
                        self.client.cancel(self.jobId)  # free the server's copy
                    except RemoteError:
                        pass
                    return
                if status == "error":
                    err = st.get("error") or {}
                    self._emit({"event": "error", "kind": err.get("kind", "error"),
                                "message": err.get("message", "remote job failed")})
                    return
                if status == "cancelled":
                    self._emit({"event": "cancelled", "message": "cancelled on the server"})
                    return
                self._cancel.wait(self.pollInterval)
        except RemoteError as e:
            self._emit({"event": "error", "kind": e.kind, "message": str(e)})
        except Exception as e:  # never let the worker die silently
            self._emit({"event": "error", "kind": "error", "message": f"remote run failed: {e}"})

    def poll(self) -> list[dict]:
        events = []
        if self.state == RUNNING and self._cancelAt is not None and time.monotonic() >= self._cancelAt:
            # the server did not confirm in time (unreachable): cancelled here, late results are never loaded
            self._queue.put({"event": "cancelled", "message": "cancelled (the server did not answer)"})
            self._cancelAt = None
        for event in drainQueue(self._queue):
            kind = event.get("event")
            if self.state != RUNNING and kind in ("done", "error", "cancelled", "progress"):
                continue  # the run is already over (e.g. cancelled locally): never resurrect it
            if kind == "progress":
                self.lastProgress = event
            elif kind == "done":
                self.result, self.state = event, DONE
            elif kind == "error":
                self.error, self.state = event, FAILED
            elif kind == "cancelled":
                self.state = CANCELLED
            events.append(event)
        if self.onEvent:
            for e in events:
                self.onEvent(e)
        return events

    def wait(self, timeout: Optional[float] = None, pollInterval: float = 0.05,
             onEvent: Optional[Callable[[dict], None]] = None) -> str:
        return waitForRun(self, timeout, pollInterval, onEvent)

    def requestCancel(self) -> None:
        """Ask the server to cancel without blocking; ``poll()`` reports ``cancelled`` once it confirmed, or after
        ``CANCEL_SECONDS`` in any case."""
        if self.state != RUNNING or self._cancel.is_set():
            return
        self._cancel.set()
        self._cancelAt = time.monotonic() + self.CANCEL_SECONDS

    def cancel(self, timeout: float = 2.0) -> bool:
        """Blocking form for scripts: the local state is 'cancelled' within ``timeout`` s either way."""
        if self.state != RUNNING:
            return True
        self.requestCancel()
        self._cancelAt = min(self._cancelAt, time.monotonic() + timeout)
        waitForRun(self, timeout + 0.5)
        return True
