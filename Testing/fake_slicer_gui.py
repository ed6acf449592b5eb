"""Fakes of the GUI-only parts of 3D Slicer, so the module files run under headless ``slicer-core``.

slicer-core has MRML (scenes, nodes, storage) but no Qt, no ``slicer.app``, no ``ScriptedLoadableModule``, no
``parameterNodeWrapper`` and no ``slicer.i18n``. The production module files import those unconditionally; the
tests install these stand-ins instead (the module files hold no fallbacks). Each fake follows the documented
behaviour of the real piece closely enough for the widget code paths:

- ``FakeWidget``: the Qt / MRML widgets of a ``.ui`` file (properties, string signals, combo items, dynamic
  properties such as ``SlicerParameterName``), built from the ``.ui`` XML itself.
- ``parameterNodeWrapper``: typed fields stored in a ``vtkMRMLScriptedModuleNode`` the way Slicer's serializers do
  (numbers and strings as parameters, bools as ``"True"`` / ``"False"``, nodes as node references), validators
  (``Choice``, ``WithinRange``, ``Minimum``), ``connectGui`` binding widgets by their ``SlicerParameterName``
  property in both directions (the node's ModifiedEvent writes every bound widget).
- ``ScriptedLoadableModuleLogic.getParameterNode``: the singleton parameter node of the module.
"""
from __future__ import annotations

import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"


# ---------------------------------------------------------------------------------------------- widgets
class FakeWidget:
    """Stand-in for a Qt / MRML widget: properties, signals (by signature string), items, node selection."""

    def __init__(self, name, cls, items=(), properties=None):
        self.name, self.cls = name, cls
        self._slots, self._blocked = {}, False
        self._text, self.toolTip, self.enabled, self.visible = "", "", True, True
        self.buttonsVisible, self.placeMultipleMarkups, self.placeModeEnabled = True, None, False
        self._checked, self._value, self._node = False, 0, None
        self._items = [[t, None, None] for t in items]
        self._index = 0 if self._items else -1
        self.lines, self.format, self.range = [], "", (0, 100)
        self._properties = dict(properties or {})
        self.focusPolicy, self.hasFocus = None, False

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        if slot in self._slots.get(signal, []):
            self._slots[signal].remove(slot)

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args)

    def click(self):
        self.emit("clicked(bool)", False)

    def blockSignals(self, b):
        old, self._blocked = self._blocked, b
        return old

    def _set(self, attr, v, signal):
        if getattr(self, attr) != v:
            setattr(self, attr, v)
            self.emit(signal, v)

    checked = property(lambda self: self._checked, lambda self, v: self._set("_checked", bool(v), "toggled(bool)"))
    text = property(lambda self: self._text, lambda self, v: self._set("_text", str(v), "textChanged(QString)"))

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        self._set("_value", v, "valueChanged(double)" if self.cls == "QDoubleSpinBox" else "valueChanged(int)")

    # combo boxes
    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, i):
        self._set("_index", int(i), "currentIndexChanged(int)")

    @property
    def count(self):
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self._index][1] if 0 <= self._index < len(self._items) else None

    @property
    def currentText(self):
        return self._items[self._index][0] if 0 <= self._index < len(self._items) else ""

    def itemTexts(self):
        return [it[0] for it in self._items]

    def addItem(self, text, data=None):
        self._items.append([text, data, None])
        if self._index < 0:
            self.currentIndex = 0

    def findData(self, data):
        return next((i for i, it in enumerate(self._items) if it[1] == data), -1)

    def setItemData(self, i, value, role):
        self._items[i][2] = value

    def clear(self):
        if self.cls == "QPlainTextEdit":
            self.lines = []
            return
        self._items = []
        self.currentIndex = -1

    # node selectors, place widgets
    def setMRMLScene(self, scene):
        pass

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentNode(self):
        return self._node

    def placeButton(self):
        if not hasattr(self, "_placeButton"):
            self._placeButton = FakeWidget(self.name + "Place", "QToolButton")
        return self._placeButton

    def setPlaceModeEnabled(self, on):
        self.placeModeEnabled = bool(on)

    # progress, log, focus
    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setRange(self, a, b):
        self.range = (a, b)

    def setFormat(self, f):
        self.format = f

    def appendPlainText(self, t):
        self.lines.append(t)

    def toPlainText(self):
        return "\n".join(self.lines)

    def setFocusPolicy(self, policy):
        self.focusPolicy = policy

    def setFocus(self):
        self.hasFocus = True

    def property(self, name):  # Qt's QObject.property (last: the name shadows the builtin in the class body)
        return self._properties.get(name)


def widgetsFromUi(ui_path) -> types.SimpleNamespace:
    """Every widget of a Qt Designer file as a FakeWidget, with its items, initial values and dynamic properties."""
    root = ET.parse(ui_path).getroot()
    ui = types.SimpleNamespace()
    for w in root.iter("widget"):
        items = [i.findtext("property/string") for i in w.findall("item")]
        props = {p.get("name"): p.findtext("string") for p in w.findall("property") if p.get("stdset") == "0"}
        widget = FakeWidget(w.get("name"), w.get("class"), items, props)
        for prop in w.findall("property"):
            name = prop.get("name")
            if prop.find("bool") is not None and name in ("checked", "enabled"):
                setattr(widget, "_checked" if name == "checked" else "enabled", prop.findtext("bool") == "true")
            for kind in ("number", "double"):
                if prop.find(kind) is not None and name == "value":
                    widget._value = float(prop.findtext(kind)) if kind == "double" else int(prop.findtext(kind))
            if name == "text" and prop.find("string") is not None:
                widget._text = prop.findtext("string") or ""
        setattr(ui, w.get("name"), widget)
    return ui


# ---------------------------------------------------------------------------------------------- qt
class QTimer:
    def __init__(self):
        self.active = False
        self.slot = None

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(ms, fn):
        pass


class QShortcut:
    created: list = []

    def __init__(self, keySequence, parent):
        self.key, self.parent, self.context, self._slots = keySequence, parent, None, []
        QShortcut.created.append(self)

    def setContext(self, context):
        self.context = context

    def connect(self, signal, slot):
        self._slots.append(slot)

    def activate(self):
        """What Qt does when the key is pressed and the shortcut's context holds."""
        for slot in self._slots:
            slot()

    def setParent(self, parent):
        self.parent = parent

    def deleteLater(self):
        pass


class QFileDialog:
    nextPath = ""

    @staticmethod
    def getOpenFileName(*args):
        return QFileDialog.nextPath


class QApplication:
    """The override-cursor stack (``slicer.util.WaitCursor``): ``cursors`` is what is set now."""
    cursors: list = []

    @classmethod
    def setOverrideCursor(cls, cursor):
        cls.cursors.append(cursor)

    @classmethod
    def restoreOverrideCursor(cls):
        cls.cursors.pop()


def fakeQt():
    qt = types.ModuleType("qt")
    qt.QTimer, qt.QShortcut, qt.QFileDialog = QTimer, QShortcut, QFileDialog
    qt.QApplication = type("QApplication", (QApplication,), {"cursors": []})  # a fresh stack per install
    qt.QKeySequence = lambda key: key
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, StrongFocus=11, WidgetShortcut=0, WindowShortcut=1,
                                  ApplicationShortcut=2, WidgetWithChildrenShortcut=3, WaitCursor=3)
    return qt


# ---------------------------------------------------------------------------------------------- parameterNodeWrapper
class Choice:
    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


def _isNodeType(t) -> bool:
    import slicer

    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


class _Field:
    def __init__(self, name, hint, cls):
        if typing.get_origin(hint) is typing.Annotated:
            self.type, self.validators = typing.get_args(hint)[0], typing.get_args(hint)[1:]
        else:
            self.type, self.validators = hint, ()
        self.name = name
        self.isNode = _isNodeType(self.type)
        self.default = getattr(cls, name) if hasattr(cls, name) else (None if self.isNode else self.type())

    def read(self, node):
        if self.isNode:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)

    def write(self, node, value):
        if self.isNode:
            if value is not None and not isinstance(value, self.type):
                raise ValueError(f"{self.name} must be a {self.type.__name__}")
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
            return
        if value is None or not isinstance(value, (int, float) if self.type is float else self.type):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        for v in self.validators:
            v.validate(value)
        node.SetParameter(self.name, ("True" if value else "False") if self.type is bool else str(value))


class _Connector:
    """Widget <-> value for the widget classes the panel binds (as Slicer's GuiConnectors do)."""

    def __init__(self, widget, field):
        self.widget, self.field = widget, field
        choice = next((v for v in field.validators if isinstance(v, Choice)), None)
        if widget.cls == "QComboBox":
            if choice is None:
                raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
            self.choices = choice.choices
            widget._items = [[str(c), None, None] for c in self.choices]
        self.signal = {"qMRMLNodeComboBox": "currentNodeChanged(vtkMRMLNode*)", "QComboBox": "currentIndexChanged(int)",
                       "QSpinBox": "valueChanged(int)", "QDoubleSpinBox": "valueChanged(double)",
                       "QCheckBox": "toggled(bool)", "QLineEdit": "textChanged(QString)"}[widget.cls]

    def read(self):
        w = self.widget
        return {"qMRMLNodeComboBox": lambda: w.currentNode(), "QComboBox": lambda: self.choices[w.currentIndex],
                "QSpinBox": lambda: int(w.value), "QDoubleSpinBox": lambda: float(w.value),
                "QCheckBox": lambda: w.checked, "QLineEdit": lambda: w.text}[w.cls]()

    def write(self, value):
        w = self.widget
        if w.cls == "qMRMLNodeComboBox":
            w.setCurrentNode(value)
        elif w.cls == "QComboBox":
            w.currentIndex = self.choices.index(value)
        elif w.cls in ("QSpinBox", "QDoubleSpinBox"):
            w.value = value
        elif w.cls == "QCheckBox":
            w.checked = value
        else:
            w.text = value


def parameterNodeWrapper(cls):
    import vtk

    fieldList = {name: _Field(name, hint, cls) for name, hint in typing.get_type_hints(cls, include_extras=True).items()}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guis, self._nextTag, self._updating = {}, 0, False
        for f in fieldList.values():
            if not parameterNode.HasParameter(f.name):
                f.write(parameterNode, f.default)

    def makeProperty(f):
        return property(lambda self: f.read(self.parameterNode), lambda self, v: f.write(self.parameterNode, v))

    def connectGui(self, gui):
        connectors = [_Connector(w, fieldList[w.property("SlicerParameterName")]) for w in vars(gui).values()
                      if isinstance(w, FakeWidget) and w.property("SlicerParameterName")]

        def toGui(*args):
            if self._updating:
                return
            self._updating = True
            try:
                for c in connectors:
                    c.write(c.field.read(self.parameterNode))
            finally:
                self._updating = False

        def fromGui(c):
            def slot(*args):
                if not self._updating:
                    c.field.write(self.parameterNode, c.read())
            return slot

        slots = [(c, fromGui(c)) for c in connectors]
        toGui()
        for c, slot in slots:
            c.widget.connect(c.signal, slot)
        tag = self._nextTag
        self._nextTag += 1
        self._guis[tag] = (slots, self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, toGui))
        return tag

    def disconnectGui(self, tag):
        slots, observer = self._guis.pop(tag, ([], None))
        for c, slot in slots:
            c.widget.disconnect(c.signal, slot)
        if observer is not None:
            self.parameterNode.RemoveObserver(observer)

    members = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
               "allParameters": fieldList,
               "StartModify": lambda self: self.parameterNode.StartModify(),
               "EndModify": lambda self, was: self.parameterNode.EndModify(was),
               "AddObserver": lambda self, e, cb, p=0.0: self.parameterNode.AddObserver(e, cb, p),
               "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
               "Modified": lambda self: self.parameterNode.Modified()}
    for name, f in fieldList.items():
        setattr(cls, name, makeProperty(f))
    for name, member in members.items():
        setattr(cls, name, member)
    return cls


def fakeParameterNodeWrapper():
    m = types.ModuleType("slicer.parameterNodeWrapper")
    m.parameterNodeWrapper, m.Choice, m.WithinRange, m.Minimum = parameterNodeWrapper, Choice, WithinRange, Minimum
    return m


# ---------------------------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent

    def setup(self):
        self.layout = types.SimpleNamespace(addWidget=lambda w: None)

    def resourcePath(self, rel):
        return str(MODULE_DIR / "Resources" / rel)


class ScriptedLoadableModuleLogic:
    def __init__(self):
        name = type(self).__name__
        self.moduleName = name[:-5] if name.endswith("Logic") else name

    def getParameterNode(self):
        """The module's singleton ``vtkMRMLScriptedModuleNode`` (created when missing)."""
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        self.displayed = getattr(self, "displayed", []) + [message]


def fakeScriptedLoadableModule():
    m = types.ModuleType("slicer.ScriptedLoadableModule")
    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(m, c.__name__, c)
    return m


class FakeApp:
    def __init__(self):
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def processEvents(self):
        pass

    def layoutManager(self):
        return None


# ---------------------------------------------------------------------------------------------- install
def install(monkeypatch=None, ui_file=None):
    """Install the fakes (undone by ``monkeypatch`` at the end of the test; permanently without one, e.g. in a
    subprocess). Returns ``(ui, errors)``: the fake widgets of ``ui_file`` and the messages
    ``slicer.util.errorDisplay`` received."""
    import slicer
    import slicer.util

    if monkeypatch is not None:
        setitem = monkeypatch.setitem

        def setattr_(obj, name, value):
            monkeypatch.setattr(obj, name, value, raising=False)
    else:
        def setitem(mapping, key, value):
            mapping[key] = value

        setattr_ = setattr

    qt = fakeQt()
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    slm, pnw = fakeScriptedLoadableModule(), fakeParameterNodeWrapper()
    for name, module in (("qt", qt), ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw),
                         ("slicer.i18n", i18n)):
        setitem(sys.modules, name, module)
    setattr_(slicer, "ScriptedLoadableModule", slm)
    setattr_(slicer, "parameterNodeWrapper", pnw)
    setattr_(slicer, "i18n", i18n)
    setattr_(slicer, "app", FakeApp())
    setattr_(slicer, "qSlicerMarkupsPlaceWidget",
             types.SimpleNamespace(ForcePlaceSingleMarkup=1, ShowPlaceMultipleMarkupsOption=0))
    ui = widgetsFromUi(ui_file) if ui_file else types.SimpleNamespace()
    errors = []
    setattr_(slicer.util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None))
    setattr_(slicer.util, "childWidgetVariables", lambda w: ui)
    setattr_(slicer.util, "errorDisplay", lambda msg, *a, **k: errors.append(msg))
    setattr_(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True)
    setattr_(slicer.util, "startupEnvironment", lambda: dict(__import__("os").environ))
    setattr_(slicer.util, "setSliceViewerLayers", lambda *a, **k: None)
    markupsLogic = types.SimpleNamespace(JumpSlicesToLocation=lambda *a: None)
    setattr_(slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: markupsLogic)))
    return ui, errors
