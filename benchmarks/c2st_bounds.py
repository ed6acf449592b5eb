"""How low can the benchmark's C2ST realism AUC go for *any* model? Lower bounds from the truth itself.

The realism reader (``model_training.benchmark.readers.c2st``: linear classifier on the 2.5 x 2.5 x 5 cm crops of
true pathology P vs generated crops G of the same held-out cases) is compared here with outputs that a perfect
model could at best produce. Each row pastes the *true* change into the healthy twin H the way the pipeline pastes
a generated one (``--paste-mode change`` at the weighted model's own sigma), losing one more thing per row:

``taper``   H + W * (P - H) on the scan's own grid: only the method's Gaussian weighting W (the pathology fades
            to untouched context with distance from the landmark); no FSU grid, no autoencoder.
``grid``    the truth through the bundled model's FSU grid (P and H resampled to the FSU and back, their
            difference pasted with W); no autoencoder.
``paper``   the same through the paper config's finer FSU grid (128 x 64 x 32).
``ae``      the truth's own autoencoder reconstruction (the benchmark's ``C2ST ceiling``: a perfect LDM).

Three more rows ask what a different paste-back or resampling could buy (``geometry.paste_back``'s resolution
knobs; the pipeline uses neither): ``*_sat`` pastes with ``min(1, W / 0.5)`` (the full change wherever W >= 0.5)
instead of W, ``*_cubic`` resamples with cubic B-splines instead of linearly (``paper_cubic_sat``: scan -> paper
FSU -> scan; ``ae_cubic_sat``: only the paste, since the autoencoder was trained on linearly resampled FSUs).

For each: ``amp`` (the pasted change projected on the true change within 25 mm of the landmark, 1 = full
contrast), ``cos``, the C2ST AUC with its case-bootstrap 95 % interval and the present reader's rate. When the
``taper`` or ``grid`` row is already far above a C2ST target, no diffusion model or autoencoder can meet it.

Usage::

    .venv/bin/python benchmarks/c2st_bounds.py                   # 20 seeds x 4 conditions, ~3 min on 2 cores
    .venv/bin/python benchmarks/c2st_bounds.py --seeds 1000-1003 --conditions dh_small

Writes ``docs/results/c2st_bounds.json`` (``--out``) and prints a markdown table.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONDITIONS = ("dh_small", "dh_moderate_large", "ccs_moderate", "ccs_severe")
VARIANTS = ("taper", "grid", "paper", "ae", "taper_sat", "paper_cubic_sat", "ae_cubic_sat")
SATURATION = 0.5  # the *_sat rows: full change wherever W >= 0.5
PAPER_SHAPE = (128, 64, 32)
TITLE = "C2ST lower bounds (the truth pasted the way the pipeline pastes)"
TEXT = (
    "Each row pastes the *true* change into the healthy twin (change paste-back at the weighted model's own sigma) "
    "and loses one more thing: `taper` only the Gaussian weighting W (scan grid, no autoencoder); `grid` the truth "
    "through the bundled model's FSU grid; `paper` through the paper config's finer FSU grid (128 x 64 x 32); `ae` "
    "the truth's own autoencoder reconstruction (the benchmark's C2ST ceiling). The last three rows try what a "
    "different paste-back could buy (`geometry.paste_back`'s resolution knobs, unused by the pipeline): `_sat` "
    "pastes min(1, W / 0.5) instead of W (the full change wherever W >= 0.5), `_cubic` resamples with cubic "
    "B-splines (`paper_cubic_sat`: scan -> paper FSU -> scan; `ae_cubic_sat`: only the paste, the autoencoder being "
    "trained on linearly resampled FSUs). Cells: C2ST AUC [95 % CI] / amp (the change projected on the true change "
    "within 25 mm, 1 = full contrast) / present rate. Where a row is near 1, no diffusion model with that grid, "
    "autoencoder and paste-back can bring the weighted method's C2ST down: the linear classifier sees that the "
    "pathology fades with W, is resampled, or is reconstructed.")


def case_variants(case, method: str = "weighted", registry=None) -> tuple[dict, float]:
    """({variant: pasted image}, sigma_mm) of one benchmark case (see the module docstring)."""
    from model_training.benchmark.run import compose
    from spine_ldm import geometry, pipeline

    H, P, lm, disc = case.healthy.image, case.truth.image, case.landmark, case.disc_center
    mid = pipeline.default_model_for(method, case.condition, registry)
    sigma = pipeline.model_sigma(mid, registry=registry)
    prov = {"sigma_mm": sigma, "paste_mode": "change"}
    fh, rh = pipeline.reconstruct(H, lm, case.condition, method, model=mid, disc_center_lps=disc, device="cpu",
                                  registry=registry)
    fp, rp = pipeline.reconstruct(P, lm, case.condition, method, model=mid, disc_center_lps=disc, device="cpu",
                                  registry=registry)
    size = tuple(float(v) for v in np.asarray(fh.GetSpacing())[::-1] * np.asarray(fh.GetSize())[::-1])
    paper = geometry.FSUSpec(shape=PAPER_SHAPE, size_mm=size)
    sat = {**prov, "paste_weight_saturation": SATURATION}
    cubic = {**sat, "paste_interpolation": "bspline"}
    out = {"taper": compose(H, P, lm, prov, H),  # P on H's own grid: the paste's resampling is the identity
           "grid": compose(H, fp, lm, prov, fh),
           "paper": compose(H, geometry.extract_fsu(P, disc, paper), lm, prov, geometry.extract_fsu(H, disc, paper)),
           "ae": compose(H, rp, lm, prov, rh),
           "taper_sat": compose(H, P, lm, sat, H),
           "paper_cubic_sat": compose(H, geometry.extract_fsu(P, disc, paper, interpolation="bspline"), lm, cubic,
                                      geometry.extract_fsu(H, disc, paper, interpolation="bspline")),
           "ae_cubic_sat": compose(H, rp, lm, cubic, rh)}
    return out, sigma


def run(seeds, conditions, registry=None, log=print) -> dict:
    from model_training.benchmark import cases as CS, metrics as M
    from model_training.benchmark.readers import c2st, crop, crop_normalization, load_reader

    reader = load_reader(registry=registry)
    res = {"seeds": list(seeds), "conditions": {}}
    for cond in conditions:
        t = time.time()
        rows, crops, sig = [], {k: [] for k in ("P", *VARIANTS)}, None
        for s in seeds:
            case = CS.make_case(s, CS.draw_level(s, CS.DEFAULT_LEVELS), cond)
            imgs, sig = case_variants(case, registry=registry)
            H, P, lm = case.healthy.image, case.truth.image, case.landmark
            nb = M.Neighbourhood(H, lm, M.COS_RADIUS_MM)
            ball, h, p = nb.ball(M.COS_RADIUS_MM), nb.array(H), nb.array(P)
            norm = crop_normalization(H, case.disc_center)
            crops["P"].append(crop(P, lm, norm))
            row = {"seed": s, "level": case.level}
            for k, img in imgs.items():
                g = nb.array(img)
                row[f"amp_{k}"] = M.change_amplitude(g, h, p, ball)
                row[f"cos_{k}"] = M.cos_r2(g, h, p, ball)[0]
                crops[k].append(crop(img, lm, norm))
            rows.append(row)
        groups = list(range(len(rows)))
        summ = {"sigma_mm": sig, "n_cases": len(rows), "seconds": round(time.time() - t, 1), "variants": {}}
        real = np.stack(crops["P"])
        for k in VARIANTS:
            fake = np.stack(crops[k])
            summ["variants"][k] = {
                "amp": float(np.mean([r[f"amp_{k}"] for r in rows])),
                "cos": float(np.mean([r[f"cos_{k}"] for r in rows])),
                "c2st": c2st(real, fake, groups, groups),
                "present": float(np.mean(reader.present_prob(fake, cond) > 0.5))}
        summ["present_truth"] = float(np.mean(reader.present_prob(real, cond) > 0.5))
        summ["cases"] = rows
        res["conditions"][cond] = summ
        log(f"[c2st-bounds] {cond}: " + ", ".join(
            f"{k} AUC {v['c2st']['auc']:.2f} amp {v['amp']:.2f}" for k, v in summ["variants"].items())
            + f" ({summ['seconds']:.0f} s)")
    return res


def table(res: dict) -> str:
    from diagnostic_io import variant_table

    def cell(v):
        a = v["c2st"]
        return f"{a['auc']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] / {v['amp']:.2f} / {100 * v['present']:.0f} %"

    return variant_table(res, VARIANTS, cell, lambda c, s: f"{c} (sigma {s['sigma_mm']:g} mm)")


def main(argv=None) -> int:
    from diagnostic_io import finish, parser
    from model_training.benchmark.seeds import parse_seeds

    args = parser(__doc__, CONDITIONS, REPO / "docs" / "results" / "c2st_bounds.json").parse_args(argv)
    res = run(parse_seeds(args.seeds), [c for c in args.conditions.split(",") if c], args.registry)
    return finish(res, "c2st_bounds.py", argv, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
