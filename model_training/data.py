"""Data command line: ``python -m model_training.data COMMAND`` (also ``python -m model_training COMMAND``).

Commands::

    import-spider   ROOT --out M.csv [--t2-space] [--herniation-condition dh_moderate_large]
    import-rsna     ROOT --cache-dir VOLS --out M.csv [--disc-offset-mm 28]
    import-manifest HAND.csv --out M.csv          validate a hand-written manifest, fill spacing/source
    import-phantom  --out-dir DIR --n-studies N --out M.csv [--mix dh_small=0.2,ccs_severe=0.2] [--spacing ...]
                    [--healthy-twins] [--pathologies-per-study 2] [--level-weights L4-L5=0.3,...]
    support         M.csv [--split train] [--require-landmark]
    precache        M.csv --cache-dir C [--spec small|paper]   fill the FSU crop cache once

Every import assigns train/val/test per study (``--fractions 0.8,0.1,0.1 --seed 0``; ``--no-split`` leaves it
empty) and prints the support table. ``--append`` merges into an existing manifest: rows already there keep
their split, re-imported (study, image, level) rows are replaced, new studies are split with the seed.
Errors print one line ``error: ...`` and exit with 2 (input) / 1 (other).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spine_ldm.errors import InputError, SpineLDMError

from .manifest import (
    Row, assign_splits, format_support_table, read_manifest, support_table, write_manifest,
)


def _fractions(s: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {s!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers (train,val,test), got {s!r}")
    return vals  # type: ignore[return-value]


def _mix(s: str) -> dict[str, float]:
    out = {}
    for part in [p for p in s.split(",") if p.strip()]:
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected condition=fraction pairs, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = float(v)
    return out


def _add_output(sp):
    sp.add_argument("--out", required=True, help="manifest CSV to write")
    sp.add_argument("--append", action="store_true", help="merge into --out if it exists (keeps its splits)")
    sp.add_argument("--fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test (default 0.8,0.1,0.1)")
    sp.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    sp.add_argument("--no-split", action="store_true", help="leave the split column empty")
    sp.add_argument("--relative-paths", action="store_true", help="store image paths relative to the manifest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training.data",
                                description="Import lumbar MRI datasets into one FSU manifest; support tables.")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("import-spider", help="SPIDER: images/*.mha, masks/*.mha, radiological_gradings.csv")
    s.add_argument("root")
    s.add_argument("--t2-space", action="store_true", help="also import the 3-D t2_SPACE series")
    s.add_argument("--herniation-condition", default="dh_moderate_large", choices=("dh_small", "dh_moderate_large"),
                   help="condition for SPIDER's binary 'Disc herniation = 1' (default dh_moderate_large)")
    s.add_argument("--no-landmark", action="store_true", help="do not derive the posterior-margin landmark")
    _add_output(s)

    r = sub.add_parser("import-rsna", help="RSNA 2024: train_images/ DICOM + train*.csv; writes NRRD volumes")
    r.add_argument("root")
    r.add_argument("--cache-dir", required=True, help="folder for the per-series NRRD volumes")
    r.add_argument("--disc-offset-mm", type=float, default=None,
                   help="anterior shift canal point -> disc centre (default geometry.DISC_OFFSET_MM['ccs'])")
    r.add_argument("--studies", help="comma list of study ids to import (default all)")
    r.add_argument("--overwrite", action="store_true", help="rewrite NRRD volumes that exist")
    _add_output(r)

    m = sub.add_parser("import-manifest", help="validate a hand-written manifest against the images")
    m.add_argument("csv")
    m.add_argument("--tolerance-mm", type=float, default=0.0, help="how far outside the image a point may lie")
    _add_output(m)

    ph = sub.add_parser("import-phantom", help="generate phantom studies (spine_ldm.phantom) with a pathology mix")
    ph.add_argument("--out-dir", required=True, help="folder for the phantom volumes")
    ph.add_argument("--n-studies", type=int, required=True)
    ph.add_argument("--phantom-seed", type=int, default=0, help="generator seed (default 0)")
    ph.add_argument("--mix", type=_mix, default=None,
                    help="fraction of studies per pathology, e.g. dh_small=0.2,ccs_severe=0.2 (rest healthy)")
    ph.add_argument("--spacing", type=_fractions, default=None, help="voxel spacing i,j,k mm")
    ph.add_argument("--healthy-twins", action="store_true", help="also write each pathological study's healthy twin")
    ph.add_argument("--pathologies-per-study", type=int, default=1,
                    help="distinct pathologies (from the mix) at distinct levels per pathological study (default 1)")
    ph.add_argument("--level-weights", type=_mix, default=None,
                    help="relative level frequencies of the pathologies, e.g. L4-L5=0.3,L5-S1=0.25,... "
                         "(default uniform)")
    _add_output(ph)

    su = sub.add_parser("support", help="FSU counts per level x condition")
    su.add_argument("manifest")
    su.add_argument("--split", choices=("train", "val", "test"))
    su.add_argument("--require-landmark", action="store_true")

    pc = sub.add_parser("precache", help="extract every FSU once into the crop cache")
    pc.add_argument("manifest")
    pc.add_argument("--cache-dir", required=True)
    pc.add_argument("--spec", default="small", help="small | paper | SI,AP,LR voxel shape (80x80x50 mm)")
    pc.add_argument("--split", choices=("train", "val", "test"))
    return p


def _finish(args, rows: list[Row], skipped=None) -> int:
    out = Path(args.out)
    if args.append and out.is_file():
        old = read_manifest(out)
        new_keys = {(r.study_id, r.image_path, r.level) for r in rows}
        old_split = {r.study_id: r.split for r in old if r.split}
        rows = [r for r in old if (r.study_id, r.image_path, r.level) not in new_keys] + \
               [r.replace(split=old_split.get(r.study_id, "")) for r in rows]
        if not args.no_split:
            rows = assign_splits(rows, args.fractions, args.seed, overwrite=False)
    elif not args.no_split:
        rows = assign_splits(rows, args.fractions, args.seed)
    write_manifest(out, rows, relative_paths=args.relative_paths)
    n_st = len({r.study_id for r in rows})
    print(f"wrote {out}: {len(rows)} FSUs from {n_st} studies")
    if not args.no_split:
        per = {sp: len({r.study_id for r in rows if r.split == sp}) for sp in ("train", "val", "test")}
        print("studies per split: " + ", ".join(f"{k} {v}" for k, v in per.items()))
        empty = [k for k, v in per.items() if v == 0]
        if empty:
            print(f"note: no study in {', '.join(empty)} ({n_st} studies are too few for fractions "
                  f"{','.join(f'{f:g}' for f in args.fractions)})")
    if skipped is not None and len(skipped):
        print(skipped.summary())
    print(format_support_table(support_table(rows), title="support (all splits)"))
    return 0


def _spec(name: str):
    from spine_ldm.geometry import FSUSpec

    if name == "small":
        return FSUSpec.small()
    if name == "paper":
        return FSUSpec()
    try:
        shape = tuple(int(v) for v in name.split(","))
        return FSUSpec(shape=shape)
    except (ValueError, TypeError):
        raise InputError(f"--spec must be small, paper or SI,AP,LR voxel counts, got {name!r}") from None


def run(args) -> int:
    from .importers.common import SkipLog

    cmd = args.command
    if cmd == "import-spider":
        from .importers.spider import import_spider

        sk = SkipLog()
        rows = import_spider(args.root, include_t2_space=args.t2_space,
                             herniation_condition=args.herniation_condition,
                             landmark="none" if args.no_landmark else "posterior_margin", skipped=sk)
        return _finish(args, rows, sk)
    if cmd == "import-rsna":
        from .importers.rsna import import_rsna

        sk = SkipLog()
        studies = [s.strip() for s in args.studies.split(",")] if args.studies else None
        rows = import_rsna(args.root, args.cache_dir, studies=studies, disc_offset_mm=args.disc_offset_mm,
                           overwrite=args.overwrite, skipped=sk)
        return _finish(args, rows, sk)
    if cmd == "import-manifest":
        from .importers.generic import import_manifest

        return _finish(args, import_manifest(args.csv, tolerance_mm=args.tolerance_mm))
    if cmd == "import-phantom":
        from .importers.phantom import import_phantoms

        kw = {}
        if args.mix is not None:
            kw["mix"] = args.mix
        if args.spacing is not None:
            kw["spacing"] = args.spacing
        if args.level_weights is not None:
            kw["level_weights"] = args.level_weights
        rows = import_phantoms(args.out_dir, args.n_studies, args.phantom_seed, healthy_twins=args.healthy_twins,
                               pathologies_per_study=args.pathologies_per_study, **kw)
        return _finish(args, rows)
    if cmd == "support":
        rows = read_manifest(args.manifest)
        title = f"support ({args.split or 'all splits'}{', with landmark' if args.require_landmark else ''})"
        print(format_support_table(support_table(rows, split=args.split, require_landmark=args.require_landmark),
                                   title=title))
        return 0
    if cmd == "precache":
        from .dataset import FSUDataset

        ds = FSUDataset(read_manifest(args.manifest), _spec(args.spec), args.cache_dir, split=args.split)
        last = [-1]

        def progress(i, n):
            pct = int(100 * i / max(n, 1))
            if pct // 10 != last[0]:
                last[0] = pct // 10
                print(f"  {i}/{n}", flush=True)

        failed = ds.precompute(progress=progress, skip_errors=True)
        print(f"cached {len(ds) - len(failed)} FSUs in {args.cache_dir} "
              f"({ds.stats['extracted']} extracted, {ds.stats['cache_hits']} already there)")
        for i, msg in failed:
            print(f"  failed: {msg}")
        return 0 if not failed else 2
    raise SystemExit(f"unknown command {cmd}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    try:
        return run(args)
    except SpineLDMError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
