"""Slicer rating panel logic (SpineInpaintLib.rating) under headless slicer-core, and the .ui <-> widget contract."""
from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SpineInpaintRating.ui"
WIDGET_FILE = MODULE_DIR / "SpineInpaintRating.py"


def test_ui_has_every_widget_the_module_uses():
    names = {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", WIDGET_FILE.read_text()))
    assert used, "widget file references no ui widgets?"
    assert used <= names, f"missing in .ui: {sorted(used - names)}"
    src = WIDGET_FILE.read_text()
    assert "SpineInpaintRating.ui" in src and "import torch" not in src


def test_shortcuts_documented_in_ui_and_match_browser_keys():
    sys.path.insert(0, str(MODULE_DIR))
    try:
        from SpineInpaintLib.rating import SHORTCUTS
    finally:
        sys.path.remove(str(MODULE_DIR))
    from spine_ldm.study.engine import DEFAULT_QUESTIONS

    web_keys = {(q["id"], v): k for q in DEFAULT_QUESTIONS for v, k in q.get("keys", {}).items() if v in ("yes", "no")}
    for (qid, val), key in web_keys.items():
        assert SHORTCUTS[key] == ("set", (qid, val))
    help_text = ET.parse(UI_FILE).getroot().find(".//widget[@name='helpLabel']/property/string").text
    for frag in ("Y/N", "P/A", "1-5", "Enter", "B back", "L landmark"):
        assert frag in help_text


slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
from SpineInpaintLib import rating  # noqa: E402

from spine_ldm.errors import InputError  # noqa: E402
from spine_ldm.study.engine import Study, make_demo_study  # noqa: E402


@pytest.fixture
def scene():
    sc = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(sc)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(sc)
    old = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = sc
    # what the layout manager creates for ratingLayoutXml(): one slice + composite node per view
    for name in (rating.SAGITTAL_VIEW, rating.AXIAL_VIEW):
        sn = sc.CreateNodeByClass("vtkMRMLSliceNode")
        sn.SetLayoutName(name)
        sc.AddNode(sn)
        cn = slicer.vtkMRMLSliceCompositeNode()
        cn.SetLayoutName(name)
        sc.AddNode(cn)
    yield sc
    slicer.mrmlScene = old
    sc.Clear(1)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_demo_study(tmp_path_factory.mktemp("rp") / "s", n_inpainted_per_method=1, n_real_pathological=1,
                           n_real_healthy=1, seed=2, phantom_spacing=(2.0, 2.0, 4.3))


def _views(scene):
    sl = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName(): scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
          for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))}
    co = {scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").GetLayoutName():
          scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
          for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))}
    return sl, co


def test_layout_xml_has_sagittal_and_axial_views():
    root = ET.fromstring(rating.ratingLayoutXml())
    views = root.findall(".//view")
    assert [v.get("singletontag") for v in views] == [rating.SAGITTAL_VIEW, rating.AXIAL_VIEW]
    assert [v.find("property[@name='orientation']").text for v in views] == ["Sagittal", "Axial"]


def _reader_copy(study, name, tmp_path, seed=None):
    """What the organizer hands a reader who rates in a local folder: that reader's copy."""
    _, token = study.add_reader(name, seed=seed)
    copy = rating.makeReaderCopy(str(study.root), name, str(tmp_path / f"copy-{name}"))
    return Study.load(copy), token


def test_open_load_case_blinded_and_centred(scene, study, tmp_path):
    copy, token = _reader_copy(study, "panel-a", tmp_path, seed=4)
    logic = rating.RatingLogic(scene)
    p = logic.openStudy(str(copy.root), token)
    assert p["resume_index"] == 0 and logic.progressText() == f"1 / {len(study.cases)}"
    assert logic.warnings == []
    node = logic.volumeNode
    cid = logic.session.order[0]
    assert node.GetName() == cid and not node.GetAttributeNames()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    # voxels and geometry equal the anonymized file (LPS -> RAS)
    import SimpleITK as sitk

    img = sitk.ReadImage(str(study.volume_path(cid)))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(img))
    o = img.GetOrigin()
    np.testing.assert_allclose(node.GetOrigin(), (-o[0], -o[1], o[2]), atol=1e-6)
    sl, co = _views(scene)
    for name in (rating.SAGITTAL_VIEW, rating.AXIAL_VIEW):
        assert co[name].GetBackgroundVolumeID() == node.GetID()
        m = sl[name].GetSliceToRAS()
        centre = np.array([m.GetElement(r, 3) for r in range(3)])
        np.testing.assert_allclose(centre, rating.lpsToRas(logic.case["landmark_lps"]), atol=1e-6)
    m = sl[rating.SAGITTAL_VIEW].GetSliceToRAS()
    assert abs(abs(m.GetElement(0, 2)) - 1.0) < 1e-6  # sagittal view: slice normal along R-L
    m = sl[rating.AXIAL_VIEW].GetSliceToRAS()
    assert abs(abs(m.GetElement(2, 2)) - 1.0) < 1e-6  # axial view: slice normal along S-I
    assert sl[rating.SAGITTAL_VIEW].GetFieldOfView()[0] == pytest.approx(1.05 * 80.0, rel=1e-3)  # FSU 80 mm
    # landmark fiducial: named neutrally, at the landmark, toggled by L
    lm = logic.landmarkNode
    assert lm.GetName() == rating.LANDMARK_NODE_NAME
    pos = [0.0, 0.0, 0.0]
    lm.GetNthControlPointPosition(0, pos)
    np.testing.assert_allclose(pos, rating.lpsToRas(logic.case["landmark_lps"]), atol=1e-6)
    assert logic.handleKey("L") == "landmark" and lm.GetDisplayNode().GetVisibility() == 0


def test_keyboard_answers_resume_and_history(scene, study, tmp_path):
    copy, token = _reader_copy(study, "panel-b", tmp_path, seed=9)
    logic = rating.RatingLogic(scene)
    logic.openStudy(str(copy.root), token)
    order = logic.session.order
    with pytest.raises(ValueError, match="please answer"):
        logic.handleKey("Return")  # nothing answered yet
    for keys in (("Y", "P", "4"), ("N", "A"), ("y", "a")):
        for k in keys:
            assert logic.handleKey(k) == "set"
        assert logic.handleKey("Return") == "save"
    assert logic.index == 3 and logic.progressText() == f"4 / {len(order)}"
    assert logic.volumeNode.GetName() == order[3]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # previous case node removed
    ans = logic.session.answers()
    assert ans[order[0]].values == {"realistic": "yes", "pathology_present": "yes", "confidence": 4}
    assert ans[order[1]].values == {"realistic": "no", "pathology_present": "no"}
    assert ans[order[2]].client == "slicer" and ans[order[2]].seconds is not None
    # back, change the answer: a new row, last wins
    assert logic.handleKey("B") == "back" and logic.index == 2
    assert logic.values == {"realistic": "yes", "pathology_present": "no"}  # pre-filled with the previous answer
    logic.handleKey("N")
    logic.handleKey("Return")
    hist = copy.store.history(logic.session.reader.reader_id, order[2])
    assert [h.values["realistic"] for h in hist] == ["yes", "no"]
    # a fresh panel (Slicer restarted) resumes at the first unanswered case
    scene2_logic = rating.RatingLogic(scene)
    assert scene2_logic.openStudy(str(copy.root), token)["resume_index"] == 3 and scene2_logic.index == 3
    assert logic.handleKey("Q") is None


def test_local_folder_must_be_one_readers_copy(scene, study, tmp_path):
    logic = rating.RatingLogic(scene)
    _, token = study.add_reader("panel-c")
    with pytest.raises(InputError, match="holds the truth key"):  # the organizer's folder
        logic.openStudy(str(study.root), token)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # nothing of it was shown
    # a copy of the organizer's folder without the key still holds every reader: refused too
    import shutil

    leaked = tmp_path / "leaked"
    shutil.copytree(study.root, leaked)
    shutil.rmtree(leaked / "organizer")
    with pytest.raises(InputError, match="readers' answers"):
        logic.openStudy(str(leaked), token)


def test_readers_copy_holds_only_that_readers_answers(scene, study, tmp_path):
    reader_a, ta = study.add_reader("panel-d")
    reader_b, tb = study.add_reader("panel-e")
    sa, sb = study.session(ta), study.session(tb)
    sa.answer(sa.order[0], {"realistic": "yes", "pathology_present": "no"})  # rated earlier on the server
    sb.answer(sb.order[0], {"realistic": "no", "pathology_present": "yes"})
    copy = Study.load(rating.makeReaderCopy(str(study.root), "panel-d", str(tmp_path / "copy-d")))
    assert not copy.truth_path().exists() and not (copy.root / "organizer").exists()
    assert [r.name for r in copy.store.readers()] == ["panel-d"]
    assert {a.reader_id for a in copy.store.all_rows()} == {reader_a.reader_id}
    assert [a.values for a in copy.store.all_rows()] == [{"realistic": "yes", "pathology_present": "no"}]
    assert sorted(p.name for p in (copy.root / "volumes").iterdir()) == \
        sorted(Path(c["volume"]).name for c in study.cases)
    logic = rating.RatingLogic(scene)
    with pytest.raises(InputError, match="unknown reader token"):  # another reader's token does not open it
        logic.openStudy(str(copy.root), tb)
    p = logic.openStudy(str(copy.root), ta)  # same token, same order, resumes after the earlier answer
    assert p["resume_index"] == 1 and logic.session.order == sa.order
    logic.handleKey("N")
    logic.handleKey("A")
    logic.handleKey("Return")
    assert len(study.store.latest_answers(reader_a.reader_id)) == 1  # the organizer's store is untouched
    with pytest.raises(InputError, match="is not empty"):
        rating.makeReaderCopy(str(study.root), "panel-d", str(tmp_path / "copy-d"))


def test_shortcuts_act_only_while_the_panel_has_focus(scene, monkeypatch):
    """The rating widget's keys are owned by the panel with a widget-with-children context, never the main
    window's application-wide context where 1-5, B, L, ... belong to the slice views."""
    sys.path.insert(0, str(REPO / "Testing"))
    import fake_slicer_gui

    ui, _ = fake_slicer_gui.install(monkeypatch, UI_FILE)
    monkeypatch.setattr(fake_slicer_gui.QShortcut, "created", [])
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: pytest.fail("shortcuts must not go to the main window"),
                        raising=False)
    sys.modules.pop("SpineInpaintRating", None)
    import SpineInpaintRating

    panel = fake_slicer_gui.FakeWidget("panel", "qSlicerScriptedLoadableModuleWidget")
    panel.isEntered = True
    w = SpineInpaintRating.SpineInpaintRatingWidget(parent=panel)
    try:
        w.setup()
        created = fake_slicer_gui.QShortcut.created
        assert sorted(sc.key for sc in created) == sorted(rating.SHORTCUTS)
        qt = sys.modules["qt"]
        assert all(sc.parent is panel and sc.context == qt.Qt.WidgetWithChildrenShortcut for sc in created)
        assert panel.focusPolicy == qt.Qt.StrongFocus  # a click in the panel gives it the focus
        keys = []
        monkeypatch.setattr(w, "onKey", keys.append)
        next(sc for sc in created if sc.key == "Y").activate()
        assert keys == ["Y"]
    finally:
        w.cleanup()
        sys.modules.pop("SpineInpaintRating", None)


def test_rating_self_test_runs_as_ctest_does(scene, monkeypatch):
    """SpineInpaintRatingTest through the unittest loader (slicer_add_python_unittest): runs, does not skip."""
    import unittest

    sys.path.insert(0, str(REPO / "Testing"))
    import fake_slicer_gui

    fake_slicer_gui.install(monkeypatch)
    sys.modules.pop("SpineInpaintRating", None)
    try:
        import SpineInpaintRating

        assert hasattr(SpineInpaintRating, "SpineInpaintRatingTest")
        result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(
            unittest.TestLoader().loadTestsFromName("SpineInpaintRating"))
        assert result.wasSuccessful() and result.testsRun == 1 and not result.skipped, result.errors
    finally:
        sys.modules.pop("SpineInpaintRating", None)


def test_remote_study_server(scene, study):
    """The panel as a client of `spine-ldm study serve`: same keys, answers land in the server's store."""
    pytest.importorskip("fastapi")
    import socket
    import threading
    import time

    import uvicorn

    from spine_ldm.study.web import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(study.root), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not srv.started and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        logic = rating.RatingLogic(scene)
        with pytest.raises(InputError, match="unknown reader token"):
            logic.openStudy(url, "wrong")
        reader, token = study.add_reader("panel-remote", seed=13)
        p = logic.openStudy(url, token)
        assert p["resume_index"] == 0 and logic.warnings == []  # the truth key stays on the server
        order = study.session(token).order
        assert logic.volumeNode.GetName() == order[0] and not logic.volumeNode.GetAttributeNames()
        import SimpleITK as sitk

        np.testing.assert_array_equal(slicer.util.arrayFromVolume(logic.volumeNode),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(study.volume_path(order[0])))))
        assert logic.questionText("pathology_present") == "Moderate/large disc herniation present?"
        for k in ("Y", "A", "2", "Return", "N", "P", "Return"):
            logic.handleKey(k)
        assert logic.progressText() == f"3 / {len(order)}"
        ans = study.store.latest_answers(reader.reader_id)
        assert ans[order[0]].values == {"realistic": "yes", "pathology_present": "no", "confidence": 2}
        assert ans[order[1]].values == {"realistic": "no", "pathology_present": "yes"}
        assert {a.client for a in ans.values()} == {"slicer"}
        assert rating.RatingLogic(scene).openStudy(url, token)["resume_index"] == 2
    finally:
        srv.should_exit = True
        th.join(10)
