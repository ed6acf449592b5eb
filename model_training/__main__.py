"""``python -m model_training COMMAND ...`` (also under ``torchrun --nproc_per_node=N -m model_training ...``).

Training side: train-autoencoder | train-ldm | export | export-decoder | evaluate | make-demo-weights |
benchmark-phantoms | train-reader.
Data side (model_training.data_cli / model_training.data, when present): import-spider | import-rsna |
import-manifest | import-phantom | support ... are forwarded to that module's ``main(argv)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from spine_ldm.errors import SpineLDMError

TRAIN_COMMANDS = ("train-autoencoder", "train-ldm", "export", "export-decoder", "evaluate", "make-demo-weights",
                  "benchmark-phantoms", "train-reader")


def _data_module():
    for name in ("model_training.data_cli", "model_training.data"):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            if getattr(e, "name", None) == name:
                continue
            raise
        if hasattr(mod, "main"):
            return mod
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training",
                                description="SpineInpaint training: VQGAN autoencoder, latent diffusion "
                                            "(weighted / masked / full), export, evaluation, demo weights.")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common_train(sp, default_cfg):
        sp.add_argument("--config", default=default_cfg,
                        help=f"training YAML (path or name in model_training/configs; default {default_cfg})")
        sp.add_argument("--manifest", help="manifest CSV (model_training.manifest)")
        sp.add_argument("--out", required=True, help="run directory (checkpoints, TensorBoard, weights)")
        sp.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: per LOCAL_RANK)")
        sp.add_argument("--cache-dir", help="FSU crop cache (default: <manifest folder>/.fsu_cache)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a training config key (repeatable), e.g. --set steps=200")
        sp.add_argument("--quiet", action="store_true")

    a = sub.add_parser("train-autoencoder", help="train the VQGAN autoencoder")
    common_train(a, "ae_small")

    l = sub.add_parser("train-ldm", help="train a latent diffusion U-Net (weighted | masked | full)")
    common_train(l, "ldm_small")
    l.add_argument("--method", required=True, choices=("weighted", "masked", "full"))
    l.add_argument("--autoencoder", required=True, help="train-autoencoder run dir or autoencoder .pt")
    l.add_argument("--conditions", help="comma list of target conditions (weighted/masked default: every "
                                        "pathology; full default: all)")

    e = sub.add_parser("export", help="export a train-ldm run (+ its autoencoder) into a Models.json registry")
    e.add_argument("--run", required=True)
    e.add_argument("--id", required=True)
    e.add_argument("--registry", required=True, help="Models.json to create or update")
    e.add_argument("--weights-dir", help="where the .pt files go (default <registry folder>/Models)")
    e.add_argument("--autoencoder-name", help="file stem of the autoencoder weights (share one between entries)")
    e.add_argument("--description", default="")
    e.add_argument("--training-data", default="")
    e.add_argument("--license", default="")
    e.add_argument("--extra", help="JSON object merged into the entry")
    e.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    e.add_argument("--half", action="store_true", help="store the U-Net in float16 (half the size)")

    x = sub.add_parser("export-decoder", help="swap a decoder-fine-tuned autoencoder (train: decoder) into a "
                                              "registry, for every entry using the one it started from")
    x.add_argument("--run", required=True, help="train-autoencoder run dir (train: decoder, complete)")
    x.add_argument("--registry", required=True, help="Models.json to update")

    v = sub.add_parser("evaluate", help="Table 1: FID and MS-SSIM per level x condition x method")
    from .evaluate import add_arguments as _eval_args
    _eval_args(v)

    d = sub.add_parser("make-demo-weights", help="the bundled demo recipe: phantoms -> AE -> weighted/masked/full")
    from .demo_weights import add_arguments as _demo_args
    _demo_args(d)

    b = sub.add_parser("benchmark-phantoms", help="paired-truth phantom benchmark: metrics, readers, tables, figures")
    from .benchmark.run import add_arguments as _bench_args
    _bench_args(b)

    r = sub.add_parser("train-reader", help="train the benchmark's pathology-present reader on phantom crops")
    from .benchmark.readers import add_arguments as _reader_args
    _reader_args(r)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in TRAIN_COMMANDS:
        mod = _data_module()
        if mod is not None:
            return int(mod.main(argv) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not args.command:
        parser.print_help()
        mod = _data_module()
        if mod is not None:
            print(f"\ndata commands: python -m model_training <data command> (see python -m {mod.__name__} --help)")
        return 1
    try:
        return _run(args)
    except SpineLDMError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted (the last complete checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130


def _run(args) -> int:
    from . import common as C

    if args.command in ("train-autoencoder", "train-ldm"):
        cfg = C.load_train_config(args.config, C.parse_overrides(args.set))
        if args.command == "train-autoencoder":
            from .train_autoencoder import train_autoencoder
            train_autoencoder(cfg, args.out, manifest=args.manifest, resume=args.resume, device=args.device,
                              cache_dir=args.cache_dir, quiet=args.quiet)
        else:
            from .train_ldm import train_ldm
            conds = [c for c in (args.conditions or "").split(",") if c.strip()] or None
            train_ldm(cfg, args.method, args.autoencoder, args.out, manifest=args.manifest, resume=args.resume,
                      device=args.device, conditions=conds, cache_dir=args.cache_dir, quiet=args.quiet)
        return 0
    if args.command == "export":
        from .export import main_export
        return main_export(args)
    if args.command == "export-decoder":
        from .export import main_export_decoder
        return main_export_decoder(args)
    if args.command == "evaluate":
        from .evaluate import main_evaluate
        return main_evaluate(args)
    if args.command == "make-demo-weights":
        from .demo_weights import main_demo
        return main_demo(args)
    if args.command == "benchmark-phantoms":
        from .benchmark.run import main_benchmark
        return main_benchmark(args, args.argv)
    if args.command == "train-reader":
        from .benchmark.readers import main_train_reader
        return main_train_reader(args)
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
