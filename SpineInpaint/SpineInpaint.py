"""SpineInpaint: inpaint lumbar-spine pathology (disc herniation, central canal stenosis) into sagittal T2 MRI.

Thin 3D Slicer module (Module / ParameterNode / Widget / Logic / Test). All logic lives in ``SpineInpaintLib`` (plain
functions and classes, testable without the GUI); the diffusion model runs in a separate backend process (the warm
local worker, a one-shot ``spine-ldm`` process, or a remote server), never in the Slicer process. Nothing here
blocks the GUI: jobs, downloads, hashing, imports, the phantom and the connection test run in the background and
are polled from one timer.
"""
import logging
import os
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from spine_ldm.conditions import CONDITIONS, LEVELS
from SpineInpaintLib import MINIMUM_SLICER_VERSION, dependencies, layout, models, sampledata, tasks
from SpineInpaintLib.level import suggestLevelFromMarkups
from SpineInpaintLib.logic import POLL_INTERVAL_MS, InpaintLogic, defaultRegistryPath, selfTestProblem
from SpineInpaintLib.parameters import (BACKENDS, DEVICES, GUIDANCE_RANGE, METHOD_LABELS, METHODS, MODEL_GUIDANCE,
                                        MODEL_SIGMA, SAMPLES_RANGE, SEVERITY_LABELS, SIGMA_RANGE_MM, STEPS_RANGE,
                                        InpaintParameters, conditionFromPathologySeverity, fromParameterNode,
                                        pathologySeverityFromCondition)

PATHOLOGY_KEYS = ("dh", "ccs", "none")  # order of pathologyComboBox items in the .ui
_DEFAULTS = InpaintParameters()


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
            "Results are synthetic: for research, education and reader studies, not for diagnosis.<br>"
            "Requires 3D Slicer {version} or later and the PyTorch extension.").format(version=MINIMUM_SLICER_VERSION)
        self.parent.acknowledgementText = _(
            "Method: Hansen et al., Gaussian-weighted latent diffusion inpainting of lumbar spine pathology. "
            "Module structure follows SlicerNNUnet and SlicerMONAIAuto3DSeg.")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("aboutToQuit()", stopBackendWorker)


def registerSampleData():
    """The synthetic phantom under its own category in the Sample Data module (generated, not downloaded)."""
    sampledata.registerSampleData(loadPhantomSample)


def loadPhantomSample(source=None):
    """Sample Data button: open SpineInpaint and load the phantom there (generated in the background)."""
    slicer.util.selectModule("SpineInpaint")
    slicer.modules.spineinpaint.widgetRepresentation().self().onLoadPhantomButton()


def stopBackendWorker():
    from SpineInpaintLib import worker

    worker.shutdownWorkers()


#
# SpineInpaintParameterNode
#
@parameterNodeWrapper
class SpineInpaintParameterNode:
    """The panel's state in the scene: the fields of ``InpaintParameters`` (same names, defaults and ranges) and the
    selected nodes (node references: they survive scene save / load)."""

    inputVolume: vtkMRMLScalarVolumeNode
    landmark: vtkMRMLMarkupsFiducialNode
    discCenters: vtkMRMLMarkupsFiducialNode
    level: Annotated[str, Choice(LEVELS)] = _DEFAULTS.level
    levelAuto: bool = _DEFAULTS.levelAuto
    condition: Annotated[str, Choice(CONDITIONS)] = _DEFAULTS.condition
    method: Annotated[str, Choice(METHODS)] = _DEFAULTS.method
    compareMethods: bool = _DEFAULTS.compareMethods
    model: str = _DEFAULTS.model
    samples: Annotated[int, WithinRange(*SAMPLES_RANGE)] = _DEFAULTS.samples
    seed: Annotated[int, Minimum(0)] = _DEFAULTS.seed
    sigmaMm: Annotated[float, WithinRange(MODEL_SIGMA, SIGMA_RANGE_MM[1])] = _DEFAULTS.sigmaMm  # 0 = the model's
    steps: Annotated[int, WithinRange(*STEPS_RANGE)] = _DEFAULTS.steps
    # 0 = the model's own
    guidanceScale: Annotated[float, WithinRange(MODEL_GUIDANCE, GUIDANCE_RANGE[1])] = _DEFAULTS.guidanceScale
    device: Annotated[str, Choice(DEVICES)] = _DEFAULTS.device
    backend: Annotated[str, Choice(BACKENDS)] = _DEFAULTS.backend
    remoteUrl: str = _DEFAULTS.remoteUrl
    remoteTokenFile: str = _DEFAULTS.remoteTokenFile
    registry: str = _DEFAULTS.registry


#
# SpineInpaintWidget
#
class SpineInpaintWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: the parameter node (connected to the widgets), background jobs and tasks polled from one timer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.tasks = {}  # name -> tasks.BackgroundTask (model check / download / import, connection test, device)
        self.phantomLoader = None
        self.lastResults = []
        self.lastLabels = []
        self.lastLandmarkRas = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self._observedMarkups = []
        self._models = []
        self._remoteModels = None  # models of the remote server, after "Test connection"
        self._deviceInfo = None

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
        self.ui.discCentersPlaceWidget.placeButton().show()
        self.ui.landmarkPlaceWidget.placeButton().hide()  # placeLandmarkButton creates the point list on demand
        self.ui.landmarkPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.discCentersPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ShowPlaceMultipleMarkupsOption

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        # widgets the parameter node cannot bind by itself (label <-> value maps, lists that change)
        self.ui.pathologyComboBox.connect("currentIndexChanged(int)", self.onPathologyChanged)
        self.ui.severityComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.remoteCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.placeLandmarkButton.connect("clicked(bool)", self.onPlaceLandmarkButton)
        self.ui.remoteTestButton.connect("clicked(bool)", self.onRemoteTestButton)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        self.ui.showCompareButton.connect("clicked(bool)", self.onShowCompareButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModelButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()
        self.ui.modelProgressBar.setRange(0, 1000)
        self.ui.modelProgressBar.hide()
        self.populateSeverity("dh")
        self.initializeParameterNode()
        self.refreshModels()
        self.startDeviceProbe()

    def cleanup(self):
        if self.job is not None:
            self.job.requestCancel()
        for task in self.tasks.values():
            task.cancel()
        if self.phantomLoader is not None:
            self.phantomLoader.cancel()
        self.pollTimer.stop()
        self.setParameterNode(None)
        self.observeMarkups(clear=True)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # no GUI updates while hidden: connectGui writes the current values again on enter
        self.setParameterNode(None)

    def onReload(self):
        """Developer "Reload": also reload SpineInpaintLib (dependency order), not just this file."""
        import importlib
        import sys

        import SpineInpaintLib

        if self.job is not None:
            self.job.requestCancel()
        for name in SpineInpaintLib.SUBMODULES:
            module = sys.modules.get(f"SpineInpaintLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        if self.job is not None and self.job.state == "running":
            self.job.requestCancel()  # the timer finishes it; nothing is loaded into the closing scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        """Observe the module's parameter node; creates no node besides it (the landmark list comes with Place)."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                    self._parameterNode.inputVolume = volume
                    break

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        self._parameterNodeGuiTag = None
        if parameterNode is not None:
            # widgets with a SlicerParameterName property in the .ui follow the node and write into it
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def currentParameters(self) -> InpaintParameters:
        return fromParameterNode(self._parameterNode)

    def onParameterNodeModified(self, caller=None, event=None):
        """Scene load, script or widget changed the node: update what connectGui does not bind."""
        if self._parameterNode is None or self._updatingGUI:
            return
        node = self._parameterNode
        self._updatingGUI = True
        try:
            pathology, severity = pathologySeverityFromCondition(node.condition)
            self.ui.pathologyComboBox.currentIndex = PATHOLOGY_KEYS.index(pathology)
            self.populateSeverity(pathology, severity)
            self.ui.methodComboBox.currentIndex = METHODS.index(node.method)
            self.ui.remoteCheckBox.checked = node.backend == "remote"
            self.populateModels(node.method, node.model)
            self.ui.landmarkPlaceWidget.setCurrentNode(node.landmark)
            self.ui.discCentersPlaceWidget.setCurrentNode(node.discCenters)
        finally:
            self._updatingGUI = False
        self.observeMarkups()
        self.updateLevelSuggestion()
        self.updateDeviceLabel()
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUI:
            return
        node = self._parameterNode
        pathology = PATHOLOGY_KEYS[max(0, self.ui.pathologyComboBox.currentIndex)]
        try:
            condition = conditionFromPathologySeverity(pathology, self.ui.severityComboBox.currentData or "")
        except ValueError:  # severity list being repopulated
            condition = node.condition
        with slicer.util.NodeModify(node):
            node.condition = condition
            node.method = METHODS[max(0, self.ui.methodComboBox.currentIndex)]
            node.model = self.ui.modelComboBox.currentData or ""
            node.backend = "remote" if self.ui.remoteCheckBox.checked else "local"

    # ------------------------------------------------------------------------------------------ markups
    def observeMarkups(self, clear=False):
        for node, tag in self._observedMarkups:
            node.RemoveObserver(tag)
        self._observedMarkups = []
        if clear or self._parameterNode is None:
            return
        for node in (self._parameterNode.landmark, self._parameterNode.discCenters):
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

    def onPlaceLandmarkButton(self, *args):
        """One click: a "Landmark" point list is created if none is selected, the old point is replaced."""
        node = self._parameterNode.landmark
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                      slicer.mrmlScene.GenerateUniqueName("Landmark"))
            self._parameterNode.landmark = node
        node.RemoveAllControlPoints()
        self.ui.landmarkPlaceWidget.setCurrentNode(node)
        self.ui.landmarkPlaceWidget.setPlaceModeEnabled(True)

    def updateLevelSuggestion(self, *args):
        node = self._parameterNode
        suggestion = suggestLevelFromMarkups(node.landmark, node.discCenters) if node is not None else None
        if suggestion is None:
            self.ui.levelSuggestionLabel.text = ""
            return
        self.ui.levelSuggestionLabel.text = _("Nearest disc centre: {level} ({dist:.1f} mm from the landmark)").format(
            level=suggestion.level, dist=suggestion.distanceMm)
        if node.levelAuto and suggestion.level != node.level:
            node.level = suggestion.level

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
            self.populateModels(METHODS[max(0, index)], "")  # "default for this method"
        self.updateParameterNodeFromGUI()

    # ------------------------------------------------------------------------------------------ models
    def registryPath(self):
        registry = self._parameterNode.registry if self._parameterNode is not None else ""
        registry = registry or defaultRegistryPath()
        return registry if os.path.exists(registry) else None

    def refreshModels(self):
        """The registry's entries at once (no hashing), their sha256 status from a background task."""
        registry = self.registryPath()
        try:
            self._models = models.listModels(registry, verify=False)
        except Exception as e:
            self._models = []
            self.ui.modelStatusLabel.text = _("Model registry unreadable: {error}").format(error=e)
            return
        self.startTask("verifyModels", models.listModelsTask(registry))
        self.repopulateModels()

    def availableModels(self):
        remote = self.ui.remoteCheckBox.checked and self._remoteModels is not None
        return self._remoteModels if remote else self._models  # the server's list once connected

    def repopulateModels(self):
        if self._parameterNode is not None:  # hidden module: enter() shows the current list
            self.populateModels(self._parameterNode.method, self._parameterNode.model)

    def populateModels(self, method, current=""):
        """'default for this method' (the backend picks the model per method and condition) + registry entries."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("default for this method"), "")
        available = self.availableModels()
        for info in models.modelsForMethod(available, method):
            combo.addItem(info.label(), info.id)
            combo.setItemData(combo.count - 1, info.tooltip(), qt.Qt.ToolTipRole)
        index = combo.findData(current) if current else 0
        combo.currentIndex = max(0, index)
        combo.blockSignals(wasBlocked)
        self.updateModelStatus()

    def selectedModel(self):
        modelId = self.ui.modelComboBox.currentData or ""
        return next((m for m in self.availableModels() if m.id == modelId), None) if modelId else None

    def updateModelStatus(self):
        info = self.selectedModel()
        busy = any(name in self.tasks for name in ("downloadModel", "importModel"))
        remote = self.ui.remoteCheckBox.checked
        self.ui.importModelButton.enabled = not busy and not remote
        self.ui.downloadModelButton.enabled = "downloadModel" in self.tasks or (
            not busy and not remote and info is not None and models.needsDownload(info))
        self.ui.downloadModelButton.text = _("Cancel download") if "downloadModel" in self.tasks else _("Download")
        if busy:
            return
        if info is None and not remote and self._parameterNode is not None:  # "default for this method"
            node = self._parameterNode
            modelId = models.defaultModelFor(node.method, node.condition, self.registryPath())
            info = next((m for m in self._models if m.id == modelId), None)
            if info is None or info.status in ("ok", "unknown"):
                self.ui.modelStatusLabel.text = _("Default for this case: {model}").format(model=modelId) if modelId \
                    else _("No default model for this method and condition: choose one.")
                return
        if info is None:
            self.ui.modelStatusLabel.text = _("checking models...") if "verifyModels" in self.tasks else ""
        elif info.status != "ok":
            self.ui.modelStatusLabel.text = "; ".join(m for m in info.messages if not m.endswith(": ok")) or info.status
        else:
            self.ui.modelStatusLabel.text = ""

    def onImportModelButton(self, *args):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a trained model"), "",
                                              _("Model zip (*.zip)"))
        if path:
            self.startTask("importModel", models.importTask(path))
            self.ui.modelStatusLabel.text = _("Importing {name}...").format(name=os.path.basename(path))
            self.updateModelStatus()

    def onDownloadModelButton(self, *args):
        if "downloadModel" in self.tasks:
            self.tasks["downloadModel"].cancel()
            return
        info = self.selectedModel()
        if info is None:
            return
        self.startTask("downloadModel", models.downloadTask(info.id, self.registryPath()))
        self.updateModelStatus()

    # ------------------------------------------------------------------------------------------ background work
    def startTask(self, name, task):
        old = self.tasks.pop(name, None)
        if old is not None:
            old.cancel()
        self.tasks[name] = task
        self.pollTimer.start()

    def onPollTimer(self):
        """Poll everything that runs in the background; the timer stops when nothing does."""
        if self.job is not None and self.job.state == "running":
            self.job.poll()
            self.ui.progressBar.value = int(1000 * self.job.progress())
            self.ui.progressBar.setFormat(self.job.progressText())
            if self.job.state != "running":
                self.finishRun()
        for name, task in list(self.tasks.items()):
            if task.poll() == tasks.RUNNING:
                if name == "downloadModel":
                    self.ui.modelProgressBar.show()
                    self.ui.modelProgressBar.value = int(1000 * (task.fraction or 0.0))
                    self.ui.modelProgressBar.setFormat(task.text)
                continue
            del self.tasks[name]
            getattr(self, f"on{name[0].upper()}{name[1:]}Finished")(task)
        if self.phantomLoader is not None and self.phantomLoader.poll() != "running":
            loader, self.phantomLoader = self.phantomLoader, None
            self.onPhantomLoaded(loader)
        running = self.job is not None and self.job.state == "running"
        if not running and not self.tasks and self.phantomLoader is None:
            self.pollTimer.stop()

    def onVerifyModelsFinished(self, task):
        if task.state == tasks.DONE:
            self._models = task.result
        self.repopulateModels()

    def onDownloadModelFinished(self, task):
        self.ui.modelProgressBar.hide()
        if task.state == tasks.DONE:
            self._models = [task.result if m.id == task.result.id else m for m in self._models]
            self.setStatus(_("Model {model} downloaded, sha256 {status}").format(model=task.result.id,
                                                                                  status=task.result.status))
        else:
            self.setStatus(_("Download: {message}").format(message=task.message))
        self.repopulateModels()

    def onImportModelFinished(self, task):
        if task.state == tasks.DONE:
            self.setStatus(_("Model {model} imported").format(model=task.result))
            self.refreshModels()
        else:
            self.setStatus(_("Import failed: {message}").format(message=task.message))
            self.updateModelStatus()

    def startDeviceProbe(self):
        """What the backend will run on (torch / CUDA), probed in a subprocess from a background thread."""
        from SpineInpaintLib.runner import backendEnvironment, pythonExecutable

        status = dependencies.torchStatus()
        if not status.installed:
            self.ui.deviceInfoLabel.text = status.message()
            return
        python, env = pythonExecutable(), backendEnvironment()  # Qt calls stay on the main thread
        self.startTask("deviceProbe", tasks.BackgroundTask(
            lambda progress, cancelled: dependencies.probeDevice(python, env), "device probe").start())
        self.ui.deviceInfoLabel.text = _("checking the device...")

    def onDeviceProbeFinished(self, task):
        self._deviceInfo = task.result if task.state == tasks.DONE else dependencies.DeviceInfo(error=task.message)
        self.updateDeviceLabel()

    def updateDeviceLabel(self):
        """'CUDA found: <name>' or 'running on CPU, expect ~N s' for the current parameters."""
        if self._deviceInfo is None or self._parameterNode is None:
            return
        from SpineInpaintLib import worker

        p = self.currentParameters()
        modelId = p.model or models.defaultModelFor(p.method, p.condition, self.registryPath())
        info = next((m for m in self._models if m.id == modelId), None)
        current = worker.currentWorker()
        self.ui.deviceInfoLabel.text = dependencies.deviceMessage(
            self._deviceInfo, p.device, p.steps, p.samples, info.config if info else "small",
            methods=p.methodsToRun(), warm=current is not None and current.state == worker.READY)

    # ------------------------------------------------------------------------------------------ run
    def updateButtons(self):
        running = self.job is not None and self.job.state == "running"
        problems = []
        node = self._parameterNode
        if node is not None:
            problems = self.currentParameters().validate()
            if node.inputVolume is None:
                problems.append(_("Select an input volume."))
            if node.landmark is None or node.landmark.GetNumberOfControlPoints() == 0:
                problems.append(_("Place the landmark."))
        self.ui.applyButton.enabled = node is not None and not running and not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Inpaint the pathology")
        self.ui.cancelButton.enabled = running and not self.job.cancelRequested
        self.ui.showCompareButton.enabled = bool(self.lastResults) and not running
        self.ui.loadPhantomButton.enabled = self.phantomLoader is None

    def setupDependencies(self, params) -> bool:
        """torch (PyTorch extension, minimum from requirements.txt) and the pinned backend packages."""
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
        conflicts = dependencies.dependencyConflicts()
        if conflicts:
            raise dependencies.DependencyError(conflicts[0])
        return True

    def onApplyButton(self, *args):
        if self.job is not None and self.job.state == "running":
            return
        node = self._parameterNode
        params = self.currentParameters()
        self.ui.logTextEdit.clear()
        try:
            if not self.setupDependencies(params):
                self.setStatus(_("Cancelled: dependencies not installed."))
                return
            self.job = self.logic.start(node.inputVolume, node.landmark, params, node.discCenters,
                                        onEvent=self.onJobEvent, token=self.ui.remoteTokenLineEdit.text.strip())
        except Exception as e:  # one line for the user, details in the log
            logging.exception("SpineInpaint: could not start")
            message = tasks.oneLine(e)
            self.setStatus(message)
            slicer.util.errorDisplay(_("Could not start: {message}").format(message=message))
            return
        from SpineInpaintLib.nodes import controlPointWorld

        self.lastLandmarkRas = list(controlPointWorld(node.landmark, 0))  # world RAS
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(_("starting backend..."))
        self.ui.progressBar.show()
        self.pollTimer.start()
        self.updateButtons()

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
        job = self.job
        if job is None:
            return
        if job.state == "done":
            self.lastResults = [job.inputVolume] + list(job.outputNodes)
            if len(job.methods) > 1:  # input | weighted | masked | RePaint (sample k of each method)
                self.lastLabels = ["In"] + [METHOD_LABELS.get(n.GetAttribute("SpineInpaint.method"), "?")
                                            for n in job.outputNodes]
            else:  # input | sample 1..K
                self.lastLabels = ["In"] + [str(i + 1) for i in range(len(job.outputNodes))]
            self.showResults()
        elif job.state == "error":
            slicer.util.errorDisplay(job.message)
        self.updateDeviceLabel()  # the estimate drops once the warm backend runs
        self.ui.progressBar.setFormat(job.message)
        self.ui.progressBar.value = 1000 if job.state == "done" else self.ui.progressBar.value
        self.updateButtons()

    def onCancelButton(self, *args):
        """Never waits: the backend is told to stop, the timer reports 'cancelled' once it did (within 2 s)."""
        if self.job is None or self.job.state != "running":
            return
        self.job.requestCancel()
        self.ui.progressBar.setFormat(self.job.progressText())
        self.updateButtons()

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
        from SpineInpaintLib.remote import RemoteClient

        try:
            token = InpaintLogic.remoteToken(self.currentParameters(), self.ui.remoteTokenLineEdit.text.strip())
            client = RemoteClient(self.ui.remoteUrlLineEdit.text, token, timeout=10)
        except Exception as e:
            self.ui.remoteStatusLabel.text = tasks.oneLine(e)
            return
        self.ui.remoteStatusLabel.text = _("connecting to {url}...").format(url=client.url)
        self.ui.remoteTestButton.enabled = False
        self.startTask("remoteTest", tasks.BackgroundTask(
            lambda progress, cancelled: (client.health(), client.models()), "connection test").start())

    def onRemoteTestFinished(self, task):
        self.ui.remoteTestButton.enabled = True
        if task.state == tasks.DONE:
            health, remoteModels = task.result
            self.ui.remoteStatusLabel.text = _("Connected: spine-ldm {version}, {n} model(s), {q} job(s) queued").format(
                version=health.get("version", "?"), n=len(remoteModels), q=health.get("queued", 0))
            self._remoteModels = models.fromRemote(remoteModels)
        else:
            self.ui.remoteStatusLabel.text = task.message
            self._remoteModels = None
        self.repopulateModels()

    def onLoadPhantomButton(self, *args):
        """Generate the phantom in the background; the nodes appear when it is written."""
        if self.phantomLoader is not None:
            return
        self.phantomLoader = sampledata.PhantomLoader(seed=0, scene=slicer.mrmlScene).start()
        self.setStatus(_("Generating the synthetic phantom..."))
        self.pollTimer.start()
        self.updateButtons()

    def onPhantomLoaded(self, loader):
        self.updateButtons()
        if loader.state != "done":
            self.setStatus(loader.message)
            if loader.state == "error":
                slicer.util.errorDisplay(_("Phantom generation failed: {error}").format(error=loader.message))
            return
        volume, discs, landmark = loader.nodes
        node = self._parameterNode or self.logic.getParameterNode()  # also when the module is not shown
        with slicer.util.NodeModify(node):
            node.inputVolume = volume
            node.landmark = landmark
            node.discCenters = discs
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        p = [0.0, 0.0, 0.0]
        landmark.GetNthControlPointPositionWorld(0, p)
        slicer.modules.markups.logic().JumpSlicesToLocation(p[0], p[1], p[2], True)
        self.setStatus(_("Phantom loaded: landmark at the centre of a moderate/large L4-L5 herniation "
                         "(4 mm behind the posterior disc margin)."))
        self.updateButtons()

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

    def getParameterNode(self):
        return SpineInpaintParameterNode(super().getParameterNode())


#
# SpineInpaintTest
#
class SpineInpaintTest(ScriptedLoadableModuleTest):
    """End-to-end self-test in 3D Slicer: phantom -> landmark -> bundled demo weights -> output node checks, cancel.

    Run it from the module's "Reload and Test" button (Developer mode), or
    ``Slicer --no-main-window --python-code "import SpineInpaint; SpineInpaint.SpineInpaintTest().runTest(); exit()"``
    or through ctest (``slicer_add_python_unittest``). It needs PyTorch (PyTorch extension), the backend packages
    (press Apply once) and the demo weights listed in ``Resources/Models.json`` (or the registry named by env
    ``SPINE_LDM_REGISTRY``); about a minute on a CPU. Without them (the Slicer factory's build machines) it is skipped
    with the reason. ``Testing/test_slicer_lib.py`` also runs it headless under slicer-core with random-init weights.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        problem = selfTestProblem()
        if problem:  # "Reload and Test": say why instead of failing
            logging.warning("SpineInpaintTest skipped: %s", problem)
            self.delayDisplay(f"SpineInpaintTest skipped: {problem}")
            return
        self.setUp()
        self.test_InpaintPhantom()
        self.setUp()
        self.test_CancelLeavesSceneUntouched()

    def _requirePrerequisites(self):
        problem = selfTestProblem()
        if problem:  # ctest / unittest: reported as skipped, not failed
            self.skipTest(problem)

    def _phantom(self):
        import tempfile

        outDir = tempfile.mkdtemp(prefix="SpineInpaintTest-")
        sampledata.generatePhantom(outDir, seed=0)
        return sampledata.loadPhantom(outDir)

    def test_InpaintPhantom(self):
        import numpy as np

        from SpineInpaintLib import nodes

        self._requirePrerequisites()
        registry = os.environ.get("SPINE_LDM_REGISTRY") or defaultRegistryPath()
        expected = models.defaultModelFor("weighted", "dh_moderate_large", registry)
        demo = {m.id: m for m in models.listModels(registry)}[expected]
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
            self.assertIs(node.GetNodeReference(nodes.INPUT_REFERENCE_ROLE), volume)
            prov = nodes.getProvenanceAttributes(node)
            self.assertEqual(prov["model_id"], demo.id)
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

        self._requirePrerequisites()
        volume, discs, landmark = self._phantom()
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = SpineInpaintLogic().start(volume, landmark, InpaintParameters(steps=1000), discs)
        deadline = time.monotonic() + 300
        while job.state == "running" and job.step == 0 and time.monotonic() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(job.state, "running", job.message)
        t0 = time.monotonic()
        job.requestCancel()
        while job.state == "running" and time.monotonic() - t0 < 5:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(job.state, "cancelled", job.message)
        self.assertLess(time.monotonic() - t0, 2.0, "the backend did not stop within 2 s")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Cancel test passed")
