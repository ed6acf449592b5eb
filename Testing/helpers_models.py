"""Test helper: randomly initialised tiny weights + a temporary ``Models.json`` registry.

For tests by everyone (no trained weights needed)::

    from helpers_models import make_registry
    reg = make_registry(tmp_path)                 # demo-small-{weighted,masked,full}, config "small"
    result = spine_ldm.pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=reg, steps=3)

or with pytest's ``monkeypatch.setenv("SPINE_LDM_REGISTRY", str(reg))`` for code that reads the default registry
(e.g. a ``python -m spine_ldm`` subprocess). Weights are deterministic for a given ``seed``. Files are written
once per directory; building the small models takes well under a second.

``make_model_dir`` / ``make_model_zip`` build a model directory / zip (``model.json`` + weights) as
:func:`spine_ldm.registry.import_zip` and ``--model PATH`` read them. ``corrupt`` flips one byte of a file.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch

DEFAULT_IDS = {"weighted": "demo-small-weighted", "masked": "demo-small-masked", "full": "demo-small-full"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def save_random_weights(out_dir: str | Path, config: str = "small", seed: int = 0, prefix: str = "rand",
                        unet_seeds: dict[str, int] | None = None, methods=("weighted", "masked", "full"),
                        latent_scale: float | None = None) -> dict[str, Path]:
    """Write ``{prefix}-autoencoder.pt`` and one ``{prefix}-{method}-unet.pt`` per method into ``out_dir``.

    Returns ``{"autoencoder": path, "weighted": path, ...}``. Deterministic for a given seed.
    """
    from spine_ldm.models import build_models

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"autoencoder": out / f"{prefix}-autoencoder.pt"}
    for m in methods:
        paths[m] = out / f"{prefix}-{m}-unet.pt"
    if all(p.exists() for p in paths.values()):
        return paths
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        ae, _ = build_models(config)
        if latent_scale is not None:
            ae.latent_scale.fill_(float(latent_scale))
        torch.save(ae.state_dict(), paths["autoencoder"])
        for i, m in enumerate(methods):
            torch.manual_seed((unet_seeds or {}).get(m, seed + 1 + i))
            _, un = build_models(config)
            torch.save(un.state_dict(), paths[m])
    finally:
        torch.random.set_rng_state(state)
    return paths


def entry_for(model_id: str, method: str, ae_path: Path, unet_path: Path, base: Path, config: str = "small") -> dict:
    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    return {"id": model_id, "description": f"random-init test weights ({method})", "method": method,
            "config": config,
            "files": {"autoencoder": {"path": rel(ae_path), "sha256": _sha(ae_path)},
                      "unet": {"path": rel(unet_path), "sha256": _sha(unet_path)}},
            "training_data": "none (random initialisation, for tests only)", "license": "Apache-2.0"}


def make_registry(tmp_dir: str | Path, config: str = "small", seed: int = 0, ids: dict[str, str] | None = None,
                  name: str = "Models.json") -> Path:
    """A registry file in ``tmp_dir`` with random-init models for weighted, masked and full (RePaint).

    Default ids are the pipeline's defaults (``demo-small-weighted``, ``demo-small-masked``, ``demo-small-full``),
    so ``inpaint(..., registry=path)`` works without ``model=``.
    """
    tmp = Path(tmp_dir)
    ids = {**DEFAULT_IDS, **(ids or {})}
    paths = save_random_weights(tmp / "Models", config=config, seed=seed, prefix=f"rand-{config}-{seed}")
    models = [entry_for(ids[m], m, paths["autoencoder"], paths[m], tmp, config) for m in ("weighted", "masked", "full")]
    reg = tmp / name
    reg.write_text(json.dumps({"version": 1, "models": models}, indent=2))
    return reg


def make_model_dir(out_dir: str | Path, model_id: str = "test-imported", method: str = "weighted",
                   config: str = "small", seed: int = 7) -> Path:
    """A model directory (``model.json`` + two weight files) for ``--model DIR`` and zips."""
    d = Path(out_dir)
    paths = save_random_weights(d, config=config, seed=seed, prefix=model_id, methods=(method,))
    entry = entry_for(model_id, method, paths["autoencoder"], paths[method], d, config)
    (d / "model.json").write_text(json.dumps(entry, indent=2))
    return d


def make_model_zip(zip_path: str | Path, model_id: str = "test-imported", method: str = "weighted",
                   config: str = "small", seed: int = 7, subfolder: str = "") -> Path:
    """A model zip (what ``spine-ldm models import`` reads)."""
    zp = Path(zip_path)
    src = make_model_dir(zp.parent / f".{zp.stem}-src", model_id, method, config, seed)
    with zipfile.ZipFile(zp, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"{subfolder}{f.name}")
    return zp


def corrupt(path: str | Path, offset: int = -100) -> None:
    """Flip one byte of a file (sha256 no longer matches)."""
    p = Path(path)
    b = bytearray(p.read_bytes())
    b[offset] ^= 0xFF
    p.write_bytes(bytes(b))


def make_test_volume(spacing=(4.0, 1.25, 1.25), extent_mm=(100.0, 120.0, 120.0), seed: int = 0, dtype="int16"):
    """(image, landmark_lps, disc_centre_lps): a small sagittal-like volume (LPS; i = L->R, j = A->P,
    k = S->I, like the real scans) of smooth random texture, with a slightly oblique direction so the FSU frame
    is not axis-aligned. The disc centre is near the volume centre, the landmark 18 mm posterior of it.
    Use the phantom (``spine_ldm.phantom``) for anatomy; this is for geometry and plumbing tests."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    size = [int(round(e / s)) for e, s in zip(extent_mm, spacing)]
    arr = rng.normal(0.0, 1.0, size=size[::-1]).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(arr), 1.5)
    a = sitk.GetArrayFromImage(img)
    a = (a - a.min()) / (a.max() - a.min()) * 1200.0 + 50.0
    a = a.astype(np.dtype(dtype))
    out = sitk.GetImageFromArray(a)
    ang = np.deg2rad(8.0)  # 8 degrees in-plane tilt (sagittal plane)
    rot = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    d = rot @ np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    sp = np.asarray(spacing, dtype=float)
    out.SetSpacing(tuple(float(v) for v in sp))
    out.SetDirection(tuple(float(v) for v in d.reshape(-1)))
    out.SetOrigin(tuple(float(v) for v in (np.array([3.0, -5.0, 12.0]) - (d * sp[None, :]) @ ((np.asarray(size) - 1) / 2.0))))
    disc = tuple(float(v) for v in out.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in size]))
    lm = (disc[0], disc[1] + 18.0, disc[2])
    return out, lm, disc
