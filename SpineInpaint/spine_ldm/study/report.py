"""Reader-study report (paper Table 2) and answer export. Organizer only: needs the truth key.

Table 2 rows: per group (inpainted per method, inpainted all methods, real pathological, real healthy),
per asked condition, per FSU level (and all levels): number of cases, number of ratings (case x reader,
last answer wins), % rated realistic and % rated "pathology present", each with a Wilson 95% interval.
Agreement between readers: Cohen's kappa for 2 readers, Fleiss' kappa for 3 or more, on the cases that
every reader answered.

Every CSV written here is spreadsheet-safe: a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return (a reader's comment such as ``=HYPERLINK(...)``) is prefixed with ``'`` so that Excel /
LibreOffice show it as text instead of running it as a formula. JSONL exports keep the text unchanged.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..conditions import LEVELS
from ..errors import InputError
from .engine import METHODS, Study, condition_label

Z95 = 1.959963984540054
GROUP_ORDER = tuple(f"inpainted:{m}" for m in METHODS) + ("inpainted:all", "real_pathological", "real_healthy")
GROUP_LABELS = {"inpainted:weighted": "Inpainted (weighted)", "inpainted:masked": "Inpainted (masked)",
                "inpainted:repaint": "Inpainted (RePaint)", "inpainted:all": "Inpainted (all methods)",
                "real_pathological": "Real pathological", "real_healthy": "Real healthy"}
QUESTIONS = ("realistic", "pathology_present")


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (returns (nan, nan) for n = 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise InputError(f"successes {k} must be in 0..{n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def cohen_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters' labels on the same items (nan when chance agreement is 1 or no items)."""
    if len(a) != len(b):
        raise InputError(f"Cohen's kappa needs paired ratings, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    cats = sorted(set(a) | set(b), key=str)
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((sum(x == c for x in a) / n) * (sum(y == c for y in b) / n) for c in cats)
    return math.nan if pe >= 1.0 else (po - pe) / (1 - pe)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a subjects x categories count table (same number of raters per subject)."""
    rows = [list(map(int, r)) for r in counts]
    if not rows:
        return math.nan
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        raise InputError("Fleiss' kappa needs the same number (>= 2) of ratings for every subject")
    N = len(rows)
    p_i = [(sum(x * x for x in r) - n) / (n * (n - 1)) for r in rows]
    p_bar = sum(p_i) / N
    p_j = [sum(r[j] for r in rows) / (N * n) for j in range(len(rows[0]))]
    pe = sum(p * p for p in p_j)
    return math.nan if pe >= 1.0 else (p_bar - pe) / (1 - pe)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """``value`` unless it is text a spreadsheet would run as a formula (starts with = + - @ tab CR): then
    ``'`` + value (OWASP CSV-injection advice). Numbers, None and booleans are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(path: Path, fields: list, rows: list[dict]) -> None:
    """CSV with a header row; every cell passed through :func:`spreadsheet_safe`."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in rows)


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return math.nan
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


# ----------------------------------------------------------------------------- collection
def collect_ratings(study: Study, truth: dict[str, dict]) -> list[dict]:
    """One dict per (reader, case) with the newest complete-or-not answer joined to the truth."""
    names = {r.reader_id: r.name for r in study.store.readers()}
    out = []
    for a in study.store.all_latest():
        t = truth.get(a.case_id)
        if t is None:
            raise InputError(f"answer for case {a.case_id} has no entry in the truth key")
        c = study.case(a.case_id)
        out.append({"reader": names.get(a.reader_id, str(a.reader_id)), "case_id": a.case_id, "level": c["level"],
                    "condition": c["condition"], "truth": t["truth"], "method": t.get("method"),
                    "realistic": a.values.get("realistic"), "pathology_present": a.values.get("pathology_present"),
                    "confidence": a.values.get("confidence"), "seconds": a.seconds, "complete": a.complete})
    return out


def _groups_of(r: dict) -> list[str]:
    if r["truth"] == "inpainted":
        return [f"inpainted:{r['method']}", "inpainted:all"]
    return [r["truth"]]


def table2(ratings: list[dict]) -> list[dict]:
    """Aggregate rows (see module doc). Percentages are over the ratings that answered that question."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for r in ratings:
        for g in _groups_of(r):
            buckets[(g, r["condition"], r["level"])].append(r)
            buckets[(g, r["condition"], "all")].append(r)
    rows = []
    lvl_order = {lv: i for i, lv in enumerate(LEVELS + ("all",))}
    for (g, cond, lvl) in sorted(buckets, key=lambda k: (GROUP_ORDER.index(k[0]), k[1], lvl_order[k[2]])):
        rs = buckets[(g, cond, lvl)]
        row = {"group": g, "condition": cond, "level": lvl, "cases": len({r["case_id"] for r in rs}),
               "ratings": len(rs)}
        for q in QUESTIONS:
            ans = [r[q] for r in rs if r[q] in ("yes", "no")]
            k, n = sum(a == "yes" for a in ans), len(ans)
            lo, hi = wilson_interval(k, n)
            row.update({f"{q}_yes": k, f"{q}_n": n, f"{q}_pct": 100.0 * k / n if n else math.nan,
                        f"{q}_ci_low": 100.0 * lo, f"{q}_ci_high": 100.0 * hi})
        row["median_seconds"] = _median([r["seconds"] for r in rs])
        rows.append(row)
    return rows


def agreement(ratings: list[dict]) -> list[dict]:
    """Inter-reader agreement per question over the cases every reader answered."""
    readers = sorted({r["reader"] for r in ratings})
    out = []
    for q in QUESTIONS:
        by_case: dict[str, dict[str, str]] = defaultdict(dict)
        for r in ratings:
            if r[q] in ("yes", "no"):
                by_case[r["case_id"]][r["reader"]] = r[q]
        common = sorted(c for c, d in by_case.items() if len(d) == len(readers))
        row = {"question": q, "readers": len(readers), "cases": len(common)}
        if len(readers) < 2:
            row.update(statistic="n/a (one reader)", kappa=math.nan)
        elif len(readers) == 2:
            a = [by_case[c][readers[0]] for c in common]
            b = [by_case[c][readers[1]] for c in common]
            row.update(statistic="Cohen's kappa", kappa=cohen_kappa(a, b))
        else:
            counts = [[sum(v == "yes" for v in by_case[c].values()), sum(v == "no" for v in by_case[c].values())]
                      for c in common]
            row.update(statistic="Fleiss' kappa", kappa=fleiss_kappa(counts) if counts else math.nan)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- outputs
def _fmt_pct(row, q):
    if not row[f"{q}_n"]:
        return "-"
    return f"{row[f'{q}_pct']:.0f}% [{row[f'{q}_ci_low']:.0f}-{row[f'{q}_ci_high']:.0f}]"


def _fmt(x, nd=2):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def write_markdown(rows: list[dict], agree: list[dict], study: Study, path: Path) -> None:
    n_readers = agree[0]["readers"] if agree else 0
    lines = [f"# Reader study: {study.name}", "",
             f"{len(study.cases)} cases, {n_readers} reader(s), field of view: {study.data.get('fov', 'fsu')}. "
             "Last answer per reader and case; percentages with Wilson 95% intervals.", "",
             "## Table 2", "",
             "| Group | Condition | Level | Cases | Ratings | Realistic | Pathology present | Median s |",
             "|---|---|---|---:|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {GROUP_LABELS.get(r['group'], r['group'])} | {r['condition']} | {r['level']} | {r['cases']} | "
                     f"{r['ratings']} | {_fmt_pct(r, 'realistic')} | {_fmt_pct(r, 'pathology_present')} | "
                     f"{_fmt(r['median_seconds'], 1)} |")
    lines += ["", "## Inter-reader agreement", "", "| Question | Statistic | Readers | Cases | Kappa |", "|---|---|---:|---:|---:|"]
    for a in agree:
        lines.append(f"| {a['question']} | {a['statistic']} | {a['readers']} | {a['cases']} | {_fmt(a['kappa'], 3)} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_table2(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = sorted({r["condition"] for r in rows})
    groups = [g for g in GROUP_ORDER if g != "inpainted:all" and any(r["group"] == g for r in rows)]
    levels = [lv for lv in LEVELS + ("all",) if any(r["level"] == lv for r in rows)]
    colors = {"inpainted:weighted": "#1f77b4", "inpainted:masked": "#ff7f0e", "inpainted:repaint": "#2ca02c",
              "real_pathological": "#7f7f7f", "real_healthy": "#c7c7c7"}
    fig, axes = plt.subplots(len(conds), 2, figsize=(12, 3.6 * len(conds)), squeeze=False)
    width = 0.8 / max(1, len(groups))
    for ci, cond in enumerate(conds):
        for qi, (q, qlabel) in enumerate((("realistic", "% rated realistic"), ("pathology_present", "% pathology present"))):
            ax = axes[ci][qi]
            for gi, g in enumerate(groups):
                xs, ys, lo, hi, ns = [], [], [], [], []
                for li, lv in enumerate(levels):
                    m = [r for r in rows if r["group"] == g and r["condition"] == cond and r["level"] == lv]
                    if m and m[0][f"{q}_n"]:
                        xs.append(li + (gi - (len(groups) - 1) / 2) * width)
                        ys.append(m[0][f"{q}_pct"])
                        lo.append(m[0][f"{q}_pct"] - m[0][f"{q}_ci_low"])
                        hi.append(m[0][f"{q}_ci_high"] - m[0][f"{q}_pct"])
                        ns.append(m[0][f"{q}_n"])
                if xs:
                    for x, n in zip(xs, ns):
                        ax.text(x, 1.5, str(n), ha="center", va="bottom", fontsize=6, color="black")
                    ax.bar(xs, ys, width * 0.95, yerr=[lo, hi], capsize=2, color=colors.get(g, "k"),
                           label=GROUP_LABELS.get(g, g), edgecolor="black", linewidth=0.4)
            ax.set_xticks(range(len(levels)))
            ax.set_xticklabels(levels)
            ax.set_ylim(0, 105)
            ax.set_ylabel(qlabel)
            ax.set_title(f"{condition_label(cond)}: {qlabel} (n ratings at the bar foot)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title or "Reader study (Wilson 95% intervals)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_report(study_dir: str | Path, out_dir: str | Path, truth_path: str | Path | None = None,
                plot: bool = True) -> dict:
    """Write table2.csv, table2.md, agreement.csv, ratings.csv, report.json (+ table2.png). Returns report.json's dict."""
    study = Study.load(study_dir)
    truth = study.load_truth(truth_path)
    ratings = collect_ratings(study, truth)
    rows = table2(ratings)
    agree = agreement(ratings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table2.csv", list(rows[0]) if rows else ["group", "condition", "level", "cases", "ratings"], rows)
    write_csv(out / "agreement.csv", ["question", "statistic", "readers", "cases", "kappa"], agree)
    write_ratings_csv(ratings, out / "ratings.csv")
    write_markdown(rows, agree, study, out / "table2.md")
    if plot and rows:
        plot_table2(rows, out / "table2.png", f"Reader study: {study.name}")
    rep = {"study": study.name, "cases": len(study.cases), "ratings": len(ratings), "table2": rows,
           "agreement": agree}
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str).replace("NaN", "null"), encoding="utf-8")
    return rep


def write_ratings_csv(ratings: list[dict], path: Path) -> None:
    fields = ["reader", "case_id", "level", "condition", "truth", "method", "realistic", "pathology_present",
              "confidence", "seconds", "complete"]
    write_csv(path, fields, ratings)


def export_answers(study_dir: str | Path, out_path: str | Path, history: bool = False,
                   truth_path: str | Path | None = None) -> int:
    """Export answers as JSONL (``.jsonl``) or CSV (``.csv``): last answer per reader and case, or every row
    with ``history``. With ``truth_path`` the truth columns are joined (organizer analysis). Returns row count."""
    study = Study.load(study_dir)
    names = {r.reader_id: r.name for r in study.store.readers()}
    truth = study.load_truth(truth_path) if truth_path else None
    qids = [q["id"] for q in study.questions]
    rows = []
    for a in (study.store.all_rows() if history else study.store.all_latest()):
        c = study.case(a.case_id)
        row = {"row_id": a.row_id, "reader": names.get(a.reader_id), "case_id": a.case_id, "level": c["level"],
               "condition": c["condition"], **{q: a.values.get(q) for q in qids}, "complete": a.complete,
               "seconds": a.seconds, "client": a.client, "created": a.created}
        if truth is not None:
            row["truth"] = truth[a.case_id]["truth"]
            row["method"] = truth[a.case_id].get("method")
        rows.append(row)
    p = Path(out_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".csv":
        fields = list(rows[0]) if rows else ["row_id", "reader", "case_id", "level", "condition", *qids, "complete",
                                             "seconds", "client", "created"]
        write_csv(p, fields, rows)
    elif p.suffix.lower() in (".jsonl", ".json"):
        with p.open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    else:
        raise InputError(f"export file must end in .jsonl or .csv, got {p.name!r}")
    return len(rows)
