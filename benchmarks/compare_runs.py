"""Paired comparison of two phantom-benchmark runs on the same cases: did a change (new weights, a sampler
option, a decoder) move the figures, beyond case-to-case noise?

Rows of ``results.csv`` (``python -m model_training benchmark-phantoms``) are matched by seed, condition, method,
sample and sigma: both runs drew the same healthy phantom, truth and sample seed, so the per-case difference
removes most of the case-to-case spread that the runs' own intervals carry. For each condition x method and
metric: the mean of A and of B, the mean paired difference B - A with its 95 % case-bootstrap interval (the K
samples of a case move together, ``model_training.benchmark.stats.grouped_mean_ci``) and the share of cases where
B's case mean is larger / smaller (ties count in neither).

``--a`` / ``--b`` take one or more run folders (their rows are pooled, e.g. a baseline split over runs);
``DIR:cond1,cond2`` keeps only those conditions of that folder.

Usage::

    .venv/bin/python benchmarks/compare_runs.py --a docs/results/guidance_sweep/g2:dh_small --b /tmp/new \\
        --metrics cos,r2,geom_ratio,graded --out /tmp/compare.json

Prints a markdown table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = ("seed", "condition", "method", "sample", "sigma_mm")
DEFAULT_METRICS = ("cos", "cos_ceiling", "r2", "geom_ratio", "present", "graded")


def load_rows(specs) -> dict:
    """{(seed, condition, method, sample, sigma): row} pooled over ``DIR[:conditions]`` specs (a later folder's
    row for the same key is an error: the pooled runs must not overlap)."""
    rows: dict = {}
    for spec in specs:
        path, _, conds = str(spec).partition(":")
        keep = {c.strip() for c in conds.split(",") if c.strip()}
        f = Path(path) / "results.csv"
        if not f.is_file():
            raise SystemExit(f"compare_runs: {f} not found (a benchmark-phantoms output folder)")
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                if keep and r["condition"] not in keep:
                    continue
                k = tuple(r[c] for c in KEY)
                if k in rows:
                    raise SystemExit(f"compare_runs: {f} repeats the row {k} of an earlier folder")
                rows[k] = r
    return rows


def compare(a: dict, b: dict, metrics=DEFAULT_METRICS, n_boot: int = 2000) -> list[dict]:
    """One record per condition x method x metric over the keys both runs hold (see the module docstring)."""
    from model_training.benchmark.stats import grouped_mean_ci

    common = sorted(set(a) & set(b))
    out = []
    for cond, method in sorted({(k[1], k[2]) for k in common}):
        keys = [k for k in common if k[1] == cond and k[2] == method]
        for m in metrics:
            va = np.array([_num(a[k].get(m)) for k in keys])
            vb = np.array([_num(b[k].get(m)) for k in keys])
            ok = np.isfinite(va) & np.isfinite(vb)
            if not ok.any():
                continue
            seeds = np.array([k[0] for k in keys])[ok]
            d = vb[ok] - va[ok]
            mean, lo, hi = grouped_mean_ci(d, seeds, n_boot=n_boot)
            per_case = [d[seeds == s].mean() for s in sorted(set(seeds.tolist()))]
            out.append({"condition": cond, "method": method, "metric": m, "n_outputs": int(ok.sum()),
                        "n_cases": len(per_case), "a": float(va[ok].mean()), "b": float(vb[ok].mean()),
                        "diff": mean, "lo": lo, "hi": hi, "b_larger": float(np.mean(np.array(per_case) > 0)),
                        "b_smaller": float(np.mean(np.array(per_case) < 0))})
    return out


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def markdown(recs: list[dict]) -> str:
    lines = ["| condition | method | metric | n cases | A | B | B - A [95 % CI] | cases B > A / B < A |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in recs:
        lines.append(f"| {r['condition']} | {r['method']} | {r['metric']} | {r['n_cases']} | {r['a']:.3f} | "
                     f"{r['b']:.3f} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {100 * r['b_larger']:.0f} / "
                     f"{100 * r['b_smaller']:.0f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, help="baseline run folder(s), DIR[:conditions]")
    ap.add_argument("--b", nargs="+", required=True, help="changed run folder(s), DIR[:conditions]")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="results.csv columns (default %(default)s)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--out", help="write the records as JSON")
    args = ap.parse_args(argv)
    a, b = load_rows(args.a), load_rows(args.b)
    recs = compare(a, b, [m.strip() for m in args.metrics.split(",") if m.strip()], args.n_boot)
    if not recs:
        raise SystemExit("compare_runs: the runs share no rows (same seeds, conditions, methods, samples, sigma?)")
    print(markdown(recs))
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "records": recs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
