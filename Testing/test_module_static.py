"""Static checks of the Slicer extension (the desktop app cannot run here).

- every ``self.ui.X`` used by a module file exists in its Qt Designer .ui (parsed as XML), the .ui is well formed,
  its custom widget classes are declared and its signal/slot connections name existing widgets;
- every file named in ``SpineInpaint/CMakeLists.txt`` exists, every glob matches, and every Python file of the module
  packages is shipped (a file missing from the list would silently be missing from the installed extension);
- the top-level ``CMakeLists.txt`` is a Slicer extension depending on PyTorch with ``add_subdirectory(SpineInpaint)``;
- ``SpineInpaint.py`` imports with Slicer's GUI parts faked (``fake_slicer_gui``: the module holds no fallbacks of
  its own) without pulling torch or the backend, and its Logic and parameter node work without the widget.
"""
from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
UI_DIR = MODULE_DIR / "Resources" / "UI"
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QComboBox", "QSpinBox",
              "QDoubleSpinBox", "QLineEdit", "QPlainTextEdit", "QTextEdit", "QTextBrowser", "QProgressBar",
              "QGroupBox", "QFrame", "QRadioButton", "QSlider", "QTableWidget", "QListWidget", "QTreeWidget",
              "QButtonGroup", "QScrollArea", "QTabWidget", "QStackedWidget", "QSplitter", "QDialogButtonBox"}
MODULES = [("SpineInpaint.py", "SpineInpaint.ui"), ("SpineInpaintRating.py", "SpineInpaintRating.ui")]


def ui_widgets(ui_path: Path) -> dict[str, str]:
    root = ET.parse(ui_path).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


@pytest.mark.parametrize("module,ui", MODULES)
def test_ui_names_used_in_code_exist(module, ui):
    code_path, ui_path = MODULE_DIR / module, UI_DIR / ui
    if not code_path.exists():
        pytest.skip(f"{module} not present")
    assert ui_path.exists(), f"{ui_path} missing"
    widgets = ui_widgets(ui_path)
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", code_path.read_text()))
    assert used, f"{module} uses no self.ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{module} uses widgets missing from {ui}: {missing}"


@pytest.mark.parametrize("ui", ["SpineInpaint.ui", "SpineInpaintRating.ui"])
def test_ui_is_consistent(ui):
    path = UI_DIR / ui
    if not path.exists():
        pytest.skip(f"{ui} not present")
    root = ET.parse(path).getroot()
    widgets = ui_widgets(path)
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.findtext("class") == top.get("name")
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectNames"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom_used = {cls for cls in widgets.values() if cls not in QT_CLASSES}
    assert custom_used <= declared, f"undeclared custom widgets: {sorted(custom_used - declared)}"
    for conn in root.iter("connection"):
        assert conn.findtext("sender") in widgets and conn.findtext("receiver") in widgets
    # MRML widgets get the scene through the top widget's mrmlSceneChanged signal
    mrml = {n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget",
                                                   "qMRMLSegmentSelectorWidget", "qMRMLSubjectHierarchyTreeView")}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml <= connected, f"MRML widgets without setMRMLScene connection: {sorted(mrml - connected)}"


def test_main_panel_has_the_required_controls():
    widgets = ui_widgets(UI_DIR / "SpineInpaint.ui")
    required = {"inputVolumeSelector": "qMRMLNodeComboBox", "landmarkPlaceWidget": "qSlicerMarkupsPlaceWidget",
                "discCentersSelector": "qMRMLNodeComboBox", "levelComboBox": "QComboBox",
                "pathologyComboBox": "QComboBox", "severityComboBox": "QComboBox", "methodComboBox": "QComboBox",
                "samplesSpinBox": "QSpinBox", "seedSpinBox": "QSpinBox", "sigmaSpinBox": "QDoubleSpinBox",
                "guidanceSpinBox": "QDoubleSpinBox",
                "stepsSpinBox": "QSpinBox", "deviceComboBox": "QComboBox", "modelComboBox": "QComboBox",
                "applyButton": "QPushButton", "cancelButton": "QPushButton", "progressBar": "QProgressBar",
                "statusLabel": "QLabel", "remoteCollapsibleButton": "ctkCollapsibleButton",
                "remoteUrlLineEdit": "QLineEdit", "remoteTokenLineEdit": "QLineEdit"}
    for name, cls in required.items():
        assert widgets.get(name) == cls, (name, widgets.get(name))
    root = ET.parse(UI_DIR / "SpineInpaint.ui").getroot()
    token = next(w for w in root.iter("widget") if w.get("name") == "remoteTokenLineEdit")
    assert token.find("property[@name='echoMode']/enum").text == "QLineEdit::Password"
    levels = [i.findtext("property/string") for w in root.iter("widget") if w.get("name") == "levelComboBox"
              for i in w.findall("item")]
    from spine_ldm.conditions import LEVELS

    assert tuple(levels) == LEVELS
    def items(name):
        return [i.findtext("property/string") for w in root.iter("widget") if w.get("name") == name
                for i in w.findall("item")]

    sys.path.insert(0, str(MODULE_DIR))
    from SpineInpaintLib.parameters import DEVICES, METHOD_LABELS, METHODS, PATHOLOGY_LABELS

    # SpineInpaint.py maps combo indices to these keys: the .ui order must match
    code = (MODULE_DIR / "SpineInpaint.py").read_text()
    keys = eval(re.search(r"^PATHOLOGY_KEYS = (\([^)]*\))", code, re.M).group(1))
    assert items("pathologyComboBox") == [PATHOLOGY_LABELS[k] for k in keys]
    assert items("methodComboBox") == [METHOD_LABELS[m] for m in METHODS]
    assert tuple(items("deviceComboBox")) == DEVICES


def _cmake_tokens(text: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", text)
    return re.findall(r"[\w${}./*-]+\.(?:py|ui|png|json|txt|yaml|pt|svg|\*)\b|[\w${}./-]+/\*", text)


def _expand(token: str, module_name: str) -> str:
    return token.replace("${MODULE_NAME}", module_name)


def test_module_cmakelists_lists_existing_files_and_ships_everything():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    module_name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    assert module_name == "SpineInpaint"
    assert "slicerMacroBuildScriptedModule(" in text and "NAME SpineInpaintRating" in text
    listed, globs = set(), []
    for tok in _cmake_tokens(text):
        path = _expand(tok, module_name)
        if "*" in path:
            globs.append(path)
            continue
        listed.add(path)
        assert (MODULE_DIR / path).is_file(), f"CMakeLists names a missing file: {path}"
    for pattern in globs:
        if pattern.startswith("Resources/Models/"):
            continue  # demo weights may not be trained yet
        matches = [p for p in MODULE_DIR.rglob("*") if p.is_file() and
                   fnmatch.fnmatch(p.relative_to(MODULE_DIR).as_posix(), pattern)]
        assert matches, f"glob {pattern} matches nothing"
    # every Python file of the Slicer glue is listed explicitly (files of spine_ldm come from the glob)
    for py in sorted((MODULE_DIR / "SpineInpaintLib").glob("*.py")):
        assert f"SpineInpaintLib/{py.name}" in listed, f"{py.name} is not in SpineInpaint/CMakeLists.txt"
    assert "SpineInpaint.py" in listed and "SpineInpaintRating.py" in listed
    assert "spine_ldm/*.py" in globs
    for required in ("Resources/UI/SpineInpaint.ui", "Resources/UI/SpineInpaintRating.ui",
                     "Resources/Icons/SpineInpaint.png", "Resources/Models.json", "Resources/requirements.txt"):
        assert required in listed, required
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_reader_study_module_files_exist():
    for rel in ("SpineInpaintRating.py", "Resources/UI/SpineInpaintRating.ui", "SpineInpaintLib/rating.py"):
        assert (MODULE_DIR / rel).is_file(), rel


def test_top_level_cmakelists_is_a_slicer_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text)
    assert depends and "PyTorch" in depends.group(1).split()
    assert re.search(r"^add_subdirectory\(SpineInpaint\)$", text, re.M)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert f"set({key} " in text, key
    assert re.search(r"^find_package\(Slicer [\d.]+ REQUIRED\)", text, re.M) and "${Slicer_EXTENSION_CPACK}" in text
    # icon / screenshot URLs and the catalog entry: Testing/test_extension_index.py
    assert (REPO / "Resources" / "Icons" / "SpineInpaint.png").is_file()
    png = (MODULE_DIR / "Resources" / "Icons" / "SpineInpaint.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


IMPORT_CHECK = r'''
import sys, types
sys.path.insert(0, {module_dir!r}); sys.path.insert(0, {testing_dir!r})
import fake_slicer_gui
fake_slicer_gui.install()  # Qt, slicer.app, ScriptedLoadableModule, parameterNodeWrapper: the tests' fakes
import slicer
scene = slicer.vtkMRMLScene()
app = slicer.vtkSlicerApplicationLogic(); app.SetMRMLScene(scene); slicer.mrmlScene = scene
import SpineInpaint as m
parent = types.SimpleNamespace()
mod = m.SpineInpaint(parent)
assert parent.title == "SpineInpaint" and "Hansen" in parent.helpText and "5.10 or later" in parent.helpText
for name in ("SpineInpaintWidget", "SpineInpaintLogic", "SpineInpaintTest", "SpineInpaintParameterNode"):
    assert hasattr(m, name), name
assert issubclass(m.SpineInpaintTest, __import__("unittest").TestCase)
bad = [x for x in ("torch", "monai", "ctk", "fastapi") if x in sys.modules]
assert not bad, bad
logic = m.SpineInpaintLogic()
assert logic.scene is scene and callable(logic.run) and callable(logic.start)
node = logic.getParameterNode()
assert node.samples == 1 and node.inputVolume is None
print("ok")
'''


def test_module_imports_without_torch_or_the_gui():
    """SpineInpaint.py imports with nothing but Slicer (torch and the backend are only in the backend process)."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = IMPORT_CHECK.format(module_dir=str(MODULE_DIR), testing_dir=str(REPO / "Testing"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
