"""Slicer rating panel logic (SpineInpaintLib.rating) under headless slicer-core, and the .ui <-> widget contract."""
from __future__ import annotations

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
from spine_ldm.study.engine import make_demo_study  # noqa: E402


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


def test_open_load_case_blinded_and_centred(scene, study):
    _, token = study.add_reader("panel-a", seed=4)
    logic = rating.RatingLogic(scene)
    p = logic.openStudy(str(study.root), token)
    assert p["resume_index"] == 0 and logic.progressText() == f"1 / {len(study.cases)}"
    assert any("truth key" in w for w in logic.warnings)
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


def test_keyboard_answers_resume_and_history(scene, study):
    _, token = study.add_reader("panel-b", seed=9)
    logic = rating.RatingLogic(scene)
    logic.openStudy(str(study.root), token)
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
    hist = study.store.history(logic.session.reader.reader_id, order[2])
    assert [h.values["realistic"] for h in hist] == ["yes", "no"]
    # a fresh panel (Slicer restarted) resumes at the first unanswered case
    scene2_logic = rating.RatingLogic(scene)
    assert scene2_logic.openStudy(str(study.root), token)["resume_index"] == 3 and scene2_logic.index == 3
    assert logic.handleKey("Q") is None


def test_bad_token_and_other_readers_answers_invisible(scene, study):
    logic = rating.RatingLogic(scene)
    with pytest.raises(InputError, match="unknown reader token"):
        logic.openStudy(str(study.root), "wrong")
    _, ta = study.add_reader("panel-c")
    _, tb = study.add_reader("panel-d")
    logic.openStudy(str(study.root), ta)
    cid = logic.case["case_id"]
    logic.handleKey("Y")
    logic.handleKey("P")
    logic.handleKey("Return")
    other = rating.RatingLogic(scene)
    other.openStudy(str(study.root), tb)
    idx = other.session.order.index(cid)
    other.loadCase(idx)
    assert other.values == {} and other.session.answers() == {}


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
