"""SPIDER (van der Graaf et al., Sci Data 2024; Zenodo 10159290, CC BY 4.0) -> manifest rows.

Native layout (unzipped)::

    <root>/images/{patient}_{seq}.mha     seq in t1 | t2 | t2_SPACE
    <root>/masks/{patient}_{seq}.mha      same name and grid as the image
    <root>/radiological_gradings.csv      Patient,IVD label,Modic,...,Disc herniation,...,Pfirrman grade

What is imported, and how:

* **Series**: only T2 (``*_t2.mha``); ``include_t2_space=True`` adds the 3-D ``*_t2_SPACE.mha`` series. T1 is
  never imported (the models are T2). ``study_id = "spider-{patient}"``: the split unit is the patient, so a
  patient's t2 and t2_SPACE series always land in the same split.
* **Levels**: disc mask value ``200 + n`` with IVD label n = 1 -> L5-S1, 2 -> L4-L5, 3 -> L3-L4, 4 -> L2-L3,
  5 -> L1-L2 (labels are numbered from the bottom; n = 6 is T12-L1 and is skipped, as is label 0).
* **Disc centre**: centroid of the disc-mask voxels (continuous index) mapped to LPS mm with the mask's own
  origin/spacing/direction (``TransformContinuousIndexToPhysicalPoint``), so PIR- and LPS-stored series both
  come out right.
* **Condition**: the ``Disc herniation`` grading (0/1) of (patient, IVD label). SPIDER's herniation grade is
  binary and has **no small vs moderate/large distinction**: 1 maps to ``herniation_condition``
  (default ``dh_moderate_large``; pass ``"dh_small"`` to choose the other), 0 to ``none``. SPIDER has no
  stenosis grade, so no ``ccs_*`` rows come from it. A disc without a grading row is skipped (logged).
* **Landmark** (SPIDER has no pathology coordinate; this one is *derived*): the **posterior disc margin in the
  disc's mid-plane on the mid-sagittal slice**. Take the disc voxels whose centres lie within half a slice of
  the disc centre along the image's left-right axis; their principal axes in the sagittal plane give the
  disc's own AP axis ``u`` and normal ``v`` (:func:`disc_axes`; so the tilted L5-S1 disc is handled). Keep the
  voxels within ``si_band_mm`` (default 3 mm) of the centre along ``v``, then those within half a voxel of the
  most posterior position along ``u``; the landmark is the mean LPS position of those voxel centres. It is the
  natural seed of a posterior herniation (and is set for healthy discs too, as the point where a herniation
  could be inpainted). ``landmark="none"`` leaves it empty.
* **Canal centre** (``canal_lps``, where a stenosis landmark goes): the centroid (LPS mm) of the spinal-canal
  voxels (mask value ``CANAL_LABEL`` = 100) whose centres lie within the superior-inferior extent of that disc's
  voxels (projection on the image axis closest to LPS S-I); empty when the mask has no canal voxels there.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from spine_ldm.conditions import parse_condition
from spine_ldm.errors import InputError

from ..manifest import Row
from .common import ImageHeader, SkipLog

#: IVD label n (mask value 200 + n) -> level. 6 (T12-L1) is not a lumbar FSU of ours and is skipped.
IVD_LEVELS = {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2"}
DISC_LABEL_OFFSET = 200
#: spinal canal mask value
CANAL_LABEL = 100
GRADINGS_FILE = "radiological_gradings.csv"
_NAME = re.compile(r"^(\d+)_(t1|t2|t2_space)$", re.IGNORECASE)

LPS_LR = (1.0, 0.0, 0.0)
LPS_AP = (0.0, 1.0, 0.0)  # +y = posterior
LPS_SI = (0.0, 0.0, 1.0)


def read_gradings(path: str | os.PathLike) -> dict[tuple[str, int], dict[str, int]]:
    """``radiological_gradings.csv`` -> {(patient, IVD label): {column: int}}. Header names are stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SPIDER gradings file {str(path)!r} not found (expected <root>/{GRADINGS_FILE})")
    out: dict[tuple[str, int], dict[str, int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
        for col in ("Patient", "IVD label", "Disc herniation"):
            if col not in reader.fieldnames:
                raise InputError(f"{path.name}: column {col!r} missing; header is {', '.join(reader.fieldnames)}")
        for rec in reader:
            try:
                patient = str(int(float(rec["Patient"])))
                ivd = int(float(rec["IVD label"]))
                vals = {k: int(float(v)) for k, v in rec.items() if k and v not in (None, "") and k != "Patient"}
            except (TypeError, ValueError):
                raise InputError(f"{path.name} line {reader.line_num}: non-numeric grading {dict(rec)}") from None
            out[(patient, ivd)] = vals
    return out


def disc_geometry(mask: sitk.Image, label: int, *, si_band_mm: float = 3.0,
                  array: np.ndarray | None = None) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """(disc centre LPS, posterior-margin landmark LPS) of mask value ``label``, or None when absent.

    See the module docstring for the landmark definition. ``array`` = ``GetArrayFromImage(mask)`` if at hand.
    """
    a = sitk.GetArrayViewFromImage(mask) if array is None else array
    kji = np.argwhere(a == label)
    if kji.size == 0:
        return None
    hdr = ImageHeader.of(mask)
    ijk = kji[:, ::-1].astype(np.float64)
    centre_idx = ijk.mean(axis=0)
    centre = np.asarray(mask.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre_idx)))
    pts = hdr.index_to_physical(ijk)
    rel = pts - centre[None, :]
    lr_ax, ap_ax, si_ax = (hdr.axis_closest_to(v) for v in (LPS_LR, LPS_AP, LPS_SI))
    lr_tol = 0.5 * hdr.axis_spacing_closest_to(LPS_LR) + 1e-6
    band = np.abs(rel @ lr_ax) <= lr_tol
    if not band.any():  # cannot happen for a centroid of a convex-ish blob, but be safe
        band = np.ones(len(pts), bool)
    u, v = disc_axes(rel[band], ap_ax, si_ax)
    in_plane = max(hdr.axis_spacing_closest_to(LPS_AP), hdr.axis_spacing_closest_to(LPS_SI))
    sel = band & (np.abs(rel @ v) <= max(si_band_mm, 0.5 * in_plane + 1e-6))
    if not sel.any():
        sel = band
    a = rel[sel] @ u
    post = pts[sel][a >= a.max() - (0.5 * in_plane + 1e-6)]
    landmark = post.mean(axis=0)
    return tuple(float(v) for v in centre), tuple(float(v) for v in landmark)


def canal_center(mask: sitk.Image, disc_label: int, *, array: np.ndarray | None = None,
                 canal_label: int = CANAL_LABEL,
                 _canal_pts: np.ndarray | None = None) -> tuple[float, float, float] | None:
    """Centroid (LPS mm) of the canal voxels within the S-I extent of disc ``disc_label``, or None.

    The S-I coordinate of a voxel is its physical position projected on the image axis closest to LPS S-I; a canal
    voxel counts when that coordinate lies within [min, max] of the disc's voxels (+- 1e-6 mm).
    """
    a = sitk.GetArrayViewFromImage(mask) if array is None else array
    hdr = ImageHeader.of(mask)
    disc = np.argwhere(a == disc_label)
    if disc.size == 0:
        return None
    if _canal_pts is None:
        kji = np.argwhere(a == canal_label)
        _canal_pts = hdr.index_to_physical(kji[:, ::-1].astype(np.float64)) if kji.size else np.zeros((0, 3))
    if len(_canal_pts) == 0:
        return None
    si_ax = hdr.axis_closest_to(LPS_SI)
    s_disc = hdr.index_to_physical(disc[:, ::-1].astype(np.float64)) @ si_ax
    s_canal = _canal_pts @ si_ax
    sel = (s_canal >= s_disc.min() - 1e-6) & (s_canal <= s_disc.max() + 1e-6)
    if not sel.any():
        return None
    return tuple(float(v) for v in _canal_pts[sel].mean(axis=0))


def disc_axes(rel: np.ndarray, ap_ax: np.ndarray, si_ax: np.ndarray, *, min_elongation: float = 1.5,
              max_tilt_deg: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """The disc's own (anterior->posterior, normal) axes in the sagittal plane from voxel offsets ``rel`` (N, 3).

    Principal axes of the voxel positions projected on the image's (AP, SI) plane: the major axis (signed to point
    posteriorly) is the disc's AP axis ``u``, the minor one its normal ``v``; so tilted discs (L5-S1) get their
    posterior margin along their own plane, not along a horizontal line. Falls back to the image axes when the
    blob is not elongated (major/minor spread < ``min_elongation``) or tilted more than ``max_tilt_deg``.
    """
    p2 = np.stack([rel @ ap_ax, rel @ si_ax], axis=1)
    if len(p2) >= 3:
        p2 = p2 - p2.mean(axis=0)
        w, vecs = np.linalg.eigh(p2.T @ p2 / len(p2))
        major = vecs[:, 1] * (1.0 if vecs[0, 1] >= 0 else -1.0)  # point posteriorly
        tilt = np.degrees(np.arccos(np.clip(major[0], -1.0, 1.0)))
        if w[0] > 0 and np.sqrt(w[1] / w[0]) >= min_elongation and tilt <= max_tilt_deg:
            u = major[0] * ap_ax + major[1] * si_ax
            v = -major[1] * ap_ax + major[0] * si_ax
            return u / np.linalg.norm(u), v / np.linalg.norm(v)
    return ap_ax, si_ax


def find_series(root: str | os.PathLike, include_t2_space: bool = False) -> list[tuple[str, str, Path, Path]]:
    """[(patient, seq, image_path, mask_path)] of the T2 series present under ``root`` (sorted)."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise InputError(f"{str(root)!r} is not a SPIDER folder: expected 'images/' and 'masks/' inside")
    want = {"t2"} | ({"t2_space"} if include_t2_space else set())
    out = []
    for p in img_dir.glob("*.mha"):
        m = _NAME.match(p.stem)
        if not m or m.group(2).lower() not in want:
            continue
        out.append((m.group(1), m.group(2), p, mask_dir / p.name))
    out.sort(key=lambda t: (int(t[0]), t[1].lower()))
    return out


def import_spider(root: str | os.PathLike, *, include_t2_space: bool = False,
                  herniation_condition: str = "dh_moderate_large", landmark: str = "posterior_margin",
                  si_band_mm: float = 3.0, patients: Iterable[str | int] | None = None,
                  skipped: SkipLog | None = None, progress=None) -> list[Row]:
    """Import a SPIDER tree (see module docstring). Returns rows with ``split=""``, ``source="spider"``.

    ``patients`` limits the import to those patient ids; ``skipped`` collects what was left out and why;
    ``progress(done, total)`` is called after each series.
    """
    herniation_condition = parse_condition(herniation_condition)
    if herniation_condition not in ("dh_small", "dh_moderate_large"):
        raise InputError(f"herniation_condition must be dh_small or dh_moderate_large, got {herniation_condition!r}")
    if landmark not in ("posterior_margin", "none"):
        raise InputError(f"landmark must be 'posterior_margin' or 'none', got {landmark!r}")
    skipped = skipped if skipped is not None else SkipLog()
    root = Path(root)
    grades = read_gradings(root / GRADINGS_FILE)
    series = find_series(root, include_t2_space)
    if patients is not None:
        keep = {str(int(p)) if str(p).isdigit() else str(p) for p in patients}
        series = [s for s in series if s[0] in keep]
    rows: list[Row] = []
    for n_done, (patient, seq, img_path, mask_path) in enumerate(series, 1):
        if not mask_path.is_file():
            skipped.add(f"{img_path.name}: no mask masks/{mask_path.name}")
            continue
        try:
            hdr = ImageHeader.read(img_path)
            mask = sitk.ReadImage(str(mask_path))
        except (InputError, RuntimeError) as e:
            skipped.add(f"{img_path.name}: {str(e).splitlines()[0]}")
            continue
        if mask.GetDimension() != 3:
            skipped.add(f"{mask_path.name}: mask is {mask.GetDimension()}D")
            continue
        if tuple(mask.GetSize()) != hdr.size:
            skipped.add(f"{img_path.name}: mask size {mask.GetSize()} != image size {hdr.size} (centres still in mm; "
                        "series skipped to be safe)")
            continue
        arr = sitk.GetArrayFromImage(mask)
        kji = np.argwhere(arr == CANAL_LABEL)
        canal_pts = ImageHeader.of(mask).index_to_physical(kji[:, ::-1].astype(np.float64)) if kji.size \
            else np.zeros((0, 3))
        for ivd, level in IVD_LEVELS.items():
            g = grades.get((patient, ivd))
            if g is None:
                skipped.add(f"{img_path.name} {level}: no grading row (Patient {patient}, IVD label {ivd})")
                continue
            geo = disc_geometry(mask, DISC_LABEL_OFFSET + ivd, si_band_mm=si_band_mm, array=arr)
            if geo is None:
                skipped.add(f"{img_path.name} {level}: disc label {DISC_LABEL_OFFSET + ivd} absent from the mask")
                continue
            centre, lm = geo
            canal = canal_center(mask, DISC_LABEL_OFFSET + ivd, array=arr, _canal_pts=canal_pts)
            dh = g.get("Disc herniation", 0)
            rows.append(Row(
                study_id=f"spider-{patient}", image_path=str(img_path.resolve()), level=level,
                disc_center_lps=centre, condition=herniation_condition if dh >= 1 else "none",
                landmark_lps=lm if landmark == "posterior_margin" else None, spacing=hdr.spacing,
                split="", source="spider", canal_lps=canal))
        if progress is not None:
            progress(n_done, len(series))
    return rows


__all__ = ["import_spider", "read_gradings", "disc_geometry", "disc_axes", "canal_center", "CANAL_LABEL", "find_series", "IVD_LEVELS"]
