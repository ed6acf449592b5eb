"""Compare weighted / masked / RePaint on the synthetic phantom through the SpineInpaint logic and save a PNG.

The same path as the panel with "Compare weighted, masked and RePaint" ticked: phantom -> landmark at the L4-L5
posterior disc margin with labelled disc centres -> three backend runs with one seed -> new volume nodes. The
figure shows the sagittal slice through the landmark: input | weighted | masked | RePaint (+ difference row).

    .venv/bin/python SpineInpaint/examples/compare_figure.py --out compare.png [--steps 50] [--seed 0]

Needs slicer-core (headless MRML) and matplotlib; inside Slicer use the panel instead.
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.dirname(HERE)
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--condition", default="dh_moderate_large")
    p.add_argument("--device", default="auto")
    p.add_argument("--registry", default="", help="Models.json (default: bundled / SPINE_LDM_REGISTRY)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import slicer

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    slicer.mrmlScene = scene

    from SpineInpaintLib import nodes, sampledata
    from SpineInpaintLib.logic import InpaintLogic
    from SpineInpaintLib.parameters import METHOD_LABELS, InpaintParameters

    work = tempfile.mkdtemp(prefix="SpineInpaintCompare-")
    sampledata.generatePhantom(work, seed=args.seed)
    volume, discs, landmark = sampledata.loadPhantom(work, scene)
    params = InpaintParameters(condition=args.condition, compareMethods=True, steps=args.steps, seed=args.seed,
                               device=args.device, registry=args.registry)
    outputs = InpaintLogic(scene).run(volume, landmark, params, discs)

    ras = nodes.controlPointWorld(landmark, 0)
    i, j, k = (int(round(v)) for v in nodes.rasToIjk(volume, ras))
    arrays = [slicer.util.arrayFromVolume(n) for n in [volume] + outputs]  # [k, j, i]
    titles = ["input"] + [METHOD_LABELS.get(n.GetAttribute("SpineInpaint.method"), "?") for n in outputs]
    half = 70  # voxels around the landmark (0.625 mm in-plane: ~9 cm field of view)
    crop = lambda a: a[k, max(0, j - half):j + half, max(0, i - half):i + half]
    lo, hi = np.percentile(crop(arrays[0]), [1, 99.5])
    fig, axes = plt.subplots(2, len(arrays), figsize=(3 * len(arrays), 6.2))
    for col, (a, title) in enumerate(zip(arrays, titles)):
        axes[0, col].imshow(crop(a), cmap="gray", vmin=lo, vmax=hi)
        axes[0, col].plot([half], [half], "+", color="orange", ms=10)
        axes[0, col].set_title(title, fontsize=10)
        diff = crop(a).astype(float) - crop(arrays[0]).astype(float)
        axes[1, col].imshow(diff, cmap="RdBu_r", vmin=-(hi - lo) / 2, vmax=(hi - lo) / 2)
        axes[1, col].set_title("difference to input" if col else "", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    axes[1, 0].set_visible(False)
    level = nodes.getProvenanceAttributes(outputs[0]).get("level", "")
    fig.suptitle(f"SpineInpaint on the synthetic phantom: {args.condition} at {level}, seed {args.seed}, "
                 f"{args.steps} steps ({nodes.getProvenanceAttributes(outputs[0]).get('model_id', '?')} ...)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
