"""Volume I/O with validation: read_volume / write_volume / validate_volume / check_modality.

Every problem with an input volume raises :class:`spine_ldm.errors.InputError` with a
one-line message that says what is wrong and by how much:

* file missing / unreadable (the reader's first error line is quoted),
* not 3D: 2D images, 3D images with a single slice, 4D images with more than one volume.
  A 4D image holding exactly **one** volume (size 1 along the 4th axis) and a vector image
  with exactly **one** component are squeezed to a 3D scalar volume (geometry kept),
* multi-component voxels (RGB / vector images),
* complex-valued voxels,
* NaN / Inf voxels (the message gives how many of each),
* absurd spacing: any axis below 0.1 mm or above 20 mm (axis and value named),
* a degenerate direction matrix,
* metadata that says the modality is not MR (e.g. DICOM ``Modality = CT``): see
  :func:`check_modality`; missing / unknown modality passes.

Reading supports every format SimpleITK reads (NRRD, NIfTI, MHA, ...) and a folder with
one DICOM series. Writing stores key/value metadata in the header (NRRD / MHA); key
prefixes (``spine_ldm_``) are the caller's job.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "MIN_SPACING_MM",
    "MAX_SPACING_MM",
    "read_volume",
    "write_volume",
    "validate_volume",
    "check_modality",
    "image_metadata",
]

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
_AXES = ("i", "j", "k", "t")

#: Metadata keys that may carry the imaging modality (case-insensitive match).
MODALITY_KEYS = ("0008|0060", "modality", "dicom_modality", "spine_ldm_modality")
#: DICOM modality codes that are certainly not MR (values outside this set and "MR" pass).
NON_MR_MODALITIES = {
    "CT": "CT", "PT": "PET", "PET": "PET", "NM": "nuclear medicine", "US": "ultrasound", "CR": "radiograph",
    "DX": "radiograph", "DR": "radiograph", "RG": "radiograph", "MG": "mammography", "XA": "X-ray angiography",
    "RF": "fluoroscopy", "IO": "intra-oral X-ray", "PX": "panoramic X-ray", "OCT": "optical coherence tomography",
    "XC": "photograph", "ES": "endoscopy", "SEG": "segmentation", "RTDOSE": "RT dose", "RTSTRUCT": "RT structure",
}


def _short(msg: str) -> str:
    """One informative line from a (multi-line) SimpleITK / ITK error message.

    Takes the text after ``ERROR:`` (without the ``NrrdImageIO(0x...):`` object prefix) and, for
    libraries that print a trace of ``[lib] ...`` lines (teem/NRRD), appends the innermost cause.
    """
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    head = next((ln for ln in lines if "ERROR:" in ln), None)
    if head is None:
        head = next((ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")), lines[0] if lines else "")
    else:
        head = head.split("ERROR:", 1)[1].strip()
    head = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", head)
    if "Unable to determine ImageIO reader" in head:
        return "not a recognised image format (expected NRRD, NIfTI, MHA, a DICOM folder, ...)"
    trace = [ln for ln in lines if ln.startswith("[")]
    if trace:
        cause = trace[-1].split("]", 1)[-1].strip()
        head = f"{head.rstrip(':')}: {cause}"
    return (head or "unknown error")[:300]


def image_metadata(image: sitk.Image) -> dict[str, str]:
    """All header key/value pairs of ``image`` as a plain dict."""
    return {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}


def check_modality(metadata: Mapping | None, source: str = "volume") -> None:
    """Reject metadata whose modality is obviously not MR (e.g. ``Modality = CT``).

    Looks at the keys in :data:`MODALITY_KEYS` (case-insensitive). ``MR`` / ``MRI`` and any
    unknown value pass; so does metadata without a modality key.
    """
    if not metadata:
        return
    for key, value in metadata.items():
        if str(key).strip().lower() not in MODALITY_KEYS:
            continue
        val = str(value).strip().strip("\\").upper()
        if val in NON_MR_MODALITIES:
            raise InputError(
                f"{source} is {NON_MR_MODALITIES[val]} (metadata {key} = {str(value).strip()}), "
                "but SpineInpaint needs a T2-weighted MR volume")


def _squeeze(image: sitk.Image, source: str) -> sitk.Image:
    dim = image.GetDimension()
    size = image.GetSize()
    shape = "x".join(str(s) for s in size)
    if dim == 4:
        if size[3] != 1:
            raise InputError(f"{source} is 4D ({shape}) with {size[3]} volumes; a single 3D volume is required")
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    elif dim != 3:
        raise InputError(f"{source} is {dim}D ({shape}); a 3D volume is required")
    ncomp = image.GetNumberOfComponentsPerPixel()
    ptype = image.GetPixelIDTypeAsString().lower()
    if "complex" in ptype:
        raise InputError(f"{source} has complex-valued voxels ({image.GetPixelIDTypeAsString()}); a real-valued magnitude image is required")
    if ncomp > 1:
        kind = "RGB/RGBA colour" if ncomp in (3, 4) else "vector"
        raise InputError(f"{source} has {ncomp} components per voxel ({kind}); a scalar grayscale volume is required")
    if "vector" in ptype:  # a vector image with exactly one component
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def validate_volume(image: sitk.Image, source: str = "volume") -> sitk.Image:
    """Validate an image and return it as a 3D scalar ``sitk.Image``.

    A 4D image with one volume and a 1-component vector image are squeezed (a new image
    with the same geometry is returned); otherwise the input object itself is returned.
    Raises :class:`InputError` as described in the module docstring.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{source} must be a SimpleITK.Image, got {type(image).__name__}")
    image = _squeeze(image, source)
    size = image.GetSize()
    if min(size) < 2:
        flat = [_AXES[a] for a, s in enumerate(size) if s < 2]
        raise InputError(
            f"{source} is effectively 2D ({'x'.join(map(str, size))}, a single voxel along axis {', '.join(flat)}); "
            "a 3D volume is required")
    for a, s in enumerate(image.GetSpacing()):
        if not math.isfinite(s) or s < MIN_SPACING_MM or s > MAX_SPACING_MM:
            raise InputError(
                f"{source} spacing along axis {_AXES[a]} is {s:g} mm, outside the plausible range "
                f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm (wrong header units?)")
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    det = float(np.linalg.det(d))
    if not np.all(np.isfinite(d)) or abs(abs(det) - 1.0) > 1e-3:
        raise InputError(f"{source} has a degenerate direction matrix (determinant {det:.3g}, expected +-1)")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise InputError(f"{source} has a non-finite origin {image.GetOrigin()}")
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = int(np.count_nonzero(np.isinf(arr)))
        if n_nan or n_inf:
            raise InputError(
                f"{source} contains {n_nan} NaN and {n_inf} Inf voxels (of {arr.size}); "
                "replace them before inpainting")
    return image


def _read_dicom_dir(path: Path) -> sitk.Image:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise InputError(f"no volume file or DICOM series found in folder '{path}'")
    if len(ids) > 1:
        raise InputError(f"folder '{path}' holds {len(ids)} DICOM series; pass the folder or a file of one series")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    # copy the first slice's tags (modality etc.) onto the volume
    for key in reader.GetMetaDataKeys(0):
        try:
            image.SetMetaData(key, reader.GetMetaData(0, key))
        except (RuntimeError, UnicodeDecodeError):  # pragma: no cover - odd binary tags
            pass
    return image


def read_volume(path, modality_check: bool = True) -> sitk.Image:
    """Read and validate a 3D scalar volume (any SimpleITK format, or a DICOM series folder).

    Header metadata is kept on the returned image. Raises :class:`InputError` with a
    one-line message for every problem (see module docstring).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise InputError(f"file not found: '{p}'")
    try:
        if p.is_dir():
            image = _read_dicom_dir(p)
        else:
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except (RuntimeError, OSError) as exc:
        raise InputError(f"cannot read '{p}': {_short(str(exc))}") from None
    meta = image_metadata(image)
    try:
        image = validate_volume(image, source=f"'{p.name}'")
    except InputError as exc:
        if "2D" in str(exc) and p.is_file() and (p.suffix.lower() in (".dcm", ".ima") or "0008|0060" in meta):
            raise InputError(f"{exc} (a single DICOM file is one slice: pass the folder of the series)") from None
        raise
    if modality_check:
        check_modality(meta, source=f"'{p.name}'")
    if not image.GetMetaDataKeys() and meta:  # squeezed: carry the header over
        for k, v in meta.items():
            image.SetMetaData(k, v)
    return image


def _meta_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    if isinstance(value, np.generic):
        return json.dumps(value.item())
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    return json.dumps(value, default=str)


def write_volume(image: sitk.Image, path, metadata: Mapping | None = None, compress: bool = True) -> Path:
    """Write ``image`` (format from the suffix; NRRD recommended) with extra header metadata.

    Values that are not strings are JSON-encoded (dicts, lists, numbers). Keys are written
    as given (the caller adds the ``spine_ldm_`` prefix). Existing metadata of ``image`` is
    kept; the caller's image object is not modified. Parent folders are created.
    Returns the written path.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"expected a SimpleITK.Image to write, got {type(image).__name__}")
    p = Path(os.fspath(path)).expanduser()
    out = sitk.Image(image)  # shallow copy-on-write: metadata changes do not touch the caller's image
    for key, value in (metadata or {}).items():
        k = str(key)
        if not k or any(c in k for c in ":=\n\r"):
            raise InputError(f"invalid metadata key {key!r} (no ':', '=', or newlines allowed)")
        v = _meta_str(value)
        if "\n" in v or "\r" in v:
            v = v.replace("\r", " ").replace("\n", " ")
        out.SetMetaData(k, v)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(out, str(p), compress)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"cannot write '{p}': {_short(str(exc))}") from None
    return p
