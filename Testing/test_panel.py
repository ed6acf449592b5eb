"""The SpineInpaint panel (``SpineInpaint.py``) under headless slicer-core with the GUI fakes of ``fake_slicer_gui``.

What a user does, click by click: the parameter node and its GUI connection (scene save / load, script changes),
one-click landmark, Apply / Cancel without blocking, the phantom, the connection test and the model manager in the
background, the Sample Data entry, and the self-test's skip on a Slicer without torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import types
import unittest
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(REPO / "Testing"))
import fake_slicer_gui  # noqa: E402
from SpineInpaintLib import dependencies, models, runner, worker  # noqa: E402
import test_slicer_lib  # noqa: E402
from test_slicer_lib import FAKE_BACKEND, add_points, make_volume_node, ras_of_ijk, volume_nodes  # noqa: E402

scene = test_slicer_lib.scene  # the headless scene fixture

GUI_BLOCK_S = 0.1  # nothing a click starts may keep the GUI thread longer


@pytest.fixture
def gui(scene, monkeypatch, tmp_path):
    """Fakes installed, SpineInpaint imported fresh; ``make()`` builds a set-up widget."""
    monkeypatch.setenv("SPINE_LDM_CACHE", str(tmp_path / "cache"))
    ui, errors = fake_slicer_gui.install(monkeypatch,
                                         MODULE_DIR / "Resources" / "UI" / "SpineInpaint.ui")
    monkeypatch.setattr(dependencies, "probeDevice", lambda *a, **k: dependencies.DeviceInfo(torch="2.13.0"))
    # the panel's behaviour, not this environment's: the pins may differ from what is installed here (a newer
    # uvicorn on a fresh CI setup); test_dependency_install_asks_and_runs_under_a_wait_cursor covers that path
    monkeypatch.setattr(dependencies, "ensureTorch", lambda *a, **k: "2.13.0")
    monkeypatch.setattr(dependencies, "missingRequirements", lambda *a, **k: [])
    monkeypatch.setattr(dependencies, "dependencyConflicts", lambda *a, **k: [])
    sys.modules.pop("SpineInpaint", None)
    import SpineInpaint

    monkeypatch.setattr(SpineInpaint.layout, "showCompareLayout", lambda *a, **k: True)
    widgets = []

    def make():
        w = SpineInpaint.SpineInpaintWidget(parent=types.SimpleNamespace(isEntered=True))
        w.setup()
        widgets.append(w)
        return w

    yield types.SimpleNamespace(module=SpineInpaint, ui=ui, errors=errors, make=make)
    for w in widgets:
        w.cleanup()
    worker.shutdownWorkers()
    sys.modules.pop("SpineInpaint", None)


def pump(w, until=None, timeout=60.0):
    """The panel's QTimer: call onPollTimer like Qt would, until ``until()`` or the timer stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        w.onPollTimer()
        assert time.monotonic() - t0 < GUI_BLOCK_S * 5, "a timer tick blocked the GUI"
        if (until() if until else not w.pollTimer.active):
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def timed(fn, *args):
    t0 = time.monotonic()
    fn(*args)
    return time.monotonic() - t0


def one_shot_backend(w, tmp_path, mode):
    """The one-shot CLI path with the fake backend of test_slicer_lib (FAKE_MODE ok / slow / error)."""
    script = tmp_path / "fake_backend.py"
    script.write_text(FAKE_BACKEND)

    def builder(payload, inputPath, outputDir, python=None, registry=None):
        return [sys.executable, str(script)] + runner.inpaintCommand(payload, inputPath, outputDir, python="x",
                                                                     registry=registry)[4:]

    w.logic.commandBuilder, w.logic.warm = builder, False
    w.logic._env = dict(os.environ, FAKE_MODE=mode)


# ---------------------------------------------------------------------------------------------- parameter node
def test_enter_creates_no_nodes_and_place_creates_the_landmark(gui, scene):
    n = scene.GetNumberOfNodes()
    w = gui.make()
    w.enter()
    created = [scene.GetNthNode(i).GetClassName() for i in range(n, scene.GetNumberOfNodes())]
    assert created == ["vtkMRMLScriptedModuleNode"], created  # the parameter node, nothing else
    assert w._parameterNode.landmark is None and not gui.ui.applyButton.enabled
    gui.ui.placeLandmarkButton.click()  # the user asks for it: now the point list exists
    landmark = w._parameterNode.landmark
    assert landmark is not None and landmark.IsA("vtkMRMLMarkupsFiducialNode")
    assert gui.ui.landmarkSelector.currentNode() is landmark and gui.ui.landmarkPlaceWidget.placeModeEnabled
    landmark.AddControlPoint(vtk.vtkVector3d(1, 2, 3))
    gui.ui.placeLandmarkButton.click()  # placing again replaces the point, same list
    assert w._parameterNode.landmark is landmark and landmark.GetNumberOfControlPoints() == 0


def test_parameter_node_round_trip_through_scene_save_and_load(gui, scene, tmp_path):
    w = gui.make()
    vol = make_volume_node(scene, name="T2")
    other = make_volume_node(scene, name="Other")
    ui = gui.ui
    ui.inputVolumeSelector.setCurrentNode(vol)  # GUI -> node (connectGui)
    ui.pathologyComboBox.currentIndex = 1  # CCS (manual mapping)
    ui.severityComboBox.currentIndex = 1  # moderate
    ui.methodComboBox.currentIndex = 2  # RePaint
    ui.samplesSpinBox.value = 3
    ui.sigmaSpinBox.value = 12.5
    ui.guidanceSpinBox.value = 3.0
    ui.levelAutoCheckBox.checked = False
    ui.levelComboBox.currentIndex = 4
    ui.remoteCheckBox.checked = True
    ui.remoteUrlLineEdit.text = "https://gpu:8000"
    p = w.currentParameters()
    assert (p.condition, p.method, p.samples, p.sigmaMm, p.guidanceScale, p.levelAuto, p.level, p.backend,
            p.remoteUrl) == ("ccs_moderate", "repaint", 3, 12.5, 3.0, False, "L5-S1", "remote", "https://gpu:8000")
    assert w._parameterNode.inputVolume is vol
    # the input volume is a node reference (survives ID changes), not an ID in an attribute
    raw = w._parameterNode.parameterNode
    assert raw.GetNodeReference("inputVolume") is vol and not any(
        vol.GetID() in str(raw.GetAttribute(a)) for a in (raw.GetAttributeNames() or ()))

    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    scene.Clear(0)  # the user closes the scene: the panel goes back to defaults
    assert ui.samplesSpinBox.value == 1 and ui.methodComboBox.currentIndex == 0 and ui.inputVolumeSelector.currentNode() is None
    make_volume_node(scene, name="Unrelated")  # IDs of the loaded nodes will differ from the saved ones
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Import()  # loading the scene updates the panel
    assert ui.inputVolumeSelector.currentNode().GetName() == "T2"
    assert ui.inputVolumeSelector.currentNode() is not None and ui.inputVolumeSelector.currentNode().GetID() != vol.GetID()
    assert (ui.samplesSpinBox.value, ui.sigmaSpinBox.value, ui.guidanceSpinBox.value, ui.levelComboBox.currentText) == \
        (3, 12.5, 3.0, "L5-S1")
    assert ui.pathologyComboBox.currentIndex == 1 and ui.severityComboBox.currentData == "moderate"
    assert ui.methodComboBox.currentIndex == 2 and ui.remoteCheckBox.checked and not ui.levelAutoCheckBox.checked
    assert w.currentParameters().condition == "ccs_moderate"
    del other


def test_a_script_change_updates_the_panel(gui, scene):
    w = gui.make()
    node = gui.module.SpineInpaintLogic().getParameterNode()  # what a script does
    node.samples = 5
    node.condition = "dh_small"
    node.method = "masked"
    assert gui.ui.samplesSpinBox.value == 5
    assert gui.ui.pathologyComboBox.currentIndex == 0 and gui.ui.severityComboBox.currentData == "small"
    assert gui.ui.methodComboBox.currentIndex == 1 and gui.ui.modelComboBox.currentData == ""  # default for method
    expected = models.defaultModelFor("masked", "dh_small", w.registryPath())  # the backend's choice for the case
    assert expected and gui.ui.modelStatusLabel.text == f"Default for this case: {expected}"
    with pytest.raises(ValueError):
        node.samples = 0  # the wrapper's validators use the dataclass's ranges
    with pytest.raises(ValueError):
        node.level = "L6-L7"
    assert w.currentParameters().samples == 5


def test_wrapper_fields_are_the_dataclass_fields(gui):
    from dataclasses import fields

    from SpineInpaintLib.parameters import InpaintParameters

    wrapper = gui.module.SpineInpaintParameterNode
    declared = set(wrapper.allParameters)
    assert declared - {"inputVolume", "landmark", "discCenters"} == {f.name for f in fields(InpaintParameters)}
    node = wrapper(gui.module.SpineInpaintLogic().getParameterNode().parameterNode)
    assert node.samples == InpaintParameters().samples and node.level == InpaintParameters().level


# ---------------------------------------------------------------------------------------------- run, cancel
def test_apply_cancel_and_errors_never_block(gui, scene, tmp_path):
    w = gui.make()
    ui = gui.ui
    vol = make_volume_node(scene)
    ui.inputVolumeSelector.setCurrentNode(vol)
    ui.placeLandmarkButton.click()
    landmark = w._parameterNode.landmark
    landmark.AddControlPoint(vtk.vtkVector3d(*ras_of_ijk(vol, (12, 12, 4))))
    landmark.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
    discs = add_points(scene, [ras_of_ijk(vol, (12, 12, 1)), ras_of_ijk(vol, (12, 12, 5))], name="Discs",
                       labels=["L2-L3", "L3-L4"])  # 12 mm and 4 mm from the landmark (4 mm slices)
    ui.discCentersSelector.setCurrentNode(discs)
    assert w._parameterNode.level == "L3-L4" and ui.levelComboBox.currentText == "L3-L4"  # suggested level
    assert "L3-L4" in ui.levelSuggestionLabel.text
    ui.pathologyComboBox.currentIndex = 1
    assert [it[1] for it in ui.severityComboBox._items] == ["severe", "moderate"]
    ui.samplesSpinBox.value = 2
    ui.stepsSpinBox.value = 3
    assert ui.applyButton.enabled, ui.applyButton.toolTip

    one_shot_backend(w, tmp_path, "ok")
    n_before = len(volume_nodes(scene))
    assert timed(ui.applyButton.click) < 2.0  # writes the input volume, starts the process
    assert w.pollTimer.active and ui.cancelButton.enabled and not ui.applyButton.enabled
    pump(w)
    assert w.job.state == "done", (w.job.message, gui.errors)
    assert [n.GetName() for n in volume_nodes(scene)[n_before:]] == ["T2 CCS-severe L3-L4 weighted #1",
                                                                     "T2 CCS-severe L3-L4 weighted #2"]
    assert ui.statusLabel.text.startswith("Done: 2 volume(s)") and w.lastLabels == ["In", "1", "2"]

    one_shot_backend(w, tmp_path, "slow")  # Cancel: returns at once, the timer reports the end
    n_nodes = scene.GetNumberOfNodes()
    ui.applyButton.click()
    pump(w, until=lambda: w.job.step > 0)
    assert timed(ui.cancelButton.click) < GUI_BLOCK_S
    assert not ui.cancelButton.enabled and "cancelling" in ui.progressBar.format
    t0 = time.monotonic()
    pump(w)
    assert w.job.state == "cancelled" and time.monotonic() - t0 < 2.0
    assert scene.GetNumberOfNodes() == n_nodes and "nothing was added" in ui.statusLabel.text

    one_shot_backend(w, tmp_path, "error")
    ui.applyButton.click()
    pump(w)
    assert gui.errors[-1] == "Input problem: landmark (1, 2, 3) LPS is 41.0 mm outside the volume"
    assert scene.GetNumberOfNodes() == n_nodes


def test_dependency_install_asks_and_runs_under_a_wait_cursor(gui, scene, tmp_path, monkeypatch):
    """A missing pin: Apply asks first; No starts nothing, Yes installs (wait cursor on during, off after), then
    starts; a conflict left after the install is one clear error and no job."""
    import qt

    w = gui.make()
    ui = gui.ui
    vol = make_volume_node(scene)
    ui.inputVolumeSelector.setCurrentNode(vol)
    ui.placeLandmarkButton.click()
    w._parameterNode.landmark.AddControlPoint(vtk.vtkVector3d(*ras_of_ijk(vol, (12, 12, 4))))
    ui.stepsSpinBox.value = 3
    one_shot_backend(w, tmp_path, "ok")
    missing, asked, installed, conflicts = ["uvicorn==0.54.0"], [], [], []
    monkeypatch.setattr(dependencies, "missingRequirements", lambda *a, **k: list(missing))
    monkeypatch.setattr(dependencies, "dependencyConflicts", lambda *a, **k: list(conflicts))
    monkeypatch.setattr(dependencies, "installRequirements",
                        lambda *a, **k: installed.append(list(qt.QApplication.cursors)))
    answer = [False]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda msg, *a, **k: asked.append(msg) or answer[0])

    ui.applyButton.click()
    assert "uvicorn==0.54.0" in asked[-1] and installed == [] and w.job is None
    assert ui.statusLabel.text == "Cancelled: dependencies not installed." and ui.applyButton.enabled

    answer[0] = True
    n_before = len(volume_nodes(scene))
    ui.applyButton.click()
    assert installed == [[qt.Qt.WaitCursor]] and qt.QApplication.cursors == []  # restored after the install
    pump(w)
    assert w.job.state == "done", (w.job.message, gui.errors)
    assert len(volume_nodes(scene)) == n_before + 1

    conflicts.append("monai 1.6.1 needs torch>=2.8.0 (installed: 2.1.0)")
    job = w.job
    ui.applyButton.click()
    assert w.job is job and gui.errors[-1] == "Could not start: monai 1.6.1 needs torch>=2.8.0 (installed: 2.1.0)"
    assert qt.QApplication.cursors == [] and ui.applyButton.enabled


def test_phantom_loads_in_the_background(gui, scene, monkeypatch):
    w = gui.make()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(runner, "backendEnvironment", lambda extra=None: env)
    assert timed(gui.ui.loadPhantomButton.click) < GUI_BLOCK_S
    assert not gui.ui.loadPhantomButton.enabled and "Generating" in gui.ui.statusLabel.text
    pump(w, timeout=120)
    node = w._parameterNode
    assert node.inputVolume.GetName() == "SpinePhantom" and node.landmark.GetNumberOfControlPoints() == 1
    assert node.discCenters.GetNumberOfControlPoints() == 5 and node.level == "L4-L5"
    assert gui.ui.loadPhantomButton.enabled and "Phantom loaded" in gui.ui.statusLabel.text


# ---------------------------------------------------------------------------------------------- connection test
def _serve(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return srv, th, f"http://127.0.0.1:{port}"


def test_connection_test_runs_in_the_background(gui, scene):
    pytest.importorskip("fastapi")
    from spine_ldm.server import create_app

    w = gui.make()
    srv, th, url = _serve(create_app("secret-token"))
    try:
        gui.ui.remoteUrlLineEdit.text = url
        gui.ui.remoteTokenLineEdit.text = "secret-token"
        gui.ui.remoteCheckBox.checked = True
        assert timed(gui.ui.remoteTestButton.click) < GUI_BLOCK_S
        assert gui.ui.remoteStatusLabel.text.startswith("connecting to") and not gui.ui.remoteTestButton.enabled
        pump(w, until=lambda: "remoteTest" not in w.tasks)
        assert gui.ui.remoteStatusLabel.text.startswith("Connected: spine-ldm") and gui.ui.remoteTestButton.enabled
        assert [m.id for m in w._remoteModels] == [m.id for m in models.listModels(w.registryPath(), verify=False)]
        gui.ui.remoteTokenLineEdit.text = "wrong"
        gui.ui.remoteTestButton.click()
        pump(w, until=lambda: "remoteTest" not in w.tasks)
        assert "HTTP 401" in gui.ui.remoteStatusLabel.text and w._remoteModels is None
    finally:
        srv.should_exit = True
        th.join(10)


# ---------------------------------------------------------------------------------------------- model manager
def _url_registry(tmp_path, corrupt=False):
    """A registry whose model names its weights by file:// URL (what a user adds for a model on a server)."""
    helpers = pytest.importorskip("helpers_models")
    d = helpers.make_model_dir(tmp_path / "served", model_id="url-weighted")
    entry = json.loads((d / "model.json").read_text())
    for f in entry["files"].values():
        f["url"] = (d / f.pop("path")).resolve().as_uri()
    if corrupt:
        entry["files"]["unet"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    reg = tmp_path / ("bad.json" if corrupt else "url.json")
    reg.write_text(json.dumps({"version": 1, "models": [entry]}))
    return reg


@pytest.mark.parametrize("corrupt", [False, True], ids=["sha-ok", "wrong-sha256"])
def test_model_download_on_demand_with_progress_and_sha256(gui, scene, tmp_path, monkeypatch, corrupt):
    pytest.importorskip("torch")
    reg = _url_registry(tmp_path, corrupt)
    hashed_on = []
    real_status = models.fileStatus
    monkeypatch.setattr(models, "fileStatus",
                        lambda ref: hashed_on.append(threading.current_thread()) or real_status(ref))
    w = gui.make()
    w._parameterNode.registry = str(reg)
    w.refreshModels()
    pump(w, until=lambda: "verifyModels" not in w.tasks)
    assert hashed_on and threading.main_thread() not in hashed_on  # hashing never on the GUI thread
    combo = gui.ui.modelComboBox
    assert combo.itemTexts()[0] == "default for this method"
    combo.currentIndex = combo.findData("url-weighted")
    assert w._parameterNode.model == "url-weighted" and "not downloaded" in gui.ui.modelStatusLabel.text
    assert gui.ui.downloadModelButton.enabled
    assert timed(gui.ui.downloadModelButton.click) < GUI_BLOCK_S
    assert gui.ui.downloadModelButton.text == "Cancel download"
    pump(w, until=lambda: "downloadModel" not in w.tasks)
    cached = list((tmp_path / "cache" / "downloads").glob("*")) if (tmp_path / "cache" / "downloads").exists() else []
    info = next(m for m in w._models if m.id == "url-weighted")
    if corrupt:
        assert "sha256 mismatch" in gui.ui.statusLabel.text and info.status == "not downloaded"
        expected = json.loads(reg.read_text())["models"][0]["files"]["unet"]["sha256"]
        assert f"{expected}.pt" not in {p.name for p in cached}  # the bad bytes never take the cached name
        assert not any(p.name.startswith(".dl-") for p in cached)  # no partial file left
    else:
        assert info.status == "ok" and "downloaded, sha256 ok" in gui.ui.statusLabel.text
        assert len([p for p in cached if p.suffix == ".pt"]) == 2
        assert gui.ui.modelProgressBar.visible is False and not gui.ui.downloadModelButton.enabled


def test_model_download_can_be_cancelled(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("SPINE_LDM_CACHE", str(tmp_path / "cache"))
    reg = _url_registry(tmp_path)
    from SpineInpaintLib import tasks

    task = models.downloadTask("url-weighted", str(reg))
    task.cancel()
    assert task.wait(30) == tasks.CANCELLED
    leftovers = list((tmp_path / "cache" / "downloads").glob("*")) if (tmp_path / "cache" / "downloads").exists() else []
    assert all(not p.name.startswith(".dl-") for p in leftovers)


def test_model_import_from_the_panel(gui, scene, tmp_path):
    pytest.importorskip("torch")
    helpers = pytest.importorskip("helpers_models")
    zp = helpers.make_model_zip(tmp_path / "trained.zip", model_id="my-herniation-model")
    w = gui.make()
    pump(w, until=lambda: "verifyModels" not in w.tasks)
    fake_slicer_gui.QFileDialog.nextPath = str(zp)
    try:
        assert timed(gui.ui.importModelButton.click) < GUI_BLOCK_S
        assert not gui.ui.importModelButton.enabled
        pump(w, until=lambda: not w.tasks)
    finally:
        fake_slicer_gui.QFileDialog.nextPath = ""
    assert "Model my-herniation-model imported" in gui.ui.statusLabel.text
    assert gui.ui.modelComboBox.findData("my-herniation-model") > 0  # listed from the registry (weighted method)
    assert next(m for m in w._models if m.id == "my-herniation-model").status == "ok"
    assert (tmp_path / "cache" / "Models.json").is_file()


# ---------------------------------------------------------------------------------------------- sample data, self-test
def test_phantom_is_registered_in_sample_data(gui, scene, monkeypatch):
    sources, categories, selected = {}, {}, []

    class SampleDataLogic:  # the documented API of Slicer's SampleData module
        @staticmethod
        def registerCustomSampleDataCategory(category, title):
            categories[category] = title

        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={},
                                           checksums=None, loadFileType=None):
            assert len(uris) == len(fileNames) == len(nodeNames) == len(checksums)  # SampleDataSource's check
            sources.setdefault(category, []).append(types.SimpleNamespace(
                sampleName=sampleName, customDownloader=customDownloader, thumbnailFileName=thumbnailFileName))

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    gui.module.SpineInpaint(types.SimpleNamespace())
    assert ("startupCompleted()", gui.module.registerSampleData) in slicer.app.connections
    assert ("aboutToQuit()", gui.module.stopBackendWorker) in slicer.app.connections
    gui.module.registerSampleData()
    assert categories == {"SpineInpaint": "SpineInpaint"}
    (source,) = sources["SpineInpaint"]
    assert source.sampleName == "SpinePhantom" and Path(source.thumbnailFileName).is_file()
    w = gui.make()
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: selected.append(name))
    monkeypatch.setattr(slicer.modules, "spineinpaint", types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: w)), raising=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(runner, "backendEnvironment", lambda extra=None: env)
    assert timed(source.customDownloader, source) < GUI_BLOCK_S  # the Sample Data button
    assert selected == ["SpineInpaint"]
    pump(w, timeout=120)
    assert w._parameterNode.inputVolume.GetName() == "SpinePhantom"


def test_self_test_skips_where_torch_is_missing(gui, monkeypatch):
    """The factory's build machines: no torch. ctest's unittest run reports skips, Reload and Test says why."""
    monkeypatch.setattr(dependencies, "torchStatus", lambda: dependencies.TorchStatus(False, None, True))
    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(
        unittest.TestLoader().loadTestsFromName("SpineInpaint"))
    assert result.wasSuccessful() and result.testsRun == 2 and len(result.skipped) == 2
    assert all("PyTorch is not installed" in reason for _, reason in result.skipped)
    test = gui.module.SpineInpaintTest()
    test.runTest()
    assert test.displayed[-1].startswith("SpineInpaintTest skipped: PyTorch is not installed")


def test_module_file_holds_no_test_fallbacks():
    source = (MODULE_DIR / "SpineInpaint.py").read_text()
    assert "except ImportError" not in source and "GUI_AVAILABLE" not in source
    for fake in ("class ScriptedLoadableModule:", "class VTKObservationMixin", "def _(text)"):
        assert fake not in source
