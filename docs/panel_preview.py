"""Render the SpineInpaint panel's layout (``SpineInpaint/Resources/UI/SpineInpaint.ui``) offscreen, as the extension
screenshot ``Resources/Screenshots/SpineInpaint-panel.png``.

No Slicer needed: the Slicer / CTK widgets are swapped for plain Qt stand-ins (``ctkCollapsibleButton`` -> a titled
``QGroupBox``, ``qMRMLNodeComboBox`` -> ``QComboBox``, ``qSlicerMarkupsPlaceWidget`` -> a "Place" button) and the
panel is filled with a typical case (the synthetic phantom, a small disc herniation at L4-L5). What you see is
the real ``.ui`` file's widgets, order, labels and tooltips; colours and fonts are plain Qt's, not Slicer's style.

Needs PySide6 (``pip install PySide6-Essentials`` in any Python; not a project dependency)::

    QT_QPA_PLATFORM=offscreen python docs/panel_preview.py [--out Resources/Screenshots/SpineInpaint-panel.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI = REPO / "SpineInpaint" / "Resources" / "UI" / "SpineInpaint.ui"
STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox", "qMRMLWidget": "QWidget",
             "qSlicerWidget": "QWidget", "qSlicerMarkupsPlaceWidget": "QPushButton"}


def plain_qt_ui(path: Path) -> str:
    """The .ui text with Slicer / CTK classes replaced by Qt stand-ins (a collapsible button's text -> a title)."""
    root = ET.parse(path).getroot()
    for w in root.iter("widget"):
        cls = w.get("class")
        if cls == "ctkCollapsibleButton":
            for prop in w.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
                elif prop.get("name") == "collapsed":  # collapsed: a checkable group box, unchecked, contents hidden
                    w.remove(prop)  # applied after loading: collapsed_names
                elif prop.get("name") == "collapsedHeight":
                    w.remove(prop)
        if cls == "qSlicerMarkupsPlaceWidget":
            for prop in list(w.findall("property")):
                w.remove(prop)
            ET.SubElement(ET.SubElement(w, "property", name="text"), "string").text = "Place"
        if cls in STAND_INS:
            w.set("class", STAND_INS[cls])
        for prop in list(w.findall("property")):  # dynamic Slicer properties the stand-ins do not have
            if prop.get("name") in ("nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
                                    "renameEnabled", "editEnabled", "selectNodeUponCreation", "baseName",
                                    "SlicerParameterName", "placeMultipleMarkups", "buttonsVisible",
                                    "deleteAllControlPointsOptionVisible", "currentNodeID"):
                w.remove(prop)
    cw = root.find("customwidgets")
    if cw is not None:
        root.remove(cw)
    for conn in root.findall("connections"):
        root.remove(conn)
    return ET.tostring(root, encoding="unicode")


def collapsed_names(path: Path) -> list[str]:
    """Names of the collapsible buttons the .ui starts collapsed."""
    return [w.get("name") for w in ET.parse(path).getroot().iter("widget")
            if w.get("class") == "ctkCollapsibleButton" and any(
                p.get("name") == "collapsed" and p.findtext("bool") == "true" for p in w.findall("property"))]


def fill(panel) -> None:
    """A typical case: the synthetic phantom, its landmark and disc centres, a small herniation at L4-L5 (a widget
    the .ui no longer has is an error: the preview must follow the panel)."""
    from PySide6 import QtWidgets as W

    def get(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise SystemExit(f"{UI.name} has no {cls.__name__} {name!r}: update docs/panel_preview.py")
        return widget

    for name in collapsed_names(UI):  # as Slicer shows a collapsed ctkCollapsibleButton: the title bar only
        box = get(W.QGroupBox, name)
        for child in box.findChildren(W.QWidget):
            child.hide()
        box.setFixedHeight(24)
    for name, text in (("inputVolumeSelector", "SpinePhantom"), ("landmarkSelector", "SpinePhantom landmark"),
                       ("discCentersSelector", "SpinePhantom disc centres"),
                       ("modelComboBox", "default (demo-small-weighted-dh)")):
        get(W.QComboBox, name).addItem(text)
    sev = get(W.QComboBox, "severityComboBox")
    if sev.count() == 0:  # the module fills it per pathology
        sev.addItems(["moderate/large", "small"])
    sev.setCurrentText("small")
    get(W.QComboBox, "levelComboBox").setCurrentText("L4-L5")
    get(W.QSpinBox, "seedSpinBox").setValue(7)
    done = "Done: 1 volume(s) in 5 s"
    for name, text in (("levelSuggestionLabel", "Nearest disc centre: L4-L5 (7.5 mm from the landmark)"),
                       ("modelStatusLabel", "Default for this case: demo-small-weighted-dh"),
                       ("deviceInfoLabel", "running on CPU, expect ~5 s"), ("statusLabel", done)):
        get(W.QLabel, name).setText(text)
    get(W.QPushButton, "landmarkPlaceWidget").hide()  # the module hides it (placeLandmarkButton places)
    for name, enabled in (("applyButton", True), ("showCompareButton", True), ("cancelButton", False)):
        get(W.QPushButton, name).setEnabled(enabled)
    bar = get(W.QProgressBar, "progressBar")
    bar.setValue(100)
    bar.setFormat(done)
    panel.findChild(W.QPlainTextEdit).setPlainText(
        "dh_small at L4-L5 (suggested), landmark RAS (0.5, -31.7, -51.7), methods weighted, 1 sample(s), seed 7, "
        "50 steps, the model's sigma, the model's guidance on warm local backend\nrun 1/1: weighted\n" + done)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "Resources" / "Screenshots" / "SpineInpaint-panel.png"))
    ap.add_argument("--width", type=int, default=430)
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as tmp:
        ui_path = Path(tmp) / "panel.ui"
        ui_path.write_text(plain_qt_ui(UI))
        f = QtCore.QFile(str(ui_path))
        f.open(QtCore.QIODevice.ReadOnly)
        panel = QtUiTools.QUiLoader().load(f)
        f.close()
    if panel is None:
        raise SystemExit(f"could not load {UI}")
    fill(panel)
    panel.resize(args.width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    panel.resize(args.width, panel.sizeHint().height())
    app.processEvents()
    if not panel.grab().save(args.out):
        raise SystemExit(f"could not write {args.out}")
    print(f"wrote {args.out} ({panel.width()} x {panel.height()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
