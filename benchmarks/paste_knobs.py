"""Do ``geometry.paste_back``'s resolution knobs help the bundled weighted models' own outputs?

``benchmarks/c2st_bounds.py`` shows that the *truth* pasted with ``weight_saturation=0.5`` (the full change wherever
W >= 0.5) or resampled with cubic B-splines keeps more of its contrast and fools the C2ST reader more often. This
script asks the same of real outputs: each held-out case is inpainted once by the bundled weighted model (change
paste-back, the pipeline's defaults), and the same decoded samples are pasted again with each variant, so the
variants differ by the paste alone (paired):

``linear``        the pipeline's paste-back (linear resampling, weight W).
``cubic``         cubic B-spline resampling of the FSUs onto the scan.
``sat``           ``min(1, W / 0.5)`` instead of W.
``cubic_sat``     both.

Per condition and variant: mean cos and R^2 of the change within 25 mm (and the lowest case's cos), ``amp`` (the
change projected on the true change, 1 = full contrast), ``sharp`` (gradient energy within 12 mm relative to the
truth through the FSU grid), the present reader's rate and the C2ST AUC. Prints a markdown table and writes
``docs/results/paste_knobs.json`` (``--out``).

Usage::

    .venv/bin/python benchmarks/paste_knobs.py                   # 20 seeds x 4 conditions x 2 samples, ~3 min
    .venv/bin/python benchmarks/paste_knobs.py --seeds 1000-1003 --conditions dh_small
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONDITIONS = ("dh_small", "dh_moderate_large", "ccs_moderate", "ccs_severe")
SATURATION = 0.5
VARIANTS = {"linear": {}, "cubic": {"paste_interpolation": "bspline"},
            "sat": {"paste_weight_saturation": SATURATION},
            "cubic_sat": {"paste_interpolation": "bspline", "paste_weight_saturation": SATURATION}}
TITLE = "Paste-back knobs on the weighted models' own outputs"
TEXT = (
    "The same decoded samples of the bundled weighted models (change paste-back) pasted again with "
    "`geometry.paste_back`'s resolution knobs: `cubic` = cubic B-spline resampling onto the scan, `sat` = "
    "min(1, W / 0.5) instead of W, `cubic_sat` = both; `linear` is the pipeline's paste. Cells: cos (lowest case) / "
    "R^2 / amp / sharp / present / C2ST AUC. Where the truth gains (C2ST lower bounds above), the outputs do not: the "
    "saturated weight pastes the context's sampling noise at full strength, and C2ST stays near 1, so the pipeline "
    "keeps linear resampling and W.")
METRICS = ("cos", "r2", "amp", "sharp")


def case_outputs(case, samples: int = 2, registry=None):
    """(``{variant: [pasted image per sample]}``, the pipeline's result) of one benchmark case: the bundled weighted
    model's samples (change paste-back) pasted with each variant; ``linear`` is checked to be the pipeline's output."""
    import SimpleITK as sitk

    from model_training.benchmark import cases as CS
    from model_training.benchmark.run import compose
    from spine_ldm import pipeline

    H, lm = case.healthy.image, case.landmark
    out = pipeline.inpaint(H, lm, case.level, case.condition, method="weighted", samples=samples,
                           seed=CS.sample_seed(case.seed), steps=50, device="cpu",
                           disc_center_lps=case.disc_center, paste_mode="change", registry=registry)
    prov = out.provenance
    res = {k: [compose(H, fsu, lm, {**prov, **knobs}, out.fsu_reconstruction) for fsu in out.fsu_outputs]
           for k, knobs in VARIANTS.items()}
    for a, b in zip(res["linear"], out.outputs):
        if not np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)):
            raise RuntimeError("the 'linear' paste differs from the pipeline's output: "
                               "model_training.benchmark.run.compose must follow pipeline.inpaint")
    return res, out


def run(seeds, conditions, samples: int = 2, registry=None, log=print) -> dict:
    from model_training.benchmark import cases as CS, metrics as M
    from model_training.benchmark.readers import c2st, crop, crop_normalization, load_reader

    reader = load_reader(registry=registry)
    res = {"seeds": list(seeds), "samples": samples, "saturation": SATURATION, "conditions": {}}
    for cond in conditions:
        t = time.time()
        real, crops, rows, groups = [], {k: [] for k in VARIANTS}, {k: [] for k in VARIANTS}, []
        for s in seeds:
            case = CS.make_case(s, CS.draw_level(s, CS.DEFAULT_LEVELS), cond)
            H, P, lm = case.healthy.image, case.truth.image, case.landmark
            pasted, out = case_outputs(case, samples, registry)
            nb = M.Neighbourhood(H, lm, M.COS_RADIUS_MM)
            h, p = nb.array(H), nb.array(P)
            m_cos, m_sharp = nb.ball(M.COS_RADIUS_MM), nb.ball(M.SHARP_RADIUS_MM)
            grad_pf = M.mean_gradient(M.through_grid(P, out.fsu_input, nb), nb.spacing, m_sharp)
            norm = crop_normalization(H, case.disc_center)
            real.append(crop(P, lm, norm))
            for k, images in pasted.items():
                for G in images:
                    g = nb.array(G)
                    cos, r2 = M.cos_r2(g, h, p, m_cos)
                    rows[k].append({"seed": s, "cos": cos, "r2": r2, "amp": M.change_amplitude(g, h, p, m_cos),
                                    "sharp": M.mean_gradient(g, nb.spacing, m_sharp) / grad_pf})
                    crops[k].append(crop(G, lm, norm))
            groups += [s] * len(out.fsu_outputs)
        real = np.stack(real)
        summ = {"n_cases": len(real), "seconds": round(time.time() - t, 1), "variants": {}}
        for k in VARIANTS:
            fake = np.stack(crops[k])
            by_case = {}
            for r in rows[k]:
                by_case.setdefault(r["seed"], []).append(r["cos"])
            v = {m: float(np.mean([r[m] for r in rows[k]])) for m in METRICS}
            v.update(cos_min_case=float(min(np.mean(c) for c in by_case.values())),
                     present=float(np.mean(reader.present_prob(fake, cond) > 0.5)),
                     c2st=c2st(real, fake, list(seeds), groups), outputs=rows[k])
            summ["variants"][k] = v
        res["conditions"][cond] = summ
        log(f"[paste-knobs] {cond}: " + ", ".join(
            f"{k} cos {v['cos']:.3f} AUC {v['c2st']['auc']:.2f}" for k, v in summ["variants"].items())
            + f" ({summ['seconds']:.0f} s)")
    return res


def table(res: dict) -> str:
    from diagnostic_io import variant_table

    return variant_table(res, VARIANTS, lambda v: (
        f"{v['cos']:.3f} ({v['cos_min_case']:.2f}) / {v['r2']:.2f} / {v['amp']:.2f} / {v['sharp']:.2f} / "
        f"{100 * v['present']:.0f} % / {v['c2st']['auc']:.2f}"))


def main(argv=None) -> int:
    from diagnostic_io import finish, parser
    from model_training.benchmark.seeds import parse_seeds

    ap = parser(__doc__, CONDITIONS, REPO / "docs" / "results" / "paste_knobs.json")
    ap.add_argument("--samples", type=int, default=2, help="samples per case (default %(default)s)")
    args = ap.parse_args(argv)
    res = run(parse_seeds(args.seeds), [c for c in args.conditions.split(",") if c], args.samples, args.registry)
    return finish(res, "paste_knobs.py", argv, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
