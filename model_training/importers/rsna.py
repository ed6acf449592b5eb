"""RSNA 2024 Lumbar Spine Degenerative Classification (Kaggle) -> NRRD volumes + manifest rows.

Native layout::

    <root>/train_images/{study_id}/{series_id}/{instance_number}.dcm
    <root>/train_series_descriptions.csv   study_id,series_id,series_description
    <root>/train.csv                       study_id, spinal_canal_stenosis_l1_l2 ... (25 condition_level columns)
    <root>/train_label_coordinates.csv     study_id,series_id,instance_number,condition,level,x,y

What is imported, and how:

* **Series**: ``Sagittal T2/STIR`` series only (``series_descriptions``). Central canal stenosis points are
  annotated on them; the series whose id appears in the canal coordinates is used (if a study has several,
  the annotated one wins). ``study_id = "rsna-{study_id}"``.
* **Volume**: the DICOM slices of the series are grouped by ImageOrientationPatient (a series may hold several
  stacks); the stack holding the annotated instances (else the largest) is kept and its slices are sorted by
  ImagePositionPatient projected on the slice normal ``n = r x c`` (never by instance number). Geometry:
  ``origin = IPP`` of the first slice, direction columns ``(r, c, n)`` with ``r = IOP[0:3]`` (+column) and
  ``c = IOP[3:6]`` (+row), spacing ``(PixelSpacing[1], PixelSpacing[0], median slice step)``; voxels are
  ``pixel * RescaleSlope + RescaleIntercept``. Irregular slice steps (> 10 % off the median, i.e. missing
  slices) or duplicate positions skip the series (logged). One NRRD per series is written to
  ``<cache_dir>/rsna_{study}_{series}.nrrd`` (atomic; reused when present unless ``overwrite``).
* **Condition**: ``spinal_canal_stenosis_{level}`` of ``train.csv``: ``Normal/Mild`` -> ``none``,
  ``Moderate`` -> ``ccs_moderate``, ``Severe`` -> ``ccs_severe``; empty -> the level is skipped. Foraminal and
  subarticular grades are not imported (not among our conditions).
* **Landmark**: the canal coordinate of that level, ``P = IPP + x * PixelSpacing[1] * r + y * PixelSpacing[0] * c``
  (LPS mm; x = column, y = row, pixel-centre convention as DICOM's IPP, i.e. (0, 0) is the centre of the first
  pixel), computed from the annotated instance's own header. Set for healthy levels too (where stenosis
  could be inpainted).
* **Canal centre** (``canal_lps``): the same canal coordinate. The RSNA point *is* the centre of the central
  canal at the disc level, i.e. where a CCS landmark goes, for every row.
* **Disc centre**: RSNA has no disc annotation, so it is *derived*: the canal landmark shifted anteriorly by
  ``spine_ldm.geometry.DISC_OFFSET_MM["ccs"]`` (28 mm: canal centre ~8 mm behind the posterior disc margin, disc
  centre ~20 mm in front of it) along the volume's own anterior-posterior axis turned by the level's typical disc
  tilt (``DISC_TILT_DEG``: 27 degrees towards inferior at L5-S1), via
  ``spine_ldm.geometry.estimate_disc_center(P, "ccs_moderate", volume, level)``; ``disc_offset_mm`` overrides
  the distance. The FSU is 80 mm in AP, so a +-10 mm error in this offset still keeps disc and canal inside it.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from spine_ldm.conditions import parse_level
from spine_ldm.errors import InputError

from ..manifest import Row
from .common import ImageHeader, SkipLog

SAGITTAL_T2 = "Sagittal T2/STIR"
CANAL = "spinal_canal_stenosis"
LEVEL_KEYS = {"l1_l2": "L1-L2", "l2_l3": "L2-L3", "l3_l4": "L3-L4", "l4_l5": "L4-L5", "l5_s1": "L5-S1"}
SEVERITY = {"normal/mild": "none", "moderate": "ccs_moderate", "severe": "ccs_severe"}


def _norm_condition(s: str) -> str:
    return str(s).strip().lower().replace(" ", "_")


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"RSNA file {str(path)!r} not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in reader.fieldnames]
        if missing:
            raise InputError(f"{path.name}: column(s) {', '.join(missing)} missing; header is "
                             f"{', '.join(reader.fieldnames)}")
        return [{k: (v or "").strip() for k, v in rec.items() if k is not None} for rec in reader]


def _int_id(s: str) -> str:
    try:
        return str(int(float(s)))
    except ValueError:
        return str(s).strip()


# --------------------------------------------------------------------------------------------------------- DICOM
def _dcmread(path: Path, pixels: bool):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types
        raise InputError(f"cannot read DICOM {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _geom(ds, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(IPP, r, c, (row spacing, column spacing)) of one slice; r = +column direction, c = +row direction."""
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], float)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], float)
        ps = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"DICOM {path.name} lacks ImagePositionPatient / ImageOrientationPatient / PixelSpacing") from None
    if ipp.shape != (3,) or iop.shape != (6,) or len(ps) != 2:
        raise InputError(f"DICOM {path.name} has malformed IPP/IOP/PixelSpacing")
    r, c = iop[:3], iop[3:]
    r = r / np.linalg.norm(r)
    c = c / np.linalg.norm(c)
    return ipp, r, c, (ps[0], ps[1])


def pixel_to_lps(ds, x: float, y: float, path: Path | None = None) -> tuple[float, float, float]:
    """RSNA (x = column, y = row) on a slice -> LPS mm: ``IPP + x * PixelSpacing[1] * r + y * PixelSpacing[0] * c``."""
    ipp, r, c, (row_sp, col_sp) = _geom(ds, path or Path("?"))
    p = ipp + float(x) * col_sp * r + float(y) * row_sp * c
    return tuple(float(v) for v in p)


def series_to_image(series_dir: str | os.PathLike, prefer_instances: Iterable[int] = (),
                    max_step_deviation: float = 0.1) -> sitk.Image:
    """Read one DICOM series folder into a 3-D LPS ``sitk.Image`` (see module docstring)."""
    series_dir = Path(series_dir)
    files = sorted(series_dir.glob("*.dcm"))
    if not files:
        raise InputError(f"no .dcm files in {str(series_dir)!r}")
    groups: dict[tuple, list] = defaultdict(list)
    for f in files:
        ds = _dcmread(f, pixels=True)
        ipp, r, c, ps = _geom(ds, f)
        key = tuple(np.round(np.concatenate([r, c]), 3)) + (int(ds.Rows), int(ds.Columns)) + tuple(np.round(ps, 4))
        try:
            inst = int(ds.InstanceNumber)
        except (AttributeError, TypeError, ValueError):
            inst = int(f.stem) if f.stem.isdigit() else -1
        groups[key].append((f, ds, ipp, r, c, ps, inst))
    prefer = set(int(i) for i in prefer_instances)

    def rank(item):
        key, members = item
        hits = sum(1 for m in members if m[6] in prefer)
        return (hits, len(members))

    key, members = max(groups.items(), key=rank)
    if len(members) < 2:
        raise InputError(f"series {series_dir.name}: the selected stack has {len(members)} slice(s); need >= 2")
    r, c = members[0][3], members[0][4]
    n = np.cross(r, c)
    members.sort(key=lambda m: float(np.dot(m[2], n)))
    pos = np.array([float(np.dot(m[2], n)) for m in members])
    steps = np.diff(pos)
    step = float(np.median(steps))
    if step <= 1e-3 or np.any(steps <= 1e-3):
        raise InputError(f"series {series_dir.name}: duplicate slice positions along the normal")
    if np.max(np.abs(steps - step)) > max_step_deviation * step:
        raise InputError(f"series {series_dir.name}: irregular slice spacing {np.round(steps, 2).tolist()} mm "
                         f"(median {step:.2f}; missing slices?)")
    slices = []
    for f, ds, *_ in members:
        a = ds.pixel_array.astype(np.float32)
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        icpt = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append(a * slope + icpt)
    vol = np.stack(slices, axis=0)  # (k, j = row, i = column)
    if np.allclose(vol, np.round(vol)) and vol.min() >= -32768 and vol.max() <= 32767:
        vol = vol.astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    row_sp, col_sp = members[0][5]
    img.SetSpacing((col_sp, row_sp, step))
    img.SetOrigin(tuple(float(v) for v in members[0][2]))
    img.SetDirection(tuple(float(v) for v in np.stack([r, c, n], axis=1).reshape(-1)))
    return img


def _write_atomic(img: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}_{path.name}")
    sitk.WriteImage(img, str(tmp), True)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------- import
def import_rsna(root: str | os.PathLike, cache_dir: str | os.PathLike, *, studies: Iterable[str | int] | None = None,
                series_description: str = SAGITTAL_T2, disc_offset_mm: float | None = None,
                overwrite: bool = False, skipped: SkipLog | None = None, progress=None) -> list[Row]:
    """Import an RSNA 2024 tree (see module docstring). Writes one NRRD per used series into ``cache_dir``.

    Returns rows with ``split=""``, ``source="rsna"``. ``studies`` limits the import; ``skipped`` collects
    what was left out and why; ``progress(done, total)`` is called after each study.
    """
    from spine_ldm import geometry

    root = Path(root)
    cache_dir = Path(cache_dir)
    skipped = skipped if skipped is not None else SkipLog()
    desc = _read_csv(root / "train_series_descriptions.csv", ("study_id", "series_id", "series_description"))
    grades = _read_csv(root / "train.csv", ("study_id",))
    coords = _read_csv(root / "train_label_coordinates.csv",
                       ("study_id", "series_id", "instance_number", "condition", "level", "x", "y"))
    want = series_description.strip().lower()
    sag = defaultdict(set)
    for d in desc:
        if d["series_description"].strip().lower() == want:
            sag[_int_id(d["study_id"])].add(_int_id(d["series_id"]))
    canal: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))  # study -> level -> rows
    for c in coords:
        if _norm_condition(c["condition"]) != CANAL:
            continue
        try:
            lv = parse_level(c["level"])
        except InputError:
            skipped.add(f"study {c['study_id']}: unknown level {c['level']!r} in coordinates")
            continue
        canal[_int_id(c["study_id"])][lv].append(c)
    keep = None if studies is None else {_int_id(str(s)) for s in studies}
    todo = [g for g in grades if keep is None or _int_id(g["study_id"]) in keep]
    rows: list[Row] = []
    for n_done, g in enumerate(todo, 1):
        study = _int_id(g["study_id"])
        try:
            rows.extend(_import_study(root, cache_dir, study, g, sag.get(study, set()), canal.get(study, {}),
                                      disc_offset_mm, overwrite, skipped, geometry))
        except InputError as e:
            skipped.add(f"study {study}: {e}")
        except (ValueError, KeyError) as e:  # malformed CSV values (empty x/y, non-numeric instance, ...)
            skipped.add(f"study {study}: malformed CSV value ({type(e).__name__}: {e})")
        if progress is not None:
            progress(n_done, len(todo))
    return rows


def _import_study(root, cache_dir, study, grade_row, sag_series, canal_levels, disc_offset_mm, overwrite,
                  skipped: SkipLog, geometry) -> list[Row]:
    if not sag_series:
        skipped.add(f"study {study}: no Sagittal T2/STIR series in train_series_descriptions.csv")
        return []
    # choose the series: the sagittal T2 series with the most canal points, ties -> smallest id
    votes = defaultdict(int)
    for lv, recs in canal_levels.items():
        for rec in recs:
            s = _int_id(rec["series_id"])
            if s in sag_series:
                votes[s] += 1
    if not votes:
        skipped.add(f"study {study}: no spinal canal stenosis coordinates on its Sagittal T2/STIR series")
        return []
    series = sorted(votes, key=lambda s: (-votes[s], int(s) if s.isdigit() else 0, s))[0]
    series_dir = root / "train_images" / study / series
    if not series_dir.is_dir():
        skipped.add(f"study {study}: series folder train_images/{study}/{series} missing")
        return []
    out_path = cache_dir / f"rsna_{study}_{series}.nrrd"
    instances = [int(float(rec["instance_number"])) for recs in canal_levels.values() for rec in recs
                 if _int_id(rec["series_id"]) == series]
    if out_path.is_file() and not overwrite:
        hdr = ImageHeader.read(out_path)
    else:
        img = series_to_image(series_dir, prefer_instances=instances)
        _write_atomic(img, out_path)
        hdr = ImageHeader.of(img, str(out_path))
    ref = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # carries the direction for estimate_disc_center
    ref.SetDirection(hdr.direction)
    rows = []
    for key, level in LEVEL_KEYS.items():
        sev = grade_row.get(f"{CANAL}_{key}", "").strip()
        if not sev:
            skipped.add(f"study {study} {level}: no spinal canal stenosis grade")
            continue
        cond = SEVERITY.get(sev.lower())
        if cond is None:
            skipped.add(f"study {study} {level}: unknown severity {sev!r}")
            continue
        recs = [r for r in canal_levels.get(level, []) if _int_id(r["series_id"]) == series]
        if not recs:
            skipped.add(f"study {study} {level}: no canal coordinate on series {series}")
            continue
        rec = recs[0]
        inst = int(float(rec["instance_number"]))
        dcm = series_dir / f"{inst}.dcm"
        if not dcm.is_file():
            skipped.add(f"study {study} {level}: annotated instance {inst}.dcm missing")
            continue
        p = pixel_to_lps(_dcmread(dcm, pixels=False), float(rec["x"]), float(rec["y"]), dcm)
        dist = hdr.distance_outside_mm(p)
        if dist > 1.0:
            skipped.add(f"study {study} {level}: canal point lies {dist:.1f} mm outside the series volume")
            continue
        centre = geometry.estimate_disc_center(p, "ccs_moderate", ref, level, offset_mm=disc_offset_mm)
        rows.append(Row(study_id=f"rsna-{study}", image_path=str(out_path.resolve()), level=level,
                        disc_center_lps=centre, condition=cond, landmark_lps=p, spacing=hdr.spacing,
                        split="", source="rsna", canal_lps=p))
    return rows


__all__ = ["import_rsna", "series_to_image", "pixel_to_lps", "SEVERITY", "LEVEL_KEYS"]
