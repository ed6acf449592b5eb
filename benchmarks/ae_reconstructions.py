"""How do two registries' autoencoders reconstruct held-out pathological FSUs? A figure, one row per case.

Each row: the true pathological twin's FSU (the benchmark's case for that seed, condition and drawn level) and its
reconstruction ``decode(encode(x))`` by each registry's autoencoder (``spine_ldm.pipeline.reconstruct``: the
pipeline's own FSU frame, normalisation and decode path; the weighted model's entry of the condition), the
sagittal slice through the FSU centre at the FSU grid's physical aspect. This is what a perfect diffusion model
could at best paint (the benchmark's ceiling), so decoder changes show here first.

Usage::

    .venv/bin/python benchmarks/ae_reconstructions.py --registry /tmp/reg/ft/Models.json --label "decoder ft" \\
        --out docs/results/decoder_finetune/reconstructions.png

The bundled registry is always the first column after the truth.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = "2000:dh_moderate_large,2001:dh_moderate_large,2002:dh_small,2003:dh_small,2004:ccs_severe"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", action="append", default=[], help="a Models.json to compare (repeatable)")
    ap.add_argument("--label", action="append", default=[], help="column title per --registry")
    ap.add_argument("--cases", default=CASES, help="seed:condition list (default: validation seeds, %(default)s)")
    ap.add_argument("--out", required=True, help="PNG")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from model_training.benchmark.cases import DEFAULT_LEVELS, draw_level, make_case
    from spine_ldm import pipeline

    regs = [("bundled", None)] + [(args.label[i] if i < len(args.label) else Path(r).parent.name, r)
                                  for i, r in enumerate(args.registry)]
    cases = [(int(s), c) for s, c in (x.split(":") for x in args.cases.split(",") if x.strip())]
    fig, ax = plt.subplots(len(cases), 1 + len(regs), figsize=(2.2 * (1 + len(regs)), 2.3 * len(cases)),
                           squeeze=False)
    for r, (seed, cond) in enumerate(cases):
        case = make_case(seed, draw_level(seed, DEFAULT_LEVELS), cond)
        cols = []
        for name, reg in regs:
            fsu, rec = pipeline.reconstruct(case.truth.image, case.landmark, cond, disc_center_lps=case.disc_center,
                                            registry=reg, device="cpu")
            if not cols:
                cols.append(("truth FSU", sitk.GetArrayFromImage(fsu), fsu.GetSpacing()))
            cols.append((name, sitk.GetArrayFromImage(rec), rec.GetSpacing()))
        lo, hi = np.percentile(cols[0][1], [0.5, 99.5])
        for c, (name, a, sp) in enumerate(cols):  # array (SI, AP, LR) after sitk's (LR, AP, SI) index order
            axis = ax[r, c]
            axis.imshow(a[:, :, a.shape[2] // 2], cmap="gray", vmin=lo, vmax=hi, aspect=sp[2] / sp[1])
            axis.set_title(f"{seed} {case.level} {cond}: {name}" if c == 0 else name, fontsize=7)
            axis.axis("off")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
