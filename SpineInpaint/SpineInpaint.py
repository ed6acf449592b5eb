"""SpineInpaint: inpaint lumbar-spine pathology (disc herniation, central canal stenosis) into sagittal T2 MRI.

Thin 3D Slicer module (Module / Widget / Logic / Test). All logic lives in ``SpineInpaintLib`` (plain functions and
classes, testable without the GUI); the diffusion model runs in a separate backend process (``spine-ldm``) or on a
remote server, never in the Slicer process.
"""
import logging
import os
import tempfile
import unittest

import slicer

try:  # GUI-only pieces: absent under headless slicer-core (tests import this file there)
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    GUI_AVAILABLE = hasattr(slicer, "app")
except ImportError:  # pragma: no cover - exercised by Testing/test_module_static.py
    qt = None
    GUI_AVAILABLE = False

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    class VTKObservationMixin:
        def __init__(self):
            pass

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4 or slicer-core
    def _(text):
        return text

from SpineInpaintLib import dependencies, layout, models
from SpineInpaintLib.level import suggestLevelFromMarkups
from SpineInpaintLib.logic import InpaintLogic, defaultRegistryPath
from SpineInpaintLib.parameters import (DEVICES, METHOD_LABELS, METHODS, REF_DISC_CENTERS,
                                        REF_INPUT, REF_LANDMARK, SEVERITY_LABELS, InpaintParameters,
                                        conditionFromPathologySeverity, getNodeReference, getParameterNode,
                                        pathologySeverityFromCondition, setNodeReference)

PATHOLOGY_KEYS = ("dh", "ccs", "none")  # order of pathologyComboBox items in the .ui
LEVEL_ITEMS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")  # order of levelComboBox items
POLL_INTERVAL_MS = 100


#
# SpineInpaint
#
class SpineInpaint(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SpineInpaint")
        self.parent.categories = ["Spine"]  # same category as SpineInpaintRating
        self.parent.dependencies = []
        self.parent.contributors = ["SpineInpaint developers"]
        self.parent.helpText = _(
            "Inpaint a disc herniation or a central canal stenosis at a landmark into a sagittal T2 MRI of the "
            "lumbar spine with a latent diffusion model whose per-voxel noise level follows a Gaussian weight "
            "around the landmark (Hansen et al.).<br><br>"
            "1. Select the T2 volume. 2. Place the landmark with one click. 3. Optionally place the disc centre (or "
            "labelled disc centres: the level is then suggested). 4. Choose level, pathology, severity. 5. Apply.<br>"
            "Each sample becomes a new volume named '&lt;input&gt; &lt;condition&gt; &lt;level&gt; &lt;method&gt; "
            "#k' with provenance in its node attributes (SpineInpaint.*); the input is never modified. "
            "Results are synthetic: for research, education and reader studies, not for diagnosis.")
        self.parent.acknowledgementText = _(
            "Method: Hansen et al., Gaussian-weighted latent diffusion inpainting of lumbar spine pathology. "
            "Module structure follows SlicerNNUnet and SlicerMONAIAuto3DSeg.")


#
# SpineInpaintWidget
#
class SpineInpaintWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: collects parameters into the parameter node, starts/cancels ``InpaintJob``s, shows results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.lastResults = []
        self.lastLabels = []
        self.lastLandmarkRas = None
        self._parameterNode = None
        self._updatingGUI = False
        self._observedMarkups = []
        self._models = []
        self._remoteModels = None  # models of the remote server, after "Test connection"
        self._deviceProbe = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineInpaint.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineInpaintLogic()

        for placeWidget in (self.ui.landmarkPlaceWidget, self.ui.discCentersPlaceWidget):
            placeWidget.setMRMLScene(slicer.mrmlScene)
            placeWidget.buttonsVisible = False
            placeWidget.placeButton().show()
        self.ui.landmarkPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.discCentersPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ShowPlaceMultipleMarkupsOption
        placeSignal = "activeMarkupsPlaceModeChanged(bool)" if hasattr(
            self.ui.landmarkPlaceWidget, "activeMarkupsPlaceModeChanged") else "activeMarkupsFiducialPlaceModeChanged(bool)"
        self.ui.landmarkPlaceWidget.connect(placeSignal, self.onLandmarkPlaceModeChanged)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        # GUI -> parameter node
        for selector in (self.ui.inputVolumeSelector, self.ui.landmarkSelector, self.ui.discCentersSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onNodeSelectionChanged)
        for combo in (self.ui.levelComboBox, self.ui.severityComboBox, self.ui.deviceComboBox,
                      self.ui.modelComboBox):
            combo.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.pathologyComboBox.connect("currentIndexChanged(int)", self.onPathologyChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        for box in (self.ui.levelAutoCheckBox, self.ui.compareMethodsCheckBox, self.ui.remoteCheckBox):
            box.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        for spin in (self.ui.samplesSpinBox, self.ui.seedSpinBox, self.ui.stepsSpinBox, self.ui.sigmaSpinBox):
            spin.connect("valueChanged(double)" if spin is self.ui.sigmaSpinBox else "valueChanged(int)",
                         self.updateParameterNodeFromGUI)
        for edit in (self.ui.remoteUrlLineEdit, self.ui.remoteTokenFileLineEdit):
            edit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.levelAutoCheckBox.connect("toggled(bool)", self.updateLevelSuggestion)
        self.ui.remoteCheckBox.connect("toggled(bool)", self.onRemoteToggled)

        # buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.remoteTestButton.connect("clicked(bool)", self.onRemoteTestButton)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        self.ui.showCompareButton.connect("clicked(bool)", self.onShowCompareButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()
        self.populateSeverity("dh")
        self.refreshModels()
        self.initializeParameterNode()
        self.startDeviceProbe()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        self.pollTimer.stop()
        for node, tag in self._observedMarkups:
            node.RemoveObserver(tag)
        self._observedMarkups = []
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onReload(self):
        """Developer "Reload": also reload SpineInpaintLib (dependency order), not just this file."""
        import importlib
        import sys

        import SpineInpaintLib

        if self.job is not None:
            self.job.cancel()
        for name in SpineInpaintLib.SUBMODULES:
            module = sys.modules.get(f"SpineInpaintLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        if self.job is not None and self.job.state == "running":
            self.job.cancel()
            self.finishRun()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        self._parameterNode = getParameterNode(slicer.mrmlScene)
        if getNodeReference(self._parameterNode, REF_INPUT) is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                setNodeReference(self._parameterNode, REF_INPUT, first)
        if getNodeReference(self._parameterNode, REF_LANDMARK) is None:  # ready for a one-click placement
            landmark = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                          slicer.mrmlScene.GenerateUniqueName("Landmark"))
            setNodeReference(self._parameterNode, REF_LANDMARK, landmark)
        self.updateGUIFromParameterNode()

    def currentParameters(self) -> InpaintParameters:
        return InpaintParameters.loadFromNode(self._parameterNode)

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self.currentParameters()
            self.ui.inputVolumeSelector.setCurrentNode(getNodeReference(self._parameterNode, REF_INPUT))
            self.ui.landmarkSelector.setCurrentNode(getNodeReference(self._parameterNode, REF_LANDMARK))
            self.ui.discCentersSelector.setCurrentNode(getNodeReference(self._parameterNode, REF_DISC_CENTERS))
            self.ui.landmarkPlaceWidget.setCurrentNode(self.ui.landmarkSelector.currentNode())
            self.ui.discCentersPlaceWidget.setCurrentNode(self.ui.discCentersSelector.currentNode())
            if p.level in LEVEL_ITEMS:
                self.ui.levelComboBox.currentIndex = LEVEL_ITEMS.index(p.level)
            self.ui.levelAutoCheckBox.checked = p.levelAuto
            pathology, severity = pathologySeverityFromCondition(p.condition)
            self.ui.pathologyComboBox.currentIndex = PATHOLOGY_KEYS.index(pathology)
            self.populateSeverity(pathology, severity)
            self.ui.methodComboBox.currentIndex = METHODS.index(p.method) if p.method in METHODS else 0
            self.ui.compareMethodsCheckBox.checked = p.compareMethods
            self.populateModels(p.method, p.model)
            self.ui.samplesSpinBox.value = p.samples
            self.ui.seedSpinBox.value = p.seed
            self.ui.sigmaSpinBox.value = p.sigmaMm
            self.ui.stepsSpinBox.value = p.steps
            self.ui.deviceComboBox.currentIndex = DEVICES.index(p.device) if p.device in DEVICES else 0
            self.ui.remoteCheckBox.checked = p.backend == "remote"
            self.ui.remoteUrlLineEdit.text = p.remoteUrl
            self.ui.remoteTokenFileLineEdit.text = p.remoteTokenFile
        finally:
            self._updatingGUI = False
        self.observeMarkups()
        self.updateLevelSuggestion()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        previous = self.currentParameters()
        pathology = PATHOLOGY_KEYS[max(0, self.ui.pathologyComboBox.currentIndex)]
        try:
            condition = conditionFromPathologySeverity(pathology, self.ui.severityComboBox.currentData or "")
        except ValueError:  # severity list being repopulated
            condition = previous.condition
        p = InpaintParameters(
            level=LEVEL_ITEMS[max(0, self.ui.levelComboBox.currentIndex)],
            condition=condition,
            method=METHODS[max(0, self.ui.methodComboBox.currentIndex)],
            samples=self.ui.samplesSpinBox.value, seed=self.ui.seedSpinBox.value,
            sigmaMm=self.ui.sigmaSpinBox.value, steps=self.ui.stepsSpinBox.value,
            device=DEVICES[max(0, self.ui.deviceComboBox.currentIndex)],
            model=self.ui.modelComboBox.currentData or "",
            levelAuto=self.ui.levelAutoCheckBox.checked, compareMethods=self.ui.compareMethodsCheckBox.checked,
            backend="remote" if self.ui.remoteCheckBox.checked else "local",
            remoteUrl=self.ui.remoteUrlLineEdit.text.strip(), remoteTokenFile=self.ui.remoteTokenFileLineEdit.text.strip(),
            registry=previous.registry)
        p.saveToNode(self._parameterNode)
        self.updateDeviceLabel()
        self.updateButtons()

    def onNodeSelectionChanged(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        setNodeReference(self._parameterNode, REF_INPUT, self.ui.inputVolumeSelector.currentNode())
        setNodeReference(self._parameterNode, REF_LANDMARK, self.ui.landmarkSelector.currentNode())
        setNodeReference(self._parameterNode, REF_DISC_CENTERS, self.ui.discCentersSelector.currentNode())
        self.ui.landmarkPlaceWidget.setCurrentNode(self.ui.landmarkSelector.currentNode())
        self.ui.discCentersPlaceWidget.setCurrentNode(self.ui.discCentersSelector.currentNode())
        self.observeMarkups()
        self.updateLevelSuggestion()
        self.updateButtons()

    # ------------------------------------------------------------------------------------------ markups
    def observeMarkups(self):
        for node, tag in self._observedMarkups:
            node.RemoveObserver(tag)
        self._observedMarkups = []
        for node in (self.ui.landmarkSelector.currentNode(), self.ui.discCentersSelector.currentNode()):
            if node is None:
                continue
            for event in ("PointPositionDefinedEvent", "PointModifiedEvent", "PointRemovedEvent",
                          "PointEndInteractionEvent"):
                eventId = getattr(slicer.vtkMRMLMarkupsNode, event, None)
                if eventId is not None:
                    self._observedMarkups.append((node, node.AddObserver(eventId, self.onMarkupsChanged)))

    def onMarkupsChanged(self, caller=None, event=None):
        self.updateLevelSuggestion()
        self.updateButtons()

    def onLandmarkPlaceModeChanged(self, active):
        """One click places the landmark: placing again replaces the previous point."""
        node = self.ui.landmarkSelector.currentNode()
        if active and node is not None and node.GetNumberOfControlPoints() > 0:
            node.RemoveAllControlPoints()

    def updateLevelSuggestion(self, *args):
        suggestion = suggestLevelFromMarkups(self.ui.landmarkSelector.currentNode(),
                                             self.ui.discCentersSelector.currentNode())
        if suggestion is None:
            self.ui.levelSuggestionLabel.text = ""
            return
        self.ui.levelSuggestionLabel.text = _("Nearest disc centre: {level} ({dist:.1f} mm from the landmark)").format(
            level=suggestion.level, dist=suggestion.distanceMm)
        if self.ui.levelAutoCheckBox.checked and suggestion.level in LEVEL_ITEMS:
            self.ui.levelComboBox.currentIndex = LEVEL_ITEMS.index(suggestion.level)

    # ------------------------------------------------------------------------------------------ combo boxes
    def onPathologyChanged(self, index):
        if not self._updatingGUI:
            self.populateSeverity(PATHOLOGY_KEYS[max(0, index)])
        self.updateParameterNodeFromGUI()

    def populateSeverity(self, pathology, current=""):
        from spine_ldm.conditions import PATHOLOGIES

        wasBlocked = self.ui.severityComboBox.blockSignals(True)
        self.ui.severityComboBox.clear()
        severities = list(reversed(PATHOLOGIES.get(pathology, ())))  # most severe first
        for s in severities:
            self.ui.severityComboBox.addItem(SEVERITY_LABELS.get(s, s), s)
        if current in severities:
            self.ui.severityComboBox.currentIndex = severities.index(current)
        self.ui.severityComboBox.enabled = bool(severities)
        self.ui.severityComboBox.blockSignals(wasBlocked)

    def onMethodChanged(self, index):
        if not self._updatingGUI:
            self.populateModels(METHODS[max(0, index)], "")
        self.updateParameterNodeFromGUI()

    def onRemoteToggled(self, *args):
        """Local and remote backends have their own model lists."""
        if not self._updatingGUI and self._parameterNode is not None:
            p = self.currentParameters()
            self.populateModels(p.method, p.model)

    def refreshModels(self):
        registry = self._parameterNode and self.currentParameters().registry or defaultRegistryPath()
        try:
            self._models = models.listModels(registry if os.path.exists(registry) else None)
        except Exception as e:
            self._models = []
            self.ui.modelStatusLabel.text = _("Model registry unreadable: {error}").format(error=e)

    def populateModels(self, method, current=""):
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("default ({model})").format(model=models.defaultModelFor(method)), "")
        remote = self.ui.remoteCheckBox.checked and self._remoteModels is not None
        available = self._remoteModels if remote else self._models  # the server's list once connected
        for info in models.modelsForMethod(available, method):
            combo.addItem(info.label(), info.id)
            combo.setItemData(combo.count - 1, info.tooltip(), qt.Qt.ToolTipRole)
        index = combo.findData(current) if current else 0
        combo.currentIndex = max(0, index)
        combo.blockSignals(wasBlocked)
        modelId = current or models.defaultModelFor(method)
        info = next((m for m in available if m.id == modelId), None)
        if info is None:
            self.ui.modelStatusLabel.text = _("Model {model} is not registered.").format(model=modelId)
        elif info.status != "ok":
            self.ui.modelStatusLabel.text = "; ".join(m for m in info.messages if "ok" not in m) or info.status
        else:
            self.ui.modelStatusLabel.text = ""

    # ------------------------------------------------------------------------------------------ device
    def startDeviceProbe(self):
        """Probe the backend's torch / CUDA in a background thread (never imports torch here)."""
        import threading

        from SpineInpaintLib.runner import backendEnvironment, pythonExecutable

        status = dependencies.torchStatus()
        if not status.installed:
            self.ui.deviceInfoLabel.text = status.message()
            return
        result = {}
        python, env = pythonExecutable(), backendEnvironment()  # Qt calls stay on the main thread

        def probe():
            try:
                result["info"] = dependencies.probeDevice(python, env)
            except Exception as e:  # the label must never stay on "checking"
                result["info"] = dependencies.DeviceInfo(error=str(e))

        self._deviceProbe = (threading.Thread(target=probe, daemon=True), result)
        self._deviceProbe[0].start()
        self.ui.deviceInfoLabel.text = _("checking the device...")
        qt.QTimer.singleShot(500, self._waitForDeviceProbe)

    def _waitForDeviceProbe(self):
        thread, result = self._deviceProbe
        if "info" not in result and thread.is_alive():
            qt.QTimer.singleShot(500, self._waitForDeviceProbe)
        else:
            self.updateDeviceLabel()

    def updateDeviceLabel(self):
        """'CUDA found: <name>' or 'running on CPU, expect ~N s' for the current parameters."""
        if self._deviceProbe is None or "info" not in self._deviceProbe[1]:
            return
        result = self._deviceProbe[1]
        p = self.currentParameters()
        info = next((m for m in self._models if m.id == (p.model or models.defaultModelFor(p.method))), None)
        self.ui.deviceInfoLabel.text = dependencies.deviceMessage(
            result["info"], p.device, p.steps, p.samples, info.config if info else "small",
            methods=p.methodsToRun())

    # ------------------------------------------------------------------------------------------ run
    def updateButtons(self):
        running = self.job is not None and self.job.state == "running"
        problems = []
        if self._parameterNode is not None:
            problems = self.currentParameters().validate()
        volume = self.ui.inputVolumeSelector.currentNode()
        landmark = self.ui.landmarkSelector.currentNode()
        if volume is None:
            problems.append(_("Select an input volume."))
        if landmark is None or landmark.GetNumberOfControlPoints() == 0:
            problems.append(_("Place the landmark."))
        self.ui.applyButton.enabled = not running and not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Inpaint the pathology")
        self.ui.cancelButton.enabled = running
        self.ui.showCompareButton.enabled = bool(self.lastResults) and not running

    def setupDependencies(self, params) -> bool:
        if params.backend == "remote":
            return True
        dependencies.ensureTorch(askConfirmation=True)
        missing = dependencies.missingRequirements()
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("SpineInpaint needs these Python packages (installed once, Slicer's numpy/SimpleITK/vtk are "
                      "left untouched):\n{packages}\n\nInstall now?").format(packages="\n".join(missing))):
                return False
            with slicer.util.WaitCursor():
                dependencies.installRequirements(log=self.log)
        return True

    def onApplyButton(self, *args):
        if self.job is not None and self.job.state == "running":
            return
        self.updateParameterNodeFromGUI()
        params = self.currentParameters()
        self.ui.logTextEdit.clear()
        try:
            if not self.setupDependencies(params):
                self.setStatus(_("Cancelled: dependencies not installed."))
                return
            self.job = self.logic.start(self.ui.inputVolumeSelector.currentNode(), self.ui.landmarkSelector.currentNode(),
                                        params, self.ui.discCentersSelector.currentNode(), onEvent=self.onJobEvent,
                                        token=self.ui.remoteTokenLineEdit.text.strip())
        except Exception as e:  # one line for the user, details in the log
            logging.exception("SpineInpaint: could not start")
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.setStatus(message)
            slicer.util.errorDisplay(_("Could not start: {message}").format(message=message))
            return
        from SpineInpaintLib.nodes import controlPointWorld

        self.lastLandmarkRas = list(controlPointWorld(self.ui.landmarkSelector.currentNode(), 0))  # world RAS
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(_("starting backend..."))
        self.ui.progressBar.show()
        self.pollTimer.start()
        self.updateButtons()

    def onPollTimer(self):
        if self.job is None:
            self.pollTimer.stop()
            return
        self.job.poll()
        self.ui.progressBar.value = int(1000 * self.job.progress())
        self.ui.progressBar.setFormat(self.job.progressText())
        if self.job.state != "running":
            self.finishRun()

    def onJobEvent(self, job, event):
        kind = event.get("event")
        if kind == "log":
            self.log(event.get("message", ""))
        elif kind == "start":
            self.log(_("backend started on {device}").format(device=event.get("device_name") or event.get("device", "?")))
        elif kind == "error":
            self.log(event.get("message", ""))
        elif kind == "finished":
            self.setStatus(event.get("message", ""))

    def finishRun(self):
        self.pollTimer.stop()
        job = self.job
        if job is None:
            return
        if job.state == "done":
            self.lastResults = [job.inputVolume] + list(job.outputNodes)
            if len(job.methods) > 1:  # input | weighted | masked | RePaint (sample k of each method)
                self.lastLabels = ["In"] + [METHOD_LABELS[n.GetAttribute("SpineInpaint.method")] if
                                            n.GetAttribute("SpineInpaint.method") in METHOD_LABELS else "?"
                                            for n in job.outputNodes]
            else:  # input | sample 1..K
                self.lastLabels = ["In"] + [str(i + 1) for i in range(len(job.outputNodes))]
            self.showResults()
        elif job.state == "error":
            slicer.util.errorDisplay(job.message)
        self.ui.progressBar.setFormat(job.message)
        self.ui.progressBar.value = 1000 if job.state == "done" else self.ui.progressBar.value
        self.updateButtons()

    def onCancelButton(self, *args):
        if self.job is None:
            return
        self.job.cancel(timeout=2.0)
        self.finishRun()

    def showResults(self):
        if not self.lastResults:
            return
        layout.showCompareLayout(self.lastResults, self.lastLandmarkRas, labels=self.lastLabels)

    def onShowCompareButton(self, *args):
        if any(n is None or n.GetScene() is None for n in self.lastResults):  # a result was deleted
            self.lastResults, self.lastLabels = [], []
            self.updateButtons()
            return
        self.showResults()

    # ------------------------------------------------------------------------------------------ misc buttons
    def onRemoteTestButton(self, *args):
        from SpineInpaintLib.remote import RemoteClient, RemoteError

        params = self.currentParameters()
        try:
            token = InpaintLogic.remoteToken(params, self.ui.remoteTokenLineEdit.text.strip())
            client = RemoteClient(self.ui.remoteUrlLineEdit.text, token, timeout=10)
            with slicer.util.WaitCursor():
                health = client.health()
                remoteModels = client.models()
            self.ui.remoteStatusLabel.text = _("Connected: spine-ldm {version}, {n} model(s), {q} job(s) queued").format(
                version=health.get("version", "?"), n=len(remoteModels), q=health.get("queued", 0))
            self._remoteModels = models.fromRemote(remoteModels)
        except (RemoteError, OSError) as e:
            self.ui.remoteStatusLabel.text = str(e)
            self._remoteModels = None
        p = self.currentParameters()
        self.populateModels(p.method, p.model)

    def onLoadPhantomButton(self, *args):
        from SpineInpaintLib import sampledata

        outDir = tempfile.mkdtemp(prefix="SpinePhantom-")
        try:
            with slicer.util.WaitCursor():
                self.setStatus(_("Generating the synthetic phantom..."))
                sampledata.generatePhantom(outDir)
                volume, discs, landmark = sampledata.loadPhantom(outDir)
        except Exception as e:
            slicer.util.errorDisplay(_("Phantom generation failed: {error}").format(error=e))
            return
        setNodeReference(self._parameterNode, REF_INPUT, volume)
        setNodeReference(self._parameterNode, REF_LANDMARK, landmark)
        setNodeReference(self._parameterNode, REF_DISC_CENTERS, discs)
        self.updateGUIFromParameterNode()
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        p = [0.0, 0.0, 0.0]
        landmark.GetNthControlPointPositionWorld(0, p)
        slicer.modules.markups.logic().JumpSlicesToLocation(p[0], p[1], p[2], True)
        self.setStatus(_("Phantom loaded: landmark at the L4-L5 posterior disc margin."))

    def setStatus(self, text):
        self.ui.statusLabel.text = text
        if text:
            self.log(text)

    def log(self, text):
        if text:
            self.ui.logTextEdit.appendPlainText(text)
            logging.info("SpineInpaint: %s", text)


#
# SpineInpaintLogic
#
class SpineInpaintLogic(ScriptedLoadableModuleLogic, InpaintLogic):
    """Batch-usable logic (see ``SpineInpaintLib.logic.InpaintLogic`` and ``examples/batch_inpaint.py``)::

        logic = slicer.util.getModuleLogic("SpineInpaint")  # or SpineInpaintLogic()
        nodes = logic.run(volumeNode, landmarkNode, InpaintParameters(level="L4-L5", samples=2))
    """

    def __init__(self, scene=None, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        InpaintLogic.__init__(self, scene=scene, **kwargs)


#
# SpineInpaintTest
#
class SpineInpaintTest(ScriptedLoadableModuleTest):
    """End-to-end self-test in 3D Slicer: phantom -> landmark -> bundled demo weights -> output node checks.

    Run it from the module's "Reload and Test" button (Developer mode), or
    ``Slicer --no-main-window --python-code "import SpineInpaint; SpineInpaint.SpineInpaintTest().runTest(); exit()"``
    or through ctest (``slicer_add_python_unittest``). It needs PyTorch (PyTorch extension) and the demo weights
    listed in ``Resources/Models.json`` (or the registry named by env ``SPINE_LDM_REGISTRY``); about a minute on a
    CPU. ``Testing/test_slicer_lib.py`` also runs it headless under slicer-core with random-init weights.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_InpaintPhantom()
        self.setUp()
        self.test_CancelLeavesSceneUntouched()

    def _prerequisites(self):
        from SpineInpaintLib import nodes

        status = dependencies.torchStatus()
        self.assertTrue(status.installed, status.message())
        missing = dependencies.missingRequirements()
        self.assertEqual(missing, [], f"missing backend packages (press Apply once to install): {missing}")
        registry = os.environ.get("SPINE_LDM_REGISTRY") or defaultRegistryPath()  # env: same rule as the backend
        self.assertTrue(os.path.exists(registry), f"model registry {registry} is missing")
        demo = {m.id: m for m in models.listModels(registry)}.get("demo-small-weighted")
        self.assertIsNotNone(demo, "demo-small-weighted is not in Resources/Models.json")
        self.assertEqual(demo.status, "ok", "; ".join(demo.messages))
        return nodes, demo

    def _phantom(self):
        from SpineInpaintLib import sampledata

        outDir = tempfile.mkdtemp(prefix="SpineInpaintTest-")
        sampledata.generatePhantom(outDir, seed=0)
        return sampledata.loadPhantom(outDir)

    def test_InpaintPhantom(self):
        import numpy as np

        nodes, demo = self._prerequisites()
        self.delayDisplay("Generating the phantom")
        volume, discs, landmark = self._phantom()
        before = nodes.snapshotNode(volume)
        self.delayDisplay("Inpainting (2 samples, 10 steps)")
        params = InpaintParameters(level="L1-L2", levelAuto=True, condition="dh_moderate_large", samples=2, seed=4,
                                   steps=10)
        outputs = SpineInpaintLogic().run(volume, landmark, params, discs, timeout=900)
        self.assertEqual([n.GetName() for n in outputs],
                         ["SpinePhantom DH-mod/large L4-L5 weighted #1", "SpinePhantom DH-mod/large L4-L5 weighted #2"])
        for k, node in enumerate(outputs):
            self.assertTrue(np.array_equal(nodes.ijkToRasMatrix(node), nodes.ijkToRasMatrix(volume)))
            prov = nodes.getProvenanceAttributes(node)
            self.assertEqual(prov["model_id"], "demo-small-weighted")
            for name, sha in demo.sha256.items():
                self.assertEqual(prov["weights_sha256"][name], sha)
            self.assertEqual((prov["seed"], prov["level"], prov["level_source"]), (4 + k, "L4-L5", "suggested"))
            arr = slicer.util.arrayFromVolume(node)
            self.assertEqual(arr.shape, before["array"].shape)
            self.assertFalse(np.array_equal(arr, before["array"]), "nothing was inpainted")
            self.assertTrue(np.array_equal(arr[:, :20, :20], before["array"][:, :20, :20]),
                            "voxels far from the landmark changed")
        self.assertTrue(nodes.sameSnapshot(before, nodes.snapshotNode(volume)), "the input volume was modified")
        p = [0.0, 0.0, 0.0]
        landmark.GetNthControlPointPositionWorld(0, p)
        layout.showCompareLayout([volume] + outputs, p)
        self.delayDisplay("Inpainting test passed")

    def test_CancelLeavesSceneUntouched(self):
        import time

        nodes, _demo = self._prerequisites()
        volume, discs, landmark = self._phantom()
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = SpineInpaintLogic().start(volume, landmark, InpaintParameters(steps=1000), discs)
        deadline = time.monotonic() + 300
        while job.state == "running" and job.step == 0 and time.monotonic() < deadline:
            job.poll()
            if GUI_AVAILABLE:
                slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(job.state, "running", job.message)
        self.assertTrue(job.cancel(timeout=2.0), "the backend did not stop within 2 s")
        self.assertEqual(job.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel test passed")
