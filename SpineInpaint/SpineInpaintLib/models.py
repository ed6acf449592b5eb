"""Versioned model list and model manager for the panel: ``Models.json`` entries with their sha256 status.

Reads the registry through ``spine_ldm.registry`` (pure Python: json + hashlib, no torch). Hashing large weights is
cached per file (path, size, mtime), so re-opening the module does not re-hash unchanged files.

Model manager (``*Task`` functions): verifying the list (hashing), importing a trained model zip
(``registry.import_zip``: into the user cache, every sha256 checked) and downloading the files of a registry entry
that names a URL (``registry.download``: progress, cancel, sha256 before the file is used) all run as
``tasks.BackgroundTask``s, never on the GUI thread. Nothing is ever downloaded that the user did not add.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

_HASH_CACHE: dict[tuple, str] = {}


@dataclass
class ModelInfo:
    id: str
    method: str  # what the U-Net was trained for: weighted | masked | full
    config: str
    description: str = ""
    license: str = ""
    trainingData: str = ""
    status: str = "unknown"  # ok | missing | corrupt | not downloaded | unknown
    messages: list = field(default_factory=list)
    sha256: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "not downloaded")

    def label(self) -> str:
        mark = {"ok": "sha256 ok", "missing": "MISSING", "corrupt": "CORRUPT", "not downloaded": "not downloaded",
                "unknown": "unchecked"}.get(self.status, self.status)
        return f"{self.id} ({self.config}, {self.method}) [{mark}]"

    def tooltip(self) -> str:
        lines = [self.description or self.id, f"config: {self.config}", f"trained for: {self.method}"]
        if self.trainingData:
            lines.append(f"training data: {self.trainingData}")
        if self.license:
            lines.append(f"license: {self.license}")
        lines += self.messages
        return "\n".join(lines)


def inpaintMethodsFor(modelMethod: str) -> list[str]:
    from spine_ldm.registry import MODEL_METHOD_FOR

    return [m for m, mm in MODEL_METHOD_FOR.items() if mm == modelMethod]


def defaultModelFor(method: str, condition: Optional[str] = None, registry: Optional[str] = None) -> str:
    """The model the backend runs for ``method`` (and ``condition``: a registry can flag one default model per
    pathology) when the panel says "default for this method"; "" when the registry has none."""
    from spine_ldm import registry as reg
    from spine_ldm.errors import SpineLDMError

    try:
        return reg.default_model_id(method, condition, registry or None)
    except SpineLDMError:
        return ""


def _cachedSha(path) -> Optional[str]:
    from spine_ldm.registry import sha256_file

    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def fileStatus(fileRef) -> tuple[str, str]:
    """(status, message) of one registry file reference, hashing through the cache."""
    local = fileRef.local_path()
    if not os.path.isfile(local):
        if fileRef.path is None:
            return "not downloaded", f"{fileRef.name}: not downloaded yet ({fileRef.url})"
        return "missing", f"{fileRef.name}: missing: {local}"
    actual = _cachedSha(local)
    if actual != fileRef.sha256:
        return "corrupt", (f"{fileRef.name}: sha256 mismatch for {local}: expected {fileRef.sha256[:12]}..., "
                           f"got {str(actual)[:12]}...")
    return "ok", f"{fileRef.name}: ok"


def listModels(registry: Optional[str] = None, verify: bool = True) -> list[ModelInfo]:
    """All registered models (main registry, then the user registry), optionally sha256-verified."""
    from spine_ldm.registry import list_models

    out = []
    for entry in list_models(registry or None):
        info = ModelInfo(id=entry.id, method=entry.method, config=os.path.basename(str(entry.config)),
                         description=entry.description, license=entry.license, trainingData=entry.training_data,
                         sha256={n: f.sha256 for n, f in entry.files.items()})
        if verify:
            statuses = [fileStatus(f) for f in entry.files.values()]
            info.messages = [m for _, m in statuses]
            order = ("corrupt", "missing", "not downloaded", "ok")
            info.status = next(s for s in order if any(st == s for st, _ in statuses))
        out.append(info)
    return out


def modelsForMethod(models: list[ModelInfo], method: str) -> list[ModelInfo]:
    """Models that can run the inpainting ``method`` (RePaint uses 'full' models)."""
    return [m for m in models if method in inpaintMethodsFor(m.method)]


def fromRemote(entries: list) -> list[ModelInfo]:
    """ModelInfo list from a remote server's ``GET /models`` answer (status as verified on the server)."""
    out = []
    for d in entries or []:
        if not isinstance(d, dict) or "id" not in d:
            continue
        files = d.get("files") or {}
        out.append(ModelInfo(id=str(d["id"]), method=str(d.get("method", "")),
                             config=os.path.basename(str(d.get("config", ""))),
                             description=str(d.get("description", "")), license=str(d.get("license", "")),
                             trainingData=str(d.get("training_data", "")), status=str(d.get("status", "unknown")),
                             messages=[f"{name}: {st} (on the server)" for name, st in files.items()],
                             sha256=dict(d.get("sha256") or {})))
    return out


# ---------------------------------------------------------------------------------------------- model manager
def listModelsTask(registry: Optional[str] = None):
    """Background task: ``listModels(registry, verify=True)`` (hashes the weights)."""
    from .tasks import BackgroundTask

    return BackgroundTask(lambda progress, cancelled: listModels(registry, verify=True), "checking models").start()


def needsDownload(info: ModelInfo) -> bool:
    return info.status == "not downloaded"


def downloadTask(modelId: str, registry: Optional[str] = None):
    """Background task: fetch the URL files of ``modelId`` into the cache with progress (bytes of all files),
    sha256-verified; cancellable. Its result is the model's refreshed ``ModelInfo``."""
    from .tasks import BackgroundTask

    def run(progress, cancelled):
        from spine_ldm import registry as reg

        entry = reg.resolve(modelId, registry or None)
        pending = [f for f in entry.files.values() if f.path is None]
        done = {}

        def report(name, got, total):
            done[name] = (got, total)
            totals = [t for _, t in done.values()]
            whole = sum(totals) if len(done) == len(pending) and all(totals) else None
            mb = sum(g for g, _ in done.values()) / 2 ** 20
            progress(None if not whole else sum(g for g, _ in done.values()) / whole,
                     f"downloading {modelId}: {mb:.1f} MB")

        reg.download(entry, progress=report, cancel=cancelled)
        progress(1.0, f"checking {modelId}")
        return next(m for m in listModels(registry, verify=True) if m.id == modelId)

    return BackgroundTask(run, f"downloading {modelId}").start()


def importTask(zipPath: str, replace: bool = False):
    """Background task: import a trained model zip into the user cache (``spine-ldm models import``); the result
    is the imported model's id."""
    from .tasks import BackgroundTask

    def run(progress, cancelled):
        from spine_ldm import registry as reg

        progress(None, f"importing {os.path.basename(zipPath)}")
        return reg.import_zip(zipPath, replace=replace).id

    return BackgroundTask(run, "importing a model").start()
