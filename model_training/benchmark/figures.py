"""Benchmark figures (``DIR/figures/``):

* ``<condition>.png`` (``<condition>_s<sigma>.png`` in a sigma sweep): one block of two rows per case (the first
  ``--figure-cases`` seeds): the sagittal slice through the landmark (anterior left, superior up) and the axial
  reformat perpendicular to the canal (anterior up, patient right on the left); columns healthy | truth | each
  method's K samples. Same grey window per case (the healthy slice's 1st-99.5th percentile); landmark: a crosshair
  with a gap; the dashed circle is the W > 0.1 region (the baselines' ROI) where the plane cuts it; number = the
  output's cos.
* ``summary.png``: bar chart per condition (rows) and metric (columns) with 95 % intervals; the cos panel marks the
  ceiling (the truth's autoencoder reconstruction) with a black tick.
* ``sigma_sweep.png`` (``--sigma-sweep``): cos, R^2, sharpness and present rate against sigma per method.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from spine_ldm.conditions import CONDITION_LABELS
from spine_ldm.demo import mark_landmark
from spine_ldm.weighting import weight_radius_mm

from .report import METHOD_LABELS

COLORS = {"weighted": "#1b9e77", "masked": "#d95f02", "repaint": "#7570b3"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int) -> Path:
    """PNG with an adaptive 256-colour palette (the grey images and the few overlay colours fit; ~1/3 the bytes of
    RGBA: these figures go into the repository's docs)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    Image.open(buf).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)
    _plt().close(fig)
    return Path(path)


def case_grid(cases, methods, samples: int, path: Path, title: str) -> Path | None:
    """The per-condition grid (see the module docstring) from the stored views of ``cases``."""
    from .run import VIEW_MM

    cases = [(r, a) for r, a in cases if "view_sag_H" in a]
    if not cases:
        return None
    plt = _plt()
    cols = [("H", "healthy"), ("P", "truth")] + [(f"{m}_{k}", f"{METHOD_LABELS.get(m, m)} #{k}")
                                                 for m in methods for k in range(1, samples + 1)]
    n_rows = 2 * len(cases)
    size = 1.75
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(size * len(cols) + 0.6, size * n_rows + 0.7),
                             squeeze=False, gridspec_kw={"wspace": 0.03, "hspace": 0.03})
    half = VIEW_MM / 2
    ext = [-half, half, half, -half]
    for ci, (rec, arr) in enumerate(cases):
        sigma = float(rec["rows"][0]["sigma_mm"])
        r_roi = weight_radius_mm(sigma, 0.1)
        cos = {(r["method"], r["sample"]): r["cos"] for r in rec["rows"]}
        lo, hi = np.percentile(arr["view_sag_H"], [1, 99.5])
        for vi, view in enumerate(("sag", "ax")):
            for j, (key, label) in enumerate(cols):
                ax = axes[2 * ci + vi][j]
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
                a = arr.get(f"view_{view}_{key}")
                if a is None:
                    continue
                ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="bilinear")
                ax.add_patch(plt.Circle((0, 0), r_roi, fill=False, ls="--", lw=0.6, color="#33c3ff", alpha=0.8))
                mark_landmark(ax, 0.0, 0.0, gap=2.5, length=3.5, lw=0.8)  # mm
                ax.set_xlim(-half, half)
                ax.set_ylim(half, -half)
                if ci == 0 and vi == 0:
                    ax.set_title(label, fontsize=7)
                if j == 0:
                    what = "sagittal" if view == "sag" else "axial"
                    ax.text(-half + 1.5, half - 2, f"{rec['seed']} {rec['level']}\n{what}", color="white",
                            fontsize=5.5, va="bottom")
                if vi == 0 and j >= 2:
                    m, k = key.rsplit("_", 1)
                    v = cos.get((m, int(k)))
                    if v is not None and math.isfinite(v):
                        ax.text(half - 1.5, half - 2, f"cos {v:+.2f}", color="white", fontsize=5.5, ha="right",
                                va="bottom")
    fig.suptitle(title, fontsize=8, y=0.995)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (size * n_rows + 0.7))
    return save(fig, path, 110)


SUMMARY_METRICS = (("cos", "cos (shape; black: ceiling)"), ("r2", "R$^2$"), ("sharp", "sharpness"),
                   ("geom_ratio", "geometry ratio"), ("present", "present rate"), ("c2st_auc", "C2ST AUC"))


def _val(d, key):
    v = d.get(key, {})
    return v.get("mean", np.nan), v.get("lo", np.nan), v.get("hi", np.nan)


def summary_chart(cells: dict, methods, conditions, path: Path, title: str) -> Path:
    plt = _plt()
    conditions = [c for c in conditions if c in cells]
    fig, axes = plt.subplots(len(conditions), len(SUMMARY_METRICS),
                             figsize=(2.1 * len(SUMMARY_METRICS), 1.9 * len(conditions) + 0.5), squeeze=False)
    x = np.arange(len(methods))
    for i, c in enumerate(conditions):
        for j, (key, label) in enumerate(SUMMARY_METRICS):
            ax = axes[i][j]
            vals = [_val(cells[c].get(m, {}), key) for m in methods]
            mean = np.array([v[0] for v in vals], float)
            err = np.array([[max(0.0, v[0] - v[1]) if math.isfinite(v[1]) else 0.0 for v in vals],
                            [max(0.0, v[2] - v[0]) if math.isfinite(v[2]) else 0.0 for v in vals]])
            ax.bar(x, np.nan_to_num(mean), yerr=err, color=[COLORS.get(m, "grey") for m in methods], capsize=2,
                   error_kw={"lw": 0.8})
            if key == "cos":
                ceil = [_val(cells[c].get(m, {}), "cos_ceiling")[0] for m in methods]
                ax.scatter(x, ceil, marker="_", s=160, color="black", zorder=3, label="ceiling")
            if key in ("present", "c2st_auc", "geom_ratio", "sharp"):
                ax.axhline(0.5 if key == "c2st_auc" else 1.0, color="grey", lw=0.6, ls=":")
            if key in ("present", "c2st_auc"):
                ax.set_ylim(0, 1.12)
            elif key == "cos":
                ax.set_ylim(min(-0.1, np.nanmin(np.r_[mean, 0.0]) - 0.1), 1.05)
            for xi, v, e in zip(x, mean, err.T):  # the value just beyond the interval's end
                if math.isfinite(v):
                    end = v + e[1] if v >= 0 else v - e[0]
                    ax.annotate(f"{v:.2f}", (xi, end), xytext=(0, 2 if v >= 0 else -8), textcoords="offset points",
                                ha="center", fontsize=5.5)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(x)
            ax.set_xticklabels([METHOD_LABELS.get(m, m) for m in methods], fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            if i == 0:
                ax.set_title(label, fontsize=8)
            if j == 0:
                ax.set_ylabel(CONDITION_LABELS.get(c, c), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save(fig, path, 130)


def sigma_plot(per_sigma: dict, methods, conditions, path: Path) -> Path:
    plt = _plt()
    sigmas = sorted(per_sigma, key=float)
    keys = (("cos", "cos"), ("r2", "R$^2$"), ("sharp", "sharpness"), ("present", "present rate"))
    conditions = [c for c in conditions if any(c in per_sigma[s]["cells"] for s in sigmas)]
    fig, axes = plt.subplots(len(conditions), len(keys), figsize=(2.6 * len(keys), 2.0 * len(conditions) + 0.4),
                             squeeze=False)
    xs = np.array([float(s) for s in sigmas])
    for i, c in enumerate(conditions):
        for j, (key, label) in enumerate(keys):
            ax = axes[i][j]
            for m in methods:
                v = np.array([_val(per_sigma[s]["cells"].get(c, {}).get(m, {}), key) for s in sigmas], float)
                ax.plot(xs, v[:, 0], "o-", color=COLORS.get(m), ms=3, lw=1, label=METHOD_LABELS.get(m, m))
                ax.fill_between(xs, v[:, 1], v[:, 2], color=COLORS.get(m), alpha=0.15, lw=0)
                if key == "cos":
                    cv = np.array([_val(per_sigma[s]["cells"].get(c, {}).get(m, {}), "cos_ceiling")[0]
                                   for s in sigmas], float)
                    ax.plot(xs, cv, ":", color=COLORS.get(m), lw=0.8)
            ax.set_xticks(xs)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(label + (" (dotted: ceiling)" if key == "cos" else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel(CONDITION_LABELS.get(c, c), fontsize=7)
            if i == len(conditions) - 1:
                ax.set_xlabel("sigma (mm)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path, 130)


def render_all(out: Path, cases, settings: dict, summary: dict, log=print) -> list[Path]:
    from .report import _by, sigma_key, sigma_keys, sigma_label

    fdir = Path(out) / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    for old in fdir.glob("*.png"):  # the folder is the report's: no stale figure of an earlier setting survives
        old.unlink()
    paths = []
    sigmas = sigma_keys(summary["sigma"])
    for sg in sigmas:
        suffix = f"_s{sg}" if len(sigmas) > 1 else ""
        sc = [(r, a) for r, a in cases if sigma_key(r) == sg]
        label = sigma_label(sg, sc)
        for c in settings["conditions"]:
            sub = sorted(_by(sc, condition=c), key=lambda ra: ra[0]["seed"])
            p = case_grid(sub, settings["methods"], settings["samples"], fdir / f"{c}{suffix}.png",
                          f"{CONDITION_LABELS.get(c, c)} inpainted into the healthy twin at the true landmark "
                          f"({sigma_label(sg, sub)}; dashed: W > 0.1)")
            if p:
                paths.append(p)
        cells = summary["sigma"][sg]["cells"]
        if cells:
            paths.append(summary_chart(cells, settings["methods"], settings["conditions"],
                                       fdir / f"summary{suffix}.png",
                                       f"Phantom benchmark ({label}): mean and 95 % CI over cases"))
    numeric = {k: v for k, v in summary["sigma"].items() if k != "model"}
    if len(numeric) > 1:
        paths.append(sigma_plot(numeric, settings["methods"], settings["conditions"], fdir / "sigma_sweep.png"))
    return paths
