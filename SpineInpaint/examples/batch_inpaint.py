"""Batch inpainting with the SpineInpaint logic, without the panel.

Runs in 3D Slicer's Python (the logic and the backend process are the same as the module's)::

    Slicer --no-main-window --python-script SpineInpaint/examples/batch_inpaint.py \
        --input t2.nrrd --landmark-ras 0.502,-30.179,-51.712 --level L4-L5 --condition dh_moderate_large \
        --samples 2 --seed 7 --out results/

and, for development, in any Python with ``slicer-core`` (headless MRML) and the backend installed::

    python SpineInpaint/examples/batch_inpaint.py --input t2.nrrd --landmark-lps=-0.502,30.179,-51.712 ... --out results/

Each sample is written as ``<out>/<input> <condition> <level> <method> #k.nrrd`` (``/`` in names replaced) with the
provenance in ``spine_ldm_*`` NRRD header keys, exactly what the module puts into node attributes. From the Slicer
Python console the same takes three lines::

    from SpineInpaintLib.logic import InpaintLogic
    from SpineInpaintLib.parameters import InpaintParameters
    nodes = InpaintLogic().run(getNode("T2"), getNode("Landmark"), InpaintParameters(level="L4-L5", samples=2))
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.dirname(HERE)
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)


def parse_args(argv):
    p = argparse.ArgumentParser(description="SpineInpaint batch inpainting (Slicer logic, background backend).")
    p.add_argument("--input", required=True, help="input volume (NRRD, NIfTI, ...)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--landmark-ras", help="R,A,S mm (as Slicer shows it)")
    where.add_argument("--landmark-lps", help="L,P,S mm (ITK / NRRD frame)")
    p.add_argument("--disc-center-ras", help="optional disc centre R,A,S mm (else estimated by the backend)")
    p.add_argument("--level", default="L4-L5")
    p.add_argument("--condition", default="dh_moderate_large")
    p.add_argument("--method", default="weighted", choices=("weighted", "masked", "repaint"))
    p.add_argument("--compare-methods", action="store_true", help="run weighted, masked and RePaint")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sigma-mm", type=float, default=0.0, help="0 = the sigma the model was trained with")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="", help="registry id (default: the bundled model of the method)")
    p.add_argument("--registry", default="", help="Models.json (default: the module's bundled one)")
    p.add_argument("--remote", default="", help="URL of a 'spine-ldm serve' backend instead of the local one")
    p.add_argument("--token-file", default="", help="file with the remote backend's token")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def vector(text):
    values = [float(v) for v in text.split(",")]
    if len(values) != 3:
        raise SystemExit(f"expected 3 comma-separated numbers, got {text!r}")
    return values


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import slicer
    import vtk

    if not hasattr(slicer, "app"):  # headless slicer-core: create the scene ourselves
        scene = slicer.vtkMRMLScene()
        appLogic = slicer.vtkSlicerApplicationLogic()
        appLogic.SetMRMLScene(scene)
        slicer.mrmlScene = scene
        slicer._spineInpaintAppLogic = appLogic  # keep it alive

    from spine_ldm.geometry import lps_to_ras
    from SpineInpaintLib import nodes
    from SpineInpaintLib.logic import InpaintLogic
    from SpineInpaintLib.parameters import InpaintParameters

    name = os.path.basename(args.input).split(".")[0]
    volume = nodes.addVolumeFromFile(args.input, name)
    ras = vector(args.landmark_ras) if args.landmark_ras else list(lps_to_ras(vector(args.landmark_lps)))
    landmark = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmark")
    landmark.AddControlPoint(vtk.vtkVector3d(*ras))
    discs = None
    if args.disc_center_ras:
        discs = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "DiscCenter")
        discs.AddControlPoint(vtk.vtkVector3d(*vector(args.disc_center_ras)))
    params = InpaintParameters(level=args.level, condition=args.condition, method=args.method,
                               compareMethods=args.compare_methods, samples=args.samples, seed=args.seed,
                               steps=args.steps, sigmaMm=args.sigma_mm, device=args.device, model=args.model,
                               registry=args.registry, levelAuto=False,
                               backend="remote" if args.remote else "local", remoteUrl=args.remote or
                               InpaintParameters().remoteUrl, remoteTokenFile=args.token_file)
    outputs = InpaintLogic().run(volume, landmark, params, discs)
    os.makedirs(args.out, exist_ok=True)
    for node in outputs:
        path = os.path.join(args.out, node.GetName().replace("/", "-") + ".nrrd")
        nodes.saveOutputVolume(node, path)
        print(path)
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except Exception as e:  # one line, like the CLI
        print(f"batch_inpaint: error: {e}", file=sys.stderr)
        rc = 1
    try:
        import slicer

        if hasattr(slicer, "app"):
            slicer.util.exit(rc)
    except ImportError:
        pass
    sys.exit(rc)
