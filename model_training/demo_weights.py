"""The bundled demo weights recipe (small config, phantoms, CPU): ``python -m model_training make-demo-weights
--out SpineInpaint/Resources/Models``.

Stages (all seeded; each stage resumes from its checkpoint when re-run with the same --work folder):

1. phantoms: ``model_training.importers.phantom.import_phantoms`` writes N synthetic lumbar T2 studies with a
   pathology mix (+ healthy twins), split per study (80/10/10), manifest ``<work>/phantoms.csv``;
2. autoencoder: ``train-autoencoder`` with ``ae_small`` (shared by every model);
3. LDMs: ``train-ldm`` with ``ldm_small`` for ``weighted`` and ``masked`` (pathological FSUs with a landmark) and
   ``full`` (every FSU);
4. export: ``<out>/demo-small-autoencoder.pt`` (shared), ``<out>/demo-small-{weighted,masked,full}-unet.pt`` and
   the entries ``demo-small-weighted``, ``demo-small-masked``, ``demo-small-full`` in ``<out>/../Models.json``
   (other entries of that registry are kept);
5. check (``--check``): inpaint moderate/large herniations and a severe stenosis into the healthy twins of held-out
   phantoms with the three methods and render the sagittal slice through the landmark (healthy twin | real
   pathological twin | weighted | masked | RePaint) to ``<work>/demo_check.png`` (numbers: ``demo_check.json``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from spine_ldm.errors import InputError

from . import common as C

DEFAULT_MIX = {"dh_moderate_large": 0.3, "dh_small": 0.15, "ccs_severe": 0.2, "ccs_moderate": 0.15}
IDS = {"weighted": "demo-small-weighted", "masked": "demo-small-masked", "full": "demo-small-full"}
AE_NAME = "demo-small-autoencoder"
LICENSE = "Apache-2.0 (weights trained only on synthetic phantoms)"


def add_arguments(p) -> None:
    p.add_argument("--out", default="SpineInpaint/Resources/Models", help="weights folder (Models.json goes to its parent)")
    p.add_argument("--registry", help="registry to update (default <out>/../Models.json)")
    p.add_argument("--work", default="demo_work", help="phantoms, manifest, runs (resumable)")
    p.add_argument("--n-studies", type=int, default=60)
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--ae-steps", type=int, help="override ae_small steps")
    p.add_argument("--ldm-steps", type=int, help="override ldm_small steps (all methods)")
    p.add_argument("--methods", default="weighted,masked,full")
    p.add_argument("--jobs", type=int, default=1,
                   help="train the LDMs in N parallel processes of 1 thread each (2 on a 2-core CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                   help="train the LDMs under CPU bfloat16 autocast (~1.5x faster); auto = when the CPU computes "
                        "bf16 natively (AVX512-BF16 / AMX). The autoencoder always trains in fp32")
    p.add_argument("--check", action="store_true", help="render the demo check PNG at the end")
    p.add_argument("--only-check", action="store_true", help="only render the check PNG from the registry")
    p.add_argument("--quiet", action="store_true")


#: level draw of the demo's pathologies (the lower levels carry most lumbar pathology)
LEVEL_WEIGHTS = {"L1-L2": 0.1, "L2-L3": 0.15, "L3-L4": 0.2, "L4-L5": 0.3, "L5-S1": 0.25}
PHANTOM_SPACING = (0.9, 0.9, 4.3)


def make_phantoms(work: Path, n_studies: int, seed: int, mix=None, log=print, shape=None) -> Path:
    """Phantom studies via :func:`model_training.importers.phantom.import_phantoms` (each pathological study: two
    different pathologies at two distinct levels drawn with :data:`LEVEL_WEIGHTS`, plus its healthy twin under
    the same study id), split per study (80/10/10, ``seed``), written to ``<work>/phantoms.csv`` (reused when
    present). ``shape`` overrides the phantom voxel counts (tests)."""
    from model_training.manifest import assign_splits, write_manifest

    manifest = work / "phantoms.csv"
    if manifest.is_file():
        log(f"[demo] phantoms: reusing {manifest}")
        return manifest
    t = time.time()
    rows = generate_phantom_rows(work / "phantoms", n_studies, seed, mix=dict(mix or DEFAULT_MIX), log=log,
                                 shape=shape)
    rows = assign_splits(rows, (0.8, 0.1, 0.1), seed=seed)
    write_manifest(manifest, rows)
    log(f"[demo] phantoms: {n_studies} studies, {len(rows)} FSUs in {time.time() - t:.0f}s -> {manifest}")
    return manifest


def generate_phantom_rows(out_dir: Path, n_studies: int, seed: int, mix: dict, spacing=PHANTOM_SPACING,
                          log=print, shape=None) -> list:
    """The demo's phantom rows (no splits): :func:`model_training.importers.phantom.import_phantoms` with healthy
    twins, two pathologies per pathological study at :data:`LEVEL_WEIGHTS`-drawn levels, posterior-margin
    candidate landmarks on healthy levels (healthy studies have one image: their twin would be the same)."""
    from model_training.importers.phantom import import_phantoms

    def progress(done, total):
        if done % 10 == 0 or done == total:
            log(f"[demo] phantoms: {done}/{total}")

    return import_phantoms(out_dir, n_studies, seed, mix, spacing=spacing, healthy_twins=True,
                           healthy_landmark="posterior_margin", shape=shape, pathologies_per_study=2,
                           level_weights=LEVEL_WEIGHTS, progress=progress)


def main_demo(args) -> int:
    out = Path(args.out)
    registry = Path(args.registry) if args.registry else out.parent / "Models.json"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.only_check:
        render_check(work, registry, log)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.time()
    manifest = make_phantoms(work, args.n_studies, args.phantom_seed, log=log)
    timings = {}

    from .train_autoencoder import train_autoencoder

    ae_run = work / "runs" / "autoencoder"
    ae_cfg = C.load_train_config("ae_small", {"steps": args.ae_steps})
    if not (ae_run / "autoencoder.pt").is_file() or C.read_run_info(ae_run).get("status") != "complete":
        t = time.time()
        train_autoencoder(ae_cfg, ae_run, manifest=manifest, resume=True, device=args.device,
                          cache_dir=work / "fsu_cache", quiet=args.quiet)
        timings["autoencoder_s"] = round(time.time() - t, 1)
    ldm_cfg = C.load_train_config("ldm_small", {"steps": args.ldm_steps})
    bf16 = getattr(args, "cpu_bf16", "off")
    want_bf16 = bf16 == "on" or (bf16 == "auto" and C.cpu_has_native_bf16())
    if want_bf16 and C.resolve_device(args.device).type == "cpu":
        ldm_cfg["amp"] = "bf16"
        timings["ldm_amp"] = "bf16"
        log("[demo] LDMs train under CPU bfloat16 autocast (--cpu-bf16 off for fp32)")
    todo = []
    for m in methods:
        run = work / "runs" / m
        info = C.read_run_info(run) if (run / "run.json").is_file() else {}
        if (run / "unet.pt").is_file() and info.get("status") == "complete" and \
                int(info.get("steps_done", 0)) >= int(ldm_cfg["steps"]):
            continue
        todo.append((m, run))
    jobs = max(1, min(int(getattr(args, "jobs", 1) or 1), len(todo)))
    job_args = (str(ae_run), str(manifest), args.device, str(work / "fsu_cache"), args.quiet)
    t = time.time()
    if jobs == 1:
        for m, run in todo:
            timings[f"{m}_s"] = _train_ldm_job(ldm_cfg, m, str(run), *job_args)
    elif todo:
        # one process per method (1 torch thread each): on a small CPU this beats one process with N threads
        import concurrent.futures as cf
        import multiprocessing as mp

        log(f"[demo] training {', '.join(m for m, _ in todo)} in {jobs} parallel processes")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_train_ldm_job, {**ldm_cfg, "threads": 1}, m, str(run), *job_args): m
                    for m, run in todo}
            for f in cf.as_completed(futs):
                timings[f"{futs[f]}_s"] = f.result()
        timings["ldm_wall_s"] = round(time.time() - t, 1)

    from .export import export_run

    data_desc = (f"{args.n_studies} synthetic phantom studies (spine_ldm.phantom, seed {args.phantom_seed}, "
                 f"healthy twins, mix {json.dumps(DEFAULT_MIX)}); train split only")
    for m in methods:
        what = {"weighted": "weighted noise schedule (Hansen et al.)", "masked": "masked-LDM baseline",
                "full": "whole-FSU LDM for the RePaint baseline"}[m]
        export_run(work / "runs" / m, IDS[m], registry, weights_dir=out, autoencoder_name=AE_NAME,
                   description=f"Demo (small config, CPU-trained on phantoms): {what}. Not for clinical or "
                               f"research conclusions.",
                   training_data=data_desc, license=LICENSE)
        log(f"[demo] exported {IDS[m]} -> {registry}")
    total = round(time.time() - t0, 1)
    C.atomic_write_text(work / "demo_timings.json", json.dumps({**timings, "total_s": total}, indent=2))
    log(f"[demo] done in {total:.0f}s: {registry}")
    if args.check:
        render_check(work, registry, log)
    return 0


def _train_ldm_job(cfg, method, run, ae_run, manifest, device, cache_dir, quiet) -> float:
    """One LDM training (in this process, or a worker process with ``--jobs``); returns its seconds."""
    from .train_ldm import train_ldm

    t = time.time()
    train_ldm(cfg, method, ae_run, run, manifest=manifest, resume=True, device=device, cache_dir=cache_dir,
              quiet=quiet)
    return round(time.time() - t, 1)


def render_check(work: Path, registry: Path, log=print, out_png: Path | None = None, n_cases: int = 4,
                 steps: int = 50) -> Path:
    """For held-out phantom studies (val/test split) with a moderate/large herniation (two thirds of ``n_cases``)
    or a severe stenosis (one third): inpaint the same condition into the
    healthy twin at the pathological twin's landmark with weighted / masked / RePaint. PNG rows = cases, columns =
    healthy input | real pathological twin | weighted | masked | RePaint (sagittal slice through the landmark,
    superior up, anterior left); also ``demo_check.json`` with the landmark intensity change of each output (the
    phantom "pathology present" metric of model_training.evaluate) next to the real twin's change."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from model_training.manifest import read_manifest
    from spine_ldm import pipeline
    from spine_ldm.demo import landmark_patch_change, sagittal_slice
    from spine_ldm.io import read_volume

    rows = read_manifest(work / "phantoms.csv")
    held = [r for r in rows if r.split in ("test", "val") and r.condition in ("dh_moderate_large", "ccs_severe")]
    held.sort(key=lambda r: (r.level != "L4-L5", r.study_id))
    cases = {"dh_moderate_large": [], "ccs_severe": []}
    n_ccs = n_cases // 3  # about a third stenosis, the rest herniation
    quota = {"dh_moderate_large": n_cases - n_ccs, "ccs_severe": n_ccs}
    for r in held:
        twin = [h for h in rows if h.study_id == r.study_id and h.level == r.level and h.condition == "none"
                and h.image_path != r.image_path]
        if twin and len(cases[r.condition]) < quota[r.condition]:
            cases[r.condition].append((r, twin[0]))
    cases = cases["dh_moderate_large"] + cases["ccs_severe"]
    if not cases:
        raise InputError("no held-out herniation or stenosis phantom with a healthy twin in the demo manifest")
    cols = ["healthy input", "real pathological twin", "weighted", "masked", "RePaint"]
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(3.0 * len(cols), 3.2 * len(cases)), squeeze=False)
    report = []
    for i, (r, h) in enumerate(cases):
        img_h, img_p = read_volume(h.image_path), read_volume(r.image_path)
        lm = r.landmark_lps
        outs = {}
        for m in ("weighted", "masked", "repaint"):
            res = pipeline.inpaint(img_h, lm, r.level, r.condition, method=m, samples=1, seed=0, steps=steps,
                                   registry=str(registry), disc_center_lps=h.disc_center_lps)
            outs[m] = res.outputs[0]
        ims = [img_h, img_p, outs["weighted"], outs["masked"], outs["repaint"]]
        sl = [sagittal_slice(im, lm, 60.0, 60.0, 0.4) for im in ims]
        lo, hi = np.percentile(sl[0], [1, 99.5])
        deltas = {name: round(landmark_patch_change(im, img_h, lm), 3) for name, im in zip(cols, ims)}
        report.append({"study": r.study_id, "level": r.level, "condition": r.condition, "landmark_lps": lm,
                       "landmark_patch_change_vs_healthy": deltas})
        for k, (name, a) in enumerate(zip(cols, sl)):
            ax = axes[i][k]
            ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
            ax.plot([a.shape[1] / 2], [a.shape[0] / 2], marker="+", color="yellow", markersize=9)
            ax.set_title(f"{name}\n{r.level} {r.condition}" if k == 0 else f"{name} ({deltas[name]:+.2f})",
                         fontsize=8)
            ax.axis("off")
        log(f"[demo] check {r.study_id} {r.level} {r.condition}: {deltas}")
    fig.suptitle("demo weights check: pathology inpainted into the healthy twin at the real landmark "
                 "(60 mm sagittal crop; number = mean change in a 8 mm patch at the landmark, / intensity range)",
                 fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else work / "demo_check.png"
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    (work / "demo_check.json").write_text(json.dumps(report, indent=2))
    log(f"[demo] check image: {out_png}")
    return out_png
