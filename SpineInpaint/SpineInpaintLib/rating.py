"""Reader-study rating panel logic (Slicer side of ``spine_ldm.study``).

The panel shows one blinded case at a time to a reader identified by their token, in the reader's own
seeded order, and records the answers in the study's answer store through ``spine_ldm.study.engine``
(the same store as the browser app). Pure MRML + engine calls, so it runs under headless ``slicer-core``;
the Qt widget (``SpineInpaintRating.py``) only forwards button clicks and shortcuts here.

Two ways to reach a study:

- a study **URL** (``http(s)://host:port`` of ``spine-ldm study serve``): the panel is a client of the same
  HTTP API as the browser app; the truth key and the answer store never leave the server (recommended for
  several readers);
- a local study **folder**: answers go straight into its ``answers.sqlite``. It must be a *reader's copy*
  (``makeReaderCopy``): without ``organizer/`` (the truth key) and with only that reader in its answer store.
  ``openStudy`` refuses the organizer's folder (truth key present) and a folder holding other readers' data.

Blinding on the Slicer side: the volume node is named with the anonymous case id, carries no attributes,
and is loaded from the anonymized NRRD through SimpleITK (geometry only, no storage node pointing elsewhere;
a downloaded volume's temporary file is deleted right after loading).

Keyboard shortcuts (same letters as the browser app): Y / N realistic yes / no, P / A pathology present /
absent, 1-5 confidence, Enter save & next, B back, L landmark on / off. They act only while the rating panel has
the keyboard focus (``SHORTCUT_CONTEXT``), so the slice views keep their own keys. Slice scrolling, zoom and
window/level are Slicer's own (arrow keys / wheel, right-drag, left-drag).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np

RATING_LAYOUT_ID = 56011
SAGITTAL_VIEW = "SpineInpaintRatingSagittal"
AXIAL_VIEW = "SpineInpaintRatingAxial"
LANDMARK_NODE_NAME = "landmark"
CLIENT = "slicer"

#: key -> (action, argument). Actions: "set" (question id, value), "save", "back", "next", "landmark".
SHORTCUTS = {
    "Y": ("set", ("realistic", "yes")), "N": ("set", ("realistic", "no")),
    "P": ("set", ("pathology_present", "yes")), "A": ("set", ("pathology_present", "no")),
    "1": ("set", ("confidence", 1)), "2": ("set", ("confidence", 2)), "3": ("set", ("confidence", 3)),
    "4": ("set", ("confidence", 4)), "5": ("set", ("confidence", 5)),
    "Return": ("save", None), "Enter": ("save", None), "B": ("back", None), "L": ("landmark", None),
}
#: Qt.ShortcutContext of the panel's shortcuts: active while the focus is in the rating widget or its children
#: (never application-wide: "1"-"5", "B", "L", ... are also keys of Slicer's slice views)
SHORTCUT_CONTEXT = "WidgetWithChildrenShortcut"


def ratingLayoutXml() -> str:
    """Sagittal (left, larger) + axial (right) views for rating."""
    def view(tag, orientation, label, color):
        return (f'   <item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
                f'<property name="orientation" action="default">{orientation}</property>'
                f'<property name="viewlabel" action="default">{label}</property>'
                f'<property name="viewcolor" action="default">{color}</property>'
                f'<property name="viewgroup" action="default">0</property></view></item>')
    return "\n".join(['<layout type="horizontal" split="true">',
                      view(SAGITTAL_VIEW, "Sagittal", "S", "#E0C040"),
                      view(AXIAL_VIEW, "Axial", "A", "#F34A33"),
                      '</layout>'])


def _ensureBackendImportable() -> None:
    """``spine_ldm`` ships next to this module (SpineInpaint/spine_ldm); make it importable in Slicer."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(here, "spine_ldm")) and here not in sys.path:
        sys.path.insert(0, here)


def checkReaderCopy(study) -> None:
    """Refuse (InputError) a local study folder that is not one reader's copy: the organizer's folder (it holds
    the truth key, readers must never see it) or a folder whose answer store holds several readers (their answers
    would be side by side in the copy)."""
    from spine_ldm.errors import InputError

    if study.truth_path().exists():
        raise InputError(f"{study.root} holds the truth key (organizer/truth.json): open a reader's copy "
                         "(SpineInpaintLib.rating.makeReaderCopy) or the study server's URL instead")
    readers = study.store.readers()
    if len(readers) > 1:
        raise InputError(f"{study.root} holds {len(readers)} readers' answers: each reader gets a copy with only "
                         "their own (SpineInpaintLib.rating.makeReaderCopy), or use the study server's URL")


def makeReaderCopy(studyDir: str, readerName: str, outDir: str) -> str:
    """Organizer: a study folder for one reader to rate locally in Slicer. It has the blinded study file and
    volumes, no ``organizer/`` folder, and an answer store holding only that reader (same token, same case order)
    and that reader's earlier answers and views. Returns ``outDir``."""
    import shutil
    import sqlite3

    _ensureBackendImportable()
    from spine_ldm.errors import InputError
    from spine_ldm.study.engine import STUDY_FILES, Study
    from spine_ldm.study.store import AnswerStore

    study = Study.load(studyDir)
    reader = study.store.reader_by_name(readerName)
    if reader is None:
        raise InputError(f"no reader {readerName!r} in {study.root}")
    out = os.path.abspath(outDir)
    if os.path.exists(out) and os.listdir(out):
        raise InputError(f"{out} is not empty")
    os.makedirs(out, mode=0o700, exist_ok=True)
    for name in STUDY_FILES:
        if (study.root / name).is_file():
            shutil.copy2(study.root / name, os.path.join(out, name))
    for case in study.cases:  # the blinded volumes only
        dest = os.path.join(out, case["volume"])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(study.volume_path(case["case_id"]), dest)
    AnswerStore(os.path.join(out, "answers.sqlite")).close()  # the schema, private file mode
    con = sqlite3.connect(os.path.join(out, "answers.sqlite"))
    try:
        con.execute("ATTACH DATABASE ? AS src", (str(study.store.path),))
        with con:
            for table in ("readers", "answers", "views"):
                con.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE reader_id = ?",
                            (reader.reader_id,))
        con.execute("DETACH DATABASE src")
    finally:
        con.close()
    return out


def lpsToRas(p) -> tuple:
    return (-float(p[0]), -float(p[1]), float(p[2]))


class _RemoteReader:
    def __init__(self, name: str):
        self.name = name


class RemoteReaderSession:
    """The reader-session interface of ``spine_ldm.study.engine.ReaderSession`` over the study server's HTTP API."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        _ensureBackendImportable()
        from spine_ldm.errors import InputError

        self._InputError = InputError
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        info = self._request("POST", "/api/login", {"token": token}, auth=False)
        self.reader = _RemoteReader(info["reader"])
        self._questions = info["questions"]
        self.total = int(info["total"])

    def _request(self, method: str, path: str, body: Optional[dict] = None, auth: bool = True, raw: bool = False):
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read().decode("utf-8")).get("detail", e.reason)
            except Exception:  # noqa: BLE001
                detail = e.reason
            if e.code == 401:
                raise self._InputError("unknown reader token") from None
            raise self._InputError(f"study server: {detail} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            raise self._InputError(f"cannot reach the study server at {self.url}: {e.reason}") from None
        return payload if raw else json.loads(payload.decode("utf-8"))

    def progress(self) -> dict:
        p = self._request("GET", "/api/session")
        return {"answered": int(p["answered"]), "total": int(p["total"]), "resume_index": int(p["resume_index"])}

    def resume_index(self) -> int:
        return self.progress()["resume_index"]

    def answered(self) -> int:
        return self.progress()["answered"]

    def case(self, index: int, record_view: bool = False) -> dict:
        return self._request("GET", f"/api/case/{int(index)}")

    def questions(self, condition: Optional[str] = None) -> list[dict]:
        from spine_ldm.study.engine import condition_label

        out = []
        for q in self._questions:
            q = dict(q)
            if condition is not None:
                q["text"] = q["text"].replace("{condition}", condition_label(condition))
            out.append(q)
        return out

    def answer(self, case_id: str, values: dict, seconds: Optional[float] = None, client: str = CLIENT) -> dict:
        return self._request("POST", "/api/answer", {"case_id": case_id, "values": values, "seconds": seconds,
                                                     "client": client})

    def volume_bytes(self, case: dict) -> bytes:
        return self._request("GET", case["volume_url"], raw=True)


class RatingLogic:
    """State of one reader's rating session in a Slicer scene."""

    def __init__(self, scene=None):
        import slicer

        self.scene = scene or slicer.mrmlScene
        self.study = None
        self.session = None
        self.index = 0
        self.case: Optional[dict] = None
        self.values: dict = {}
        self.volumeNode = None
        self.landmarkNode = None
        self.showLandmark = True
        self._shownAt = 0.0
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ study / reader
    def openStudy(self, studyDir: str, token: str) -> dict:
        """Authenticate the reader (study folder or server URL) and load the first unanswered case.
        Returns the progress dict."""
        _ensureBackendImportable()
        from spine_ldm.study.engine import Study

        location = str(studyDir).strip()
        if location.startswith(("http://", "https://")):
            study, session = None, RemoteReaderSession(location, token.strip())
        else:
            study = Study.load(location)
            checkReaderCopy(study)
            session = study.session(token.strip())  # raises InputError("unknown reader token")
        self.close()
        self.study, self.session = study, session
        self.warnings = []
        start = session.resume_index()
        self.loadCase(min(start, session.total - 1))
        return self.progress()

    @property
    def total(self) -> int:
        return self.session.total if self.session else 0

    @property
    def readerName(self) -> str:
        return self.session.reader.name if self.session else ""

    def progress(self) -> dict:
        p = self.session.progress() if self.session else {"answered": 0, "total": 0, "resume_index": 0}
        p["index"] = self.index
        return p

    def progressText(self) -> str:
        """'12 / 50' (1-based position of the case shown) and the number answered."""
        if not self.session:
            return ""
        p = self.session.progress()
        return f"{self.index + 1} / {p['total']}"

    def isFinished(self) -> bool:
        return bool(self.session) and self.session.resume_index() >= self.session.total

    def questions(self) -> list[dict]:
        return self.session.questions(self.case["condition"]) if self.session and self.case else []

    def questionText(self, qid: str) -> str:
        for q in self.questions():
            if q["id"] == qid:
                return q["text"]
        return ""

    # ------------------------------------------------------------------ cases
    def loadCase(self, index: int):
        """Show case ``index`` of this reader's order: volume node, views, landmark; returns the node."""
        if not self.session:
            raise RuntimeError("open a study first")
        case = self.session.case(index, record_view=True)
        self._removeCaseNodes()
        self.index, self.case = int(index), case
        self.values = dict(case.get("answer") or {})
        if self.study is not None:
            self.volumeNode = self._loadVolume(self.study.volume_path(case["case_id"]), case["case_id"])
        else:
            import shutil
            import tempfile

            tmp = tempfile.mkdtemp(prefix="spine-rating-")
            try:
                path = os.path.join(tmp, "volume.nrrd")
                with open(path, "wb") as fh:
                    fh.write(self.session.volume_bytes(case))
                self.volumeNode = self._loadVolume(path, case["case_id"])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._setupViews()
        self.setLandmarkVisible(self.showLandmark)
        self._shownAt = time.monotonic()
        return self.volumeNode

    def _loadVolume(self, path, name: str):
        import SimpleITK as sitk
        import slicer

        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        flip = np.diag([-1.0, -1.0, 1.0])
        node.SetIJKToRASDirections(*[float(v) for v in (flip @ d).flatten()])
        node.SetSpacing(*image.GetSpacing())
        node.SetOrigin(*lpsToRas(image.GetOrigin()))
        node.CreateDefaultDisplayNodes()
        disp = node.GetDisplayNode()
        if disp is not None:
            lo, hi = np.percentile(array, [1.0, 99.5]) if array.size else (0.0, 1.0)
            disp.SetAutoWindowLevel(False)
            disp.SetWindowLevelMinMax(float(lo), float(hi if hi > lo else lo + 1))
        for key in list(node.GetAttributeNames() or []):  # blinding: no attributes at all
            node.RemoveAttribute(key)
        return node

    def landmarkRas(self) -> tuple:
        return lpsToRas(self.case["landmark_lps"]) if self.case else (0.0, 0.0, 0.0)

    def _viewNodes(self) -> tuple[dict, dict]:
        def byLayout(cls):
            out = {}
            for i in range(self.scene.GetNumberOfNodesByClass(cls)):
                n = self.scene.GetNthNodeByClass(i, cls)
                out[n.GetLayoutName()] = n
            return out
        return byLayout("vtkMRMLSliceNode"), byLayout("vtkMRMLSliceCompositeNode")

    def _setupViews(self) -> None:
        """Rating views (fall back to every slice view): background = case volume, centred on the landmark,
        field of view = the volume's largest extent."""
        slices, composites = self._viewNodes()
        names = [n for n in (SAGITTAL_VIEW, AXIAL_VIEW) if n in slices] or list(slices)
        extent = self._extentMm()
        ras = self.landmarkRas()
        for name in names:
            comp, sl = composites.get(name), slices[name]
            if comp is not None:
                comp.SetBackgroundVolumeID(self.volumeNode.GetID())
                comp.SetForegroundVolumeID(None)
                comp.SetLabelVolumeID(None)
            if name == SAGITTAL_VIEW:
                sl.SetOrientationToSagittal()
            elif name == AXIAL_VIEW:
                sl.SetOrientationToAxial()
            if hasattr(sl, "RotateToVolumePlane"):
                sl.RotateToVolumePlane(self.volumeNode)
            fov = 1.05 * extent
            sl.SetFieldOfView(fov, fov, sl.GetFieldOfView()[2])
            sl.JumpSliceByCentering(*ras)

    def _extentMm(self) -> float:
        dims = self.volumeNode.GetImageData().GetDimensions()
        return float(max(d * s for d, s in zip(dims, self.volumeNode.GetSpacing())))

    def setLandmarkVisible(self, visible: bool) -> None:
        self.showLandmark = bool(visible)
        if self.landmarkNode is None and visible and self.case is not None:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", LANDMARK_NODE_NAME)
            node.AddControlPoint(*self.landmarkRas())
            node.SetNthControlPointLabel(0, "")
            node.SetLocked(True)
            node.CreateDefaultDisplayNodes()
            self.landmarkNode = node
        if self.landmarkNode is not None and self.landmarkNode.GetDisplayNode() is not None:
            self.landmarkNode.GetDisplayNode().SetVisibility(bool(visible))

    def _removeCaseNodes(self) -> None:
        for attr in ("volumeNode", "landmarkNode"):
            node = getattr(self, attr)
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
            setattr(self, attr, None)

    def close(self) -> None:
        self._removeCaseNodes()
        self.study = self.session = self.case = None
        self.values = {}

    # ------------------------------------------------------------------ answers
    def setValue(self, qid: str, value) -> None:
        if value is None:
            self.values.pop(qid, None)
        else:
            self.values[qid] = value

    def missingRequired(self) -> list[str]:
        return [q["text"] for q in self.questions() if q.get("required") and self.values.get(q["id"]) in (None, "")]

    def save(self) -> dict:
        """Record the current answer (a new row; last wins). Raises ValueError when a required answer is missing."""
        missing = self.missingRequired()
        if missing:
            raise ValueError("please answer: " + ", ".join(missing))
        seconds = max(0.0, time.monotonic() - self._shownAt)
        return self.session.answer(self.case["case_id"], dict(self.values), seconds=seconds, client=CLIENT)

    def saveAndNext(self) -> dict:
        """Save, then show the next case (or the first unanswered one after the last). Returns progress."""
        r = self.save()
        nxt = self.index + 1
        if nxt >= self.total:
            nxt = r["resume_index"] if r["resume_index"] < self.total else self.index
        if nxt != self.index:
            self.loadCase(nxt)
        return self.progress()

    def back(self) -> bool:
        if self.index > 0:
            self.loadCase(self.index - 1)
            return True
        return False

    def next(self) -> bool:
        if self.index + 1 < self.total:
            self.loadCase(self.index + 1)
            return True
        return False

    def handleKey(self, key: str) -> Optional[str]:
        """Apply a keyboard shortcut (see :data:`SHORTCUTS`); returns the action name or None."""
        entry = SHORTCUTS.get(key if len(key) > 1 else key.upper())
        if entry is None or not self.session:
            return None
        action, arg = entry
        if action == "set":
            if not any(q["id"] == arg[0] for q in self.questions()):
                return None
            self.setValue(*arg)
        elif action == "save":
            self.saveAndNext()
        elif action == "back":
            self.back()
        elif action == "landmark":
            self.setLandmarkVisible(not self.showLandmark)
        return action
