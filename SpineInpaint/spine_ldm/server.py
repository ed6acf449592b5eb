"""HTTP backend: ``spine-ldm serve`` (FastAPI + uvicorn) around :func:`spine_ldm.pipeline.inpaint`.

For running the heavy part on a GPU machine while 3D Slicer runs on a laptop (``SpineInpaintLib/remote.py`` is
the client; the panel's "Remote backend" section points at it).

Endpoints (all but ``/health`` need ``Authorization: Bearer <token>``; 401 otherwise)::

    GET    /health                  {"status": "ok", "version", "queued", "running"}
    GET    /models                  {"models": [{"id", "method", "config", "description", "status", ...}]}
    POST   /jobs                    multipart: image=<NRRD/NIfTI/MHA file>, params=<JSON> -> 202 {"id", "status"}
    GET    /jobs/{id}               {"id", "status": queued|running|done|error|cancelled, "step", "of", "stage",
                                     "position", "outputs", "error": {"kind", "message"}, "provenance", ...}
    GET    /jobs/{id}/result/{k}    NRRD of sample k (0-based), the same bytes ``spine-ldm inpaint`` writes
    DELETE /jobs/{id}               cancel a queued/running job, or forget a finished one (deletes its files)

``params`` are :func:`~spine_ldm.pipeline.inpaint` keyword arguments: ``landmark_lps`` (LPS mm), ``level``,
``condition`` (required), ``method``, ``samples``, ``seed``, ``steps``, ``sigma_mm``, ``guidance_scale``, ``device``, ``model`` (one
of the ids ``GET /models`` lists: clients cannot make the server load files), ``disc_center_lps``. Unknown keys,
non-finite numbers (NaN, Infinity) and unregistered models are refused (422), and so is an uploaded volume whose
header claims more voxels than the limit (env ``SPINE_LDM_MAX_VOXELS``) or more data than the file holds.

Safety: bearer token compared in constant time (one is generated and printed when none is given); requests larger
than ``max_request_mb`` get 413 (checked on ``Content-Length`` and again while streaming); one worker thread runs
jobs one at a time from a bounded queue (503 when full); finished jobs are kept for ``RESULT_TTL_S`` or until
``MAX_FINISHED`` newer ones exist. Jobs live in memory only: after a restart an old job id is answered with 404
"the server restarted" (ids carry a per-process prefix). No ``/docs``, ``/redoc`` or ``/openapi.json``.
Uploads go to a ``spine-ldm-server-*`` temporary folder holding a locked marker file; at start the folders of
servers that did not shut down (kill -9, power loss) are removed, and the log says so. The server speaks plain
HTTP: bind it to 127.0.0.1 (default) and reach it through an SSH tunnel, or put an HTTPS reverse proxy in front
of it.
"""

import collections
import contextlib
import datetime
import hmac
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import __version__
from .conditions import parse_condition, parse_level
from .errors import CancelledError, SpineLDMError

log = logging.getLogger("spine_ldm.server")

MAX_QUEUE = 16
MAX_FINISHED = 32
RESULT_TTL_S = 3600.0
ALLOWED_SUFFIXES = (".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")
PARAM_KEYS = {"landmark_lps", "level", "condition", "method", "samples", "seed", "steps", "sigma_mm", "device",
              "model", "disc_center_lps", "guidance_scale"}
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: model names that mean "the method's default model" (pipeline aliases)
MODEL_ALIASES = ("demo-small", "default")
ROOT_PREFIX = "spine-ldm-server-"
ROOT_MARKER = ".spine-ldm-server"


class ParamError(ValueError):
    pass


def validate_params(params: Any) -> dict:
    """Checked copy of the job parameters (ParamError with a one-line message otherwise)."""
    if not isinstance(params, dict):
        raise ParamError("params must be a JSON object")
    unknown = set(params) - PARAM_KEYS
    if unknown:
        raise ParamError(f"unknown parameter(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(PARAM_KEYS))}")
    for key in ("landmark_lps", "level", "condition"):
        if key not in params:
            raise ParamError(f"missing parameter {key!r}")
    out = dict(params)

    def vec(key):
        v = out[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_finite(x) for x in v)):
            raise ParamError(f"{key} must be a list of 3 numbers (finite, LPS mm), got {v!r}")
        out[key] = [float(x) for x in v]

    vec("landmark_lps")
    if out.get("disc_center_lps") is not None:
        vec("disc_center_lps")
    try:
        out["level"], out["condition"] = parse_level(out["level"]), parse_condition(out["condition"])
    except SpineLDMError as e:
        raise ParamError(str(e)) from None
    for key in ("samples", "seed", "steps"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool)):
            raise ParamError(f"{key} must be an integer, got {out[key]!r}")
    for key in ("sigma_mm", "guidance_scale"):
        if key in out and not _finite(out[key]):
            raise ParamError(f"{key} must be a finite number, got {out[key]!r}")
    if out.get("model") is not None and (not isinstance(out["model"], str) or not _MODEL_ID.match(out["model"])):
        raise ParamError(f"model must be a registry id (letters, digits, '.', '_', '-'), got {out['model']!r}")
    if "device" in out and (not isinstance(out["device"], str) or not _DEVICES.match(out["device"])):
        raise ParamError(f"device must be auto, cpu, cuda, cuda:N or mps, got {out['device']!r}")
    if "method" in out and out["method"] not in ("weighted", "masked", "repaint"):
        raise ParamError(f"method must be weighted, masked or repaint, got {out['method']!r}")
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_params(text: str) -> dict:
    """``params`` JSON -> checked dict. NaN / Infinity are refused already by the parser (JSON has no such
    numbers; Python's json would accept them and the job status could then never be serialised)."""
    def no_constant(name):
        raise ParamError(f"{name} is not a JSON number; numbers must be finite")

    return validate_params(json.loads(text, parse_constant=no_constant))


def registered_model_ids(registry) -> set:
    """Ids a client may name as ``model``: the registry's entries and the default-model aliases."""
    from . import registry as reg

    return {e.id for e in reg.list_models(registry)} | set(MODEL_ALIASES)


# ---------------------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    id: str
    params: dict
    workdir: str
    input_path: str
    status: str = "queued"  # queued | running | done | error | cancelled
    step: int = 0
    of: int = 0
    stage: str = ""
    error: Optional[dict] = None
    outputs: list = field(default_factory=list)
    provenance: Optional[dict] = None
    provenances: list = field(default_factory=list)
    nfe: Optional[int] = None
    seconds: Optional[float] = None
    device: Optional[str] = None
    peak_memory_mb: Optional[float] = None
    created: float = field(default_factory=time.time)
    finished: Optional[float] = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def public(self, position: Optional[int] = None) -> dict:
        d = {"id": self.id, "status": self.status, "step": self.step, "of": self.of, "stage": self.stage,
             "outputs": len(self.outputs), "created": self.created, "finished": self.finished,
             "params": self.params}
        if position is not None:
            d["position"] = position
        if self.error:
            d["error"] = self.error
        if self.status == "done":
            d.update(provenance=self.provenance, provenances=self.provenances, nfe=self.nfe, seconds=self.seconds,
                     device=self.device, peak_memory_mb=self.peak_memory_mb)
        return d


def _default_runner(*args, **kwargs):
    from .pipeline import inpaint

    return inpaint(*args, **kwargs)


class JobManager:
    """Bounded queue + one worker thread (a GPU runs one diffusion job at a time)."""

    def __init__(self, runner: Optional[Callable] = None, registry=None, root: Optional[str] = None):
        self.runner = runner or _default_runner
        self.registry = registry
        self.instance = secrets.token_hex(4)  # job ids start with it: ids of an earlier process are recognisable
        self.started = time.time()
        self.forgotten: "collections.deque[str]" = collections.deque(maxlen=4096)
        self._marker = None
        self.stale_removed: list[str] = []
        if root is None:
            self.stale_removed = clean_stale_roots()
            if self.stale_removed:
                log.warning("removed %d stale upload folder(s) left by a server that did not shut down cleanly "
                            "(killed?): %s", len(self.stale_removed), ", ".join(self.stale_removed))
            root, self._marker = make_root()
        self.root = root
        self.jobs: dict[str, Job] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True, name="spine-ldm-worker")
        self.worker.start()

    # -- API
    def new_workdir(self) -> tuple[str, str]:
        jid = self.instance + uuid.uuid4().hex[: 32 - len(self.instance)]
        wd = os.path.join(self.root, jid)
        os.makedirs(wd)
        return jid, wd

    def submit(self, jid: str, workdir: str, input_path: str, params: dict) -> Job:
        with self.lock:
            if self.queued_count() >= MAX_QUEUE:
                raise OverflowError(f"queue full ({MAX_QUEUE} jobs waiting)")
            job = Job(id=jid, params=params, workdir=workdir, input_path=input_path)
            self.jobs[jid] = job
            self.order.append(jid)
        self.queue.put(jid)
        return job

    def get(self, jid: str) -> Optional[Job]:
        with self.lock:
            self._prune()
            return self.jobs.get(jid)

    def position(self, job: Job) -> Optional[int]:
        if job.status != "queued":
            return None
        with self.lock:
            waiting = [j for j in self.order if self.jobs.get(j) and self.jobs[j].status == "queued"]
        return waiting.index(job.id) if job.id in waiting else None

    def queued_count(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status == "queued")

    def running(self) -> bool:
        return any(j.status == "running" for j in self.jobs.values())

    def cancel(self, jid: str) -> Optional[str]:
        """Cancel (queued/running) or forget (finished). Returns the resulting status, None if unknown."""
        with self.lock:
            job = self.jobs.get(jid)
            if job is None:
                return None
            if job.status == "queued":
                job.cancel_event.set()
                self._finish(job, "cancelled")
                return "cancelled"
            if job.status == "running":
                job.cancel_event.set()
                return "cancelling"
            self._forget(jid)
            return "deleted"

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel_event.set()
        self.queue.put(None)
        self.worker.join(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
        if self._marker is not None:
            self._marker.close()

    def unknown_job_message(self, jid: str) -> str:
        """Why ``jid`` is not (or no longer) here: the queue lives in memory, so say which case applies."""
        if _JOB_ID.match(jid) and not jid.startswith(self.instance):
            since = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(timespec="seconds")
            return (f"unknown job {jid!r}: the server was restarted at {since} and keeps jobs in memory only, so jobs "
                    "submitted before the restart are lost; submit it again")
        if jid in self.forgotten:
            return (f"job {jid!r} is gone: it was deleted, or it finished more than {RESULT_TTL_S / 60:.0f} min ago "
                    f"or before {MAX_FINISHED} newer jobs")
        return f"no job {jid!r} on this server"

    # -- internals
    def _finish(self, job: Job, status: str, error: Optional[dict] = None) -> None:
        job.status = status
        job.error = error
        job.finished = time.time()
        if status != "done":
            shutil.rmtree(job.workdir, ignore_errors=True)

    def _forget(self, jid: str) -> None:
        job = self.jobs.pop(jid, None)
        self.forgotten.append(jid)
        if jid in self.order:
            self.order.remove(jid)
        if job is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)

    def _prune(self) -> None:
        now = time.time()
        finished = [j for j in self.order if self.jobs[j].finished is not None]
        for jid in finished:
            if now - self.jobs[jid].finished > RESULT_TTL_S:
                self._forget(jid)
        finished = [j for j in self.order if j in self.jobs and self.jobs[j].finished is not None]
        for jid in finished[: max(0, len(finished) - MAX_FINISHED)]:
            self._forget(jid)

    def _work(self) -> None:
        while True:
            jid = self.queue.get()
            if jid is None:
                return
            with self.lock:
                job = self.jobs.get(jid)
                if job is None or job.status != "queued":
                    continue
                job.status = "running"
            self._run(job)
            with self.lock:
                self._prune()

    def _run(self, job: Job) -> None:
        from .pipeline import check_outputs, write_outputs

        def progress(step, total):
            job.step, job.of, job.stage = int(step), int(total), "sample"

        kwargs = dict(job.params)
        landmark = kwargs.pop("landmark_lps")
        level, condition = kwargs.pop("level"), kwargs.pop("condition")
        out = os.path.join(job.workdir, "sample.nrrd")
        try:
            check_outputs(out, int(kwargs.get("samples", 1)), inputs=[job.input_path])
            result = self.runner(job.input_path, landmark, level, condition, progress=progress,
                                 cancel=job.cancel_event.is_set, registry=self.registry, **kwargs)
            if job.cancel_event.is_set():
                raise CancelledError("cancelled by the client")
            paths = write_outputs(result, out, inputs=[job.input_path], cancel=job.cancel_event.is_set)
        except CancelledError:
            with self.lock:
                self._finish(job, "cancelled")
            return
        except SpineLDMError as e:
            with self.lock:
                self._finish(job, "error", {"kind": e.kind, "message": _one_line(e)})
            return
        except Exception as e:  # noqa: BLE001 - one line to the client, traceback in the server log
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            with self.lock:
                self._finish(job, "error", {"kind": "error",
                                            "message": f"internal error ({type(e).__name__}): {_one_line(e)}"})
            return
        with self.lock:
            job.outputs = [str(p) for p in paths]
            job.provenance = result.provenance
            job.provenances = list(result.provenances or [result.provenance])
            job.nfe, job.seconds = int(result.nfe), round(float(result.seconds), 3)
            job.device, job.peak_memory_mb = str(result.device), round(float(result.peak_memory_mb), 1)
            try:
                os.remove(job.input_path)
            except OSError:
                pass
            self._finish(job, "done")


def make_root() -> tuple[str, Any]:
    """A new upload folder ``<tmp>/spine-ldm-server-*`` with the marker file ``.spine-ldm-server`` locked (flock)
    for the life of this process: the lock is what tells a live server's folder from a stale one. The marker is
    created and locked under a temporary name, then renamed, so a marker is never seen unlocked while its server
    lives. Returns (folder, open marker file: keep it open)."""
    root = tempfile.mkdtemp(prefix=ROOT_PREFIX)
    tmp = os.path.join(root, ROOT_MARKER + ".new")
    fh = open(tmp, "w", encoding="utf-8")
    _try_lock(fh)
    fh.write(json.dumps({"pid": os.getpid(), "started": time.time(), "by": "spine-ldm serve"}) + "\n")
    fh.flush()
    os.replace(tmp, os.path.join(root, ROOT_MARKER))
    return root, fh


def _try_lock(fh) -> bool:
    """Non-blocking exclusive lock; False when another open file (a live server) holds it or locks are
    unavailable (then nothing is ever treated as stale)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no stale-folder cleaning
        return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def clean_stale_roots(base: Optional[str] = None) -> list[str]:
    """Remove the upload folders of servers that are gone: only ``spine-ldm-server-*`` folders (owned by this user,
    not symlinks) holding a marker file that no live process has locked. Folders without a marker (not ours, or
    from an older version) are left alone. Returns the removed paths."""
    base = base or tempfile.gettempdir()
    removed = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return removed
    for name in names:
        d = os.path.join(base, name)
        marker = os.path.join(d, ROOT_MARKER)
        if not name.startswith(ROOT_PREFIX) or os.path.islink(d) or not os.path.isfile(marker):
            continue
        try:
            if hasattr(os, "getuid") and os.stat(d).st_uid != os.getuid():
                continue
            fh = open(marker, "r+", encoding="utf-8")
        except OSError:
            continue
        with fh:
            if _try_lock(fh):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------- app
class _TooLarge(Exception):
    pass


class SizeLimitMiddleware:
    """413 for bodies over the limit: on Content-Length up front, and while streaming (chunked uploads: the body
    is counted as it arrives and the request is refused at the first byte over the limit, never read whole).
    Also used by the reader-study app (``max_bytes``, its own ``hint``)."""

    def __init__(self, app, max_mb: float = 512, max_bytes: Optional[int] = None,
                 hint: str = "server option --max-request-mb"):
        self.app = app
        self.max_bytes = int(max_bytes) if max_bytes is not None else int(float(max_mb) * 2 ** 20)
        self.max_mb = self.max_bytes / 2 ** 20 if max_bytes is not None else float(max_mb)
        self.in_mb = max_bytes is None  # messages in the unit the limit was given in
        self.hint = hint

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return await self._reject(send, int(value))
                except ValueError:
                    return await self._reject(send, None, status=400, message="invalid Content-Length")
        seen = 0
        started = False
        exceeded = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # the app caught _TooLarge itself (e.g. as a bad body): answer 413 instead of its reply
                if not started and message["type"] == "http.response.start":
                    started = True
                    await self._reject(send, seen)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, seen)

    async def _reject(self, send, size, status=413, message=None):
        if message is None:
            mb = self.in_mb
            got = "more" if size is None else f"{size / 2 ** 20:.3g} MB" if mb else f"{size} bytes"
            limit = f"{self.max_mb:g} MB" if mb else f"{self.max_bytes} bytes"
            message = f"request body too large: {got} > limit {limit}" + (f" ({self.hint})" if self.hint else "")
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _models_payload(registry) -> list:
    from . import registry as reg

    out = []
    for entry in reg.list_models(registry):
        d = entry.summary()
        d.pop("source", None)
        statuses = {name: s.status for name, s in reg.verify(entry).items()}
        d["files"] = statuses
        d["sha256"] = {name: f.sha256 for name, f in entry.files.items()}
        d["status"] = "ok" if all(s == "ok" for s in statuses.values()) else \
            next(s for s in ("corrupt", "missing", "not downloaded") if s in statuses.values())
        out.append(d)
    return out


def create_app(token: str, registry=None, max_request_mb: float = 512, runner: Optional[Callable] = None):
    """The FastAPI app (tests use it with ``fastapi.testclient.TestClient``). ``runner`` replaces
    :func:`spine_ldm.pipeline.inpaint` (same signature, returns an ``InpaintResult``)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse

    from .io import check_volume_file

    if not token:
        raise ValueError("create_app needs a non-empty token")
    try:  # multipart uploads (POST /jobs) need it; fail at start-up, not on the first job
        import python_multipart  # noqa: F401
    except ImportError:
        try:
            import multipart  # noqa: F401  (older python-multipart)
        except ImportError:
            raise SpineLDMError("the server needs python-multipart: pip install 'spine-ldm[serve]'") from None
    expected = token.encode("utf-8")
    manager = JobManager(runner=runner, registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        manager.shutdown()

    # no /docs, /redoc, /openapi.json: every route but /health needs the token (the contract is in the module
    # docstring and DEVELOPERS.md)
    app = FastAPI(title="SpineInpaint backend", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  description="Inpaint lumbar-spine pathology into sagittal T2 MRI (spine_ldm).")
    app.state.manager = manager
    app.add_middleware(SizeLimitMiddleware, max_mb=float(max_request_mb))

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    @app.get("/health")
    def health():
        return {"status": "ok", "version": __version__, "queued": manager.queued_count(),
                "running": manager.running()}

    @app.get("/models", dependencies=auth)
    def models():
        try:
            return {"models": _models_payload(registry)}
        except SpineLDMError as e:
            raise HTTPException(status_code=500, detail=_one_line(e))

    @app.post("/jobs", dependencies=auth, status_code=202)
    async def submit(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(status_code=415, detail="POST /jobs needs multipart/form-data (image file + params)")
        form = await request.form()
        try:
            upload, params_text = form.get("image"), form.get("params")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(status_code=422, detail="missing file field 'image' (the input volume)")
            if params_text is None:
                raise HTTPException(status_code=422, detail="missing field 'params' (JSON)")
            if hasattr(params_text, "read"):
                params_text = (await params_text.read()).decode("utf-8")
            try:
                params = parse_params(params_text)
                if params.get("model") is not None and params["model"] not in registered_model_ids(registry):
                    raise ParamError(f"model {params['model']!r} is not a registered model id (GET /models lists "
                                     "them)")
            except ValueError as e:  # JSON errors and ParamError
                raise HTTPException(status_code=422, detail=f"invalid params: {_one_line(e)}")
            except SpineLDMError as e:  # the registry itself is broken
                raise HTTPException(status_code=500, detail=_one_line(e))
            filename = os.path.basename(upload.filename or "input.nrrd").lower()
            suffix = next((s for s in ALLOWED_SUFFIXES if filename.endswith(s)), ".nrrd")
            if suffix in (".nhdr", ".mhd"):
                raise HTTPException(status_code=422, detail=f"{suffix} headers need a separate data file: "
                                                            "upload a single-file .nrrd, .nii(.gz) or .mha")
            jid, workdir = manager.new_workdir()
            input_path = os.path.join(workdir, "input" + suffix)
            with open(input_path, "wb") as f:
                while True:
                    chunk = await upload.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
            try:  # header only: a volume over the voxel limit or shorter than it claims never reaches a job
                check_volume_file(input_path)
            except SpineLDMError as e:
                shutil.rmtree(workdir, ignore_errors=True)
                raise HTTPException(status_code=422, detail=f"invalid image: {_one_line(e)}")
        finally:
            await form.close()
        try:
            job = manager.submit(jid, workdir, input_path, params)
        except OverflowError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            raise HTTPException(status_code=503, detail=str(e), headers={"Retry-After": "30"})
        return {"id": job.id, "status": job.status, "position": manager.position(job)}

    def _job(jid: str) -> Job:
        job = manager.get(jid)
        if job is None:
            raise HTTPException(status_code=404, detail=manager.unknown_job_message(jid))
        return job

    @app.get("/jobs/{jid}", dependencies=auth)
    def status(jid: str):
        job = _job(jid)
        return job.public(position=manager.position(job))

    @app.get("/jobs/{jid}/result/{k}", dependencies=auth)
    def result(jid: str, k: int):
        job = _job(jid)
        if job.status != "done":
            raise HTTPException(status_code=409, detail=f"job {jid} is {job.status}, not done")
        if not 0 <= k < len(job.outputs):
            raise HTTPException(status_code=404, detail=f"job {jid} has {len(job.outputs)} output(s), no {k}")
        path = job.outputs[k]
        return FileResponse(path, media_type="application/octet-stream", filename=f"sample_{k}" +
                            (".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]))

    @app.delete("/jobs/{jid}", dependencies=auth)
    def cancel(jid: str):
        state = manager.cancel(jid)
        if state is None:
            raise HTTPException(status_code=404, detail=manager.unknown_job_message(jid))
        return {"id": jid, "status": state}

    @app.exception_handler(SpineLDMError)
    async def _spine_error(request, exc):  # pragma: no cover - endpoints convert errors themselves
        return JSONResponse(status_code=400, content={"detail": _one_line(exc), "kind": exc.kind})

    return app


def _watch_parent(pid: int, server, interval: float = 1.0) -> None:
    """Stop ``server`` when process ``pid`` (the GUI that started this server) has ended."""
    try:
        import psutil

        parent = psutil.Process(pid)
        alive = parent.is_running  # also false when the pid was reused by another process
    except ImportError:
        if os.name != "posix":
            log.warning("--parent-pid needs psutil on this platform; the server will not follow its parent")
            return

        def alive():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
    except Exception:  # noqa: BLE001 - the parent is already gone
        alive = lambda: False  # noqa: E731

    def watch():
        while alive():
            time.sleep(interval)
        log.warning("parent process %d ended: shutting down", pid)
        server.should_exit = True
        time.sleep(10.0)
        os._exit(0)  # a job stuck in native code must not keep the process alive

    threading.Thread(target=watch, daemon=True, name="spine-ldm-parent-watch").start()


def serve(host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None, registry=None,
          max_request_mb: float = 512, parent_pid: Optional[int] = None) -> None:
    """Run the server (blocking). Without ``token`` a random one is generated and printed once.

    ``port=0`` binds a free port. Once listening, one JSON line goes to stdout:
    ``{"event": "listening", "host": ..., "port": ..., "url": "http://host:port"}``. With ``parent_pid`` the server
    shuts down when that process ends (a GUI's local worker must not outlive the GUI).
    """
    import uvicorn

    if not token:
        token = secrets.token_urlsafe(32)
        sys.stderr.write(f"spine-ldm serve: no --token given; clients must send this one:\n{token}\n")
        sys.stderr.flush()
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"spine-ldm serve: listening on {host}: plain HTTP, use a TLS reverse proxy or an SSH "
                         "tunnel on untrusted networks\n")
    logging.basicConfig(level=logging.INFO)
    app = create_app(token, registry=registry, max_request_mb=max_request_mb)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="info"))
    sock = server.config.bind_socket()  # bound before announcing: the port is taken, port 0 is resolved
    sock.listen(server.config.backlog)  # connections made before the app finished starting wait, not fail
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(json.dumps({"event": "listening", "host": host, "port": bound,
                                 "url": f"http://{shown}:{bound}"}) + "\n")
    sys.stdout.flush()
    if parent_pid:
        _watch_parent(int(parent_pid), server)
    server.run(sockets=[sock])
