"""Benchmark the panel's Apply, click to volume: warm local worker vs a one-shot backend process.

What the panel does on Apply, headless (``slicer-core``): ``InpaintLogic.start`` (write the input NRRD, hand the job
to the backend) and then ``job.poll()`` at the widget's timer interval until the result volumes are in the scene.
"Click to volume" is that whole wall time; "compute" is the backend's own ``seconds`` for the inpaint (read, FSU,
encode, sample, decode, paste back), reported in the ``done`` event. The first warm Apply starts the worker
(imports, model loading); the later ones reuse it. The cold row is the one-shot ``spine-ldm inpaint`` process the
panel used before (and still uses when the server packages are missing).

Usage (CPU, the bundled demo weights, the synthetic phantom)::

    .venv/bin/python benchmarks/bench_warm_apply.py --out bench_warm.json
    .venv/bin/python benchmarks/bench_warm_apply.py --applies 4 --steps 50 --samples 1 --device cpu

Prints a table and writes JSON (``--out``). No assertions: this is a script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
sys.path.insert(0, str(MODULE_DIR))


def apply_once(logic, volume, landmark, discs, params, poll_s: float) -> dict:
    """One Apply, click to volume, polled like the widget's timer."""
    t0 = time.perf_counter()
    job = logic.start(volume, landmark, params, discs)
    while job.state == "running":
        time.sleep(poll_s)
        job.poll()
    wall = time.perf_counter() - t0
    if job.state != "done":
        raise SystemExit(f"Apply failed: {job.message}")
    done = job.doneEvents[-1][1]
    for node in job.outputNodes:  # keep the scene small between Applies
        logic.scene.RemoveNode(node)
    return {"click_to_volume_s": round(wall, 3), "compute_s": float(done["seconds"]),
            "ratio": round(wall / float(done["seconds"]), 3), "nfe": done.get("nfe"), "device": done.get("device")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--applies", type=int, default=3, help="warm Applies in a row (the first starts the worker)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-cold", action="store_true", help="skip the one-shot process row")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import slicer

    from SpineInpaintLib import sampledata, worker
    from SpineInpaintLib.logic import POLL_INTERVAL_MS, InpaintLogic
    from SpineInpaintLib.parameters import InpaintParameters

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")])
    params = InpaintParameters(level="L4-L5", condition="dh_moderate_large", samples=args.samples, seed=1,
                               steps=args.steps, device=args.device)
    poll_s = POLL_INTERVAL_MS / 1000.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        sampledata.generatePhantom(tmp, seed=0, python=sys.executable, env=env)
        volume, discs, landmark = sampledata.loadPhantom(tmp, scene)
        if not args.no_cold:
            cold = InpaintLogic(scene, python=sys.executable, env=env, warm=False)
            rows.append({"mode": "one-shot process", "apply": 1,
                         **apply_once(cold, volume, landmark, discs, params, poll_s)})
            print(rows[-1], flush=True)
        warm = InpaintLogic(scene, python=sys.executable, env=env, warm=True)
        if not warm.useWarmWorker():
            raise SystemExit("the server packages (fastapi, uvicorn, python-multipart) are not installed")
        try:
            for k in range(1, args.applies + 1):
                rows.append({"mode": "warm worker", "apply": k,
                             **apply_once(warm, volume, landmark, discs, params, poll_s)})
                print(rows[-1], flush=True)
        finally:
            worker.shutdownWorkers()

    print(f"\n{'mode':<18} {'apply':>5} {'click->volume s':>16} {'compute s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['mode']:<18} {r['apply']:>5} {r['click_to_volume_s']:>16.2f} {r['compute_s']:>10.2f} "
              f"{r['ratio']:>6.2f}")
    second = next((r for r in rows if r["mode"] == "warm worker" and r["apply"] == 2), None)
    if second:
        print(f"\nsecond warm Apply: {second['click_to_volume_s']:.2f} s click to volume for "
              f"{second['compute_s']:.2f} s of compute = {second['ratio']:.2f}x (target <= 1.3x)")
    if args.out:
        meta = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                "steps": args.steps, "samples": args.samples, "device": args.device,
                "poll_interval_ms": POLL_INTERVAL_MS, "load_average": list(os.getloadavg())
                if hasattr(os, "getloadavg") else None}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
