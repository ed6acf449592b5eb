"""Blinding: anonymous case ids, metadata-free volumes, allow-listed public case fields.

What a reader receives for a case is built ONLY from :data:`PUBLIC_CASE_FIELDS`; the volume
shown is re-written from a bare numpy array (float32, geometry only, no metadata dictionary)
under a random name, so neither a file name, a header field nor a URL can reveal the method
or the truth.

Geometry is blind too. With the default field of view (``fsu``) every case, real or inpainted, is
resampled onto ONE canonical grid: the FSU box (80 x 80 x 50 mm) centred on the case's landmark,
canonical directions (:data:`CANONICAL_DIRECTION`), the FSU spacing, and the same origin
(:func:`view_origin`, a constant: the landmark at (0, 0, 0) mm LPS, the grid centre). Every served
header is therefore byte-identical, and so is the landmark's voxel position; whether a case had a
disc centre (given, estimated or none) no longer changes anything. With ``whole`` the scan's own grid
is served (origin shifted so the landmark is at (0, 0, 0), rounded to 0.1 um): size, spacing and
direction are then those of the scan, which blinds only when real and inpainted cases come from
comparable scans.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

#: Fields of a case that a reader may see (everything else is organizer-only).
PUBLIC_CASE_FIELDS = ("case_id", "level", "condition", "landmark_lps", "volume")
#: Header keys a served NRRD may contain (all geometry / encoding; no free-form key:=value pairs).
ALLOWED_NRRD_FIELDS = {"type", "dimension", "space", "sizes", "space directions", "kinds", "endian", "encoding",
                       "space origin", "space units", "spacings", "thicknesses", "measurement frame"}
#: Paper FSU: 80 x 80 x 50 mm, numpy order (SI, AP, LR) -> (128, 64, 32).
PAPER_FSU_SHAPE = (128, 64, 32)
PAPER_FSU_SIZE_MM = (80.0, 80.0, 50.0)
#: Direction matrix (row-major) of every served FSU view: ITK axis i runs patient left -> right, j anterior ->
#: posterior, k superior -> inferior (the canonical FSU axes of spine_ldm.geometry).
CANONICAL_DIRECTION = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: Origins of served whole volumes (``fov="whole"``) are rounded to this many decimals (mm).
ORIGIN_DECIMALS = 4

_CASE_ID = re.compile(r"^[0-9a-f]{16}$")


def new_case_id(taken: set[str] | None = None) -> str:
    """Random 64-bit hex id (used for the case id and the served file name)."""
    while True:
        cid = secrets.token_hex(8)
        if not taken or cid not in taken:
            return cid


def is_case_id(s: str) -> bool:
    return bool(_CASE_ID.match(str(s)))


def view_origin(shape=PAPER_FSU_SHAPE, size_mm=PAPER_FSU_SIZE_MM) -> tuple[float, float, float]:
    """Origin (LPS mm) of the served FSU view relative to the landmark: the same constant for every case (computed
    from the FSU shape and size alone, so it is bit-identical for all; the landmark is exactly the centre voxel)."""
    from ..geometry import FSUSpec

    spec = FSUSpec(shape=tuple(shape), size_mm=tuple(size_mm))
    d = np.asarray(CANONICAL_DIRECTION, dtype=np.float64).reshape(3, 3)
    half = (np.asarray(spec.itk_size, dtype=np.float64) - 1.0) / 2.0
    o = -(d @ (np.asarray(spec.itk_spacing, dtype=np.float64) * half))
    return tuple(float(v) + 0.0 for v in o)  # + 0.0: no "-0" in a header


def crop_fov(image: sitk.Image, landmark_lps, fov: str = "fsu", shape=PAPER_FSU_SHAPE,
             size_mm=PAPER_FSU_SIZE_MM) -> sitk.Image:
    """Field of view shown to readers: the canonical FSU view centred on ``landmark_lps`` (float32, linear,
    outside = 0; see the module docstring), or the whole volume. Raises InputError when less than half of the
    view lies inside the volume."""
    if fov == "whole":
        return image
    if fov != "fsu":
        raise InputError(f"unknown field of view {fov!r}; expected 'fsu' or 'whole'")
    from ..geometry import FSUSpec, as_point, fraction_inside

    spec = FSUSpec(shape=tuple(shape), size_mm=tuple(size_mm))
    c = np.asarray(as_point(landmark_lps, "landmark"), dtype=np.float64)
    ref = sitk.Image([int(v) for v in spec.itk_size], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in spec.itk_spacing])
    ref.SetDirection(CANONICAL_DIRECTION)
    ref.SetOrigin([float(v) for v in c + np.asarray(view_origin(shape, size_mm))])
    frac = fraction_inside(image, ref)
    if frac < 0.5:
        raise InputError(f"only {frac * 100:.0f}% of the {spec.size_mm[0]:g}x{spec.size_mm[1]:g}x{spec.size_mm[2]:g} mm "
                         f"view around the landmark lies inside the volume (need 50%)")
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def anonymize_image(image: sitk.Image, landmark_lps, origin=None) -> sitk.Image:
    """A new float32 image with the same voxels, spacing and direction, origin shifted so the
    landmark sits at (0, 0, 0) mm LPS (rounded to :data:`ORIGIN_DECIMALS`; or exactly ``origin`` when given,
    e.g. :func:`view_origin` for the canonical FSU view), and NO metadata dictionary."""
    if image.GetDimension() != 3:
        raise InputError(f"reader-study volumes must be 3-D, got {image.GetDimension()}-D")
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"volume has {int(np.sum(~np.isfinite(arr)))} NaN/Inf voxels")
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    if origin is None:
        origin = tuple(round(float(o) - float(p), ORIGIN_DECIMALS) + 0.0 for o, p in zip(image.GetOrigin(), landmark_lps))
    out.SetOrigin(tuple(float(v) for v in origin))
    for k in out.GetMetaDataKeys():  # GetImageFromArray adds none; be explicit anyway
        out.EraseMetaData(k)
    return out


def write_anonymous(image: sitk.Image, out_dir: str | Path, case_id: str) -> Path:
    """Write ``<case_id>.nrrd`` (gzip) and check its header holds only geometry/encoding fields."""
    if not is_case_id(case_id):
        raise InputError(f"case id {case_id!r} is not a 16-hex-digit anonymous id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = out_dir / f"{case_id}.nrrd"
    w = sitk.ImageFileWriter()
    w.SetFileName(str(path))
    w.SetUseCompression(True)
    w.Execute(image)
    os.chmod(path, 0o600)
    bad = sorted(set(nrrd_header_fields(path)) - ALLOWED_NRRD_FIELDS)
    if bad:
        path.unlink()
        raise InputError(f"anonymized NRRD {path.name} would carry non-geometry fields {bad}")
    return path


def nrrd_header_text(path: str | Path) -> str:
    """The NRRD header (text up to the first blank line)."""
    raw = Path(path).read_bytes()
    end = raw.find(b"\n\n")
    return raw[: end if end >= 0 else min(len(raw), 4096)].decode("latin-1")


def nrrd_header_fields(path: str | Path) -> dict[str, str]:
    """All ``field: value`` and ``key:=value`` entries of an NRRD header (keys lower-cased for fields)."""
    fields: dict[str, str] = {}
    for line in nrrd_header_text(path).splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            k, v = line.split(":=", 1)
            fields[k] = v
        elif ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return fields


def public_case(case: dict) -> dict:
    """Allow-listed view of a study case (drops anything not in :data:`PUBLIC_CASE_FIELDS`)."""
    return {k: case[k] for k in PUBLIC_CASE_FIELDS if k in case}
