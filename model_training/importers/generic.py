"""A manifest written by hand (or by your own script) -> validated manifest rows.

Write a CSV with the columns of :mod:`model_training.manifest` (``study_id, image_path, level,
disc_center_lps, condition`` are required; ``spacing``, ``landmark_lps``, ``split``, ``source``,
``canal_lps`` may be left out or empty), e.g.::

    study_id,image_path,level,disc_center_lps,condition,landmark_lps
    p01,scans/p01_t2.nrrd,L4-L5,"1.6,-35.3,-25.7",dh_small,"1.5,-18.0,-25.0"
    p01,scans/p01_t2.nrrd,L5-S1,"0.6,-30.0,-59.1",none,

Coordinates are LPS mm (what ITK/SimpleITK report; Slicer shows RAS = (-x, -y, z)). Relative image paths are
resolved against the CSV's folder. :func:`import_manifest` checks, on top of the CSV syntax (``read_manifest``):
every image exists and has a readable 3-D header; the disc centre, the landmark and the canal centre lie inside
the image (at most ``tolerance_mm`` outside); it fills ``spacing`` from the header and ``source`` with ``manual``. Every
problem raises ``InputError`` naming the line, study and column.
"""
from __future__ import annotations

import os

from spine_ldm.errors import InputError

from ..manifest import Row, format_point, read_manifest
from .common import ImageHeader


def validate_rows_against_images(rows: list[Row], *, tolerance_mm: float = 0.0, name: str = "manifest",
                                 fill_spacing: bool = True) -> list[Row]:
    """Check images and points against the image headers (see module docstring); returns rows with spacing."""
    headers: dict[str, ImageHeader | InputError] = {}
    out = []
    for r in rows:
        where = f"{name} {r.where()}"
        h = headers.get(r.image_path)
        if h is None:
            try:
                h = ImageHeader.read(r.image_path)
            except InputError as e:
                h = e
            headers[r.image_path] = h
        if isinstance(h, InputError):
            raise InputError(f"{where}, column 'image_path': {h}")
        for col, p in (("disc_center_lps", r.disc_center_lps), ("landmark_lps", r.landmark_lps),
                       ("canal_lps", r.canal_lps)):
            if p is None:
                continue
            d = h.distance_outside_mm(p)
            if d > tolerance_mm:
                raise InputError(f"{where}, column {col!r}: point ({format_point(p)}) LPS is {d:.1f} mm outside "
                                 f"{os.path.basename(r.image_path)!r} (RAS given instead of LPS? "
                                 f"RAS = (-x, -y, z))")
        if fill_spacing and r.spacing is None:
            r = r.replace(spacing=h.spacing)
        elif r.spacing is not None and any(abs(a - b) > 1e-3 * max(1.0, b) for a, b in zip(r.spacing, h.spacing)):
            raise InputError(f"{where}, column 'spacing': {r.spacing} disagrees with the image header {h.spacing}")
        out.append(r)
    return out


def import_manifest(path: str | os.PathLike, *, tolerance_mm: float = 0.0, check_images: bool = True) -> list[Row]:
    """Read a hand-written manifest, validate it (CSV + image headers) and fill spacing/source."""
    rows = read_manifest(path, default_source="manual")
    if check_images:
        rows = validate_rows_against_images(rows, tolerance_mm=tolerance_mm, name=os.path.basename(str(path)))
    return rows


__all__ = ["import_manifest", "validate_rows_against_images"]
