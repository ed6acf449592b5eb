"""Model registry: ``Models.json``, sha256 verification, import, list, load.

Registry file format (``version`` 1)::

    {"version": 1, "models": [
      {"id": "demo-small-weighted", "description": "...", "method": "weighted",
       "config": "small",
       "files": {"autoencoder": {"path": "Models/demo-small-autoencoder.pt", "sha256": "..."},
                 "unet":        {"path": "Models/demo-small-weighted-unet.pt", "sha256": "..."}},
       "training_data": "...", "license": "..."}]}

- ``method`` is what the U-Net was trained for: ``weighted`` | ``masked`` | ``full`` (``full`` = whole-FSU
  LDM, used by the RePaint sampler).
- ``config`` is ``"small"`` | ``"paper"`` (bundled YAML) or a path to a YAML file (relative to the JSON file).
- Each file has ``path`` (relative to the JSON file, or absolute) **or** ``url`` (user-added entries only;
  downloaded once into the cache and verified), and the ``sha256`` of its bytes.
- Weights are ``torch.save``-d state dicts. They are loaded with ``torch.load(weights_only=True)`` from the very
  bytes whose sha256 was checked (no re-read between check and load).

Where registries live:

- the main registry: ``SpineInpaint/Resources/Models.json`` next to the package, or env ``SPINE_LDM_REGISTRY``, or
  an explicit ``registry=`` argument / ``--registry FILE``;
- the user registry: ``<cache>/Models.json`` with ``<cache>`` = env ``SPINE_LDM_CACHE`` or ``~/.cache/spine_ldm``;
  :func:`import_zip` writes there and :func:`list_models` merges it after the main registry (an id in the main
  registry wins).

A model directory or zip (for ``--model PATH`` and :func:`import_zip`) holds a ``model.json`` with one entry in the
format above (paths relative to ``model.json``) plus the weight files.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CancelledError, ModelError

REGISTRY_VERSION = 1
MODEL_METHODS = ("weighted", "masked", "full")
REQUIRED_FILES = ("autoencoder", "unet")
#: inpainting method -> the model method it needs
MODEL_METHOD_FOR = {"weighted": "weighted", "masked": "masked", "repaint": "full"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# ----------------------------------------------------------------------------------------------------------------
# locations
def package_registry_path() -> Path:
    """``SpineInpaint/Resources/Models.json`` (located relative to the installed package)."""
    import spine_ldm

    return Path(spine_ldm.__file__).resolve().parents[1] / "Resources" / "Models.json"


def default_registry_path() -> Path:
    env = os.environ.get("SPINE_LDM_REGISTRY")
    return Path(env).expanduser() if env else package_registry_path()


def cache_dir() -> Path:
    env = os.environ.get("SPINE_LDM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spine_ldm"


def user_registry_path() -> Path:
    return cache_dir() / "Models.json"


# ----------------------------------------------------------------------------------------------------------------
# entries
@dataclass
class FileRef:
    name: str
    sha256: str
    path: Path | None = None  # absolute
    url: str | None = None

    def local_path(self) -> Path:
        """Where the bytes are (the cache location for URL files)."""
        if self.path is not None:
            return self.path
        return cache_dir() / "downloads" / f"{self.sha256}.pt"

    def where(self) -> str:
        return str(self.path) if self.path is not None else str(self.url)


@dataclass
class ModelEntry:
    id: str
    method: str
    config: str  # "small" | "paper" | absolute path to a YAML file
    files: dict[str, FileRef]
    description: str = ""
    training_data: str = ""
    license: str = ""
    source: str = ""  # the registry / model.json it came from
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, relative_to: Path | None = None) -> dict:
        """The JSON form (paths relative to ``relative_to`` when they lie below it)."""
        files = {}
        for name, f in self.files.items():
            d: dict[str, Any] = {"sha256": f.sha256}
            if f.path is not None:
                p = f.path
                if relative_to is not None:
                    try:
                        p = p.relative_to(relative_to)
                    except ValueError:
                        pass
                d["path"] = p.as_posix()
            if f.url is not None:
                d["url"] = f.url
            files[name] = d
        cfg = self.config
        if cfg not in ("small", "paper") and relative_to is not None:
            try:
                cfg = Path(cfg).relative_to(relative_to).as_posix()
            except ValueError:
                pass
        out = {"id": self.id, "description": self.description, "method": self.method, "config": cfg,
               "files": files, "training_data": self.training_data, "license": self.license}
        out.update(self.extra)
        return out

    def summary(self) -> dict:
        return {"id": self.id, "method": self.method, "config": self.config, "description": self.description,
                "training_data": self.training_data, "license": self.license, "source": self.source}


def _parse_entry(d: Any, base: Path, source: str) -> ModelEntry:
    if not isinstance(d, dict):
        raise ModelError(f"{source}: model entry must be an object, got {type(d).__name__}")
    mid = d.get("id")
    if not isinstance(mid, str) or not _ID_RE.match(mid):
        raise ModelError(f"{source}: invalid model id {mid!r} (letters, digits, '.', '_', '-'; at most 100)")
    method = d.get("method")
    if method not in MODEL_METHODS:
        raise ModelError(f"{source}: model {mid!r} has method {method!r}; expected one of {', '.join(MODEL_METHODS)}")
    cfg = d.get("config", "small")
    if not isinstance(cfg, str) or not cfg:
        raise ModelError(f"{source}: model {mid!r} has an invalid config {cfg!r}")
    if cfg not in ("small", "paper"):
        cfg = str((base / cfg).resolve()) if not Path(cfg).is_absolute() else cfg
    files_d = d.get("files")
    if not isinstance(files_d, dict):
        raise ModelError(f"{source}: model {mid!r} has no 'files' object")
    files: dict[str, FileRef] = {}
    for name in REQUIRED_FILES:
        if name not in files_d:
            raise ModelError(f"{source}: model {mid!r} lacks files.{name}")
    for name, fd in files_d.items():
        if not isinstance(fd, dict):
            raise ModelError(f"{source}: model {mid!r} files.{name} must be an object")
        sha = str(fd.get("sha256", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ModelError(f"{source}: model {mid!r} files.{name} has no valid sha256 (64 hex digits)")
        path, url = fd.get("path"), fd.get("url")
        if path is None and url is None:
            raise ModelError(f"{source}: model {mid!r} files.{name} needs 'path' or 'url'")
        p = None
        if path is not None:
            p = Path(path).expanduser()
            p = p if p.is_absolute() else (base / p)
            p = Path(os.path.normpath(p))
        if url is not None and urllib.parse.urlparse(str(url)).scheme not in ("http", "https", "file"):
            raise ModelError(f"{source}: model {mid!r} files.{name} url must be http(s) or file, got {url!r}")
        files[name] = FileRef(name=name, sha256=sha, path=p, url=url)
    known = {"id", "method", "config", "files", "description", "training_data", "license"}
    return ModelEntry(id=mid, method=method, config=cfg, files=files, description=str(d.get("description", "")),
                      training_data=str(d.get("training_data", "")), license=str(d.get("license", "")),
                      source=source, extra={k: v for k, v in d.items() if k not in known})


def read_registry(path: str | os.PathLike, missing_ok: bool = True) -> list[ModelEntry]:
    """Entries of one registry file (``[]`` when the file does not exist and ``missing_ok``)."""
    path = Path(path).expanduser()
    if not path.exists():
        if missing_ok:
            return []
        raise ModelError(f"model registry {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model registry {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelError(f"model registry {path} must be an object with a 'models' list")
    if data.get("version", REGISTRY_VERSION) != REGISTRY_VERSION:
        raise ModelError(f"model registry {path} has version {data.get('version')!r}; this spine_ldm reads version "
                         f"{REGISTRY_VERSION}")
    entries = [_parse_entry(d, path.parent.resolve(), str(path)) for d in data["models"]]
    ids = [e.id for e in entries]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ModelError(f"model registry {path} lists id(s) {', '.join(dup)} more than once")
    return entries


def _other_sections(path: Path) -> dict:
    """Top-level sections of an existing registry file other than ``version`` / ``models`` (e.g. the benchmark's
    ``readers``: ``model_training.benchmark.readers``), kept when the file is rewritten."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in old.items() if k not in ("version", "models")} if isinstance(old, dict) else {}


def write_registry(path: str | os.PathLike, entries: list[ModelEntry]) -> None:
    """Write a registry atomically (paths relative to its folder where possible; other top-level sections of an
    existing file are kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    data = {"version": REGISTRY_VERSION, "models": [e.to_json(relative_to=base) for e in entries],
            **_other_sections(path)}
    fd, tmp = tempfile.mkstemp(prefix=".Models.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def ensure_registry(path: str | os.PathLike | None = None) -> Path:
    """Create an empty registry (``{"version": 1, "models": []}``) if it does not exist yet."""
    p = Path(path) if path is not None else default_registry_path()
    if not p.exists():
        write_registry(p, [])
    return p


def list_models(registry: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Entries of the main registry, then those of the user registry whose ids are not taken."""
    main = read_registry(registry if registry is not None else default_registry_path())
    seen = {e.id for e in main}
    user_path = user_registry_path()
    user = []
    main_path = Path(registry if registry is not None else default_registry_path()).expanduser()
    if user_path.exists() and user_path.resolve() != main_path.resolve():
        user = [e for e in read_registry(user_path) if e.id not in seen]
    return main + user


def training_info(entry: ModelEntry) -> dict:
    """The entry's ``training`` record (``{}`` when absent): steps, conditions, sigma_mm, roi_threshold, ..."""
    t = entry.extra.get("training")
    return t if isinstance(t, dict) else {}


def default_model_id(method: str, condition: str | None = None,
                     registry: str | os.PathLike | None = None) -> str:
    """The default model of an inpainting ``method`` (weighted | masked | repaint) for ``condition``.

    Entries flagged ``"default": true`` are candidates; the first one (main registry first, then the user registry)
    whose model method fits and whose ``training.conditions`` include ``condition`` wins, so a registry can hold one
    model per pathology (Hansen et al. train the LDMs per pathology). Without a flagged entry: the first registered
    model of that method (no model ids are hard-coded).
    """
    if method not in MODEL_METHOD_FOR:
        raise ModelError(f"unknown method {method!r}; expected one of {', '.join(MODEL_METHOD_FOR)}")
    need = MODEL_METHOD_FOR[method]
    entries = list_models(registry)
    flagged = [e for e in entries if e.extra.get("default") is True and e.method == need]
    for e in flagged:
        conds = training_info(e).get("conditions")
        if condition is None or not conds or condition in conds:
            return e.id
    if flagged:
        raise ModelError(f"no default {method} model for condition {condition!r} in the registry (defaults: "
                         f"{', '.join(e.id + ' ' + str(training_info(e).get('conditions')) for e in flagged)}); "
                         f"pass a model id")
    for e in entries:
        if e.method == need:
            return e.id
    reg = registry if registry is not None else default_registry_path()
    raise ModelError(f"no {need} model in registry {reg} (registered: {', '.join(e.id for e in entries) or 'none'}); "
                     f"the {method} method needs one")


def get_entry(model_id: str, registry: str | os.PathLike | None = None) -> ModelEntry:
    entries = list_models(registry)
    for e in entries:
        if e.id == model_id:
            return e
    reg = registry if registry is not None else default_registry_path()
    known = ", ".join(e.id for e in entries) or "none"
    raise ModelError(f"unknown model {model_id!r} in registry {reg} (registered: {known})")


def _entry_from_model_json(mj: Path) -> ModelEntry:
    try:
        d = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{mj} is not valid JSON: {e}") from None
    if isinstance(d, dict) and isinstance(d.get("models"), list):  # a whole registry with one entry
        if len(d["models"]) != 1:
            raise ModelError(f"{mj} must describe exactly one model, found {len(d['models'])}")
        d = d["models"][0]
    return _parse_entry(d, mj.parent.resolve(), str(mj))


def _safe_extract(zf: zipfile.ZipFile, dest: Path) -> None:
    dest = dest.resolve()
    for info in zf.infolist():
        target = (dest / info.filename).resolve()
        if not str(target).startswith(str(dest) + os.sep) and target != dest:
            raise ModelError(f"zip member {info.filename!r} would be written outside the target folder")
        if info.external_attr >> 16 & 0o170000 == 0o120000:
            raise ModelError(f"zip member {info.filename!r} is a symbolic link; refusing")
    zf.extractall(dest)


def _zip_model_root(zf: zipfile.ZipFile, zip_path: Path) -> str:
    names = [n for n in zf.namelist() if n.endswith("model.json")]
    names = [n for n in names if n == "model.json" or n.endswith("/model.json")]
    if not names:
        raise ModelError(f"{zip_path} has no model.json (a model zip holds model.json plus its weight files)")
    names.sort(key=lambda n: n.count("/"))
    if len(names) > 1 and names[0].count("/") == names[1].count("/"):
        raise ModelError(f"{zip_path} holds several model.json files at the same depth: {names[:3]}")
    return names[0][: -len("model.json")]


def resolve(id_or_path: str | os.PathLike, registry: str | os.PathLike | None = None) -> ModelEntry:
    """A registry id, a model directory holding ``model.json``, a ``model.json`` file, or a model zip.

    A zip is extracted (once, keyed by its sha256) under ``<cache>/unpacked/`` without registering it.
    """
    s = str(id_or_path)
    p = Path(s).expanduser()
    looks_like_path = os.sep in s or "/" in s or s.endswith((".zip", ".json")) or p.exists()
    if not looks_like_path:
        return get_entry(s, registry)
    if p.is_dir():
        mj = p / "model.json"
        if not mj.exists():
            raise ModelError(f"model directory {p} has no model.json")
        return _entry_from_model_json(mj)
    if p.is_file() and p.name.endswith(".json"):
        return _entry_from_model_json(p)
    if p.is_file() and zipfile.is_zipfile(p):
        digest = sha256_file(p)
        dest = cache_dir() / "unpacked" / digest[:16]
        if not (dest / ".complete").exists():
            with zipfile.ZipFile(p) as zf:
                root = _zip_model_root(zf, p)
                tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_mkdir(dest.parent)))
                _safe_extract(zf, tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            (dest / ".root").write_text(root)
            (dest / ".complete").write_text(str(p))
        root = (dest / ".root").read_text()
        return _entry_from_model_json(dest / root / "model.json")
    if p.exists():
        raise ModelError(f"{p} is neither a model directory, a model.json nor a zip file")
    raise ModelError(f"model {s!r} not found: no such file or directory, and not a registered model id")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ----------------------------------------------------------------------------------------------------------------
# hashing, verification, download
def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class FileStatus:
    name: str
    status: str  # "ok" | "missing" | "corrupt" | "not downloaded"
    where: str
    expected: str
    actual: str | None = None

    def message(self) -> str:
        if self.status == "ok":
            return f"{self.name}: ok ({self.where})"
        if self.status == "missing":
            return f"{self.name}: missing: {self.where}"
        if self.status == "not downloaded":
            return f"{self.name}: not downloaded yet: {self.where}"
        return (f"{self.name}: corrupt: weights file {self.where} sha256 mismatch: expected {self.expected}, "
                f"got {self.actual}")


def _file_status(f: FileRef) -> FileStatus:
    lp = f.local_path()
    if not lp.is_file():
        return FileStatus(f.name, "not downloaded" if f.path is None else "missing", f.where(), f.sha256)
    actual = sha256_file(lp)
    return FileStatus(f.name, "ok" if actual == f.sha256 else "corrupt", str(lp), f.sha256, actual)


def verify(model: str | ModelEntry, registry: str | os.PathLike | None = None) -> dict[str, FileStatus]:
    """sha256 of each file of a model: ``{name: FileStatus}`` with status ok / missing / corrupt / not downloaded."""
    entry = model if isinstance(model, ModelEntry) else resolve(model, registry)
    return {name: _file_status(f) for name, f in entry.files.items()}


def _download(f: FileRef, progress=None, cancel=None) -> Path:
    """Download a URL file into the cache (only for entries the user added) and verify it.

    ``progress(done_bytes, total_bytes_or_None)`` is called after each block; ``cancel()`` returning True stops the
    download (:class:`CancelledError`). The bytes land under a temporary name and are moved into the cache only
    after their sha256 matched, so an interrupted or corrupt download never looks like a cached file.
    """
    dest = f.local_path()
    if dest.is_file() and sha256_file(dest) == f.sha256:
        return dest
    _mkdir(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=dest.parent)
    h = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(f.url, timeout=60) as resp:  # noqa: S310
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                for block in iter(lambda: resp.read(1 << 20), b""):
                    if cancel is not None and cancel():
                        raise CancelledError(f"download of {f.url} cancelled")
                    h.update(block)
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except OSError as e:
            raise ModelError(f"could not download {f.url}: {e}") from None
        if h.hexdigest() != f.sha256:
            raise ModelError(f"weights file {f.url} sha256 mismatch: expected {f.sha256}, got {h.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def download(model: str | ModelEntry, registry: str | os.PathLike | None = None, progress=None,
             cancel=None) -> dict[str, Path]:
    """Fetch every URL file of a model into the cache (verified; files already there are kept).

    ``progress(name, done_bytes, total_bytes_or_None)``, ``cancel()`` as in the single-file download. Returns the
    local path of every file. Raises ModelError (unreachable URL, sha256 mismatch) or CancelledError.
    """
    entry = model if isinstance(model, ModelEntry) else resolve(model, registry)
    out = {}
    for name, f in entry.files.items():
        if f.path is None:
            report = None if progress is None else (lambda done, total, _n=name: progress(_n, done, total))
            out[name] = _download(f, progress=report, cancel=cancel)
        else:
            out[name] = f.local_path()
    return out


def read_verified(f: FileRef, allow_download: bool = True) -> bytes:
    """The bytes of a weights file after checking their sha256 (raises ModelError: missing / mismatch)."""
    if f.path is None:
        if not allow_download:
            raise ModelError(f"missing: weights file {f.url} is not downloaded")
        _download(f)
    lp = f.local_path()
    if not lp.is_file():
        raise ModelError(f"missing: weights file {lp} does not exist")
    data = lp.read_bytes()
    actual = sha256_bytes(data)
    if actual != f.sha256:
        raise ModelError(f"weights file {lp} sha256 mismatch: expected {f.sha256}, got {actual}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# loading
class LoadedModel(NamedTuple):
    cfg: Any
    autoencoder: Any
    unet: Any
    entry: ModelEntry
    sha256s: dict[str, str]


def load_config_for(entry: ModelEntry):
    from .models.config import load_config

    try:
        return load_config(entry.config)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - config problems are model problems for the user
        raise ModelError(f"model {entry.id!r}: cannot read config {entry.config!r}: {e}") from None


def _state_dict(data: bytes, where: str) -> dict:
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"weights file {where} is not a loadable torch state dict: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"weights file {where} holds a {type(obj).__name__}, not a state dict")
    return obj


def _load_into(module, sd: dict, where: str, entry: ModelEntry) -> None:
    try:
        res = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ModelError(f"weights file {where} does not fit config {entry.config!r} of model {entry.id!r}: "
                         f"{len(lines)} tensor shape mismatch(es), e.g. {lines[0] if lines else str(e)[:200]}") from None
    missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected:
        raise ModelError(f"weights file {where} does not fit config {entry.config!r} of model {entry.id!r}: "
                         f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")


def load(model: str | os.PathLike | ModelEntry, device: Any = "cpu",
         registry: str | os.PathLike | None = None) -> LoadedModel:
    """Build the models of an entry and load its weights (after their sha256 matched).

    Returns ``(cfg, autoencoder, unet, entry, sha256s)``; both modules are in eval mode on ``device``.
    """
    from .models import build_models

    entry = model if isinstance(model, ModelEntry) else resolve(model, registry)
    blobs = {name: read_verified(f) for name, f in entry.files.items() if name in REQUIRED_FILES}
    cfg = load_config_for(entry)
    try:
        built = build_models(cfg)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model {entry.id!r}: cannot build the networks of config {entry.config!r}: {e}") from None
    autoencoder, unet = built[0], built[1]
    for name, module in (("autoencoder", autoencoder), ("unet", unet)):
        where = entry.files[name].where()
        _load_into(module, _state_dict(blobs[name], where), where, entry)
        module.to(device).eval()
    return LoadedModel(cfg, autoencoder, unet, entry, {n: entry.files[n].sha256 for n in blobs})


# ----------------------------------------------------------------------------------------------------------------
# import / export
def import_zip(zip_path: str | os.PathLike, replace: bool = False) -> ModelEntry:
    """Copy a model zip (``model.json`` + weight files) into ``<cache>/models/<id>/``, verify every sha256, and
    register it in the user registry (``<cache>/Models.json``). Returns the registered entry."""
    zp = Path(zip_path).expanduser()
    if not zp.is_file():
        raise ModelError(f"model zip {zp} does not exist")
    if not zipfile.is_zipfile(zp):
        raise ModelError(f"{zp} is not a zip file")
    cache = _mkdir(cache_dir())
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=cache))
    try:
        with zipfile.ZipFile(zp) as zf:
            root = _zip_model_root(zf, zp)
            _safe_extract(zf, tmp)
        src_root = tmp / root
        entry = _entry_from_model_json(src_root / "model.json")
        for name, f in entry.files.items():
            if f.path is None:
                continue
            if not str(f.path.resolve()).startswith(str(src_root.resolve()) + os.sep):
                raise ModelError(f"{zp}: files.{name} path {f.path} points outside the zip")
            st = _file_status(f)
            if st.status != "ok":
                raise ModelError(f"{zp}: {st.message()}")
        dest = cache / "models" / entry.id
        user = read_registry(user_registry_path())
        if any(e.id == entry.id for e in user) and not replace:
            raise ModelError(f"model {entry.id!r} is already imported ({dest}); remove it or import with replace")
        _mkdir(dest.parent)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(src_root), str(dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    new = _entry_from_model_json(dest / "model.json")
    new.source = str(user_registry_path())
    user = [e for e in read_registry(user_registry_path()) if e.id != new.id] + [new]
    write_registry(user_registry_path(), user)
    return new


def export_zip(model: str | ModelEntry, zip_path: str | os.PathLike,
               registry: str | os.PathLike | None = None) -> Path:
    """Write a model zip (``model.json`` + weight files, sha-verified) that :func:`import_zip` reads."""
    entry = model if isinstance(model, ModelEntry) else resolve(model, registry)
    e2 = copy.deepcopy(entry)
    zp = Path(zip_path)
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, f in entry.files.items():
            data = read_verified(f)
            arc = f"{entry.id}-{name}.pt"
            zf.writestr(arc, data)
            e2.files[name] = FileRef(name=name, sha256=f.sha256, path=Path(arc))
        if e2.config not in ("small", "paper"):
            cfg_arc = "config.yaml"
            zf.write(e2.config, cfg_arc)
            e2.config = cfg_arc
        d = e2.to_json()
        zf.writestr("model.json", json.dumps(d, indent=2) + "\n")
    return zp
