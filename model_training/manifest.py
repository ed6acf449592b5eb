"""The training manifest: one CSV row per (study x level) FSU, shared by every importer and the dataset.

Columns (in this order; a header line is required, extra columns are rejected so typos surface):

=================  ==========================================================================================
column             meaning
=================  ==========================================================================================
study_id           patient/study identifier. The split unit: all rows of a study share one split.
image_path         3-D sagittal T2 volume readable by SimpleITK (.nrrd, .nii.gz, .mha, ...). Relative paths
                   are resolved against the manifest file's folder.
spacing            voxel spacing in ITK order (i, j, k) mm, ``"0.6x0.6x4.3"``; informational (support tables,
                   filtering), filled from the image header by the importers. May be empty in hand-written
                   manifests (:func:`model_training.importers.generic.import_manifest` fills it).
level              FSU level, one of ``spine_ldm.conditions.LEVELS`` (``L1-L2`` .. ``L5-S1``); aliases such as
                   ``L4/L5`` are accepted and written back canonical.
disc_center_lps    disc centre ``"x,y,z"`` in LPS mm (ITK physical space of ``image_path``): the FSU centre.
condition          one of ``spine_ldm.conditions.CONDITIONS``: none | dh_small | dh_moderate_large |
                   ccs_moderate | ccs_severe.
landmark_lps       pathology landmark ``"x,y,z"`` LPS mm, or empty. For healthy FSUs it may still hold the
                   point where a pathology *could* be inpainted (e.g. the RSNA canal point).
split              train | val | test, or empty (= not assigned yet; see :func:`assign_splits`).
source             spider | rsna | manual | phantom.
canal_lps          optional: centre of the central canal (thecal sac) at the level of the disc, ``"x,y,z"``
                   LPS mm, or empty. This is where a central canal stenosis (CCS) landmark goes: evaluation
                   inpaints ccs_* conditions into healthy FSUs here (``landmark_lps`` of a healthy row is the
                   herniation-style point on the posterior disc margin). The column itself may be absent
                   (older / hand-written manifests still read).
=================  ==========================================================================================

All coordinates are LPS mm (DEVELOPERS.md). ``read_manifest`` validates every row and raises
``spine_ldm.errors.InputError`` whose one-line message names the file, line, study and column, e.g.
``manifest.csv line 7 (study 'p12'), column 'level': unknown level 'L6-L7'; expected one of L1-L2, ...``.

Functions: :func:`read_manifest`, :func:`write_manifest`, :func:`assign_splits`, :func:`support_table`,
:func:`format_support_table`.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spine_ldm.conditions import (CONDITIONS, LEVELS, condition_index, level_index, parse_condition, parse_level,
                                  pathology_family)
from spine_ldm.errors import InputError

COLUMNS: tuple[str, ...] = (
    "study_id", "image_path", "spacing", "level", "disc_center_lps", "condition", "landmark_lps", "split", "source",
    "canal_lps",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("study_id", "image_path", "level", "disc_center_lps", "condition")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCES: tuple[str, ...] = ("spider", "rsna", "manual", "phantom")

Point = tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class Row:
    """One FSU: a (study, image, level) with its condition and optional landmark. Immutable."""

    study_id: str
    image_path: str
    level: str
    disc_center_lps: Point
    condition: str = "none"
    landmark_lps: Point | None = None
    spacing: Point | None = None
    split: str = ""
    source: str = "manual"
    #: centre of the central canal at the disc level (where a CCS landmark goes), or None
    canal_lps: Point | None = None
    #: line in the manifest file this row was read from (0 = not from a file); not part of equality
    line: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        # canonicalise (raises InputError with the bad value)
        object.__setattr__(self, "study_id", str(self.study_id).strip())
        if not self.study_id:
            raise InputError("study_id is empty")
        object.__setattr__(self, "image_path", str(self.image_path))
        object.__setattr__(self, "level", parse_level(self.level))
        object.__setattr__(self, "condition", parse_condition(self.condition))
        object.__setattr__(self, "disc_center_lps", _as_point(self.disc_center_lps, "disc_center_lps"))
        if self.landmark_lps is not None:
            object.__setattr__(self, "landmark_lps", _as_point(self.landmark_lps, "landmark_lps"))
        if self.canal_lps is not None:
            object.__setattr__(self, "canal_lps", _as_point(self.canal_lps, "canal_lps"))
        if self.spacing is not None:
            sp = _as_point(self.spacing, "spacing")
            if min(sp) <= 0:
                raise InputError(f"spacing {sp} must be positive")
            object.__setattr__(self, "spacing", sp)
        if self.split not in ("",) + SPLITS:
            raise InputError(f"unknown split {self.split!r}; expected one of {', '.join(SPLITS)} or empty")
        if self.source not in SOURCES:
            raise InputError(f"unknown source {self.source!r}; expected one of {', '.join(SOURCES)}")

    # convenience -------------------------------------------------------------------------------------------
    @property
    def level_index(self) -> int:
        return level_index(self.level)

    @property
    def condition_index(self) -> int:
        return condition_index(self.condition)

    @property
    def has_landmark(self) -> bool:
        return self.landmark_lps is not None

    @property
    def is_pathological(self) -> bool:
        return self.condition != "none"

    def where(self) -> str:
        """'line 7 (study 'p12')' or 'study 'p12' L4-L5' for error messages."""
        return f"line {self.line} (study {self.study_id!r})" if self.line else f"study {self.study_id!r} {self.level}"

    def replace(self, **changes) -> "Row":
        return dataclasses.replace(self, **changes)

    def to_csv_dict(self, relative_to: str | os.PathLike | None = None) -> dict[str, str]:
        path = self.image_path
        if relative_to is not None:
            try:
                path = os.path.relpath(os.path.abspath(path), os.path.abspath(relative_to))
            except ValueError:  # different drive on Windows
                pass
        return {
            "study_id": self.study_id,
            "image_path": path,
            "spacing": format_spacing(self.spacing) if self.spacing is not None else "",
            "level": self.level,
            "disc_center_lps": format_point(self.disc_center_lps),
            "condition": self.condition,
            "landmark_lps": format_point(self.landmark_lps) if self.landmark_lps is not None else "",
            "split": self.split,
            "source": self.source,
            "canal_lps": format_point(self.canal_lps) if self.canal_lps is not None else "",
        }


# ---------------------------------------------------------------------------------------------------------
# value formatting / parsing

def _as_point(value, name: str) -> Point:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 numbers, got {value!r}") from None
    if len(vals) != 3:
        raise InputError(f"{name} must be 3 numbers, got {len(vals)}: {value!r}")
    if not all(math.isfinite(v) for v in vals):
        raise InputError(f"{name} must be finite, got {vals}")
    return vals  # type: ignore[return-value]


def _fmt_num(v: float) -> str:
    s = f"{float(v):.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def format_point(p: Sequence[float]) -> str:
    """(x, y, z) -> 'x,y,z' with 4 decimals (0.1 um: lossless for mm-scale annotations), trailing zeros cut."""
    return ",".join(_fmt_num(v) for v in p)


def format_spacing(sp: Sequence[float]) -> str:
    return "x".join(f"{float(v):.6g}" for v in sp)


def parse_point(text: str) -> Point:
    """'x,y,z' (also accepts spaces or ';' as separators, optional brackets) -> (x, y, z)."""
    s = str(text).strip().strip("[]()")
    parts = [p for p in s.replace(";", ",").replace(" ", ",").split(",") if p != ""]
    if len(parts) != 3:
        raise InputError(f"expected 'x,y,z' (3 numbers), got {text!r}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"expected 'x,y,z' (3 numbers), got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise InputError(f"expected finite numbers, got {text!r}")
    return vals  # type: ignore[return-value]


def parse_spacing(text: str) -> Point:
    """'0.6x0.6x4.3' -> (0.6, 0.6, 4.3)."""
    parts = str(text).strip().lower().split("x")
    if len(parts) != 3:
        raise InputError(f"expected spacing like '0.6x0.6x4.3', got {text!r}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"expected spacing like '0.6x0.6x4.3', got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise InputError(f"spacing must be positive, got {text!r}")
    return vals  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# read / write

def _parse_row(rec: dict[str, str], where: str, base_dir: Path, default_source: str | None) -> Row:
    study = (rec.get("study_id") or "").strip()
    loc = f"{where} (study {study!r})" if study else where

    def fail(col: str, msg: str) -> InputError:
        return InputError(f"{loc}, column {col!r}: {msg}")

    for col in REQUIRED_COLUMNS:
        if not (rec.get(col) or "").strip():
            raise fail(col, "empty (required)")
    vals: dict = {"study_id": study}
    img = rec["image_path"].strip()
    if not os.path.isabs(img) and "://" not in img:
        img = str((base_dir / img).resolve())
    vals["image_path"] = img
    parsers = {
        "level": parse_level,
        "condition": parse_condition,
        "disc_center_lps": parse_point,
    }
    for col, fn in parsers.items():
        try:
            vals[col] = fn(rec[col].strip())
        except InputError as e:
            raise fail(col, str(e)) from None
    for col in ("landmark_lps", "canal_lps"):
        lm = (rec.get(col) or "").strip()
        if lm:
            try:
                vals[col] = parse_point(lm)
            except InputError as e:
                raise fail(col, str(e)) from None
    sp = (rec.get("spacing") or "").strip()
    if sp:
        try:
            vals["spacing"] = parse_spacing(sp)
        except InputError as e:
            raise fail("spacing", str(e)) from None
    split = (rec.get("split") or "").strip().lower()
    if split not in ("",) + SPLITS:
        raise fail("split", f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or empty")
    vals["split"] = split
    src = (rec.get("source") or "").strip().lower() or (default_source or "")
    if src not in SOURCES:
        raise fail("source", f"unknown source {src!r}; expected one of {', '.join(SOURCES)}")
    vals["source"] = src
    return Row(**vals)


def read_manifest(path: str | os.PathLike, *, default_source: str | None = None,
                  check_files: bool = False) -> list[Row]:
    """Read and validate a manifest CSV.

    Every problem raises :class:`InputError` naming file, line, study and column. Also checked: no duplicate
    (study, image, level) rows, one split per study, and (``check_files=True``) that every image exists.
    Herniation and stenosis are graded independently: one level may have a ``dh_*`` row **and** a ``ccs_*`` row
    (each with its own landmark; the per-pathology models each read their own), but not two rows of the same
    pathology, nor a ``none`` row next to a pathological one.
    ``default_source`` fills an empty/missing ``source`` column (hand-written manifests: ``"manual"``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {str(path)!r} does not exist")
    name = path.name
    base_dir = path.resolve().parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise InputError(f"{name}: empty file (expected a header line with {', '.join(COLUMNS)})")
        reader.fieldnames = header
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if "source" not in header and default_source is None:
            missing.append("source")
        if missing:
            raise InputError(f"{name}: missing column(s) {', '.join(missing)}; header is {', '.join(header)}")
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise InputError(f"{name}: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}")
        rows: list[Row] = []
        seen: dict[tuple[str, str, str], int] = {}
        study_split: dict[str, tuple[str, int]] = {}
        for rec in reader:
            line = reader.line_num
            if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                continue  # blank line
            if None in rec:
                raise InputError(f"{name} line {line}: {len(header) + len(rec[None])} fields, header has {len(header)}"
                                 " (unquoted comma in a point? write points as \"x,y,z\" in quotes)")
            row = _parse_row(rec, f"{name} line {line}", base_dir, default_source).replace(line=line)
            fam = pathology_family(row.condition)
            keys = [(row.study_id, row.image_path, row.level, f) for f in (("none", "dh", "ccs") if fam == "none"
                                                                         else ("none", fam))]
            dup = next((seen[k] for k in keys if k in seen), None)
            if dup is not None:
                raise InputError(f"{name} line {line} (study {row.study_id!r}), column 'level': duplicate "
                                 f"{row.level} for image {os.path.basename(row.image_path)!r} (first at line {dup}; "
                                 f"a level takes one row, or one dh_* and one ccs_* row)")
            seen[(row.study_id, row.image_path, row.level, fam)] = line
            if row.split:
                prev = study_split.setdefault(row.study_id, (row.split, line))
                if prev[0] != row.split:
                    raise InputError(f"{name} line {line} (study {row.study_id!r}), column 'split': {row.split!r} but "
                                     f"line {prev[1]} puts this study in {prev[0]!r}; split is per study")
            if check_files and "://" not in row.image_path and not os.path.isfile(row.image_path):
                raise InputError(f"{name} line {line} (study {row.study_id!r}), column 'image_path': "
                                 f"file {row.image_path!r} does not exist")
            rows.append(row)
    # a study with some rows unassigned and others assigned is inconsistent too
    for r in rows:
        if not r.split and r.study_id in study_split:
            raise InputError(f"{name}: study {r.study_id!r} has rows with and without a split "
                             f"(e.g. line {study_split[r.study_id][1]} says {study_split[r.study_id][0]!r})")
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[Row], *, relative_paths: bool = False) -> Path:
    """Write rows as a manifest CSV (header = :data:`COLUMNS`). Atomic (temp file + rename).

    ``relative_paths=True`` stores image paths relative to the manifest's folder (portable trees).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = path.resolve().parent if relative_paths else None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv_dict(relative_to=rel))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# splits and support

def assign_splits(rows: Sequence[Row], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, *,
                  overwrite: bool = True, stratify: bool = True) -> list[Row]:
    """Assign train/val/test **per study** (never per FSU) with a fixed seed; returns new rows (same order).

    Studies are sorted by id, then shuffled with ``numpy.random.default_rng(seed)``, so the result depends only
    on the set of study ids (and their pathology flag), not on row order. With ``stratify`` the studies with at
    least one pathological FSU and the healthy-only studies are split separately, so each split gets its share
    of pathology. Counts per stratum: ``round(cumsum(fractions) * n)`` boundaries (train gets the remainder).
    ``overwrite=False`` keeps splits already present and assigns only unassigned studies.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
        raise InputError(f"fractions must be 3 non-negative numbers (train, val, test), got {tuple(fractions)}")
    total = sum(fr)
    fr = [f / total for f in fr]
    existing: dict[str, str] = {}
    if not overwrite:
        for r in rows:
            if r.split:
                existing[r.study_id] = r.split
    studies: "OrderedDict[str, bool]" = OrderedDict()
    for r in rows:
        studies[r.study_id] = studies.get(r.study_id, False) or r.is_pathological
    todo = sorted(s for s in studies if s not in existing)
    strata = ([s for s in todo if studies[s]], [s for s in todo if not studies[s]]) if stratify else (todo,)
    rng = np.random.default_rng(seed)
    assigned = dict(existing)
    for stratum in strata:
        order = list(stratum)
        rng.shuffle(order)
        n = len(order)
        b1 = int(round(fr[0] * n))
        b2 = int(round((fr[0] + fr[1]) * n))
        for i, s in enumerate(order):
            assigned[s] = "train" if i < b1 else ("val" if i < b2 else "test")
    return [r.replace(split=assigned[r.study_id]) for r in rows]


def support_table(rows: Iterable[Row], *, split: str | None = None,
                  require_landmark: bool = False) -> dict[str, dict[str, int]]:
    """FSU counts per level x condition (the paper's "support"): ``table[level][condition] -> int``.

    All levels and conditions are present (zeros included). ``split`` restricts to one split;
    ``require_landmark`` counts only FSUs with a landmark (what weighted/masked training can use).
    """
    table = {lv: {c: 0 for c in CONDITIONS} for lv in LEVELS}
    for r in rows:
        if split is not None and r.split != split:
            continue
        if require_landmark and not r.has_landmark:
            continue
        table[r.level][r.condition] += 1
    return table


def format_support_table(table: dict[str, dict[str, int]], title: str | None = None) -> str:
    """Plain-text table: rows = levels (+ total), columns = conditions (+ total)."""
    from spine_ldm.conditions import CONDITION_LABELS

    heads = ["level"] + [CONDITION_LABELS.get(c, c) for c in CONDITIONS] + ["total"]
    body = []
    col_tot = [0] * len(CONDITIONS)
    for lv in LEVELS:
        counts = [table.get(lv, {}).get(c, 0) for c in CONDITIONS]
        col_tot = [a + b for a, b in zip(col_tot, counts)]
        body.append([lv] + [str(v) for v in counts] + [str(sum(counts))])
    body.append(["total"] + [str(v) for v in col_tot] + [str(sum(col_tot))])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = ([title] if title else []) + [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


def study_ids(rows: Iterable[Row], split: str | None = None) -> list[str]:
    """Sorted unique study ids (optionally of one split)."""
    return sorted({r.study_id for r in rows if split is None or r.split == split})
