"""Benchmark one inpaint per method: network evaluations, seconds, peak memory.

Weighted (PLMS) vs masked (PLMS) vs RePaint (DDPM with resampling, jump 10 x 10) for the ``small`` and (optionally,
slow on CPU) the ``paper`` config, with random-init weights (timing does not depend on training), on CPU and on
CUDA when present. Each run is one full :func:`spine_ldm.pipeline.inpaint` call (read-in-memory volume -> FSU ->
encode -> sample -> decode -> paste back) after one warm-up call per (config, device, method) at 2 steps.

Usage::

    python benchmarks/bench_inpaint.py                                  # small config, cpu (+cuda), 50 steps
    python benchmarks/bench_inpaint.py --configs small,paper --samples 2 --out bench.json
    python benchmarks/bench_inpaint.py --devices cuda --configs paper

Peak memory is ``torch.cuda.max_memory_allocated`` for CUDA and the process's peak RSS for CPU (a process-lifetime
maximum: it only grows across rows). ``unet_s`` is the median time of one bare U-Net evaluation at the batch the
sampler uses (one CPU sample runs as a batch of two), and ``vs_50_unet`` = sampling seconds / (50 x unet_s): what the
sampler adds on top of its network evaluations (the weighted sampler should stay within 1.2x). ``--registry``
benchmarks a registry's default models (e.g. the bundled ones) instead of random-init weights. ``--conditions``
picks the conditions (default ``dh_moderate_large``); a condition the model guides (classifier-free guidance, the
registry's ``guidance_scale``) evaluates the U-Net on a doubled batch, and its ``vs_50_unet`` still divides by the
unguided batch's evaluation, so the ratio shows what guidance costs (one CPU sample: the same batch of two, so
about nothing; CUDA: batch 2 instead of 1). Prints a table and writes JSON (``--out``). No assertions: this is a
script.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))  # helpers_models: random-init weights + registry


def synthetic_volume(spacing=(4.3, 0.625, 0.625), extent_mm=(110.0, 200.0, 200.0), seed: int = 0):
    """A sagittal-like int16 volume (LPS, i = L->R, j = A->P, k = S->I) of smooth noise; centre at (0, 0, 0)."""
    rng = np.random.default_rng(seed)
    size = [max(8, int(round(e / s))) for e, s in zip(extent_mm, spacing)]
    arr = rng.normal(500, 120, size=size[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img = sitk.SmoothingRecursiveGaussian(img, 2.0)
    img = sitk.Cast(sitk.Clamp(img, lowerBound=0, upperBound=3000), sitk.sitkInt16)
    d = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, -1]], dtype=float)
    sp = np.asarray(spacing, dtype=float)
    img.SetSpacing(tuple(sp))
    img.SetDirection(tuple(d.reshape(-1)))
    img.SetOrigin(tuple(-(d * sp[None, :]) @ ((np.asarray(size) - 1) / 2.0)))
    return img


def unet_eval_seconds(method: str, device: str, registry, samples: int, reps: int = 15) -> float:
    """Median seconds of one U-Net evaluation of ``method``'s default model at the sampler's batch size."""
    import torch

    from spine_ldm import pipeline
    from spine_ldm.device import autocast, select_device

    dev = select_device(device)
    cfg, _, unet, _, _ = pipeline.load_model(None, method, dev, registry, condition="dh_moderate_large")
    batch = 2 if (samples == 1 and dev.type == "cpu") else samples
    lat = [s // f for s, f in zip(cfg.fsu_shape, cfg.latent_factors)]
    x = torch.randn(batch, cfg.autoencoder.latent_channels, *lat, device=dev)
    t = torch.full((batch,), 500, dtype=torch.long, device=dev)
    lvl = torch.zeros(batch, dtype=torch.long, device=dev)
    w = torch.ones(batch, 1, *lat, device=dev) if getattr(unet, "w_channel", False) else None
    times = []
    with torch.inference_mode():
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            with autocast(dev):
                unet(x, t, lvl, lvl + 2, w=w)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small", help="comma list of small,paper (paper is slow on CPU)")
    ap.add_argument("--methods", default="weighted,masked,repaint")
    ap.add_argument("--devices", default=None, help="comma list of cpu,cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--conditions", default="dh_moderate_large",
                    help="comma list of conditions (a guided one, e.g. dh_small with the bundled models, times "
                         "guidance)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--registry", default=None,
                    help="benchmark this registry's default models (e.g. SpineInpaint/Resources/Models.json) "
                         "instead of random-init weights of --configs")
    args = ap.parse_args(argv)

    import torch

    from helpers_models import make_registry
    from spine_ldm import pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    img = synthetic_volume()
    centre = (0.0, 0.0, 0.0)
    landmark = (0.0, 20.0, 0.0)  # 20 mm posterior of the "disc centre"
    rows = []
    if args.registry:
        configs = ["registry"]
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            regp = args.registry or make_registry(Path(tmp) / cfg, config=cfg)
            for dev in devices:
                unet_times: dict = {}  # one bare U-Net timing per method (it does not depend on the condition)
                for method, cond in [(m, c) for m in methods for c in conditions]:
                    kw = dict(method=method, device=dev, registry=regp, disc_center_lps=centre,
                              samples=args.samples, seed=0)
                    pipeline.inpaint(img, landmark, "L4-L5", cond, steps=2, **kw)  # warm-up
                    if dev.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = pipeline.inpaint(img, landmark, "L4-L5", cond, steps=args.steps, **kw)
                    wall = time.perf_counter() - t0
                    if method not in unet_times:
                        unet_times[method] = unet_eval_seconds(method, dev, regp, args.samples)
                    unet_s = unet_times[method]
                    samp = res.timings.get("sample", float("nan"))
                    row = {"config": res.provenance["model_config"] if args.registry else cfg,
                           "model_id": res.provenance["model_id"], "condition": cond,
                           "guidance_scale": res.provenance.get("guidance_scale"), "unet_s": round(unet_s, 4),
                           "vs_50_unet": round(samp / (50 * unet_s), 3) if method != "repaint" else None, "device": res.device, "method": method, "steps": args.steps,
                           "samples": args.samples, "nfe": res.nfe, "seconds": round(wall, 3),
                           "seconds_sampling": round(res.timings.get("sample", float("nan")), 3),
                           "seconds_per_nfe": round(res.timings.get("sample", wall) / max(res.nfe, 1), 4),
                           "peak_memory_mb": round(res.peak_memory_mb, 1),
                           "peak_memory_kind": "cuda_max_allocated" if dev.startswith("cuda") else "process_rss_peak",
                           "sampler": res.provenance["sampler"]}
                    rows.append(row)
                    print(f"{row['config']:6} {res.device:32} {method:9} {cond:17} nfe {res.nfe:4d}  {wall:8.2f} s  "
                          f"{row['seconds_per_nfe']:.3f} s/nfe  unet {unet_s:.3f} s  x50 ratio "
                          f"{row['vs_50_unet']}  peak {res.peak_memory_mb:8.0f} MB", flush=True)
    print()
    hdr = ("| config | device | method | condition | guidance | nfe | seconds | s/nfe | sampling / 50 U-Net evals "
           "| peak MB |")
    print(hdr)
    print("|" + "---|" * 10)
    for r in rows:
        ratio = "-" if r["vs_50_unet"] is None else f"{r['vs_50_unet']:.2f}"
        print(f"| {r['config']} | {r['device']} | {r['method']} | {r['condition']} | {r['guidance_scale'] or '-'} "
              f"| {r['nfe']} | {r['seconds']:.2f} | "
              f"{r['seconds_per_nfe']:.3f} | {ratio} | {r['peak_memory_mb']:.0f} |")
    meta = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
