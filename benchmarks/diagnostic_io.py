"""Shared by the diagnostic scripts (``c2st_bounds.py``, ``paste_knobs.py``, ``landmark_placement.py``): common
options, the variant x condition table, record the command, print the table, write the JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def finish(res: dict, script: str, argv, out, table) -> int:
    """Add ``argv`` (as re-runnable from the repository root) to ``res``, print ``table(res)``, write ``out``."""
    res["argv"] = ["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]
    print(table(res))
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def parser(doc: str, conditions, out, seeds: str = "1000-1019"):
    """The diagnostic scripts' common options: --seeds, --conditions, --registry, --out (add more to the result)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seeds", default=seeds, help="held-out benchmark seeds (default %(default)s)")
    ap.add_argument("--conditions", default=",".join(conditions))
    ap.add_argument("--registry", help="Models.json (default: the bundled one)")
    ap.add_argument("--out", default=str(out))
    return ap


def variant_table(res: dict, variants, cell, head=lambda cond, summary: cond) -> str:
    """Markdown table, one row per variant and one column per condition of ``res["conditions"]``:
    ``cell(res["conditions"][cond]["variants"][variant])``; variants missing in some condition are left out."""
    conds = list(res["conditions"])
    rows = [k for k in variants if all(k in s["variants"] for s in res["conditions"].values())]
    lines = ["| Variant | " + " | ".join(head(c, res["conditions"][c]) for c in conds) + " |",
             "|---|" + "---|" * len(conds)]
    for k in rows:
        lines.append(f"| `{k}` | " + " | ".join(cell(res["conditions"][c]["variants"][k]) for c in conds) + " |")
    return "\n".join(lines)
