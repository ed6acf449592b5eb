"""Reader-study engine (plain Python, no slicer): study files, creation, reader sessions.

Study directory layout
----------------------
::

    STUDY_DIR/
      study.json            public part: questions + anonymous cases (format "spine-ldm-reader-study", version 1)
      volumes/<id>.nrrd     anonymized volumes (float32, geometry only, landmark at 0,0,0 mm LPS; with the
                            default fov every case on one canonical grid, see blind.py)
      answers.sqlite        answer store (see store.py); reader tokens are stored hashed
      organizer/truth.json  hidden key: truth, method, source path, provenance (never served; move it away
                            before handing the folder to a reader who uses the Slicer panel)

``study.json`` may also be written as YAML (``study.yaml``); both load the same way. Folders are created
700 and files 600 (owner only).

Truth categories: ``inpainted`` (with ``method`` in weighted / masked / repaint), ``real_pathological``,
``real_healthy``. Every case carries the ``condition`` that the reader is asked about: for inpainted cases
the inpainted condition, for real pathological cases their own condition, and for real healthy controls a
condition drawn (seeded) from the conditions asked about elsewhere in the study.
"""
from __future__ import annotations

import csv
import datetime as _dt
import glob as _glob
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import SimpleITK as sitk

from ..conditions import CONDITION_LABELS, LEVELS, parse_condition, parse_level
from ..errors import InputError
from .blind import (PAPER_FSU_SHAPE, PAPER_FSU_SIZE_MM, anonymize_image, crop_fov, new_case_id, public_case,
                    view_origin, write_anonymous)
from .store import AnswerStore, Reader, private_dir, write_private_text

STUDY_FORMAT = "spine-ldm-reader-study"
TRUTH_FORMAT = "spine-ldm-reader-study-truth"
STUDY_VERSION = 1
METHODS = ("weighted", "masked", "repaint")
TRUTHS = ("inpainted", "real_pathological", "real_healthy")
STUDY_FILES = ("study.json", "study.yaml", "study.yml")

#: Default questions. ``keys`` are the keyboard shortcuts used by the browser app and the Slicer panel.
DEFAULT_QUESTIONS: list[dict] = [
    {"id": "realistic", "text": "Realistic?", "type": "yesno", "required": True, "keys": {"yes": "Y", "no": "N"}},
    {"id": "pathology_present", "text": "{condition} present?", "type": "yesno", "required": True,
     "keys": {"yes": "P", "no": "A"}},
    {"id": "confidence", "text": "Confidence (1 = guess, 5 = certain)", "type": "scale", "min": 1, "max": 5,
     "required": False, "keys": {"value": "1-5"}},
    {"id": "comment", "text": "Comment", "type": "text", "required": False, "max_length": 2000},
]
#: Navigation shortcuts shared by the browser app and the Slicer panel (documented in the UI help).
NAV_KEYS = {"save_next": "Enter", "previous": "ArrowLeft / B", "next": "ArrowRight", "slice": "ArrowUp / ArrowDown, wheel",
            "zoom": "+ / -", "reset_view": "0", "landmark": "L"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def condition_label(condition: str) -> str:
    return {"none": "Pathology", "dh_small": "Small disc herniation", "dh_moderate_large": "Moderate/large disc herniation",
            "ccs_moderate": "Moderate central canal stenosis", "ccs_severe": "Severe central canal stenosis"}.get(
        condition, CONDITION_LABELS.get(condition, condition))


def parse_point(value: Any, what: str = "point") -> tuple[float, float, float]:
    """(x, y, z) from a list, JSON text '[1, 2, 3]', or '1 2 3' / '1,2,3' / '(1, 2, 3)'."""
    if isinstance(value, str):
        s = value.strip()
        try:
            value = json.loads(s)
        except (ValueError, TypeError):
            value = [v for v in re.split(r"[\s,;()\[\]]+", s) if v]
    try:
        p = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be 3 numbers (LPS mm), got {value!r}") from None
    if len(p) != 3 or not all(np.isfinite(p)):
        raise InputError(f"{what} must be 3 finite numbers (LPS mm), got {value!r}")
    return p


# ----------------------------------------------------------------------------- questions / answers
def validate_questions(questions: list[dict]) -> list[dict]:
    ids = set()
    for q in questions:
        if not isinstance(q, dict) or "id" not in q or "type" not in q:
            raise InputError(f"each question needs 'id' and 'type', got {q!r}")
        if q["type"] not in ("yesno", "scale", "text"):
            raise InputError(f"question {q['id']!r}: type must be yesno/scale/text, got {q['type']!r}")
        if q["id"] in ids:
            raise InputError(f"duplicate question id {q['id']!r}")
        ids.add(q["id"])
    return questions


def normalize_values(questions: list[dict], values: dict) -> tuple[dict, bool]:
    """Validate reader answers against the questions; returns (clean values, complete)."""
    if not isinstance(values, dict):
        raise InputError(f"answer values must be an object, got {type(values).__name__}")
    qmap = {q["id"]: q for q in questions}
    unknown = sorted(set(values) - set(qmap))
    if unknown:
        raise InputError(f"unknown question id(s) {unknown}; expected some of {sorted(qmap)}")
    clean: dict[str, Any] = {}
    for qid, v in values.items():
        q = qmap[qid]
        if v is None or v == "":
            continue
        if q["type"] == "yesno":
            if isinstance(v, bool):
                v = "yes" if v else "no"
            v = str(v).strip().lower()
            v = {"y": "yes", "n": "no", "true": "yes", "false": "no", "1": "yes", "0": "no"}.get(v, v)
            if v not in ("yes", "no"):
                raise InputError(f"question {qid!r} takes yes/no, got {values[qid]!r}")
        elif q["type"] == "scale":
            lo, hi = int(q.get("min", 1)), int(q.get("max", 5))
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise InputError(f"question {qid!r} takes an integer {lo}-{hi}, got {v!r}") from None
            if iv != v and str(iv) != str(v).strip() or not lo <= iv <= hi:
                raise InputError(f"question {qid!r} takes an integer {lo}-{hi}, got {v!r}")
            v = iv
        else:
            v = str(v)
            n = int(q.get("max_length", 2000))
            if len(v) > n:
                raise InputError(f"question {qid!r}: text is {len(v)} characters, limit {n}")
        clean[qid] = v
    complete = all(q["id"] in clean for q in questions if q.get("required"))
    return clean, complete


def reader_order(case_ids: Iterable[str], seed: int) -> list[str]:
    """The reader's case order: a seeded shuffle of the sorted case ids (reproducible per reader seed)."""
    order = sorted(case_ids)
    random.Random(int(seed)).shuffle(order)
    return order


# ----------------------------------------------------------------------------- study
@dataclass
class Study:
    root: Path
    data: dict

    @classmethod
    def load(cls, study_dir: str | Path) -> "Study":
        root = Path(study_dir)
        for name in STUDY_FILES:
            p = root / name
            if p.is_file():
                break
        else:
            raise InputError(f"{root} is not a reader study (no {' / '.join(STUDY_FILES)})")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict) or data.get("format") != STUDY_FORMAT:
            raise InputError(f"{p} is not a {STUDY_FORMAT} file (format={data.get('format') if isinstance(data, dict) else None!r})")
        if int(data.get("version", 0)) > STUDY_VERSION:
            raise InputError(f"{p} has study format version {data.get('version')}; this spine_ldm reads up to {STUDY_VERSION}")
        validate_questions(data.get("questions", []))
        ids = [c["case_id"] for c in data.get("cases", [])]
        if len(ids) != len(set(ids)):
            raise InputError(f"{p} has duplicate case ids")
        return cls(root, data)

    # public properties
    @property
    def name(self) -> str:
        return str(self.data.get("name", self.root.name))

    @property
    def questions(self) -> list[dict]:
        return self.data["questions"]

    @property
    def cases(self) -> list[dict]:
        return self.data["cases"]

    @property
    def case_ids(self) -> list[str]:
        return [c["case_id"] for c in self.cases]

    def case(self, case_id: str) -> dict:
        for c in self.cases:
            if c["case_id"] == case_id:
                return c
        raise InputError(f"no case {case_id!r} in study {self.name!r}")

    def volume_path(self, case_id: str) -> Path:
        return self.root / self.case(case_id)["volume"]

    @property
    def store(self) -> AnswerStore:
        st = getattr(self, "_store", None)
        if st is None:
            st = AnswerStore(self.root / "answers.sqlite")
            self._store = st
        return st

    def truth_path(self) -> Path:
        return self.root / "organizer" / "truth.json"

    def load_truth(self, path: str | Path | None = None) -> dict[str, dict]:
        p = Path(path) if path else self.truth_path()
        if not p.is_file():
            raise InputError(f"truth key {p} not found; pass --truth PATH if the organizer moved it")
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("format") != TRUTH_FORMAT:
            raise InputError(f"{p} is not a {TRUTH_FORMAT} file")
        return data["cases"]

    def session(self, token: str) -> "ReaderSession":
        reader = self.store.authenticate(token)
        if reader is None:
            raise InputError("unknown reader token")
        return ReaderSession(self, reader)

    def add_reader(self, name: str, seed: int | None = None) -> tuple[Reader, str]:
        return self.store.add_reader(name, seed)


class ReaderSession:
    """Everything one reader can do. Every store call is scoped to this reader's id."""

    def __init__(self, study: Study, reader: Reader):
        self.study = study
        self.reader = reader
        self.order = reader_order(study.case_ids, reader.seed)

    @property
    def total(self) -> int:
        return len(self.order)

    def answers(self) -> dict:
        return self.study.store.latest_answers(self.reader.reader_id)

    def answered(self) -> int:
        return sum(1 for a in self.answers().values() if a.complete)

    def resume_index(self) -> int:
        """Index of the first case (in this reader's order) without a complete answer; ``total`` when done."""
        done = {cid for cid, a in self.answers().items() if a.complete}
        for i, cid in enumerate(self.order):
            if cid not in done:
                return i
        return self.total

    def progress(self) -> dict:
        return {"answered": self.answered(), "total": self.total, "resume_index": self.resume_index()}

    def _index(self, index: int) -> int:
        i = int(index)
        if not 0 <= i < self.total:
            raise InputError(f"case index {i} out of range 0..{self.total - 1}")
        return i

    def case(self, index: int, record_view: bool = False) -> dict:
        """Public description of the case at ``index`` in this reader's order (plus the reader's own answer)."""
        cid = self.order[self._index(index)]
        c = public_case(self.study.case(cid))
        c["condition_label"] = condition_label(c["condition"])
        c["index"] = int(index)
        c["total"] = self.total
        a = self.answers().get(cid)
        c["answer"] = a.values if a else {}
        c["complete"] = bool(a and a.complete)
        if record_view:
            self.study.store.record_view(self.reader.reader_id, cid)
        return c

    def questions(self, condition: str | None = None) -> list[dict]:
        out = []
        for q in self.study.questions:
            q = dict(q)
            if condition is not None:
                q["text"] = q["text"].replace("{condition}", condition_label(condition))
            out.append(q)
        return out

    def answer(self, case_id: str, values: dict, seconds: float | None = None, client: str = "") -> dict:
        if case_id not in self.order:
            raise InputError(f"no case {case_id!r} in this study")
        clean, complete = normalize_values(self.study.questions, values)
        if seconds is None:
            opened = self.study.store.last_view(self.reader.reader_id, case_id)
            if opened:
                t0 = _dt.datetime.fromisoformat(opened)
                seconds = max(0.0, (_dt.datetime.now(_dt.timezone.utc) - t0).total_seconds())
        self.study.store.submit(self.reader.reader_id, case_id, clean, complete, seconds, client)
        return {"case_id": case_id, "complete": complete, **self.progress()}


# ----------------------------------------------------------------------------- creation
def _read_header(path: Path) -> dict[str, str]:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return {k: r.GetMetaData(k) for k in r.GetMetaDataKeys()}


def inpainted_sources(spec: str | Iterable[str]) -> list[dict]:
    """Inpainting outputs (NRRD/NIfTI/MHA) from a directory, a glob or a list; provenance from spine_ldm_* keys."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.name.endswith((".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")))
        else:
            hits = sorted(Path(h) for h in _glob.glob(str(s)))
            if not hits:
                raise InputError(f"no inpainted volumes match {s!r}")
            files += hits
    out = []
    for f in files:
        h = _read_header(f)
        prov = {k[len("spine_ldm_"):]: v for k, v in h.items() if k.startswith("spine_ldm_")}
        missing = [k for k in ("method", "level", "condition", "landmark_lps") if k not in prov]
        if missing:
            raise InputError(f"{f.name} lacks provenance header key(s) {', '.join('spine_ldm_' + m for m in missing)}; "
                             "is it a spine-ldm inpainting output?")
        method = prov["method"].strip().lower()
        if method not in METHODS:
            raise InputError(f"{f.name}: spine_ldm_method {method!r} is not one of {', '.join(METHODS)}")
        dc = prov.get("disc_center_lps", "").strip()
        out.append({"path": str(f.resolve()), "truth": "inpainted", "method": method,
                    "level": parse_level(prov["level"]), "condition": parse_condition(prov["condition"]),
                    "landmark_lps": parse_point(prov["landmark_lps"], f"{f.name} spine_ldm_landmark_lps"),
                    "disc_center_lps": parse_point(dc, f"{f.name} spine_ldm_disc_center_lps")
                    if dc and dc.lower() not in ("none", "null") else None,
                    "provenance": prov})
    return out


def _row_point(row: dict, key: str, required: bool, where: str):
    if row.get(key) not in (None, ""):
        return parse_point(row[key], f"{where} {key}")
    xs = [row.get(f"{key}_{a}") for a in "xyz"]
    if all(x not in (None, "") for x in xs):
        return parse_point(xs, f"{where} {key}")
    if required:
        raise InputError(f"{where}: missing {key} (give '{key}' as 'x y z' or {key}_x/_y/_z columns)")
    return None


def real_sources(manifest: str | Path) -> list[dict]:
    """Real cases from a CSV manifest or a JSON list.

    Columns / keys: ``path`` (relative to the manifest), ``level``, ``condition`` (the case's true condition;
    ``none`` = healthy), ``landmark_lps`` ("x y z" or landmark_lps_x/_y/_z), optional ``disc_center_lps`` (kept in
    the truth key; the served view depends on the landmark only),
    optional ``ask_condition`` (what a healthy control is asked about).
    """
    m = Path(manifest)
    if not m.is_file():
        raise InputError(f"real-case manifest {m} not found")
    if m.suffix.lower() == ".json":
        rows = json.loads(m.read_text(encoding="utf-8"))
        if isinstance(rows, dict):
            rows = rows.get("cases", [])
    else:
        with m.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{m.name} row {n}"
        if not row.get("path"):
            raise InputError(f"{where}: missing 'path'")
        p = Path(row["path"])
        if not p.is_absolute():
            p = (m.parent / p)
        if not p.is_file():
            raise InputError(f"{where}: volume {p} not found")
        cond = parse_condition(row.get("condition") or "none")
        ask = row.get("ask_condition") or None
        out.append({"path": str(p.resolve()), "truth": "real_healthy" if cond == "none" else "real_pathological",
                    "method": None, "level": parse_level(row.get("level", "")), "condition": cond,
                    "ask_condition": parse_condition(ask) if ask else None,
                    "landmark_lps": _row_point(row, "landmark_lps", True, where),
                    "disc_center_lps": _row_point(row, "disc_center_lps", False, where), "provenance": {}})
    return out


def parse_mix(mix: str | dict | None) -> dict[str, int | None]:
    """'inpainted=40,real_pathological=5,real_healthy=5' (or weighted=/masked=/repaint=; 'all' = every one)."""
    if mix is None or mix == "":
        return {}
    if isinstance(mix, dict):
        items = mix.items()
    else:
        items = []
        for part in str(mix).split(","):
            if not part.strip():
                continue
            if "=" not in part and ":" not in part:
                raise InputError(f"--mix entry {part!r} must look like KEY=COUNT")
            k, v = re.split(r"[=:]", part, maxsplit=1)
            items.append((k.strip(), v.strip()))
    out: dict[str, int | None] = {}
    for k, v in items:
        if k not in ("inpainted", "real_pathological", "real_healthy") + METHODS:
            raise InputError(f"--mix key {k!r} unknown; use inpainted, {', '.join(METHODS)}, real_pathological, real_healthy")
        if str(v).lower() == "all":
            out[k] = None
        else:
            try:
                out[k] = int(v)
            except ValueError:
                raise InputError(f"--mix {k}={v!r}: count must be an integer or 'all'") from None
            if out[k] < 0:
                raise InputError(f"--mix {k}={v}: count must be >= 0")
    return out


def _select(pool: list[dict], key: str, n: int | None, rng: random.Random) -> list[dict]:
    if n is None:
        return list(pool)
    if n > len(pool):
        raise InputError(f"--mix asks for {n} {key} cases but only {len(pool)} are available")
    return rng.sample(pool, n)


def create_study(out_dir: str | Path, inpainted: list[dict], real: list[dict], *, mix=None, seed: int = 0,
                 fov: str = "fsu", name: str | None = None, questions: list[dict] | None = None,
                 fsu_shape=PAPER_FSU_SHAPE, fsu_size_mm=PAPER_FSU_SIZE_MM, truth_out: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Study:
    """Build a blinded study directory from source case dicts (see :func:`inpainted_sources`, :func:`real_sources`)."""
    out = Path(out_dir)
    if (out / "study.json").exists():
        raise InputError(f"{out} already holds a study; choose a new --out directory")
    if fov not in ("fsu", "whole"):
        raise InputError(f"--fov must be 'fsu' or 'whole', got {fov!r}")
    rng = random.Random(int(seed))
    mixd = parse_mix(mix)
    chosen: list[dict] = []
    default = 0 if mixd else None  # with --mix, unlisted kinds are left out; without, every case is used
    if any(m in mixd for m in METHODS):
        for m in METHODS:
            chosen += _select([c for c in inpainted if c["method"] == m], m, mixd.get(m, 0), rng)
    else:
        chosen += _select(inpainted, "inpainted", mixd.get("inpainted", default), rng)
    for t in ("real_pathological", "real_healthy"):
        chosen += _select([c for c in real if c["truth"] == t], t, mixd.get(t, default), rng)
    if not chosen:
        raise InputError("the study would have no cases (check --inpainted / --real-manifest / --mix)")
    asked = sorted({c["condition"] for c in chosen if c["condition"] != "none"}) or ["dh_moderate_large"]
    warnings = same_scan_warnings(chosen)
    private_dir(out)
    vol_dir = private_dir(out / "volumes")
    taken: set[str] = set()
    cases, truth = [], {}
    rng.shuffle(chosen)  # file-creation order must not follow the source order either
    for n, src in enumerate(chosen):
        cid = new_case_id(taken)
        taken.add(cid)
        ask = src["condition"]
        if src["truth"] == "real_healthy":
            ask = src.get("ask_condition") or rng.choice(asked)
        img = sitk.ReadImage(src["path"])
        # one rule for every case, real or inpainted, with or without a disc centre: the view is centred on the
        # landmark on the canonical grid, so no header field and no landmark position tells them apart
        centre = src["landmark_lps"]
        shown = crop_fov(img, centre, fov, fsu_shape, fsu_size_mm)
        origin = view_origin(fsu_shape, fsu_size_mm) if fov == "fsu" else None
        write_anonymous(anonymize_image(shown, src["landmark_lps"], origin=origin), vol_dir, cid)
        cases.append({"case_id": cid, "level": src["level"], "condition": ask, "landmark_lps": [0.0, 0.0, 0.0],
                      "volume": f"volumes/{cid}.nrrd"})
        truth[cid] = {"truth": src["truth"], "method": src.get("method"), "true_condition": src["condition"],
                      "asked_condition": ask, "level": src["level"], "source": src["path"],
                      "landmark_lps": list(src["landmark_lps"]),
                      "center_lps": list(centre), "disc_center_lps": list(src["disc_center_lps"])
                      if src.get("disc_center_lps") else None, "provenance": src.get("provenance", {})}
        if progress:
            progress(n + 1, len(chosen))
    cases.sort(key=lambda c: c["case_id"])
    data = {"format": STUDY_FORMAT, "version": STUDY_VERSION, "name": name or out.name, "created": _now(),
            "fov": fov, "fsu": {"shape": list(fsu_shape), "size_mm": list(fsu_size_mm)} if fov == "fsu" else None,
            "questions": validate_questions(questions or [dict(q) for q in DEFAULT_QUESTIONS]),
            "nav_keys": NAV_KEYS, "cases": cases}
    tp = Path(truth_out) if truth_out else out / "organizer" / "truth.json"
    private_dir(tp.parent)
    write_private_text(tp, json.dumps({"format": TRUTH_FORMAT, "version": STUDY_VERSION, "seed": int(seed),
                                       "mix": mixd, "warnings": warnings, "cases": truth}, indent=1))
    write_private_text(out / "study.json", json.dumps(data, indent=1))
    study = Study.load(out)
    study.store  # create answers.sqlite now
    study.warnings = warnings
    return study


def _grid_key(path: str) -> tuple:
    """Size, spacing, origin, direction and pixel type from the header (an inpainting output keeps its input's)."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return (r.GetSize(), tuple(round(v, 6) for v in r.GetSpacing()), tuple(round(v, 4) for v in r.GetOrigin()),
            tuple(round(v, 6) for v in r.GetDirection()), r.GetPixelID(), r.GetNumberOfComponents())


def _sigma(case: dict) -> float:
    try:
        return float(json.loads(str((case.get("provenance") or {}).get("sigma_mm", 16.0))))
    except (TypeError, ValueError):
        return 16.0


#: paste-back leaves every voxel whose Gaussian weight is below this bit-identical (pipeline.PASTE_THRESHOLD)
_UNTOUCHED_W = 1e-3


def same_scan_warnings(cases: list[dict]) -> list[str]:
    """Warnings for scans a reader would see twice, found by content (file names prove nothing: different scans
    share names like ``t2.nrrd``, and a renamed copy is the same scan):

    - an inpainted case made from a scan that is also a real case: the same grid (size, spacing, origin,
      direction, pixel type) and bit-identical voxels wherever the inpainting weight is below 1e-3 (the pipeline
      guarantees those are untouched), compared on the voxels themselves, ignoring voxels that are 0 in both
      (background). When less than 1000 such voxels exist (a volume hardly larger than the inpainted region),
      at least half of all non-background voxels must be identical;
    - two real cases with identical voxels and grid (sha256 of both).
    """
    from ..weighting import gaussian_weight

    real = [c for c in cases if c["truth"] != "inpainted"]
    inpainted = [c for c in cases if c["truth"] == "inpainted"]
    grid = {c["path"]: _grid_key(c["path"]) for c in cases}
    arrays: dict[str, np.ndarray] = {}

    def voxels(path: str) -> np.ndarray:
        if path not in arrays:
            arrays[path] = sitk.GetArrayFromImage(sitk.ReadImage(path))
        return arrays[path]

    out = []
    seen: dict[str, str] = {}
    for c in real:
        h = hashlib.sha256(repr(grid[c["path"]]).encode() + np.ascontiguousarray(voxels(c["path"])).tobytes())
        digest = h.hexdigest()
        if digest in seen and seen[digest] != c["path"]:
            out.append(f"real cases {Path(seen[digest]).name} and {Path(c['path']).name} are the same scan (identical "
                       "voxels): readers see it twice")
        seen.setdefault(digest, c["path"])
    for c in inpainted:
        same_grid = [r for r in real if grid[r["path"]] == grid[c["path"]]]
        if not same_grid:
            continue
        img = sitk.ReadImage(c["path"])
        a = sitk.GetArrayViewFromImage(img)
        far = gaussian_weight(img, c["landmark_lps"], _sigma(c)) < _UNTOUCHED_W
        for r in same_grid:
            b = voxels(r["path"])
            scan = (a != 0) | (b != 0)
            untouched = far & scan
            if untouched.sum() >= 1000:
                same = bool(np.array_equal(a[untouched], b[untouched]))
            else:
                same = scan.any() and np.count_nonzero(a[scan] == b[scan]) >= 0.5 * np.count_nonzero(scan)
            if same:
                out.append(f"inpainted {Path(c['path']).name} was made from the scan {Path(r['path']).name}, which is "
                           "also in the study as a real case (identical voxels away from the landmark): readers may "
                           "recognise the scan")
    return out


# ----------------------------------------------------------------------------- demo study
def _synthetic_volume(rng: np.random.Generator, lesion: bool, shape=(96, 96, 24), spacing=(1.0, 1.0, 3.0)):
    """Tiny synthetic sagittal 'spine' (numpy shape (SI, AP, LR), spacing mm in the same order):
    discs along SI, a bright canal; ``lesion`` adds a bright posterior bulge at the centre disc."""
    nk, nj, ni = shape
    k, j, i = np.mgrid[0:nk, 0:nj, 0:ni].astype(np.float32)
    arr = 200 + 20 * rng.standard_normal(shape).astype(np.float32)
    for c in range(12, nk, 18):
        arr += 500 * np.exp(-((k - c) ** 2 / 8 + (j - nj * 0.45) ** 2 / 200 + (i - ni / 2) ** 2 / 20))
    arr += 700 * np.exp(-((j - nj * 0.7) ** 2 / 10 + (i - ni / 2) ** 2 / 8))
    if lesion:
        arr += 600 * np.exp(-((k - 48) ** 2 / 10 + (j - nj * 0.62) ** 2 / 12 + (i - ni / 2) ** 2 / 6))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))  # ITK order (LR, AP, SI)
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # i: L->R, j: A->P, k: S->I
    img.SetOrigin((30.0, -50.0, 40.0))
    return img


def _demo_volume(seed: int, lesion: bool, condition: str, level: str, spacing=(1.0, 1.0, 4.3)):
    """(image, landmark_lps, disc_centre_lps) for a demo case: the project's phantom when available
    (pathology drawn at ``level``; healthy cases get the posterior disc margin as landmark), else a tiny
    synthetic volume."""
    try:
        from ..phantom import generate
    except ImportError:
        generate = None
    if generate is not None:
        case = generate(seed=int(seed), spacing=spacing, pathologies={level: condition} if lesion else None)
        disc = case.landmarks["discs"][level]
        if lesion:
            lm = case.landmarks["pathologies"][0]["landmark_LPS_mm"]
        else:
            lm = disc["posterior_margin_LPS_mm"]
        return case.image, tuple(lm), tuple(disc["center_LPS_mm"])
    img = _synthetic_volume(np.random.default_rng(seed), lesion)
    lm = img.TransformContinuousIndexToPhysicalPoint([(sz - 1) / 2 for sz in img.GetSize()])
    return img, tuple(lm), None


def make_demo_study(out_dir: str | Path, n_inpainted_per_method: int = 2, n_real_pathological: int = 2,
                    n_real_healthy: int = 2, seed: int = 0, fov: str = "fsu", condition: str = "dh_moderate_large",
                    fsu_shape=(64, 32, 16), fsu_size_mm=PAPER_FSU_SIZE_MM, phantom_spacing=(1.0, 1.0, 4.3)) -> Study:
    """A small blinded study from synthetic volumes (tests, demos).

    Volumes come from the project's phantom (``spine_ldm.phantom``; a tiny synthetic volume without it). The
    "inpainted" cases are phantoms WITH the pathology written with spine_ldm_* provenance headers, i.e. stand-ins
    for inpainting outputs (not model outputs); "real" pathological / healthy controls are phantoms too. Sources
    are written next to the study (``<out>_sources/``, with ``real.csv``).
    """
    out = Path(out_dir)
    src_dir = out.parent / (out.name + "_sources")
    src_dir.mkdir(parents=True, exist_ok=True)
    condition = parse_condition(condition)
    rng = random.Random(seed)
    n = 0
    for m in METHODS:
        for s in range(n_inpainted_per_method):
            n += 1
            lvl = rng.choice(LEVELS)
            img, lm, dc = _demo_volume(seed * 1000 + n, True, condition, lvl, phantom_spacing)
            for k, v in {"method": m, "level": lvl, "condition": condition, "seed": str(s),
                         "landmark_lps": json.dumps(list(lm)), "disc_center_lps": json.dumps(list(dc) if dc else None),
                         "model_id": f"demo-small-{m}"}.items():
                img.SetMetaData(f"spine_ldm_{k}", v)
            sitk.WriteImage(img, str(src_dir / f"inpainted_{m}_{s}.nrrd"), True)
    real_rows = []
    for t, cnt in (("real_pathological", n_real_pathological), ("real_healthy", n_real_healthy)):
        for s in range(cnt):
            n += 1
            lvl = rng.choice(LEVELS)
            img, lm, dc = _demo_volume(seed * 1000 + n, t == "real_pathological", condition, lvl, phantom_spacing)
            fn = f"{t}_{s}.nrrd"
            sitk.WriteImage(img, str(src_dir / fn), True)
            real_rows.append({"path": fn, "level": lvl, "condition": condition if t == "real_pathological" else "none",
                              "landmark_lps": " ".join(f"{v:.3f}" for v in lm),
                              "disc_center_lps": " ".join(f"{v:.3f}" for v in dc) if dc else ""})
    with (src_dir / "real.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "level", "condition", "landmark_lps", "disc_center_lps"])
        w.writeheader()
        w.writerows(real_rows)
    return create_study(out, inpainted_sources(src_dir / "inpainted_*.nrrd"), real_sources(src_dir / "real.csv"),
                        seed=seed, fov=fov, name="demo study", fsu_shape=fsu_shape, fsu_size_mm=fsu_size_mm)
