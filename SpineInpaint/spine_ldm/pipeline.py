"""The one inference API: :func:`inpaint` (image + landmark -> K inpainted volumes + provenance).

Stages (one direction, plain images/arrays between them)::

    read + validate (io) -> landmark inside? (geometry) -> disc centre (given, or geometry.estimate_disc_center)
    -> FSU around the disc centre (geometry.extract_fsu, size from the model config)
    -> normalise (geometry.Normalization, fitted on the FSU) -> encode (autoencoder)
    -> W on the latent grid (weighting.gaussian_weight(geometry.latent_frame(...), landmark, sigma))
    -> K samples in one batch (diffusion samplers; conditioned on level + condition)
    -> decode -> de-normalise -> paste back with W onto the original grid (geometry.paste_back)

Methods (each needs a model trained for it, see registry):

- ``weighted`` (Hansen et al.): per-voxel noise level ``t_v = round(W t)``; model method ``weighted``.
- ``masked``: noise and denoise only inside ROI = W > 0.1; model method ``masked``.
- ``repaint``: RePaint on a whole-FSU LDM (model method ``full``) with ROI = W > 0.1.

Reproducibility: sample ``k`` (0-based) uses seed ``seed + k`` for all its random numbers (its own generator, drawn
on the CPU), so ``samples=3, seed=5`` gives as its second output what ``samples=1, seed=6`` gives (equal up to
float rounding of batched vs unbatched convolutions). The same call twice gives bit-identical arrays on the same
machine/device.

The input image object is never modified. Every voxel whose Gaussian weight is below 1e-3 (or outside the FSU) is
bit-identical to the input, and each output has the input's size, origin, spacing, direction and pixel type.
Nothing is written to disk here; :func:`write_outputs` writes the NRRDs with ``spine_ldm_*`` provenance keys.
"""
from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from . import __version__
from .conditions import GUIDANCE_RANGE, condition_index, level_index, parse_condition, parse_level
from .errors import CancelledError, InputError, ModelError

METHODS = ("weighted", "masked", "repaint")
ROI_THRESHOLD = 0.1          # baselines' region of interest: W > 0.1 (paper), unless the model records its own
DEFAULT_SIGMA_MM = 16.0      # Gaussian sigma (paper), unless the model records its training sigma
PASTE_THRESHOLD = 1e-3       # voxels with W below this are bit-identical to the input
MAX_SAMPLES = 64
EDGE_TAPER_MM = 5.0          # paste-back weight ramps to 0 over the last 5 mm inside the FSU faces
_ALIASES = {"demo-small", "default", ""}


@dataclass
class InpaintResult:
    """What :func:`inpaint` returns.

    ``outputs[k]``: the k-th inpainted volume on the input grid. ``provenance`` is the provenance of the first sample
    (``provenances`` has one dict per sample: they differ in ``seed`` and ``sample_index``). ``fsu_input`` is the FSU
    crop of the input (input intensities, float32), ``fsu_outputs[k]`` the decoded, de-normalised k-th FSU before
    paste-back, ``fsu_weight`` the Gaussian weight on the FSU grid (numpy, (SI, AP, LR)) and ``latent_weight`` W on
    the latent grid that drove the sampler.
    """

    outputs: list[sitk.Image]
    provenance: dict
    nfe: int
    seconds: float
    device: str
    peak_memory_mb: float
    provenances: list[dict] = field(default_factory=list)
    fsu_input: sitk.Image | None = None
    fsu_outputs: list[sitk.Image] = field(default_factory=list)
    fsu_reconstruction: sitk.Image | None = None
    fsu_weight: np.ndarray | None = None
    latent_weight: np.ndarray | None = None
    timings: dict = field(default_factory=dict)


def default_model_for(method: str, condition: str | None = None, registry=None) -> str:
    """The registry's default model id for ``method`` (and ``condition``: models may be trained per pathology)."""
    from .registry import default_model_id

    return default_model_id(_check_method(method), None if condition is None else parse_condition(condition),
                            registry)


def model_sigma(model: str | None = None, method: str = "weighted", condition: str | None = None,
                registry=None) -> float:
    """The Gaussian sigma (mm) :func:`inpaint` uses when none is given: the one ``model`` (default: the registry's
    default model of ``method`` for ``condition``) was trained with, 16 mm when its registry entry records none."""
    from .registry import resolve

    mid = default_model_for(method, condition, registry) if model is None else model
    return _model_sigma_roi(resolve(mid, registry), None)[0]


PASTE_MODES = ("change", "blend")


def _check_paste_mode(mode: str) -> str:
    m = str(mode).strip().lower()
    if m not in PASTE_MODES:
        raise InputError(f"unknown paste mode {mode!r}; expected one of {', '.join(PASTE_MODES)}")
    return m


def _check_method(method: str) -> str:
    m = str(method).strip().lower()
    if m not in METHODS:
        raise InputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return m


# ----------------------------------------------------------------------------------------------------------------
# model cache (the server and the demo call inpaint repeatedly)
_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 3


def load_model(model: str | None, method: str, device, registry=None, condition: str | None = None):
    """``registry.load`` with a small in-process cache (keyed by file paths + sha256s + device).

    ``model`` None (or an alias such as "demo-small") = :func:`default_model_for` ``(method, condition)``.

    The sha256 of every file is checked on each call (cheap for the demo sizes); a changed file therefore never
    reuses a stale cached network.
    """
    from . import registry as reg

    mid = default_model_for(method, condition, registry) if model is None or str(model) in _ALIASES else model
    entry = reg.resolve(mid, registry)
    need = reg.MODEL_METHOD_FOR[method]
    if entry.method != need:
        raise ModelError(f"model {entry.id!r} was trained for method {entry.method!r}, but --method {method} needs a "
                         f"{need!r} model (e.g. {default_model_for(method, condition, registry)})")
    statuses = reg.verify(entry)
    for st in statuses.values():
        if st.status == "missing":
            raise ModelError(f"missing: weights file {st.where} of model {entry.id!r} does not exist")
        if st.status == "corrupt":
            raise ModelError(f"weights file {st.where} sha256 mismatch: expected {st.expected}, got {st.actual}")
    key = (entry.id, entry.config, tuple(sorted((n, str(f.local_path()), f.sha256) for n, f in entry.files.items())),
           str(device))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    loaded = reg.load(entry, device)  # re-checks sha256 on the bytes it loads
    with _CACHE_LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


# ----------------------------------------------------------------------------------------------------------------
def _as_image(image) -> tuple[sitk.Image, str]:
    from . import io as sio

    if isinstance(image, sitk.Image):
        return sio.validate_volume(image, "input volume"), "<in-memory image>"
    if isinstance(image, (str, os.PathLike)):
        return sio.read_volume(image), Path(image).name  # file name only: no directories in shared outputs
    raise InputError(f"image must be a SimpleITK.Image or a file path, got {type(image).__name__}")


def _point(p, what: str) -> tuple[float, float, float]:
    from .geometry import as_point

    return tuple(float(v) for v in as_point(p, what))


def _fsu_image(array: np.ndarray, frame: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.CopyInformation(frame)
    return img


#: (model id, sigma) pairs already warned about (an explicit sigma that differs from the model's training sigma)
_SIGMA_WARNED: set[tuple[str, float]] = set()


def _model_sigma_roi(entry, sigma_mm: float | None) -> tuple[float, float]:
    """(sigma_mm, roi_threshold) for a model: its training values (registry ``training.sigma_mm`` /
    ``roi_threshold``; 16 mm / 0.1 when not recorded) unless ``sigma_mm`` is given; an explicit sigma that differs
    from the training sigma warns once per model and value."""
    import warnings

    from .registry import training_info

    info = training_info(entry)
    trained = float(info.get("sigma_mm") or DEFAULT_SIGMA_MM)
    roi = float(info.get("roi_threshold") or ROI_THRESHOLD)
    if sigma_mm is None:
        return trained, roi
    if abs(float(sigma_mm) - trained) > 1e-6 and (entry.id, float(sigma_mm)) not in _SIGMA_WARNED:
        _SIGMA_WARNED.add((entry.id, float(sigma_mm)))
        warnings.warn(f"sigma {float(sigma_mm):g} mm differs from the {trained:g} mm model {entry.id!r} was trained "
                      f"with; results may be weaker", UserWarning, stacklevel=3)
    return float(sigma_mm), roi


def _number(value, what: str, lo: float, hi: float, unit: str = "") -> float:
    """``value`` as a finite float in [lo, hi], else an InputError naming ``what``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number{' of' + unit if unit else ''}, got {value!r}") from None
    if not (np.isfinite(x) and lo <= x <= hi):
        raise InputError(f"{what} must be between {lo:g} and {hi:g}{unit}, got {value!r}")
    return x


def model_guidance(entry, guidance_scale: float | None = None, condition: str | None = None) -> float:
    """The classifier-free guidance scale for a model: ``guidance_scale``, else the entry's ``guidance_scale``: a
    number, or ``{condition: scale}`` per condition (a condition it does not list, or ``condition`` None, gets 1);
    1 = none when it records none. A scale != 1 needs a model that learned the healthy condition (registry
    ``training.healthy_fraction`` > 0, or "none" among ``training.conditions`` as for the full models): otherwise
    its healthy prediction is an untrained embedding, and that is an InputError."""
    from .registry import training_info

    value = entry.extra.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    if isinstance(value, dict):
        per = {parse_condition(str(k)): v for k, v in value.items()}
        value = per.get(parse_condition(condition), 1.0) if condition is not None else 1.0
    scale = _number(value, "guidance scale", *GUIDANCE_RANGE)
    info = training_info(entry)
    knows_healthy = float(info.get("healthy_fraction") or 0.0) > 0 or "none" in (info.get("conditions") or ())
    if scale != 1.0 and not knows_healthy:
        raise InputError(f"model {entry.id!r} was trained without the healthy condition, so it cannot be guided; "
                         f"use guidance scale 1 (got {scale:g})")
    return scale


def _input_and_disc(image, landmark, condition, disc_center_lps, level=None):
    """(validated image, its name, disc centre LPS, whether the centre was estimated); both points inside. The
    estimate (no ``disc_center_lps``) follows the disc's typical tilt at ``level``."""
    from . import geometry

    img, source = _as_image(image)
    geometry.check_point_inside(img, landmark, "landmark")
    estimated = disc_center_lps is None
    disc = _point(geometry.estimate_disc_center(landmark, condition, img, level) if estimated else disc_center_lps,
                  "disc centre")
    if not estimated:
        geometry.check_point_inside(img, disc, "disc centre")
    return img, source, disc, estimated


def _fsu_around(img, landmark, disc, cfg):
    """(FSUSpec, FSU image, its float32 array (SI, AP, LR), Normalization fitted on it) for the model config."""
    from . import geometry

    spec = geometry.FSUSpec(shape=tuple(cfg.fsu_shape), size_mm=tuple(cfg.fsu_size_mm))
    fsu = geometry.extract_fsu(img, disc, spec)
    dl = geometry.distance_outside_mm(fsu, landmark)
    if dl > 0:
        raise InputError(f"landmark {_fmt(landmark)} LPS lies {dl:.1f} mm outside the FSU around the disc centre "
                         f"{_fmt(disc)} "
                         f"(FSU {spec.size_mm[0]:g}x{spec.size_mm[1]:g}x{spec.size_mm[2]:g} mm); give --disc-center "
                         f"closer to the landmark")
    fsu_arr = sitk.GetArrayFromImage(fsu)  # (SI, AP, LR) float32
    return spec, fsu, fsu_arr, geometry.Normalization.fit(fsu_arr)


def reconstruct(image: sitk.Image | str | os.PathLike, landmark_lps, condition: str = "none",
                method: str = "weighted", model: str | None = None, disc_center_lps=None, device: Any = "auto",
                registry=None, decode_quantize: bool | None = None,
                level: str | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The autoencoder's reconstruction of the FSU that :func:`inpaint` would use for these arguments.

    Returns ``(fsu_input, fsu_reconstruction)`` on the same FSU frame, normalisation and autoencoder as
    :func:`inpaint` (input intensities, float32). With a pathological image this is what a perfect diffusion model
    could at best produce (the benchmark's ceiling). ``decode_quantize`` as in :func:`inpaint`.
    """
    import torch

    from .device import select_device

    method = _check_method(method)
    condition = parse_condition(condition)
    landmark = _point(landmark_lps, "landmark")
    img, _, disc, _ = _input_and_disc(image, landmark, condition, disc_center_lps,
                                      None if level is None else parse_level(level))
    dev = select_device(device)
    cfg, autoencoder, _, _, _ = load_model(model, method, dev, registry, condition=condition)
    _, fsu, fsu_arr, norm = _fsu_around(img, landmark, disc, cfg)
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(norm.forward(fsu_arr), dtype=np.float32))[None, None].to(dev)
        recon = autoencoder.decode(autoencoder.encode(x), quantize=_decode_quantize(cfg, decode_quantize))
        recon = recon.float().cpu().numpy()[0, 0]
    return fsu, _fsu_image(norm.inverse(recon.astype(np.float64)), fsu)


def inpaint(image: sitk.Image | str | os.PathLike, landmark_lps, level: str, condition: str, method: str = "weighted",
            samples: int = 1, seed: int = 0, steps: int = 50, sigma_mm: float | None = None, device: Any = "auto",
            model: str | None = None, disc_center_lps=None, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None, registry=None, batch_size: int | None = None,
            edge_taper_mm: float = EDGE_TAPER_MM, repaint_jump: int = 10,
            repaint_resample: int = 10, paste_mode: str = "change",
            timestep_spacing: str | None = None, decode_quantize: bool | None = None,
            guidance_scale: float | None = None) -> InpaintResult:
    """Inpaint ``condition`` at ``landmark_lps`` (LPS mm) into ``image``; K = ``samples`` variants.

    ``model``: registry id, model directory or zip; ``None`` = the registry's default model of ``method`` for
    ``condition`` (:func:`registry.default_model_id`; bundled: one model per method and pathology family).
    ``progress(step, total)`` is called after each diffusion step; ``cancel()`` returning True raises
    :class:`CancelledError` at the next step. ``batch_size`` caps the batch (default: all K at once; halved on
    CUDA out-of-memory). ``edge_taper_mm`` ramps the paste-back weight to 0 at the FSU faces over that distance
    (no seam where the Gaussian is still large at a face; 0 = plain W).
    ``repaint_jump`` / ``repaint_resample``: RePaint's jump length and number of resamplings (defaults 10 / 10 as in
    Lugmayr et al.; 410 network evaluations at 50 steps, 130 with resample 3); ignored by the other methods.
    ``paste_mode``: ``"change"`` (default) adds only the model's change to the input, ``input + W * (decoded sample
    - autoencoder reconstruction of the input)``, so anatomy the model did not change keeps the scan's own detail;
    ``"blend"`` is the paper's ``W * decoded + (1 - W) * input`` (see :func:`geometry.paste_back`).
    ``sigma_mm`` None = the sigma the model was trained with (registry ``training.sigma_mm``, else 16 mm); a
    different explicit value warns once. The baselines' ROI threshold is the model's ``training.roi_threshold``
    (else 0.1). ``timestep_spacing`` None = the model config's ``sampling.spacing`` ("leading" | "trailing").
    ``decode_quantize`` None = the model config's ``sampling.decode_quantize``: True snaps the sampled latent (and
    the input's, for the reference reconstruction) to the VQ codebook before decoding.
    ``guidance_scale`` None = the model's registry ``guidance_scale`` (1 when it records none): s != 1 is
    classifier-free guidance against the healthy condition, ``eps_healthy + s (eps - eps_healthy)`` (2 network
    evaluations per step); only for a model that learned the healthy condition (:func:`model_guidance`).
    Raises InputError / ModelError / DeviceError / CancelledError with one-line messages.
    """
    import torch

    from . import geometry, weighting
    from .device import PeakMemory, describe, run_with_oom_retry, select_device

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    method = _check_method(method)
    level, condition = parse_level(level), parse_condition(condition)
    try:
        samples, seed, steps = int(samples), int(seed), int(steps)
    except (TypeError, ValueError):
        raise InputError(f"samples, seed and steps must be integers, got {samples!r}, {seed!r}, {steps!r}") from None
    if not 1 <= samples <= MAX_SAMPLES:
        raise InputError(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    if not 1 <= steps <= 1000:
        raise InputError(f"steps must be between 1 and 1000, got {steps}")
    if sigma_mm is not None:
        sigma_mm = _number(sigma_mm, "sigma_mm", 0.5, 100.0, " mm")
    try:
        repaint = {"jump_length": int(repaint_jump), "jump_n_sample": int(repaint_resample)}
    except (TypeError, ValueError):
        raise InputError(f"repaint jump/resample must be integers, got {repaint_jump!r}, {repaint_resample!r}") from None
    if method == "repaint" and not (repaint["jump_length"] >= 1 and 1 <= repaint["jump_n_sample"] <= 50):
        raise InputError(f"repaint jump must be >= 1 and resample 1..50, got {repaint_jump}, {repaint_resample}")
    repaint["jump_length"] = min(repaint["jump_length"], steps)  # a jump cannot go back further than the schedule
    paste_mode = _check_paste_mode(paste_mode)
    landmark = _point(landmark_lps, "landmark")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")

    img, source, disc, estimated = _input_and_disc(image, landmark, condition, disc_center_lps, level)
    dev = select_device(device)
    timings["prepare"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    cfg, autoencoder, unet, entry, shas = load_model(model, method, dev, registry, condition=condition)
    timings["load_model"] = time.perf_counter() - t0

    sigma_mm, roi_threshold = _model_sigma_roi(entry, sigma_mm)
    guidance = model_guidance(entry, guidance_scale, condition)
    spacing = cfg.sampling.spacing if timestep_spacing is None else str(timestep_spacing)
    if spacing not in ("leading", "trailing"):
        raise InputError(f"timestep spacing {timestep_spacing!r} unknown; use leading or trailing")
    quantize = _decode_quantize(cfg, decode_quantize)
    spec, fsu, fsu_arr, norm = _fsu_around(img, landmark, disc, cfg)
    lat_grid = geometry.latent_frame(fsu, cfg.latent_factors)
    w_lat = weighting.gaussian_weight(lat_grid, landmark, sigma_mm)  # (SI, AP, LR) latent numpy order
    w_fsu = weighting.gaussian_weight(fsu, landmark, sigma_mm)
    if method != "weighted" and not weighting.roi_mask(w_lat, roi_threshold).any():
        raise InputError(f"the region W > {roi_threshold} is empty on the latent grid (sigma {sigma_mm} mm is too "
                         f"small for the latent spacing); use a larger sigma")

    from .diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_config(cfg)
    lvl = level_index(level)
    cnd = condition_index(condition)
    seeds = [seed + k for k in range(samples)]

    with PeakMemory(dev) as pm, torch.inference_mode():
        x = torch.from_numpy(np.asarray(norm.forward(fsu_arr), dtype=np.float32))[None, None].to(dev)
        t0 = time.perf_counter()
        z0 = autoencoder.encode(x)
        recon = autoencoder.decode(z0, quantize=quantize)
        timings["encode_decode_reference"] = time.perf_counter() - t0
        W = torch.from_numpy(w_lat)[None, None].to(dev)

        def run(batch: int):
            zs, nfe_total = [], 0
            n_chunks = (samples + batch - 1) // batch

            for c in range(n_chunks):
                ks = list(range(c * batch, min(samples, (c + 1) * batch)))

                def prog(step, total, _c=c):
                    if progress is not None:
                        # one progress sequence over all chunks
                        progress(_c * total + int(step), n_chunks * total)

                z, nfe = _sample(method, unet, schedule, z0, W, [seeds[k] for k in ks], steps, lvl, cnd, dev,
                                 prog, cancel, cfg.sampling.sampler, repaint, roi_threshold, spacing, guidance)
                zs.append(z)
                nfe_total = nfe  # network evaluations per sample chain (the same for every chunk)
            return torch.cat(zs, 0), nfe_total

        t0 = time.perf_counter()
        zK, nfe = run_with_oom_retry(run, batch_size or samples, dev)
        timings["sample"] = time.perf_counter() - t0
        if cancel is not None and cancel():
            raise CancelledError("cancelled (nothing was written)")
        t0 = time.perf_counter()
        decoded = torch.cat([autoencoder.decode(zK[i:i + 1], quantize=quantize) for i in range(samples)], 0)
        decoded = decoded.float().cpu().numpy()
        timings["decode"] = time.perf_counter() - t0
        recon_np = recon.float().cpu().numpy()[0, 0]

    t0 = time.perf_counter()
    fsu_outs, outs = [], []
    recon_img = _fsu_image(norm.inverse(recon_np.astype(np.float64)), fsu)
    for k in range(samples):
        arr = norm.inverse(decoded[k, 0].astype(np.float64)).astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ModelError(f"model {entry.id!r} produced non-finite values for sample {k + 1}")
        f_img = _fsu_image(arr, fsu)
        fsu_outs.append(f_img)
        outs.append(geometry.paste_back(img, f_img, landmark, sigma_mm, threshold=PASTE_THRESHOLD,
                                        edge_taper_mm=float(edge_taper_mm),
                                        reference_fsu=recon_img if paste_mode == "change" else None))
    timings["paste_back"] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    base = {
        "spine_ldm_version": __version__, "model_id": entry.id, "model_method": entry.method,
        "model_config": cfg.name, "weights_sha256": dict(shas), "method": method, "seed": seed,
        "base_seed": seed, "sample_index": 1, "samples": samples, "steps": steps,
        "sampler": _sampler_name(method, cfg), "nfe": nfe, "sigma_mm": sigma_mm,
        "landmark_lps": _clean(landmark), "landmark_ras": _clean(geometry.lps_to_ras(landmark)),
        "disc_center_lps": _clean(disc), "disc_center_estimated": estimated, "level": level,
        "condition": condition, "device": describe(dev), "created": created, "input": source,
        "fsu_shape": list(spec.shape), "fsu_size_mm": list(spec.size_mm), "normalization": norm.to_dict(),
        "paste_threshold": PASTE_THRESHOLD, "edge_taper_mm": float(edge_taper_mm), "paste_mode": paste_mode,
        "timestep_spacing": spacing, "decode_quantize": quantize, "guidance_scale": guidance,
    }
    if method == "repaint":
        base.update(repaint_jump=repaint["jump_length"], repaint_resample=repaint["jump_n_sample"])
    if method != "weighted":
        base["roi_threshold"] = roi_threshold
    provs = [{**base, "seed": seeds[k], "sample_index": k + 1} for k in range(samples)]
    return InpaintResult(outputs=outs, provenance=provs[0], nfe=nfe, seconds=seconds, device=describe(dev),
                         peak_memory_mb=float(pm.mb), provenances=provs, fsu_input=fsu, fsu_outputs=fsu_outs,
                         fsu_reconstruction=recon_img,
                         fsu_weight=w_fsu, latent_weight=w_lat, timings=timings)


def _decode_quantize(cfg, value: bool | None) -> bool:
    """The decode's codebook snapping: ``value``, else the model config's ``sampling.decode_quantize``."""
    if value is None:
        return bool(cfg.sampling.decode_quantize)
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"decode_quantize must be true or false, got {value!r}")
    return bool(value)


def _fmt(p) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in p) + ")"


def _clean(p) -> list[float]:
    return [float(v) + 0.0 for v in p]  # no "-0.0" in provenance


def _sampler_name(method: str, cfg) -> str:
    s = cfg.sampling.sampler
    return {"weighted": f"weighted-{s}", "masked": f"masked-{s}", "repaint": "repaint-ddpm"}[method]


def _sample(method, unet, schedule, z0, W, seeds, steps, lvl, cnd, dev, progress, cancel, sampler="plms",
            repaint=None, roi_threshold=ROI_THRESHOLD, spacing="trailing", guidance_scale: float = 1.0):
    """Run the sampler of ``method`` for len(seeds) samples; returns (latents (B, C, ...), nfe).

    Each sample gets its own CPU generator seeded with its seed. Samplers that accept a list of per-sample
    generators get the whole batch at once; otherwise the samples run one after another (same numbers, slower).
    ``guidance_scale`` != 1: classifier-free guidance against the healthy condition
    (:func:`diffusion.unet_model_fn`); nfe then counts both evaluations of each call.
    """
    import torch

    from . import diffusion
    from .device import autocast

    guided = float(guidance_scale) != 1.0

    def model_fn_for(b):
        lvl_t = torch.full((b,), lvl, dtype=torch.long, device=dev)
        cnd_t = torch.full((b,), cnd, dtype=torch.long, device=dev)
        inner = diffusion.unet_model_fn(unet, lvl_t, cnd_t, w=W.expand(b, *W.shape[1:]),
                                        guidance_scale=guidance_scale, null_cond_idx=condition_index("none"))

        def model_fn(x, t, t_voxel):
            with autocast(dev):
                return inner(x, t, t_voxel).float()

        return model_fn

    def call(b, generator, prog):
        zb = z0.expand(b, *z0.shape[1:]).contiguous()
        Wb = W.expand(b, *W.shape[1:]).contiguous()
        kw = dict(steps=steps, generator=generator, schedule=schedule, progress=prog, cancel=cancel, spacing=spacing)
        fn = model_fn_for(b)
        if method == "weighted":
            x, info = diffusion.sample_weighted(fn, zb, Wb, sampler=sampler, **kw)
        elif method == "masked":
            x, info = diffusion.sample_masked(fn, zb, Wb > roi_threshold, sampler=sampler, **kw)
        else:
            x, info = diffusion.sample_repaint(fn, zb, Wb > roi_threshold, **(repaint or {}), **kw)
        # a guided call evaluates the U-Net on the conditional and the healthy half of a doubled batch
        return x, {**info, "nfe": int(info["nfe"]) * (2 if guided else 1)}

    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    if len(gens) == 1 and dev.type == "cpu" and not guided and _LIST_GENERATORS.get(method, True):
        # Batch-1 3D convolutions hit a slow CPU path (~1.8x slower per step than batch 2 for the small U-Net), so
        # one sample runs as a batch of two: lane 0 has the sample's own generator (same random numbers as alone),
        # lane 1 is a discarded twin with the same seed. (Guidance already doubles the U-Net's batch.)
        try:
            z, nfe = _unpack(call(2, [gens[0], torch.Generator(device="cpu").manual_seed(int(seeds[0]))], progress))
            return z[:1], nfe
        except InputError as e:
            if "generator must be" not in str(e):
                raise
            _LIST_GENERATORS[method] = False
    if len(gens) == 1:
        return _unpack(call(1, gens[0], progress))
    if _LIST_GENERATORS.get(method, True):
        try:
            return _unpack(call(len(gens), gens, progress))
        except InputError as e:
            if "generator must be" not in str(e):
                raise
            _LIST_GENERATORS[method] = False
    outs, nfe = [], 0
    n = len(gens)
    for k, g in enumerate(gens):
        def prog(step, total, _k=k):
            if progress is not None:
                progress(_k * total + int(step), n * total)

        z, nfe = _unpack(call(1, g, prog))
        outs.append(z)
    return torch.cat(outs, 0), nfe


#: whether the samplers take one generator per sample (probed once per method)
_LIST_GENERATORS: dict[str, bool] = {}


def _unpack(res):
    x, info = res
    return x, int(info["nfe"] if isinstance(info, dict) else info)


# ----------------------------------------------------------------------------------------------------------------
def provenance_header(prov: dict) -> dict[str, str]:
    """NRRD header keys ``spine_ldm_<key>`` (values JSON-encoded unless plain strings)."""
    import json

    out = {}
    for k, v in prov.items():
        key = k if k.startswith("spine_ldm_") else f"spine_ldm_{k}"
        out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _stem_suffix(p: Path) -> tuple[str, str]:
    """``a.nii.gz`` -> ("a", ".nii.gz"); ``a.nrrd`` -> ("a", ".nrrd"); ``a`` -> ("a", "")."""
    name = p.name
    suffix = name[-7:] if name.lower().endswith(".nii.gz") else p.suffix
    return (name[: len(name) - len(suffix)] if suffix else name), suffix


def output_paths(out: str | os.PathLike, samples: int) -> list[Path]:
    """``OUT.nrrd`` for one sample, else ``OUT_1.nrrd`` .. ``OUT_K.nrrd`` (``.nii.gz`` handled)."""
    p = Path(out)
    if samples == 1:
        return [p]
    stem, suffix = _stem_suffix(p)
    return [p.with_name(f"{stem}_{k}{suffix}") for k in range(1, samples + 1)]


#: formats whose header keeps arbitrary ``spine_ldm_*`` keys; every other format gets a ``<stem>.json`` sidecar
HEADER_FORMATS = (".nrrd", ".nhdr")


def sidecar_path(p: str | os.PathLike) -> Path:
    """``a.nii.gz`` -> ``a.json`` (the provenance sidecar of a format without free header keys)."""
    p = Path(p)
    return p.with_name(f"{_stem_suffix(p)[0]}.json")


def check_outputs(out: str | os.PathLike, samples: int, inputs=()) -> list[Path]:
    """Every file a run with ``samples`` samples writes for ``out`` (the outputs and, for formats without free
    header keys, their ``<stem>.json`` sidecars), each checked with :func:`spine_ldm.io.check_output_path`:
    refused (InputError, one line naming the path) when it is one of ``inputs`` (same path, symlink or hard link)
    or cannot be written. The CLI calls it before any work, the server before a job runs, :func:`write_outputs`
    again before writing; the Slicer glue can call it on the paths it chooses. Returns the files."""
    from . import io as sio

    files: list[Path] = []
    for p in output_paths(out, samples):
        files.append(p)
        if _stem_suffix(p)[1].lower() not in HEADER_FORMATS:
            files.append(sidecar_path(p))
    for f in files:
        sio.check_output_path(f, inputs)
    return files


def write_outputs(result: InpaintResult, out: str | os.PathLike, inputs=(),
                  cancel: Callable[[], bool] | None = None) -> list[Path]:
    """Write every output with its provenance in ``spine_ldm_*`` header keys; returns the paths. Formats that
    cannot keep such keys (NIfTI, MetaImage, ...) get the provenance as a JSON sidecar ``<stem>.json`` instead.

    All or nothing: every file is first written under a hidden temporary name in its target folder (registered
    for removal before it is created), ``cancel()`` is asked before each file and before the renames, and only
    then are all files renamed into place. Any exception, ``KeyboardInterrupt`` included, or a cancel removes
    every temporary file and every output already renamed, so either all outputs exist complete or none does
    (:class:`CancelledError` on cancel). Outputs that are one of ``inputs`` or cannot be written are refused first
    (:func:`check_outputs`); write errors are one-line InputErrors naming the path.
    """
    import json

    from . import io as sio

    paths = output_paths(out, len(result.outputs))
    check_outputs(out, len(paths), inputs)
    pending: list[tuple[Path, Path]] = []  # (temporary, final), registered before the temporary file exists
    committed: list[Path] = []

    def check_cancel():
        if cancel is not None and cancel():
            raise CancelledError("cancelled while writing the outputs (nothing was written)")

    try:
        try:
            for img, prov, p in zip(result.outputs, result.provenances or [result.provenance], paths):
                check_cancel()
                p.parent.mkdir(parents=True, exist_ok=True)
                stem, suffix = _stem_suffix(p)
                tmp = p.with_name(f".{stem}.partial{os.getpid()}{suffix}")
                header = suffix.lower() in HEADER_FORMATS
                pending.append((tmp, p))
                sio.write_volume(img, tmp, metadata=provenance_header(prov) if header else None)
                if not header:
                    side = sidecar_path(p)
                    tmp_side = side.with_name(f".{side.name}.partial{os.getpid()}")
                    pending.append((tmp_side, side))
                    tmp_side.write_text(json.dumps({"spine_ldm_provenance": prov, "image": p.name}, indent=2,
                                                   default=str) + "\n", encoding="utf-8")
            check_cancel()
            for tmp, p in pending:
                os.replace(tmp, p)
                committed.append(p)
        except OSError as exc:
            where = exc.filename or (pending[-1][1] if pending else out)
            raise InputError(f"cannot write '{where}': {exc.strerror or exc}") from None
    except BaseException:
        for p in committed:  # all or nothing
            if p.exists():
                p.unlink()
        raise
    finally:
        for tmp, _ in pending:
            if tmp.exists():
                tmp.unlink()
    return paths
