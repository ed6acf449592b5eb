"""Where must a user put a herniation's landmark? The benchmark's herniation cases inpainted from three points.

``centre``      the truth's own landmark (the centre of the drawn herniation: what the benchmark and the models'
                training use).
``margin``      the posterior disc margin at the herniation's left-right position: what "at the posterior disc
                margin" means when a user clicks on the healthy scan.
``convention``  ``spine_ldm.geometry.herniation_landmark`` from that margin point (the documented placement:
                ``HERNIATION_CENTRE_MM`` behind the margin; what the demo and the Slicer sample data use).

Each output is compared with the truth around the truth's landmark (cos of the change within 25 mm, the present
reader's rate on the crop there), so a herniation drawn in the wrong place scores low. Prints a markdown table and
writes ``docs/results/landmark_placement.json`` (``--out``).

Usage::

    .venv/bin/python benchmarks/landmark_placement.py          # 10 seeds x 2 grades x 2 methods, ~8 min on 2 cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONDITIONS = ("dh_small", "dh_moderate_large")
PLACEMENTS = ("centre", "margin", "convention")


def placements(case) -> dict:
    """{placement: LPS point} of one herniation case (see the module docstring)."""
    from spine_ldm.geometry import herniation_landmark

    lm = np.asarray(case.landmark, np.float64)
    m = np.asarray(case.posterior_margin, np.float64)
    c = np.asarray(case.disc_center, np.float64)
    u_lr = np.array([1.0, 0.0, 0.0])
    margin = m + np.dot(lm - m, u_lr) * u_lr  # the margin at the herniation's left-right position
    return {"centre": tuple(lm), "margin": tuple(margin),
            "convention": herniation_landmark(margin, c + np.dot(lm - c, u_lr) * u_lr, case.condition)}


def run(seeds, conditions, methods, samples: int = 2, registry=None, log=print) -> dict:
    from model_training.benchmark import cases as CS, metrics as M
    from model_training.benchmark.readers import crop, crop_normalization, load_reader
    from spine_ldm import pipeline

    reader = load_reader(registry=registry)
    res = {"seeds": list(seeds), "samples": samples, "conditions": {}}
    for cond in conditions:
        t = time.time()
        rows = []
        for s in seeds:
            case = CS.make_case(s, CS.draw_level(s, CS.DEFAULT_LEVELS), cond)
            H, P, lm = case.healthy.image, case.truth.image, case.landmark
            nb = M.Neighbourhood(H, lm, M.COS_RADIUS_MM)
            ball, h, p = nb.ball(M.COS_RADIUS_MM), nb.array(H), nb.array(P)
            norm = crop_normalization(H, case.disc_center)
            for name, point in placements(case).items():
                for method in methods:
                    r = pipeline.inpaint(H, point, case.level, cond, method=method, samples=samples,
                                         seed=CS.sample_seed(s), disc_center_lps=case.disc_center,
                                         device="cpu", registry=registry)
                    cos = [M.cos_r2(nb.array(G), h, p, ball)[0] for G in r.outputs]
                    pres = reader.present_prob(np.stack([crop(G, lm, norm) for G in r.outputs]), cond) > 0.5
                    rows.append({"seed": s, "placement": name, "method": method, "cos": float(np.mean(cos)),
                                 "present": float(np.mean(pres)),
                                 "offset_mm": float(np.linalg.norm(np.subtract(point, lm)))})
        summ = {}
        for name in PLACEMENTS:
            for method in methods:
                sel = [r for r in rows if r["placement"] == name and r["method"] == method]
                summ[f"{name}/{method}"] = {k: float(np.mean([r[k] for r in sel])) for k in ("cos", "present",
                                                                                             "offset_mm")}
        res["conditions"][cond] = {"summary": summ, "rows": rows, "seconds": round(time.time() - t, 1)}
        log(f"[landmark-placement] {cond}: " + ", ".join(f"{k} cos {v['cos']:.2f} present {v['present']:.0%}"
                                                         for k, v in summ.items()))
    return res


def table(res: dict) -> str:
    keys = list(next(iter(res["conditions"].values()))["summary"])
    lines = ["| Condition | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for cond, c in res["conditions"].items():
        lines.append(f"| {cond} | " + " | ".join(
            f"{c['summary'][k]['cos']:.2f} / {100 * c['summary'][k]['present']:.0f} % "
            f"({c['summary'][k]['offset_mm']:.1f} mm)" for k in keys) + " |")
    return "\n".join(lines)


TITLE = "Where to put a herniation's landmark"
TEXT = (
    "Cells: cos / present rate (the distance of the point from the truth's herniation centre). `centre` = the "
    "truth's landmark, `margin` = the posterior disc margin at the herniation's left-right position, `convention` "
    "= `geometry.herniation_landmark` from that margin point (what the demo, the Slicer sample data and the panel's "
    "hint use). The models draw the herniation centred on the point: from the margin itself part of it lands in "
    "the disc, where it does not show.")


def main(argv=None) -> int:
    from diagnostic_io import finish, parser
    from model_training.benchmark.seeds import parse_seeds

    ap = parser(__doc__, CONDITIONS, REPO / "docs" / "results" / "landmark_placement.json", seeds="1000-1009")
    ap.add_argument("--methods", default="weighted,masked")
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args(argv)
    res = run(parse_seeds(args.seeds), [c for c in args.conditions.split(",") if c],
              [m for m in args.methods.split(",") if m], args.samples, args.registry)
    return finish(res, "landmark_placement.py", argv, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
