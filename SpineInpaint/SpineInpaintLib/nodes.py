"""MRML nodes <-> backend files and arguments.

Coordinate conventions (see DEVELOPERS.md): Slicer works in RAS, the backend in LPS (ITK);
``spine_ldm.geometry.ras_to_lps`` / ``lps_to_ras`` are the one home of that conversion.

- The landmark (and optional disc centre) are read from markups control points in *world* RAS. When the input
  volume sits under a linear parent transform they are mapped into the volume's own (local) RAS, which is the
  frame its voxels are written in; the outputs get the same parent transform. Non-linear parent transforms are
  refused (harden them first).
- The input volume is written to a temporary NRRD with a standalone ``vtkMRMLVolumeArchetypeStorageNode`` that is
  never attached to the input node: the input node (voxels, geometry, attributes, storage) is never modified.
- Each backend output becomes a *new* ``vtkMRMLScalarVolumeNode`` whose IJKToRAS matrix is copied from the input
  (after checking the file's geometry matches it), with provenance in node attributes ``SpineInpaint.<key>``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from spine_ldm.conditions import CONDITION_LABELS, parse_condition, parse_level

from .parameters import METHOD_LABELS, InpaintParameters

ATTRIBUTE_PREFIX = "SpineInpaint."
#: node reference role from each result volume to the volume it was inpainted into
INPUT_REFERENCE_ROLE = "SpineInpaintInput"
NRRD_PREFIX = "spine_ldm_"
#: geometry tolerance when checking a backend output against the input (mm / direction cosines)
GEOMETRY_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------- coordinates
def rasToLps(point) -> tuple[float, float, float]:
    from spine_ldm.geometry import ras_to_lps

    return tuple(float(v) for v in ras_to_lps(point))


def lpsToRas(point) -> tuple[float, float, float]:
    from spine_ldm.geometry import lps_to_ras

    return tuple(float(v) for v in lps_to_ras(point))


def ijkToRasMatrix(volumeNode) -> np.ndarray:
    """4x4 IJK -> (local) RAS matrix of a volume node as numpy."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _linearParentTransformToWorld(node) -> Optional[np.ndarray]:
    """4x4 local -> world matrix of the node's parent transform (None when there is none)."""
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"volume '{node.GetName()}' is under a non-linear transform "
                         f"('{parent.GetName()}'): harden the transform first")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def worldToVolumeRas(volumeNode, worldRas) -> np.ndarray:
    """World RAS point -> the volume's local RAS frame (identity without a parent transform)."""
    p = np.array([*map(float, worldRas), 1.0])
    toWorld = _linearParentTransformToWorld(volumeNode)
    if toWorld is not None:
        p = np.linalg.solve(toWorld, p)
    return p[:3]


def rasToIjk(volumeNode, ras) -> np.ndarray:
    """Local RAS -> continuous IJK (voxel centres at integers)."""
    p = np.array([*map(float, ras), 1.0])
    return np.linalg.solve(ijkToRasMatrix(volumeNode), p)[:3]


def distanceOutsideVolume(volumeNode, ras) -> float:
    """0 inside the volume's extent (voxel edges, what the slice views show), else the distance in mm to it."""
    dims = volumeNode.GetImageData().GetDimensions()
    ijk = rasToIjk(volumeNode, ras)
    spacing = np.array(volumeNode.GetSpacing())
    over = [max(0.0, -0.5 - ijk[a], ijk[a] - (dims[a] - 0.5)) * spacing[a] for a in range(3)]
    return float(math.sqrt(sum(o * o for o in over)))


def controlPointWorld(markupsNode, index: int = 0) -> np.ndarray:
    """World RAS position of a control point (raises ValueError with a clear message)."""
    if markupsNode is None:
        raise ValueError("no landmark: place a point on the pathology location first")
    n = markupsNode.GetNumberOfControlPoints()
    if n == 0:
        raise ValueError(f"markups '{markupsNode.GetName()}' has no control point: place the landmark first")
    if not 0 <= index < n:
        raise ValueError(f"markups '{markupsNode.GetName()}' has {n} control point(s), no index {index}")
    p = [0.0, 0.0, 0.0]
    markupsNode.GetNthControlPointPositionWorld(index, p)
    return np.array(p, dtype=float)


def labelledPointsWorld(markupsNode) -> list[tuple[str, np.ndarray]]:
    """(label, world RAS) of every control point (for disc-centre lists labelled 'L4-L5', ...)."""
    if markupsNode is None:
        return []
    out = []
    for i in range(markupsNode.GetNumberOfControlPoints()):
        out.append((markupsNode.GetNthControlPointLabel(i), controlPointWorld(markupsNode, i)))
    return out


# ---------------------------------------------------------------------------------------------- backend input
@dataclass
class BackendRequest:
    """What the backend needs for one input, in both frames (for the log and provenance)."""

    inputPath: str
    landmarkRas: tuple  # local RAS of the input volume
    landmarkLps: tuple
    landmarkIjk: tuple
    level: str
    condition: str
    discCenterRas: Optional[tuple] = None
    discCenterLps: Optional[tuple] = None
    levelSource: str = "user"  # "user" | "suggested"
    notes: list = field(default_factory=list)


def writeVolumeToFile(volumeNode, path: str) -> str:
    """Write a scalar volume node to NRRD without touching the node (no storage node is attached to it)."""
    import slicer

    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError("the input must be a scalar volume")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{volumeNode.GetName()}' is a label map; select the T2 image")
    image = volumeNode.GetImageData()
    if image is None:
        raise ValueError(f"volume '{volumeNode.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                         "a single-component (grayscale) T2 volume is required")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # standalone, never added to the input node
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(volumeNode):
        raise OSError(f"could not write '{volumeNode.GetName()}' to {path}")
    return str(path)


def prepareBackendInput(volumeNode, landmarkNode, params: InpaintParameters, workDir: str,
                        discCentersNode=None, landmarkIndex: int = 0) -> BackendRequest:
    """Write the input NRRD into ``workDir`` and convert the markups to the backend's LPS frame.

    Disc centre: if ``discCentersNode`` has exactly one control point, it is the disc centre. If it has several,
    their labels name levels ('L4-L5', 'L4/5', ...): the nearest one to the landmark gives the disc centre, and the
    level too when ``params.levelAuto``. Without disc centres the backend estimates the centre from the landmark
    (``spine_ldm.geometry.estimate_disc_center``).
    """
    from . import level as levelLib

    params = params.normalized()
    landmarkWorld = controlPointWorld(landmarkNode, landmarkIndex)
    landmarkRas = worldToVolumeRas(volumeNode, landmarkWorld)
    outside = distanceOutsideVolume(volumeNode, landmarkRas)
    if outside > 0:
        r = ", ".join(f"{v:.1f}" for v in landmarkRas)
        raise ValueError(f"landmark ({r}) RAS is {outside:.1f} mm outside volume '{volumeNode.GetName()}'")
    level = params.level
    levelSource = "user"
    discRas = None
    notes = []
    points = labelledPointsWorld(discCentersNode)
    if len(points) == 1:
        discRas = worldToVolumeRas(volumeNode, points[0][1])
    elif len(points) > 1:
        suggestion = levelLib.suggestLevel(landmarkWorld, points)
        if suggestion is not None:
            discRas = worldToVolumeRas(volumeNode, suggestion.discCenterRas)
            if params.levelAuto:
                level, levelSource = suggestion.level, "suggested"
            elif suggestion.level != level:
                notes.append(f"level {level} kept although the nearest disc centre is {suggestion.level} "
                             f"({suggestion.distanceMm:.1f} mm away)")
                discRas = None  # the nearest disc belongs to another level: let the backend estimate
        else:
            notes.append("disc centre labels are not levels (e.g. 'L4-L5'): the backend estimates the disc centre")
    if discRas is None:
        notes.append(f"disc centre estimated by the backend from the landmark and the level ({parse_level(level)})")
    os.makedirs(workDir, exist_ok=True)
    inputPath = writeVolumeToFile(volumeNode, os.path.join(workDir, "input.nrrd"))
    return BackendRequest(
        inputPath=inputPath,
        landmarkRas=tuple(float(v) for v in landmarkRas),
        landmarkLps=rasToLps(landmarkRas),
        landmarkIjk=tuple(float(v) for v in rasToIjk(volumeNode, landmarkRas)),
        level=parse_level(level),
        condition=parse_condition(params.condition),
        discCenterRas=None if discRas is None else tuple(float(v) for v in discRas),
        discCenterLps=None if discRas is None else rasToLps(discRas),
        levelSource=levelSource,
        notes=notes,
    )


def requestPayload(request: BackendRequest, params: InpaintParameters, method: str) -> dict:
    """Keyword arguments of ``spine_ldm.pipeline.inpaint`` (JSON-able; also the remote job parameters)."""
    params = params.normalized()
    payload = {
        "landmark_lps": list(request.landmarkLps),
        "level": request.level,
        "condition": request.condition,
        "method": method,
        "samples": params.samples,
        "seed": params.seed,
        "steps": params.steps,
        "device": params.device,
    }
    sigma = params.sigmaForBackend()
    if sigma is not None:  # absent = the model's own sigma
        payload["sigma_mm"] = sigma
    guidance = params.guidanceForBackend()
    if guidance is not None:  # absent = the model's own guidance scale
        payload["guidance_scale"] = guidance
    model = modelForMethod(params, method)
    if model:
        payload["model"] = model
    if request.discCenterLps is not None:
        payload["disc_center_lps"] = list(request.discCenterLps)
    return payload


def modelForMethod(params: InpaintParameters, method: str) -> str:
    """The selected model when it is the one run, "" (= backend default for ``method``) in compare mode."""
    if params.compareMethods and method != params.method:
        return ""
    return params.model


# ---------------------------------------------------------------------------------------------- outputs
def outputNodeName(inputName: str, condition: str, level: str, method: str, index: int) -> str:
    """'<input> DH-mod/large L4-L5 weighted #1' (index is 0-based, the name 1-based)."""
    label = CONDITION_LABELS[parse_condition(condition)]
    return f"{inputName} {label} {parse_level(level)} {METHOD_LABELS.get(method, method)} #{int(index) + 1}"


def _decode(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def setProvenanceAttributes(node, provenance: dict) -> None:
    """``SpineInpaint.<key>`` attributes (strings as-is, everything else JSON)."""
    for key, value in provenance.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + str(key), value if isinstance(value, str) else json.dumps(value))


def getProvenanceAttributes(node) -> dict:
    out = {}
    for name in node.GetAttributeNames() or ():
        if name.startswith(ATTRIBUTE_PREFIX):
            out[name[len(ATTRIBUTE_PREFIX):]] = _decode(node.GetAttribute(name))
    return out


def lpsGeometryOfNode(volumeNode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin LPS, spacing, direction LPS 3x3 columns = axes) of a node, as ITK would see it."""
    m = ijkToRasMatrix(volumeNode)
    flip = np.diag([-1.0, -1.0, 1.0])
    axes = m[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return flip @ m[:3, 3], spacing, flip @ (axes / spacing)


def checkSameGeometry(image, referenceNode, what: str = "output") -> None:
    """Raise ValueError when a SimpleITK image (or ``VolumeData``) does not lie on the reference node's voxel
    grid."""
    dims = referenceNode.GetImageData().GetDimensions()
    if tuple(image.GetSize()) != tuple(dims):
        raise ValueError(f"{what} has size {tuple(image.GetSize())}, the input {tuple(dims)}")
    origin, spacing, direction = lpsGeometryOfNode(referenceNode)
    d_origin = float(np.max(np.abs(np.array(image.GetOrigin()) - origin)))
    d_spacing = float(np.max(np.abs(np.array(image.GetSpacing()) - spacing)))
    d_dir = float(np.max(np.abs(np.array(image.GetDirection()).reshape(3, 3) - direction)))
    tol = GEOMETRY_TOLERANCE * max(1.0, float(np.max(np.abs(origin))))
    if d_origin > tol or d_spacing > GEOMETRY_TOLERANCE or d_dir > GEOMETRY_TOLERANCE:
        raise ValueError(f"{what} geometry differs from the input (origin {d_origin:.2g} mm, spacing "
                         f"{d_spacing:.2g} mm, direction {d_dir:.2g})")


@dataclass
class VolumeData:
    """A volume file read into memory (voxels, LPS geometry, ``spine_ldm_*`` header keys) by ``readVolumeData``:
    plain numpy and SimpleITK, so reading and decompressing happen off the GUI thread; only making the node from it
    runs on the GUI thread. Has SimpleITK's geometry getters, so ``checkSameGeometry`` takes it like an image."""

    path: str
    array: np.ndarray  # [k, j, i], as slicer.util arrays
    origin: tuple
    spacing: tuple
    direction: tuple  # row-major 3x3
    provenance: dict

    def GetSize(self):
        return tuple(int(n) for n in self.array.shape[::-1])

    def GetOrigin(self):
        return self.origin

    def GetSpacing(self):
        return self.spacing

    def GetDirection(self):
        return self.direction


def readVolumeData(path: str, what: str = "output") -> VolumeData:
    """Read a 3D single-component volume file (any thread)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{what} {path} is not a 3D single-component image")
    provenance = {key[len(NRRD_PREFIX):]: _decode(image.GetMetaData(key)) for key in image.GetMetaDataKeys()
                  if key.startswith(NRRD_PREFIX)}
    return VolumeData(str(path), sitk.GetArrayFromImage(image), tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                      tuple(image.GetDirection()), provenance)


def loadOutputVolume(source, referenceNode, name: str, provenance: Optional[dict] = None, scene=None):
    """New scalar volume node from a backend output (a path, or ``VolumeData`` read beforehand), on exactly the
    reference node's geometry.

    The voxel grid of the file must match the reference (checked, else ValueError and nothing is added);
    the new node gets the reference's IJKToRAS matrix, parent transform and window/level, and as attributes
    ``provenance`` overlaid by the file's own ``spine_ldm_*`` header keys.
    """
    import slicer

    scene = scene or slicer.mrmlScene
    data = source if isinstance(source, VolumeData) else readVolumeData(source)
    checkSameGeometry(data, referenceNode, what=f"output {os.path.basename(data.path)}")
    array = data.array
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.CopyOrientation(referenceNode)
    slicer.util.updateVolumeFromArray(node, array)
    parent = referenceNode.GetParentTransformNode()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    node.CreateDefaultDisplayNodes()
    _copyWindowLevel(referenceNode, node)
    merged = dict(provenance or {})
    merged.update(data.provenance)  # the file's own header is the most specific (per-sample seed, ...)
    merged.setdefault("input_node", referenceNode.GetName())
    setProvenanceAttributes(node, merged)
    node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, referenceNode.GetID())  # survives scene save/load (IDs do not)
    return node


def _copyWindowLevel(referenceNode, node) -> None:
    src, dst = referenceNode.GetDisplayNode(), node.GetDisplayNode()
    if src is None or dst is None:
        return
    dst.SetAutoWindowLevel(False)
    dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())


def sampleProvenance(doneEvent: dict, index: int, request: BackendRequest, method: str) -> dict:
    """Provenance of sample ``index`` of a run: the backend's (``provenances[index]`` of the ``done`` event, else
    its ``provenance``), completed with what the module knows (frames, level source)."""
    perSample = doneEvent.get("provenances") or []
    if index < len(perSample) and isinstance(perSample[index], dict):
        prov = dict(perSample[index])
    else:
        prov = dict(doneEvent.get("provenance") or {})
    prov["sample_index"] = index
    prov.setdefault("method", method)
    prov.setdefault("level", request.level)
    prov.setdefault("condition", request.condition)
    prov.setdefault("landmark_lps", list(request.landmarkLps))
    prov.setdefault("landmark_ras", list(request.landmarkRas))
    if request.discCenterLps is not None:
        prov.setdefault("disc_center_lps", list(request.discCenterLps))
    prov["level_source"] = request.levelSource
    for key in ("device", "nfe", "seconds"):
        if key in doneEvent and key not in prov:
            prov[key] = doneEvent[key]
    return prov


def snapshotNode(volumeNode) -> dict:
    """Everything that must stay unchanged on the input (for tests and the self-test)."""
    import slicer

    return {
        "array": slicer.util.arrayFromVolume(volumeNode).copy(),
        "ijkToRas": ijkToRasMatrix(volumeNode),
        "attributes": {n: volumeNode.GetAttribute(n) for n in (volumeNode.GetAttributeNames() or ())},
        "name": volumeNode.GetName(),
        "storage": volumeNode.GetStorageNodeID(),
        "parent": volumeNode.GetTransformNodeID(),
    }


def sameSnapshot(a: dict, b: dict) -> bool:
    return (np.array_equal(a["array"], b["array"]) and a["array"].dtype == b["array"].dtype
            and np.array_equal(a["ijkToRas"], b["ijkToRas"])
            and all(a[k] == b[k] for k in ("attributes", "name", "storage", "parent")))


def lpsToIjkOfFile(path: str, lps: Sequence[float]) -> tuple:
    """Continuous index of an LPS point in a file (for tests comparing frames)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    origin = np.array(reader.GetOrigin())
    spacing = np.array(reader.GetSpacing())
    direction = np.array(reader.GetDirection()).reshape(3, 3)
    return tuple(np.linalg.solve(direction * spacing, np.asarray(lps, float) - origin))


def addVolumeFromFile(source, name: str, scene=None):
    """New scalar volume node from an image file (or ``VolumeData`` read beforehand), geometry taken from the file
    (LPS -> RAS), headless-safe."""
    import slicer
    import vtk

    scene = scene or slicer.mrmlScene
    data = source if isinstance(source, VolumeData) else readVolumeData(source, what="volume")
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(data.direction).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = flip @ direction @ np.diag(data.spacing)
    m[:3, 3] = flip @ np.array(data.origin)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, data.array)
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, float(m[r, c]))
    node.SetIJKToRASMatrix(vm)
    node.CreateDefaultDisplayNodes()
    return node


def saveOutputVolume(node, path: str) -> str:
    """Write a result node to NRRD with its provenance as ``spine_ldm_*`` header keys (node unchanged)."""
    import SimpleITK as sitk
    import slicer

    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node))
    origin, spacing, direction = lpsGeometryOfNode(node)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    for key, value in getProvenanceAttributes(node).items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key and not any(c in key for c in ":=\n\r"):
            image.SetMetaData(NRRD_PREFIX + key, text.replace("\n", " "))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return str(path)
