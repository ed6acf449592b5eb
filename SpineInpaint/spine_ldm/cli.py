"""``spine-ldm`` command line: argument parsing and the JSON-lines protocol only (logic lives in pipeline etc.).

Sub-commands: ``inpaint``, ``phantom``, ``models list|verify|import``, ``demo``, ``serve``, ``study``.

Output protocol of ``inpaint`` (``--progress json``): one JSON object per line on **stdout**::

    {"event": "start", "device": "cpu", "samples": 2, "steps": 50, "method": "weighted", "model": "..."}
    {"event": "progress", "step": 3, "of": 51, "stage": "sample"}
    {"event": "done", "outputs": [...], "nfe": 51, "seconds": 4.2, "device": "cpu", "peak_memory_mb": 812.0,
     "provenance": {...}, "provenances": [{...}, ...]}
    {"event": "error", "kind": "input", "message": "..."}

``--progress text`` writes a progress line to stderr and the output paths to stdout; ``none`` prints only the
output paths. Errors always print one line ``spine-ldm: error: <message>`` on stderr (plus the JSON ``error`` event
with ``--progress json``); the traceback only with ``--debug``. Exit codes (``spine_ldm.errors``): 0 ok, 2 input,
3 model, 4 device, 130 cancelled (Ctrl-C), 1 anything else.

Output files of ``inpaint --out OUT.nrrd``: ``OUT.nrrd`` when ``--samples 1``, else ``OUT_1.nrrd`` ...
``OUT_K.nrrd``. Each has the input's exact grid (size, origin, spacing, direction, pixel type) and carries the
provenance in NRRD header keys ``spine_ldm_*``.

Coordinates: ``--landmark`` / ``--disc-center`` are in millimetres, LPS by default (the backend convention, what
ITK and NRRD headers use); ``--coords ras`` takes them as 3D Slicer shows them (RAS = (-x, -y, z)).
Negative first coordinates work both as ``--landmark -1,2,3`` and ``--landmark=-1,2,3``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .errors import CancelledError, InputError, SpineLDMError

PROG = "spine-ldm"
_VECTOR_OPTIONS = ("--landmark", "--disc-center", "--spacing")


# ----------------------------------------------------------------------------------------------------------------
# small parsing helpers
def parse_vector(text: str, n: int = 3, what: str = "value") -> tuple[float, ...]:
    parts = [p for p in str(text).replace(";", ",").split(",")]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"{what} must be {n} comma-separated numbers (e.g. 1.5,-20,33), got {text!r}") from None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise InputError(f"{what} must be {n} finite comma-separated numbers, got {text!r}")
    return vals


def _fix_negative_vectors(argv: list[str]) -> list[str]:
    """``--landmark -1,2,3`` -> ``--landmark=-1,2,3`` (argparse would take ``-1,2,3`` for an option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _VECTOR_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and len(argv[i + 1]) > 1 \
                and (argv[i + 1][1].isdigit() or argv[i + 1][1] == "."):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


class _Emitter:
    """Writes the progress protocol (json | text | none)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._last_text = 0.0

    def event(self, **obj) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
            sys.stdout.flush()

    def progress(self, step: int, total: int, stage: str = "sample") -> None:
        if self.mode == "json":
            self.event(event="progress", step=int(step), of=int(total), stage=stage)
        elif self.mode == "text":
            now = time.monotonic()
            tty = sys.stderr.isatty()
            if step >= total or now - self._last_text > (0.5 if tty else 5.0):
                self._last_text = now
                end = "\n" if (step >= total or not tty) else "\r"
                sys.stderr.write(f"{stage}: step {step}/{total}{end}")
                sys.stderr.flush()

    def info(self, text: str) -> None:
        if self.mode == "text":
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


# ----------------------------------------------------------------------------------------------------------------
# sub-commands
@contextlib.contextmanager
def _interrupts_deferred():
    """While the outputs are written and reported, SIGINT / SIGTERM only set the returned flag (``write_outputs``
    asks it before each file and before renaming them into place): an interrupt either removes everything (exit
    130, nothing written) or comes too late and the complete outputs are reported (exit 0), never a mix."""
    import signal
    import threading

    flag = threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM"):
            sig = getattr(signal, name, None)
            if sig is not None:
                with contextlib.suppress(ValueError, OSError):
                    old[sig] = signal.signal(sig, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _cmd_inpaint(args, em: _Emitter) -> int:
    from . import pipeline
    from .conditions import parse_condition, parse_level
    from .geometry import ras_to_lps
    from .io import check_volume_file

    landmark = parse_vector(args.landmark, what="--landmark")
    disc = parse_vector(args.disc_center, what="--disc-center") if args.disc_center else None
    if args.coords == "ras":
        landmark = tuple(float(v) for v in ras_to_lps(landmark))
        disc = tuple(float(v) for v in ras_to_lps(disc)) if disc is not None else None
    level, condition = parse_level(args.level), parse_condition(args.condition)
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.suffix.lower() not in (".nrrd", ".nii", ".mha") and not str(out).lower().endswith(".nii.gz"):
        raise InputError(f"--out must end in .nrrd (or .nii.gz, .mha), got {str(out)!r}")
    if not Path(args.image).exists():
        raise InputError(f"input image {args.image} does not exist")
    # before any work (device, models, inference): the outputs never replace the input and can be written, and the
    # input's header is sane (voxel limit, data as long as the header claims)
    pipeline.check_outputs(out, args.samples, inputs=[args.image])
    check_volume_file(args.image)
    from .device import describe, select_device

    dev = select_device(args.device)
    model = args.model or pipeline.default_model_for(args.method, condition, args.registry)
    em.event(event="start", device=str(dev), device_name=describe(dev), samples=args.samples, steps=args.steps,
             method=args.method, model=model, version=__version__)
    em.info(f"spine-ldm {__version__}: {args.method} inpainting of {condition} at {level} on {describe(dev)} "
            f"({args.samples} sample(s), {args.steps} steps, model {model})")
    result = pipeline.inpaint(args.image, landmark, level, condition, method=args.method, samples=args.samples,
                              seed=args.seed, steps=args.steps, sigma_mm=args.sigma_mm, device=dev, model=model,
                              disc_center_lps=disc, progress=lambda s, t: em.progress(s, t, "sample"),
                              registry=args.registry, edge_taper_mm=args.edge_taper_mm,
                              repaint_jump=args.repaint_jump, repaint_resample=args.repaint_resample,
                              paste_mode=args.paste_mode, guidance_scale=args.guidance_scale)
    with _interrupts_deferred() as interrupted:
        paths = pipeline.write_outputs(result, out, inputs=[args.image], cancel=interrupted.is_set)
        em.event(event="done", outputs=[str(p) for p in paths], nfe=result.nfe, seconds=round(result.seconds, 3),
                 device=result.device, peak_memory_mb=round(result.peak_memory_mb, 1), provenance=result.provenance,
                 provenances=result.provenances)
        if em.mode != "json":
            em.info(f"done in {result.seconds:.1f} s ({result.nfe} network evaluations per sample, "
                    f"peak memory {result.peak_memory_mb:.0f} MB)")
            for p in paths:
                print(p)
        if interrupted.is_set():
            em.info("interrupted after the outputs were written: they are complete")
    return 0


def _cmd_phantom(args, em: _Emitter) -> int:
    from . import phantom

    kwargs = {"seed": args.seed, "dh": args.dh or None, "ccs": args.ccs or None}
    if args.spacing:
        kwargs["spacing"] = parse_vector(args.spacing, what="--spacing")
    res = phantom.generate_to_dir(args.out, **kwargs)
    em.event(event="done", out=str(args.out), result=res)
    if em.mode != "json":
        for key in ("t2", "labels", "landmarks"):
            if key in res:
                print(res[key])
    return 0


def _cmd_models(args, em: _Emitter) -> int:
    from . import registry as reg

    if args.models_cmd == "list":
        entries = reg.list_models(args.registry)
        if args.json:
            print(json.dumps([e.summary() for e in entries], indent=2))
            return 0
        if not entries:
            print(f"no models registered (registry {args.registry or reg.default_registry_path()}; user registry "
                  f"{reg.user_registry_path()})")
            return 0
        w = max(len(e.id) for e in entries)
        for e in entries:
            print(f"{e.id:<{w}}  {e.method:<8}  {Path(e.config).name if e.config not in ('small', 'paper') else e.config:<6}"
                  f"  {e.description}")
        return 0
    if args.models_cmd == "verify":
        entries = [reg.resolve(args.id, args.registry)] if args.id else reg.list_models(args.registry)
        bad = 0
        report = {}
        for e in entries:
            st = reg.verify(e)
            report[e.id] = {k: {"status": s.status, "where": s.where, "expected": s.expected, "actual": s.actual}
                            for k, s in st.items()}
            for s in st.values():
                bad += s.status not in ("ok", "not downloaded")
                if not args.json:
                    print(f"{e.id}: {s.message()}")
        if args.json:
            print(json.dumps(report, indent=2))
        if bad:
            sys.stderr.write(f"{PROG}: error: {bad} weights file(s) missing or corrupt\n")
            return 3
        return 0
    if args.models_cmd == "import":
        e = reg.import_zip(args.zip, replace=args.replace)
        print(f"imported {e.id} ({e.method}, config {e.config}) into {reg.user_registry_path()}")
        return 0
    if args.models_cmd == "export":
        p = reg.export_zip(args.id, args.zip, args.registry)
        print(p)
        return 0
    raise InputError("models: expected list, verify, import or export")


def _cmd_demo(args, em: _Emitter) -> int:
    from . import demo

    demo.run_demo(out_dir=args.out, real=args.real, device=args.device, steps=args.steps, samples=1,
                  seed=args.seed, registry=args.registry, repaint_resample=args.repaint_resample,
                  progress=(lambda s, t: em.progress(s, t, "sample")) if em.mode != "none" else None,
                  log=print)
    return 0


def _cmd_serve(args, em: _Emitter) -> int:
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise InputError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
        if not token:
            raise InputError(f"--token-file {args.token_file} is empty")
    try:
        from .server import serve
    except ImportError as e:
        raise SpineLDMError(f"the server needs the 'serve' extra (pip install 'spine-ldm[serve]'): {e}") from None
    serve(host=args.host, port=args.port, token=token, registry=args.registry, max_request_mb=args.max_request_mb,
          parent_pid=args.parent_pid)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="SpineInpaint backend: inpaint lumbar-spine pathology into "
                                "sagittal T2 MRI with a latent diffusion model (Hansen et al.).")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    from .conditions import CONDITIONS, LEVELS

    q = sub.add_parser("inpaint", help="inpaint a pathology at a landmark",
                       description="Inpaint a pathology at a landmark. Writes OUT.nrrd for --samples 1, else "
                                   "OUT_1.nrrd..OUT_K.nrrd, each on the input's exact grid with provenance in "
                                   "NRRD keys spine_ldm_*.")
    q.add_argument("image", help="input volume (NRRD, NIfTI, MHA)")
    q.add_argument("--landmark", required=True, metavar="X,Y,Z", help="point (mm) where the pathology goes")
    q.add_argument("--coords", choices=("lps", "ras"), default="lps",
                   help="frame of --landmark/--disc-center: lps (default, ITK/NRRD) or ras (as 3D Slicer shows)")
    q.add_argument("--disc-center", metavar="X,Y,Z", help="disc centre (mm) of the FSU; estimated from the landmark and --level when omitted")
    q.add_argument("--level", required=True, help=f"FSU level: {', '.join(LEVELS)}")
    q.add_argument("--condition", required=True, help=f"condition: {', '.join(CONDITIONS)}")
    q.add_argument("--method", choices=("weighted", "masked", "repaint"), default="weighted")
    q.add_argument("--samples", type=int, default=1, help="number of variants K (one batch)")
    q.add_argument("--seed", type=int, default=0, help="sample k (1-based) uses seed+k-1")
    q.add_argument("--steps", type=int, default=50, help="PLMS steps (51 network evaluations for 50)")
    q.add_argument("--sigma-mm", type=float, default=None,
                   help="Gaussian weight sigma in mm (default: the sigma the model was trained with; paper: 16)")
    q.add_argument("--paste-mode", choices=("change", "blend"), default="change",
                   help="change (default): add only the model's change (decoded sample minus the autoencoder's "
                        "reconstruction of the input) with weight W, so untouched anatomy keeps the scan's detail; "
                        "blend: the paper's W * decoded + (1 - W) * input")
    q.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance against the healthy condition (default: the model's own; "
                        "1 = none; >1 draws the pathology more strongly, 2 network evaluations per step)")
    q.add_argument("--edge-taper-mm", type=float, default=5.0,
                   help="paste-back weight ramps to 0 over this distance inside the FSU faces (0: plain W)")
    q.add_argument("--repaint-jump", type=int, default=10, help="RePaint jump length (default 10, as in RePaint)")
    q.add_argument("--repaint-resample", type=int, default=10,
                   help="RePaint resamplings per jump (default 10: 410 network evaluations at 50 steps)")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    q.add_argument("--model", default=None, help="registry id, model directory or zip (default: the registry's "
                                                 "default model of --method for --condition)")
    q.add_argument("--registry", default=None, help="Models.json to use (default: env SPINE_LDM_REGISTRY or the "
                                                    "bundled one)")
    q.add_argument("--out", required=True, help="output path (.nrrd)")
    q.add_argument("--progress", choices=("json", "text", "none"), default="text")

    q = sub.add_parser("phantom", help="write a synthetic lumbar T2 phantom (+ labels, landmarks)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--spacing", default=None, metavar="AP,SI,LR",
                   help="voxel spacing mm in ITK axis order (in-plane AP, in-plane SI, slice LR); default 0.625,0.625,4.3")
    q.add_argument("--dh", action="append", metavar="LEVEL:SEV", help="disc herniation, SEV small|moderate_large")
    q.add_argument("--ccs", action="append", metavar="LEVEL:SEV", help="canal stenosis, SEV moderate|severe")
    q.add_argument("--progress", choices=("json", "text", "none"), default="text")

    q = sub.add_parser("models", help="list, verify, import or export models")
    q.add_argument("--registry", default=None, help="Models.json (default: env SPINE_LDM_REGISTRY or bundled)")
    q.add_argument("--progress", choices=("json", "text", "none"), default="text", help=argparse.SUPPRESS)
    ms = q.add_subparsers(dest="models_cmd", metavar="ACTION")
    m = ms.add_parser("list", help="registered models (bundled + imported)")
    m.add_argument("--json", action="store_true")
    m = ms.add_parser("verify", help="check the sha256 of every weights file (exit 3 if any is missing/corrupt)")
    m.add_argument("id", nargs="?", help="model id or path (default: all)")
    m.add_argument("--json", action="store_true")
    m = ms.add_parser("import", help="import a model zip (model.json + weights) into the user cache")
    m.add_argument("zip")
    m.add_argument("--replace", action="store_true", help="replace an already imported model of the same id")
    m = ms.add_parser("export", help="write a model zip that 'models import' reads")
    m.add_argument("id")
    m.add_argument("zip")

    q = sub.add_parser("demo", help="phantom + bundled demo weights: weighted vs masked vs RePaint, NRRD + PNG")
    q.add_argument("--out", default="spine_ldm_demo", help="output directory (default ./spine_ldm_demo)")
    q.add_argument("--real", action="store_true", help="also run on ../shared/data/lumbar_t2/ivd_11_t2.nrrd")
    q.add_argument("--repaint-resample", type=int, default=3,
                   help="RePaint resamplings in the demo (default 3: 130 network evaluations, CPU-friendly; "
                        "the paper-faithful 10 gives 410)")
    q.add_argument("--device", default="auto")
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--registry", default=None)
    q.add_argument("--progress", choices=("json", "text", "none"), default="text")

    q = sub.add_parser("serve", help="HTTP server around the pipeline (needs the 'serve' extra)")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000, help="TCP port; 0 = any free one (the chosen port is printed "
                                                          "on stdout as a JSON line once the server listens)")
    q.add_argument("--parent-pid", type=int, default=None,
                   help="shut down when this process ends (the GUI that started the server as its local worker)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--token", default=None, help="bearer token clients must send")
    g.add_argument("--token-file", default=None, help="file holding the token (keeps it out of the process list)")
    q.add_argument("--registry", default=None)
    q.add_argument("--max-request-mb", type=float, default=512)
    q.add_argument("--progress", choices=("json", "text", "none"), default="text", help=argparse.SUPPRESS)

    try:
        from .study.cli import add_study_parser
    except Exception as e:  # noqa: BLE001 - the rest of the CLI must work without the study package
        q = sub.add_parser("study", help="reader study (unavailable)")
        q.add_argument("rest", nargs=argparse.REMAINDER)
        q.set_defaults(_study_missing=str(e))
    else:
        add_study_parser(sub)
    return p


_COMMANDS = {"inpaint": _cmd_inpaint, "phantom": _cmd_phantom, "models": _cmd_models, "demo": _cmd_demo,
             "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    argv = _fix_negative_vectors(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return 2
    em = _Emitter(getattr(args, "progress", "text") or "text")
    _install_sigterm()
    try:
        if args.cmd in _COMMANDS:
            if args.cmd == "models" and not getattr(args, "models_cmd", None):
                raise InputError("models: expected an action: list, verify, import or export")
            return int(_COMMANDS[args.cmd](args, em) or 0)
        if getattr(args, "_study_missing", None):
            raise SpineLDMError(f"the reader study is not available: {args._study_missing}")
        func = getattr(args, "func", None)
        if func is None:
            raise InputError(f"{args.cmd}: expected an action (see 'spine-ldm {args.cmd} --help')")
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return _fail(CancelledError("cancelled by the user (nothing was written)"), em, debug)
    except SpineLDMError as e:
        return _fail(e, em, debug)
    except Exception as e:  # noqa: BLE001 - last resort: one line, exit 1
        return _fail(e, em, debug, internal=True)


def _install_sigterm() -> None:
    """SIGTERM (e.g. a GUI's cancel) ends the run like Ctrl-C: no partial outputs, exit 130. SIGINT is set to
    Python's KeyboardInterrupt handler explicitly: a process started in the background by a non-interactive shell
    (or by some launchers) inherits SIGINT as *ignored*, and Python then keeps ignoring it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return

    def _handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):  # pragma: no cover
        pass


def _fail(e: BaseException, em: _Emitter, debug: bool, internal: bool = False) -> int:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if internal:
        msg = f"internal error ({type(e).__name__}): {msg}"
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    sys.stderr.write(f"{PROG}: error: {msg}\n")
    sys.stderr.flush()
    kind = getattr(e, "kind", "error")
    em.event(event="error", kind=kind, message=msg)
    return int(getattr(e, "exit_code", 1))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
