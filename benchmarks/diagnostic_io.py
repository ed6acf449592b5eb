"""Shared by the diagnostic scripts (``c2st_bounds.py``, ``landmark_placement.py``): record the command, print
the markdown table, write the JSON."""
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
