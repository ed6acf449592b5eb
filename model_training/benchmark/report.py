"""Benchmark report: ``results.csv`` (one row per output), ``table1.md`` (per condition x method), ``table2.md``
(per level x condition x method, the paper's Table 2 layout), ``summary.json`` and ``figures/``.

Intervals: 95 %, by resampling cases (a case's K samples move together) for every mean, FID, KID, MS-SSIM and the
C2ST AUC; Wilson score intervals for the Table 2 "% judged present" (over outputs, like the paper's counts).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from spine_ldm.conditions import CONDITION_LABELS, CONDITIONS, LEVELS

from . import stats as ST
from .seeds import format_seeds

METHOD_LABELS = {"weighted": "Weighted", "masked": "Masked", "repaint": "RePaint"}
CSV_COLUMNS = ["seed", "level", "condition", "method", "sample", "sigma_mm", "paste_mode", "model_id", "cos", "r2",
               "sharp", "sharp_native", "geom_metric", "geom", "geom_truth", "geom_healthy", "geom_ratio",
               "cos_ceiling", "r2_ceiling", "sharp_ceiling", "geom_ceiling_ratio", "present_prob", "present",
               "reader_class", "graded", "present_ceiling", "nfe", "seconds", "cpu_seconds", "seconds_per_sample"]
MEAN_METRICS = ("cos", "r2", "sharp", "sharp_native", "geom_ratio", "cos_ceiling", "r2_ceiling", "sharp_ceiling",
                "geom_ceiling_ratio", "present_prob", "present", "present_ceiling")


def load_cases(out: Path, settings: dict, case_fps: dict) -> list[tuple[dict, dict]]:
    """(record, arrays) of every case of this run's seeds x conditions x sigmas with its condition's current
    fingerprint (``case_fps``: condition -> :func:`.run.fingerprint` of that condition)."""
    from .cases import draw_level
    from .run import _work_dir, case_name

    d = _work_dir(out)
    cases = []
    for seed in settings["seeds"]:
        lv = draw_level(seed, settings["levels"])
        for c in settings["conditions"]:
            for sg in settings["sigmas"]:
                name = case_name(f"{seed}_{lv}_{c}", sg)
                f = d / f"{name}.json"
                if not f.is_file():
                    continue
                rec = json.loads(f.read_text())
                if rec.get("fingerprint") != case_fps.get(c):
                    continue
                with np.load(d / f"{name}.npz") as z:
                    arrays = {k: z[k] for k in z.files}
                cases.append((rec, arrays))
    return cases


def _fmt(v, nd=2) -> str:
    return "-" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{nd}f}"


def fmt_ci(d: dict, nd=2) -> str:
    if not d or not math.isfinite(d.get("mean", float("nan"))):
        return "-"
    if math.isfinite(d.get("lo", float("nan"))):
        return f"{d['mean']:.{nd}f} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"
    return f"{d['mean']:.{nd}f}"


def graded(row: dict) -> float:
    """1 when the reader's 5-class call of an output is the condition asked for (the severity is honoured: a small
    herniation drawn as large, or too faint to read, is 0), 0 otherwise; NaN without a reader."""
    cls = row.get("reader_class")
    return float(cls == row["condition"]) if cls else float("nan")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = {**r, "graded": graded(r)}
            w.writerow({k: (f"{r[k]:.5g}" if isinstance(r.get(k), float) and math.isfinite(r[k]) else
                            ("" if isinstance(r.get(k), float) or r.get(k) is None else r[k])) for k in CSV_COLUMNS})


def _c2st(cases, method, n_boot, fake_kind: str = "G") -> dict:
    """C2ST of the true crops against the method's outputs (``fake_kind`` "G") or against its ceiling ("C": the
    truth's own autoencoder reconstruction pasted the same way, one per case): what a perfect diffusion model with
    this autoencoder, grid and paste-back would score."""
    from .readers import c2st

    real, fake, gr, gf = [], [], [], []
    key = f"crop_{fake_kind}_{method}"
    for rec, a in cases:
        if key not in a:
            continue
        real.append(a["crop_P"])
        gr += [rec["key"]] * len(a["crop_P"])
        fake.append(a[key])
        gf += [rec["key"]] * len(a[key])
    if not real:
        return {"auc": float("nan"), "mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    res = c2st(np.concatenate(real), np.concatenate(fake), gr, gf, n_boot=n_boot)
    return {**res, "mean": res["auc"]}  # the interval fields of every other metric


def _fid_kid(cases, method, n_boot) -> dict:
    """FID and KID (features of P crops vs G crops), bias-corrected case-bootstrap intervals."""
    fr = [a["feat_P"].astype(np.float64) for _, a in cases]
    fg = [a.get(f"feat_G_{method}", np.zeros((0, 0))).astype(np.float64) for _, a in cases]
    out = {}
    if not fr or fr[0].size == 0 or any(f.size == 0 for f in fg):
        return {"fid": {"mean": float("nan")}, "kid": {"mean": float("nan")}}
    for name, fn in (("fid", ST.fid), ("kid", ST.kid)):
        def stat(idx, fn=fn):
            return fn(np.concatenate([fg[i] for i in idx]), np.concatenate([fr[i] for i in idx]))

        mean = stat(np.arange(len(cases)))
        lo, hi = ST.bootstrap_ci(stat, len(cases), n_boot=min(n_boot, 300), center=mean)
        out[name] = {"mean": mean, "lo": lo, "hi": hi}
    return out


def aggregate(cases, methods, n_boot: int) -> dict:
    """Per method over the given cases: means with case-bootstrap CIs, present rate, C2ST, FID, KID, MS-SSIM,
    nfe, seconds."""
    res = {}
    for m in methods:
        rows = [r for rec, _ in cases for r in rec["rows"] if r["method"] == m]
        if not rows:
            continue
        groups = [f"{r['seed']}_{r['condition']}" for r in rows]
        d = {"n_outputs": len(rows), "n_cases": len(set(groups)),
             "model_ids": sorted({r["model_id"] for r in rows})}
        for k in MEAN_METRICS:
            vals = [r.get(k) for r in rows]
            vals = [float("nan") if v is None else float(v) for v in vals]
            mean, lo, hi = ST.grouped_mean_ci(vals, groups, n_boot)
            d[k] = {"mean": mean, "lo": lo, "hi": hi}
        mean, lo, hi = ST.grouped_mean_ci([graded(r) for r in rows], groups, n_boot)
        d["graded"] = {"mean": mean, "lo": lo, "hi": hi}
        pres = [int(r["present"]) for r in rows if r.get("present") is not None]
        p, lo, hi = ST.wilson(sum(pres), len(pres))
        d["present_wilson"] = {"mean": p, "lo": lo, "hi": hi, "k": sum(pres), "n": len(pres)}
        for k in ("ms_ssim_2d", "ms_ssim_3d"):
            vals = [rec["methods"][m][k] for rec, _ in cases if m in rec["methods"]]
            mean, lo, hi = ST.grouped_mean_ci(vals, list(range(len(vals))), n_boot)
            d[k] = {"mean": mean, "lo": lo, "hi": hi}
        d["c2st_auc"] = _c2st(cases, m, n_boot)
        d["c2st_auc_ceiling"] = _c2st(cases, m, n_boot, fake_kind="C")
        d.update(_fid_kid(cases, m, n_boot))
        per = [rec["methods"][m] for rec, _ in cases if m in rec["methods"]]
        d["nfe"] = float(np.mean([x["nfe"] for x in per]))
        d["seconds"] = float(np.mean([x["seconds"] for x in per]))
        d["cpu_seconds"] = float(np.mean([x.get("cpu_seconds", np.nan) for x in per]))
        d["geom_truth"] = float(np.nanmean([rec["geom_truth"] for rec, _ in cases]))
        d["geom"] = float(np.nanmean([r["geom"] for r in rows]))
        d["sigma_mm"] = sorted({float(r["sigma_mm"]) for r in rows})  # the sigma(s) the outputs used
        res[m] = d
    return res


def _reader_rates(cases) -> dict:
    out = {}
    for key in ("present_truth", "present_healthy"):
        v = [rec[key] for rec, _ in cases if rec.get(key) is not None]
        k = int(sum(x > 0.5 for x in v))
        p, lo, hi = ST.wilson(k, len(v))
        out[key] = {"mean": p, "lo": lo, "hi": hi, "k": k, "n": len(v)}
    return out


def _by(cases, **want):
    """Cases whose record matches every ``key=value`` (``sigma`` = :func:`sigma_key`)."""
    return [(r, a) for r, a in cases
            if all((sigma_key(r) if k == "sigma" else r[k]) == v for k, v in want.items())]


def _sigma(rec) -> float:
    return float(rec["rows"][0]["sigma_mm"]) if rec["rows"] else float("nan")


def sigma_key(rec) -> str:
    """The sigma group of a case: ``"model"`` when the run left sigma to each model (models of different pathologies
    may be trained with different sigmas), else the requested sigma (``--sigma-mm`` / ``--sigma-sweep``) as ``%g``."""
    req = rec.get("sigma_requested", _sigma(rec))
    return "model" if req is None else f"{float(req):g}"


def sigma_keys(keys) -> list[str]:
    """``"model"`` first, then numeric sigmas ascending."""
    return sorted(set(keys), key=lambda k: (k != "model", float(k) if k != "model" else 0.0))


def sigma_label(key: str, cases=()) -> str:
    """``sigma 12 mm``, or for the ``model`` group the sigmas the models used per condition."""
    if key != "model":
        return f"sigma {key} mm"
    used: dict = {}
    for rec, _ in cases:
        for r in rec["rows"]:
            used.setdefault(r["condition"], set()).add(float(r["sigma_mm"]))
    per = ", ".join(f"{CONDITION_LABELS.get(c, c)} {'/'.join(f'{v:g}' for v in sorted(vs))} mm"
                    for c, vs in sorted(used.items(), key=lambda kv: CONDITIONS.index(kv[0])))
    return f"each model's own sigma ({per})" if per else "each model's own sigma"


def _cells(summary_cells: dict, methods, conditions):
    for c in conditions:
        for m in methods:
            d = summary_cells.get(c, {}).get(m)
            if d:
                yield f"| {CONDITION_LABELS.get(c, c)} | {METHOD_LABELS.get(m, m)} | ", d


def table1_md(summary_cells: dict, methods, conditions, sigma_label: str) -> str:
    lines = [f"### {sigma_label}", "",
             "Shape against the paired truth (mean [95 % CI over cases]; ceiling = the truth's own autoencoder "
             "reconstruction pasted the same way):", "",
             "| Condition | Method | n (cases/outputs) | cos | cos ceiling | R^2 | sharp | geometry ratio | "
             "present rate | graded as asked |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"{head}{d['n_cases']}/{d['n_outputs']} | {fmt_ci(d['cos'])} | {fmt_ci(d['cos_ceiling'])} | "
              f"{fmt_ci(d['r2'])} | {fmt_ci(d['sharp'])} | {fmt_ci(d['geom_ratio'])} | {fmt_ci(d['present'])} | "
              f"{fmt_ci(d.get('graded'))} |"
              for head, d in _cells(summary_cells, methods, conditions)]
    lines += ["", "Distribution, realism and diversity (FID/KID: Inception features of the central sagittal slices, "
                  "generated vs true crops; C2ST AUC 0.5 = indistinguishable; C2ST ceiling = the same test on the "
                  "ceiling outputs; MS-SSIM among the K samples, lower = more diverse):", "",
              "| Condition | Method | FID | KID | C2ST AUC | C2ST ceiling | MS-SSIM (2D slices) | MS-SSIM (3D) | nfe | "
              "s / call (CPU s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"{head}{fmt_ci(d['fid'], 1)} | {fmt_ci(d['kid'], 3)} | {fmt_ci(d['c2st_auc'])} | "
              f"{fmt_ci(d.get('c2st_auc_ceiling'))} | {fmt_ci(d['ms_ssim_2d'])} | {fmt_ci(d['ms_ssim_3d'])} | "
              f"{d['nfe']:.0f} | {d['seconds']:.1f} ({d['cpu_seconds']:.1f}) |"
              for head, d in _cells(summary_cells, methods, conditions)]
    return "\n".join(lines) + "\n"


def table2_md(cells: dict, methods, sigma_label: str) -> str:
    head = ["Level", "Condition", "n"] + [f"{METHOD_LABELS.get(m, m)} present" for m in methods] + \
        [f"{METHOD_LABELS.get(m, m)} C2ST AUC" for m in methods] + ["truth present", "healthy present"]
    lines = [f"### {sigma_label}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]

    def pct(d):
        if not d or not d.get("n"):
            return "-"
        return f"{100 * d['mean']:.0f}% [{100 * d['lo']:.0f}, {100 * d['hi']:.0f}] ({d['k']}/{d['n']})"

    for (lv, c), cell in sorted(cells.items(), key=lambda kv: (CONDITIONS.index(kv[0][1]), LEVELS.index(kv[0][0]))):
        row = [lv, CONDITION_LABELS.get(c, c), str(cell["n_cases"])]
        row += [pct(cell["methods"].get(m, {}).get("present_wilson")) for m in methods]
        row += [fmt_ci(cell["methods"].get(m, {}).get("c2st_auc")) for m in methods]
        row += [pct(cell["reader"]["present_truth"]), pct(cell["reader"]["present_healthy"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _table2_cells(cases, methods, n_boot) -> dict:
    cells = {}
    keys = sorted({(r["level"], r["condition"]) for r, _ in cases})
    for lv, c in keys:
        sub = _by(cases, level=lv, condition=c)
        per = {}
        for m in methods:
            rows = [r for rec, _ in sub for r in rec["rows"] if r["method"] == m]
            pres = [int(r["present"]) for r in rows if r.get("present") is not None]
            p, lo, hi = ST.wilson(sum(pres), len(pres))
            per[m] = {"present_wilson": {"mean": p, "lo": lo, "hi": hi, "k": sum(pres), "n": len(pres)},
                      "c2st_auc": _c2st(sub, m, n_boot)}
        cells[(lv, c)] = {"n_cases": len(sub), "methods": per, "reader": _reader_rates(sub)}
    return cells


def build(out, settings: dict, case_fps: dict, meta: dict, log=print) -> dict:
    from . import figures

    out = Path(out)
    cases = load_cases(out, settings, case_fps)
    methods, conditions = settings["methods"], settings["conditions"]
    rows = sorted((r for rec, _ in cases for r in rec["rows"]),
                  key=lambda r: (r["sigma_mm"], r["seed"], CONDITIONS.index(r["condition"]),
                                 methods.index(r["method"]), r["sample"]))
    write_csv(rows, out / "results.csv")
    per_sigma, t1, t2 = {}, [], []
    for sg in sigma_keys(sigma_key(rec) for rec, _ in cases):
        sc = _by(cases, sigma=sg)
        cells = {c: aggregate(_by(sc, condition=c), methods, settings["n_boot"]) for c in conditions}
        cells = {c: v for c, v in cells.items() if v}
        reader = {c: _reader_rates(_by(sc, condition=c)) for c in conditions}
        paste = sorted({r["paste_mode"] for rec, _ in sc for r in rec["rows"]})
        label = f"{sigma_label(sg, sc)}, paste mode {'/'.join(paste)}"
        t1.append(table1_md(cells, methods, conditions, label))
        c2 = _table2_cells(sc, methods, settings["n_boot"])
        t2.append(table2_md(c2, methods, label))
        per_sigma[sg] = {"label": label, "paste_mode": paste, "cells": cells, "reader": reader,
                                "table2": {f"{lv}|{c}": v for (lv, c), v in c2.items()}}
    models = {}
    for rec, _ in cases:
        for m, v in rec["methods"].items():
            models.setdefault(v["model_id"], {"method": m, "weights_sha256": v["weights_sha256"],
                                              "conditions": set()})["conditions"].add(rec["condition"])
    for v in models.values():
        v["conditions"] = sorted(v["conditions"], key=CONDITIONS.index)
    case_seconds = [rec.get("case_seconds", 0.0) for rec, _ in cases]
    case_cpu = [rec.get("case_cpu_seconds", 0.0) for rec, _ in cases]
    settings_out = {k: v for k, v in settings.items() if not k.startswith("_")}
    settings_out["seeds"] = format_seeds(settings["seeds"])
    summary = {"settings": settings_out, "meta": meta, "models": models, "n_cases": len(cases),
               "case_seconds_total": round(float(np.sum(case_seconds)), 1),
               "case_cpu_seconds_total": round(float(np.sum(case_cpu)), 1), "sigma": per_sigma}
    intro = (f"Phantom benchmark: seeds {settings_out['seeds']}, {len(cases)} cases, K = {settings['samples']}, "
             f"{settings['steps']} steps, RePaint resamplings {settings['repaint_resample']}. Models: " +
             ", ".join(f"`{k}` ({v['method']})" for k, v in models.items()) + ".\n\n")
    (out / "table1.md").write_text("# Table 1 analog (per condition x method)\n\n" + intro + "\n".join(t1))
    (out / "table2.md").write_text(
        "# Table 2 analog (automatic readers, per level x condition x method)\n\n" + intro +
        "present = the pathology-present reader's probability of the target pathology type > 0.5 (Wilson 95 % CI, "
        "over outputs); C2ST AUC = realism reader (0.5 = generated crops indistinguishable from the true ones; "
        "case-bootstrap 95 % CI); truth / healthy present = the reader on the true pathological and healthy twins "
        "(its sensitivity and false-positive rate on this level).\n\n" + "\n".join(t2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_default) + "\n")
    figures.render_all(out, cases, settings, summary, log=log)
    log(f"[benchmark] {len(cases)} case(s) -> {out / 'results.csv'}, table1.md, table2.md, summary.json, figures/")
    if not settings.get("quiet"):
        log("\n" + "\n".join(t1))
    return summary


def _default(o):
    if isinstance(o, set):
        return sorted(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)
