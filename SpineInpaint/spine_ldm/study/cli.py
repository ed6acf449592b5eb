"""``spine-ldm study ...`` sub-commands (argparse only; logic lives in engine/report/web).

::

    spine-ldm study create --inpainted DIR_OR_GLOB [--real-manifest CSV | --real CASES.json] [--mix ...]
                           [--seed S] [--fov fsu|whole] --out STUDY_DIR
    spine-ldm study demo --out STUDY_DIR                 # small synthetic study (tests, try-out)
    spine-ldm study add-reader STUDY_DIR NAME [--seed N] # prints the reader's token (shown once)
    spine-ldm study readers STUDY_DIR
    spine-ldm study serve STUDY_DIR [--host 127.0.0.1] [--port 8765]
    spine-ldm study report STUDY_DIR --out DIR [--truth PATH]
    spine-ldm study export STUDY_DIR --out FILE.jsonl|FILE.csv [--history] [--truth PATH]

Every leaf parser sets ``func(args) -> int``; errors are raised as ``spine_ldm.errors`` types.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_create(args) -> int:
    from ..errors import InputError
    from .engine import create_study, inpainted_sources, real_sources

    inp = inpainted_sources(args.inpainted) if args.inpainted else []
    real = real_sources(args.real_manifest or args.real) if (args.real_manifest or args.real) else []
    if not inp and not real:
        raise InputError("give --inpainted and/or --real-manifest (or --real)")

    def prog(i, n):
        print(f"\rwriting anonymized volumes {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    st = create_study(args.out, inp, real, mix=args.mix, seed=args.seed, fov=args.fov, name=args.name,
                      truth_out=args.truth_out, progress=prog)
    for w in getattr(st, "warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps({"study": str(st.root), "cases": len(st.cases), "warnings": len(getattr(st, "warnings", [])),
                      "truth": str(args.truth_out or st.truth_path())}))
    return 0


def _cmd_demo(args) -> int:
    from .blind import PAPER_FSU_SHAPE
    from .engine import make_demo_study

    st = make_demo_study(args.out, n_inpainted_per_method=args.per_method, n_real_pathological=args.real_pathological,
                         n_real_healthy=args.real_healthy, seed=args.seed, fov=args.fov, condition=args.condition,
                         fsu_shape=PAPER_FSU_SHAPE, phantom_spacing=tuple(args.phantom_spacing))
    print(json.dumps({"study": str(st.root), "cases": len(st.cases), "truth": str(st.truth_path())}))
    return 0


def _cmd_add_reader(args) -> int:
    from .engine import Study

    reader, token = Study.load(args.study).add_reader(args.name, args.seed)
    print(f"reader {reader.name!r} (id {reader.reader_id}) token (shown once, store it safely):", file=sys.stderr)
    print(token)
    return 0


def _cmd_readers(args) -> int:
    from .engine import ReaderSession, Study

    st = Study.load(args.study)
    for r in st.store.readers():
        p = ReaderSession(st, r).progress()
        print(f"{r.reader_id}\t{r.name}\t{p['answered']}/{p['total']} answered")
    return 0


def _cmd_serve(args) -> int:
    from .web import serve

    serve(args.study, host=args.host, port=args.port)
    return 0


def _cmd_report(args) -> int:
    from .report import make_report

    rep = make_report(args.study, args.out, truth_path=args.truth, plot=not args.no_plot)
    print(json.dumps({"out": args.out, "ratings": rep["ratings"], "rows": len(rep["table2"])}))
    return 0


def _cmd_export(args) -> int:
    from .report import export_answers

    n = export_answers(args.study, args.out, history=args.history, truth_path=args.truth)
    print(json.dumps({"out": args.out, "rows": n}))
    return 0


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``study`` with its sub-commands to an argparse sub-parser collection."""
    p = subparsers.add_parser("study", help="blinded reader study: create, add readers, serve, report, export",
                              description="Blinded reader study (paper Table 2).")
    sub = p.add_subparsers(dest="study_cmd", metavar="ACTION")

    q = sub.add_parser("create", help="build a blinded study from inpainting outputs and real cases")
    q.add_argument("--inpainted", nargs="+", default=None, metavar="DIR_OR_GLOB",
                   help="inpainting output NRRDs (provenance from their spine_ldm_* header keys)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--real-manifest", default=None, metavar="CSV",
                   help="real cases: CSV with path,level,condition,landmark_lps[,disc_center_lps,ask_condition]")
    g.add_argument("--real", default=None, metavar="CASES.json", help="real cases as a JSON list (same keys)")
    q.add_argument("--mix", default=None,
                   help="counts, e.g. 'inpainted=40,real_pathological=5,real_healthy=5' or "
                        "'weighted=20,masked=10,repaint=10,...'; 'all' = every case of that kind; kinds not listed are "
                        "left out (default without --mix: every case)")
    q.add_argument("--seed", type=int, default=0, help="seed of the case selection (default 0)")
    q.add_argument("--fov", choices=("fsu", "whole"), default="fsu",
                   help="field of view: 8x8x5 cm FSU box centred on the landmark, every case on one canonical grid "
                        "(default), or the whole volume on the scan's own grid")
    q.add_argument("--name", default=None, help="study name shown to readers")
    q.add_argument("--truth-out", default=None, help="where to write the hidden truth key "
                                                     "(default STUDY_DIR/organizer/truth.json)")
    q.add_argument("--out", required=True, metavar="STUDY_DIR")
    q.set_defaults(func=_cmd_create)

    q = sub.add_parser("demo", help="make a small synthetic demo study")
    q.add_argument("--out", required=True, metavar="STUDY_DIR")
    q.add_argument("--per-method", type=int, default=2)
    q.add_argument("--real-pathological", type=int, default=2)
    q.add_argument("--real-healthy", type=int, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--fov", choices=("fsu", "whole"), default="fsu")
    q.add_argument("--condition", default="dh_moderate_large", help="condition drawn and asked about")
    q.add_argument("--phantom-spacing", type=float, nargs=3, default=(0.625, 0.625, 4.3), metavar=("AP", "SI", "LR"),
                   help="voxel spacing (mm) of the phantom volumes (default 0.625 0.625 4.3)")
    q.set_defaults(func=_cmd_demo)

    q = sub.add_parser("add-reader", help="create a reader; prints the token (only its hash is stored)")
    q.add_argument("study", metavar="STUDY_DIR")
    q.add_argument("name")
    q.add_argument("--seed", type=int, default=None, help="seed of this reader's case order (default random)")
    q.set_defaults(func=_cmd_add_reader)

    q = sub.add_parser("readers", help="list readers and their progress")
    q.add_argument("study", metavar="STUDY_DIR")
    q.set_defaults(func=_cmd_readers)

    q = sub.add_parser("serve", help="browser reader app (FastAPI + NiiVue)")
    q.add_argument("study", metavar="STUDY_DIR")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8765)
    q.set_defaults(func=_cmd_serve)

    q = sub.add_parser("report", help="Table 2 (CSV, Markdown, PNG) and inter-reader agreement")
    q.add_argument("study", metavar="STUDY_DIR")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--truth", default=None, help="truth key (default STUDY_DIR/organizer/truth.json)")
    q.add_argument("--no-plot", action="store_true")
    q.set_defaults(func=_cmd_report)

    q = sub.add_parser("export", help="export answers as JSONL or CSV")
    q.add_argument("study", metavar="STUDY_DIR")
    q.add_argument("--out", required=True, metavar="FILE.jsonl|FILE.csv")
    q.add_argument("--history", action="store_true", help="every answer row, not only the last per reader and case")
    q.add_argument("--truth", default=None, help="join the truth key (organizer analysis)")
    q.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m spine_ldm.study.cli ACTION ...``."""
    from ..errors import SpineLDMError

    ap = argparse.ArgumentParser(prog="spine-ldm")
    sub = ap.add_subparsers(dest="cmd")
    add_study_parser(sub)
    args = ap.parse_args(["study", *(sys.argv[1:] if argv is None else argv)])
    if getattr(args, "func", None) is None:
        ap.parse_args(["study", "--help"])
        return 2
    try:
        return int(args.func(args) or 0)
    except SpineLDMError as e:
        print(f"spine-ldm: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
