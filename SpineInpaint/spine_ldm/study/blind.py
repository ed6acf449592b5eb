"""Blinding: anonymous case ids, metadata-free volumes, allow-listed public case fields.

What a reader receives for a case is built ONLY from :data:`PUBLIC_CASE_FIELDS`; the volume
shown is re-written from a bare numpy array (float32, geometry only, no metadata dictionary)
under a random name, so neither a file name, a header field nor a URL can reveal the method
or the truth. The field of view is the same for real and inpainted cases (FSU crop around the
case centre, or the whole volume), and the origin is shifted so that the landmark is at
(0, 0, 0) mm LPS in every served volume (no scanner position survives either).
"""
from __future__ import annotations

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

_CASE_ID = re.compile(r"^[0-9a-f]{16}$")


def new_case_id(taken: set[str] | None = None) -> str:
    """Random 64-bit hex id (used for the case id and the served file name)."""
    while True:
        cid = secrets.token_hex(8)
        if not taken or cid not in taken:
            return cid


def is_case_id(s: str) -> bool:
    return bool(_CASE_ID.match(str(s)))


def crop_fov(image: sitk.Image, center_lps, fov: str = "fsu", shape=PAPER_FSU_SHAPE,
             size_mm=PAPER_FSU_SIZE_MM) -> sitk.Image:
    """Field of view shown to readers: the FSU box around ``center_lps`` or the whole volume."""
    if fov == "whole":
        return image
    if fov != "fsu":
        raise InputError(f"unknown field of view {fov!r}; expected 'fsu' or 'whole'")
    from ..geometry import FSUSpec, extract_fsu

    return extract_fsu(image, tuple(float(x) for x in center_lps), FSUSpec(shape=tuple(shape), size_mm=tuple(size_mm)))


def anonymize_image(image: sitk.Image, landmark_lps) -> sitk.Image:
    """A new float32 image with the same voxels, spacing and direction, origin shifted so the
    landmark sits at (0, 0, 0) mm LPS, and NO metadata dictionary."""
    if image.GetDimension() != 3:
        raise InputError(f"reader-study volumes must be 3-D, got {image.GetDimension()}-D")
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"volume has {int(np.sum(~np.isfinite(arr)))} NaN/Inf voxels")
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(tuple(float(o) - float(p) for o, p in zip(image.GetOrigin(), landmark_lps)))
    for k in out.GetMetaDataKeys():  # GetImageFromArray adds none; be explicit anyway
        out.EraseMetaData(k)
    return out


def write_anonymous(image: sitk.Image, out_dir: str | Path, case_id: str) -> Path:
    """Write ``<case_id>.nrrd`` (gzip) and check its header holds only geometry/encoding fields."""
    if not is_case_id(case_id):
        raise InputError(f"case id {case_id!r} is not a 16-hex-digit anonymous id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{case_id}.nrrd"
    w = sitk.ImageFileWriter()
    w.SetFileName(str(path))
    w.SetUseCompression(True)
    w.Execute(image)
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
