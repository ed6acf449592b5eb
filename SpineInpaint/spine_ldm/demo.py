"""``spine-ldm demo``: the whole tool in one command, with the bundled demo weights.

1. Generate a healthy lumbar T2 phantom (seed 0) and write it as ``phantom_t2.nrrd``.
2. Inpaint a moderate/large disc herniation at L4-L5 (landmark = the herniation's centre, 4 mm behind the posterior
   disc margin: ``geometry.herniation_landmark``) and a severe central canal stenosis at L3-L4 with the three
   methods (weighted, masked, RePaint), one sample each (same seed).
3. Write every output NRRD (input grid, ``spine_ldm_*`` provenance) and ``comparison.png``: one row per case,
   columns input | weighted | masked | RePaint, the sagittal slice through the landmark (superior up, anterior
   left, the landmark marked), plus ``demo_summary.json``.
4. ``--real``: when ``../shared/data/lumbar_t2`` exists next to the repository, also inpaint DH at L4-L5 of the real
   scan ``ivd_11_t2.nrrd`` (disc centre from ``ivd_11_discs.json``; landmark 20 mm posterior of it).

The demo weights are small (config ``small``) and trained on phantoms: the demo shows the workflow, not clinical
quality. Without registered demo weights it stops with a ModelError saying what is missing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import InputError, ModelError

METHODS = ("weighted", "masked", "repaint")
CASES = (  # name, level, condition
    ("dh_L4-L5", "L4-L5", "dh_moderate_large"),
    ("ccs_L3-L4", "L3-L4", "ccs_severe"),
)
#: landmark offset (mm) posterior of the disc centre, when the phantom does not give a landmark
POSTERIOR_OFFSET_MM = {"dh": 20.0, "ccs": 28.0}


def shared_lumbar_dir() -> Path:
    """``<repo>/../shared/data/lumbar_t2`` (repo = the folder holding ``SpineInpaint/``)."""
    import spine_ldm

    return Path(spine_ldm.__file__).resolve().parents[2].parent / "shared" / "data" / "lumbar_t2"


def check_demo_weights(registry=None) -> None:
    """Every model the demo uses (the registry's default per method and case condition) is registered and its
    files verify; else a ModelError that says how to get them."""
    from . import registry as reg

    where = registry or reg.default_registry_path()
    ids, missing = [], []
    for _, _, condition in CASES:
        for m in METHODS:
            try:
                ids.append(reg.default_model_id(m, condition, registry))
            except ModelError:
                missing.append(f"a {m} model for {condition}")
    ids = list(dict.fromkeys(ids))
    known = {e.id for e in reg.list_models(registry)}
    missing = list(dict.fromkeys(missing + [i for i in ids if i not in known]))
    if missing:
        raise ModelError(f"demo weights are not registered in {where}: missing {', '.join(missing)} "
                         f"(train them with model_training, or pass --registry FILE)")
    for i in ids:
        for st in reg.verify(i, registry).values():
            if st.status not in ("ok", "not downloaded"):
                raise ModelError(f"demo model {i}: {st.message()}")


def _posterior_axis(image: sitk.Image) -> np.ndarray:
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    p = int(np.argmax(np.abs(d[1, :])))
    col = d[:, p]
    return col if d[1, p] > 0 else -col


def _phantom_case(seed: int = 0):
    """(image, disc centres {level: lps}, landmarks {(level, kind): lps}) of a healthy phantom.

    DH landmark = the phantom's posterior disc margin (the demo moves it to the herniation's centre,
    ``geometry.herniation_landmark``); CCS landmark = the centre of the thecal sac at the level.
    """
    from . import phantom

    case = phantom.generate(seed=seed)
    meta = case.landmarks
    discs = {lv: tuple(d["center_LPS_mm"]) for lv, d in meta["discs"].items()}
    lms = {}
    for lv, d in meta["discs"].items():
        if "posterior_margin_LPS_mm" in d:
            lms[(lv, "dh")] = tuple(d["posterior_margin_LPS_mm"])
    for lv, c in meta.get("canal", {}).items():
        if "center_LPS_mm" in c:
            lms[(lv, "ccs")] = tuple(c["center_LPS_mm"])
    return case.image, discs, lms


def sagittal_slice(image: sitk.Image, center_lps, width_mm: float = 90.0, height_mm: float = 90.0,
                   pixel_mm: float = 0.5) -> np.ndarray:
    """2D array of the sagittal plane through ``center_lps``: row 0 = superior, column 0 = anterior."""
    ref = sitk.Image([int(width_mm / pixel_mm), int(height_mm / pixel_mm), 1], sitk.sitkFloat32)
    # columns of the direction: i -> posterior (+y), j -> inferior (-z), k -> left-right
    ref.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    ref.SetSpacing((pixel_mm, pixel_mm, 1.0))
    c = np.asarray(center_lps, dtype=float)
    ref.SetOrigin(tuple(c + np.array([0.0, -width_mm / 2, height_mm / 2])))
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)[0]


def landmark_patch_change(output: sitk.Image, reference: sitk.Image, landmark_lps, patch_mm: float = 8.0,
                          pixel_mm: float = 0.4) -> float:
    """Mean intensity change (output - reference) in a ``patch_mm`` square at the landmark of the sagittal slice
    through it, divided by the reference slice's intensity range (1st..99.5th percentile). On T2 a herniation
    (dark disc material in bright CSF) or a stenosis (narrowed bright thecal sac) makes it clearly negative."""
    a, b = (sagittal_slice(im, landmark_lps, 60.0, 60.0, pixel_mm) for im in (output, reference))
    lo, hi = np.percentile(b, [1, 99.5])
    c, r = np.array(b.shape) // 2, int(round(patch_mm / pixel_mm / 2))
    win = (slice(c[0] - r, c[0] + r), slice(c[1] - r, c[1] + r))
    return float((a[win].mean() - b[win].mean()) / max(hi - lo, 1e-6))


def mark_landmark(ax, x: float, y: float, gap: float, length: float, color: str = "yellow", lw: float = 1.0) -> None:
    """Crosshair with a gap at (x, y) in the axes' data units: four ticks from ``gap`` to ``gap + length`` off the
    point, so the pathology drawn at the landmark stays visible (a filled ``+`` marker hides a small herniation)."""
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        ax.plot([x + gap * dx, x + (gap + length) * dx], [y + gap * dy, y + (gap + length) * dy], color=color, lw=lw)


def comparison_png(rows: list[dict], path: Path, title: str = "") -> Path:
    """rows: {"label", "landmark", "images": {column: sitk.Image}} -> PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["input", *METHODS]
    names = {"input": "input", "weighted": "weighted", "masked": "masked", "repaint": "RePaint"}
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 3.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        sl_in = sagittal_slice(row["images"]["input"], row["landmark"])
        lo, hi = np.percentile(sl_in, [1, 99.5])
        for c, col in enumerate(cols):
            ax = axes[r][c]
            ax.axis("off")
            if col not in row["images"]:
                continue
            sl = sagittal_slice(row["images"][col], row["landmark"])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
            h, w = sl.shape
            mark_landmark(ax, w / 2, h / 2, gap=12, length=12)  # pixels of 0.5 mm: 6 mm gap
            ax.set_title(f"{names[col]}" + (f"\n{row['label']}" if c == 0 else ""), fontsize=9)
    fig.suptitle(title or "SpineInpaint demo (sagittal slice through the landmark; superior up, anterior left)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir="spine_ldm_demo", real: bool = False, device="auto", steps: int = 50, samples: int = 1,
             seed: int = 0, registry=None, repaint_resample: int = 3,
             progress: Callable[[int, int], None] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the summary dict (also written to ``demo_summary.json``)."""
    from . import geometry
    from . import io as sio
    from . import pipeline

    check_demo_weights(registry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image, discs, lms = _phantom_case(seed=0)
    in_path = sio.write_volume(image, out / "phantom_t2.nrrd")
    log(f"phantom (seed 0) -> {in_path}")
    summary: dict = {"input": str(in_path), "cases": [], "png": None}
    rows = []
    for name, level, condition in CASES:
        kind = condition.split("_")[0]
        disc = discs[level]
        lm = lms.get((level, kind))
        if lm is None:
            lm = tuple(np.asarray(disc) + POSTERIOR_OFFSET_MM[kind] * _posterior_axis(image))
        elif kind == "dh":  # the herniation's centre, where the models were trained to draw it
            lm = geometry.herniation_landmark(lm, disc, condition)
        row = {"label": f"{condition} at {level}", "landmark": lm, "images": {"input": image}}
        for method in METHODS:
            log(f"{name}: {method} ...")
            res = pipeline.inpaint(image, lm, level, condition, method=method, samples=samples, seed=seed,
                                   steps=steps, device=device, disc_center_lps=disc, progress=progress,
                                   registry=registry, repaint_resample=repaint_resample)
            paths = pipeline.write_outputs(res, out / f"{name}_{method}.nrrd")
            row["images"][method] = res.outputs[0]
            summary["cases"].append({"case": name, "level": level, "condition": condition, "method": method,
                                     "outputs": [str(p) for p in paths], "seconds": round(res.seconds, 2),
                                     "nfe": res.nfe, "device": res.device, "landmark_lps": list(lm),
                                     "disc_center_lps": list(disc)})
            log(f"  -> {', '.join(str(p) for p in paths)} ({res.seconds:.1f} s, {res.nfe} network evaluations)")
        rows.append(row)
    if real:
        rows.append(_real_case(out, device, steps, samples, seed, registry, progress, log, summary,
                               repaint_resample))
    png = comparison_png(rows, out / "comparison.png")
    summary["png"] = str(png)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"comparison -> {png}")
    log(f"summary -> {out / 'demo_summary.json'}")
    return summary


def _real_case(out, device, steps, samples, seed, registry, progress, log, summary, repaint_resample=3) -> dict:
    from . import io as sio
    from . import pipeline

    d = shared_lumbar_dir()
    img_p, discs_p = d / "ivd_11_t2.nrrd", d / "ivd_11_discs.json"
    if not img_p.is_file() or not discs_p.is_file():
        raise InputError(f"--real needs {img_p} and {discs_p} (shared data next to the repository)")
    image = sio.read_volume(img_p)
    disc = tuple(json.loads(discs_p.read_text())["discs"]["L4-L5"]["center_LPS_mm"])
    lm = tuple(np.asarray(disc) + POSTERIOR_OFFSET_MM["dh"] * _posterior_axis(image))
    row = {"label": "real ivd_11: dh_moderate_large at L4-L5", "landmark": lm, "images": {"input": image}}
    for method in METHODS:
        log(f"real ivd_11 L4-L5: {method} ...")
        res = pipeline.inpaint(image, lm, "L4-L5", "dh_moderate_large", method=method, samples=samples, seed=seed,
                               steps=steps, device=device, disc_center_lps=disc, progress=progress,
                               registry=registry, repaint_resample=repaint_resample)
        paths = pipeline.write_outputs(res, out / f"real_ivd11_dh_L4-L5_{method}.nrrd")
        row["images"][method] = res.outputs[0]
        summary["cases"].append({"case": "real_ivd11_dh_L4-L5", "level": "L4-L5", "condition": "dh_moderate_large",
                                 "method": method, "outputs": [str(p) for p in paths],
                                 "seconds": round(res.seconds, 2), "nfe": res.nfe, "device": res.device,
                                 "landmark_lps": list(lm), "disc_center_lps": list(disc)})
        log(f"  -> {', '.join(str(p) for p in paths)}")
    return row
