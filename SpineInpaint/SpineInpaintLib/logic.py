"""``InpaintLogic``: everything the Apply button does, usable without the widget.

From Slicer's Python console or a PythonSlicer script::

    from SpineInpaintLib.logic import InpaintLogic
    from SpineInpaintLib.parameters import InpaintParameters

    volume = slicer.util.getNode("T2")
    landmark = slicer.util.getNode("Landmark")      # markups point list, first point = the pathology location
    params = InpaintParameters(level="L4-L5", condition="dh_moderate_large", samples=2, seed=7)
    nodes = InpaintLogic().run(volume, landmark, params)   # blocks; returns the new volume nodes

The widget uses the non-blocking form: ``job = logic.start(...)`` then ``job.poll()`` from a QTimer,
``job.requestCancel()`` on Cancel (``job.cancel(timeout)`` blocks, for scripts). A job makes one backend run per
method (one for a normal run, three in compare mode) and loads the outputs into the scene only when every run has
succeeded: a cancelled or failed job leaves the scene untouched.

Where a local run happens: on the session's warm worker (``worker.py``: a persistent ``spine-ldm serve`` on
127.0.0.1 that keeps torch and the models loaded) when the server packages are installed, else in a one-shot
``spine-ldm inpaint`` process (``runner.py``). A remote run goes to the URL in the parameters; the warm worker and a
remote server speak the same HTTP API through the same client.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable, Optional

from . import nodes as nodesLib
from .parameters import METHOD_LABELS, InpaintParameters
from .runner import CANCELLED, DONE, FAILED, IDLE, RUNNING, BackendProcess, backendEnvironment, errorMessage, \
    inpaintCommand, progressFraction

#: how often the panel polls a running job (its QTimer); the end of a run is noticed within this time
POLL_INTERVAL_MS = 50


def defaultRegistryPath() -> str:
    """The module's bundled ``Resources/Models.json`` (the backend's own default when it is absent)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Models.json")


def selfTestProblem(registry: Optional[str] = None) -> str:
    """Why the end-to-end self-test cannot run in this Slicer, or "" when it can.

    The Slicer factory's build machines have neither torch nor the backend packages: there the self-test skips with
    this message (as SlicerMONAIAuto3DSeg / SlicerNNUnet / SlicerTotalSegmentator do) instead of failing.
    """
    from . import dependencies, models

    status = dependencies.torchStatus()
    if not status.installed:
        return "PyTorch is not installed (install the PyTorch extension, then press Apply once in SpineInpaint)"
    try:
        dependencies.checkTorchVersion(status.version)
    except dependencies.DependencyError as e:
        return str(e)
    missing = dependencies.missingRequirements()
    if missing:
        return f"backend packages are missing (press Apply once in SpineInpaint to install them): {', '.join(missing)}"
    conflicts = dependencies.dependencyConflicts()
    if conflicts:
        return f"backend packages do not fit together: {conflicts[0]}"
    registry = registry or os.environ.get("SPINE_LDM_REGISTRY") or defaultRegistryPath()  # the backend's rule
    if not os.path.exists(registry):
        return f"model registry {registry} is missing"
    wanted = models.defaultModelFor("weighted", "dh_moderate_large", registry)  # what the self-test runs
    demo = {m.id: m for m in models.listModels(registry)}.get(wanted)
    if demo is None:
        return f"{registry} has no default weighted model for dh_moderate_large ({wanted or 'none'})"
    if demo.status != "ok":
        return "; ".join(m for m in demo.messages if not m.endswith(": ok")) or f"model {wanted}: {demo.status}"
    return ""


class InpaintJob:
    """One Apply: a sequence of backend runs (one per method) and the loading of their outputs."""

    def __init__(self, logic: "InpaintLogic", inputVolume, request: nodesLib.BackendRequest,
                 params: InpaintParameters, workDir: str, token: str = "",
                 onEvent: Optional[Callable[["InpaintJob", dict], None]] = None):
        self.logic = logic
        self.inputVolume = inputVolume
        self.request = request
        self.params = params
        self.workDir = workDir
        self.token = token
        self.onEvent = onEvent
        self.methods = params.methodsToRun()
        self.runIndex = -1
        self.current = None  # BackendProcess | RemoteJob
        self.doneEvents: list[tuple[str, dict]] = []
        self.outputNodes: list = []
        self.state = IDLE
        self.message = ""
        self.step = 0
        self.of = 0
        self.startTime: Optional[float] = None
        self.cancelRequested = False
        self._reading = None  # tasks.BackgroundTask reading the output files

    # -- lifecycle
    def start(self) -> "InpaintJob":
        self.state = RUNNING
        self.startTime = time.monotonic()
        self._emit({"event": "log", "message": self._describe()})
        for note in self.request.notes:
            self._emit({"event": "log", "message": note})
        self._startNext()
        return self

    def _describe(self) -> str:
        r = self.request
        lm = ", ".join(f"{v:.1f}" for v in r.landmarkRas)
        where = f"remote {self.params.remoteUrl}" if self.params.backend == "remote" else \
            "warm local backend" if self.logic.useWarmWorker() else "local backend"
        return (f"{r.condition} at {r.level} ({'suggested' if r.levelSource == 'suggested' else 'chosen'}), landmark "
                f"RAS ({lm}), methods {', '.join(self.methods)}, {self.params.samples} sample(s), seed "
                f"{self.params.seed}, {self.params.steps} steps, {self.params.sigmaText()}, "
                f"{self.params.guidanceText()} on {where}")

    def _startNext(self) -> None:
        self.runIndex += 1
        method = self.methods[self.runIndex]
        payload = nodesLib.requestPayload(self.request, self.params, method)
        outDir = os.path.join(self.workDir, f"run{self.runIndex}_{method}")
        os.makedirs(outDir, exist_ok=True)
        if self.params.backend == "remote":
            from .remote import RemoteClient, RemoteJob

            client = RemoteClient(self.params.remoteUrl, self.token)
            self.current = RemoteJob(client, self.request.inputPath, payload, outDir)
        elif self.logic.useWarmWorker():
            from .worker import WorkerJob

            self.current = WorkerJob(self.logic.worker(self.params), self.request.inputPath, payload, outDir)
        else:
            cmd = self.logic.commandBuilder(payload, self.request.inputPath, outDir, python=self.logic.python,
                                            registry=self.logic.registryFor(self.params))
            self.current = BackendProcess(cmd, env=self.logic.environment())
        self._emit({"event": "log", "message": f"run {self.runIndex + 1}/{len(self.methods)}: "
                                                f"{METHOD_LABELS.get(method, method)}"})
        self.current.start()

    def _emit(self, event: dict) -> None:
        if self.onEvent:
            self.onEvent(self, event)

    # -- polling
    def poll(self) -> list[dict]:
        """Forward the current run's events; start the next run / load outputs when it ends."""
        if self.state != RUNNING or self.current is None:
            return []
        if self._reading is not None:  # every run is done, the outputs are being read
            if self.cancelRequested:
                self._finish(CANCELLED, "Cancelled: nothing was added to the scene")
            elif self._reading.poll() == "done":
                self._makeNodes(self._reading.result)
            elif self._reading.state != "running":
                self._finish(FAILED, f"Loading the results failed: {self._reading.message}")
            return []
        events = self.current.poll()
        for e in events:
            e = dict(e, run=self.runIndex, runs=len(self.methods), method=self.methods[self.runIndex])
            if e.get("event") == "progress":
                self.step, self.of = int(e.get("step", 0)), int(e.get("of", 0))
            self._emit(e)
        if self.cancelRequested and self.current.state in (DONE, FAILED):
            self._finish(CANCELLED, "Cancelled: nothing was added to the scene")  # never load after a cancel
        elif self.current.state == DONE:
            self.doneEvents.append((self.methods[self.runIndex], self.current.result))
            if self.runIndex + 1 < len(self.methods):
                try:
                    self._startNext()
                except Exception as e:  # e.g. the interpreter vanished: end the job, never raise into the GUI
                    self._finish(FAILED, f"Could not start the backend: {e}")
            else:
                self._loadAll()
        elif self.current.state == FAILED:
            self._finish(FAILED, errorMessage(self.current.error or {}))
        elif self.current.state == CANCELLED:
            self._finish(CANCELLED, "Cancelled: nothing was added to the scene")
        return events

    def progress(self) -> float:
        """Overall fraction 0..1 over all runs (diffusion steps of the current run)."""
        if self.state == DONE:
            return 1.0
        n = max(1, len(self.methods))
        frac = progressFraction({"step": self.step, "of": self.of}) or 0.0
        return (max(0, self.runIndex) + frac) / n

    def progressText(self) -> str:
        if self.state != RUNNING:
            return self.message
        method = METHOD_LABELS.get(self.methods[max(0, self.runIndex)], "")
        run = f" ({self.runIndex + 1}/{len(self.methods)})" if len(self.methods) > 1 else ""
        if self.cancelRequested:
            return f"{method}{run}: cancelling..."
        if self._reading is not None:
            return "loading the results..."
        if not self.of:
            return f"{method}{run}: starting backend..."
        return f"{method}{run}: step {self.step}/{self.of}"

    def _loadAll(self) -> None:
        """Read every output file in the background (decompression takes the GUI thread too long); ``poll()``
        makes the nodes once they are read."""
        from .tasks import BackgroundTask

        paths = [path for _, done in self.doneEvents for path in done.get("outputs", [])]
        self._reading = BackgroundTask(lambda progress, cancelled: [nodesLib.readVolumeData(p) for p in paths],
                                       "reading the results").start()

    def _makeNodes(self, volumes: list) -> None:
        created = []
        try:
            read = iter(volumes)
            for method, done in self.doneEvents:
                for k, _path in enumerate(done.get("outputs", [])):
                    name = nodesLib.outputNodeName(self.inputVolume.GetName(), self.request.condition,
                                                   self.request.level, method, k)
                    prov = nodesLib.sampleProvenance(done, k, self.request, method)
                    created.append(nodesLib.loadOutputVolume(next(read), self.inputVolume, name, prov,
                                                             scene=self.logic.scene))
        except Exception as e:
            for node in created:  # all or nothing
                self.logic.scene.RemoveNode(node)
            self._finish(FAILED, f"Loading the results failed: {e}")
            return
        self.outputNodes = created
        seconds = time.monotonic() - (self.startTime or time.monotonic())
        self._finish(DONE, f"Done: {len(created)} volume(s) in {seconds:.0f} s")

    def _finish(self, state: str, message: str) -> None:
        self.state = state
        self.message = message
        self._emit({"event": "finished", "state": state, "message": message})
        self.cleanup()

    def requestCancel(self) -> None:
        """Start cancelling without blocking; ``poll()`` ends the job (``cancelled``) once the backend stopped.
        Nothing is loaded afterwards."""
        if self.state != RUNNING or self.cancelRequested:
            return
        self.cancelRequested = True
        if self.current is not None:
            self.current.requestCancel()
        else:
            self._finish(CANCELLED, "Cancelled: nothing was added to the scene")

    def cancel(self, timeout: float = 2.0) -> bool:
        """Blocking cancel (scripts): the backend is stopped within ``timeout`` s; nothing is loaded afterwards."""
        if self.state != RUNNING:
            return True
        self.requestCancel()
        deadline = time.monotonic() + timeout
        while self.state == RUNNING and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.02)
        if self.state == RUNNING:
            self._finish(CANCELLED, "Cancelled: nothing was added to the scene")
            return False
        return True

    def wait(self, timeout: Optional[float] = None, pollInterval: float = 0.1) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == RUNNING:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(pollInterval)
        return self.state

    def cleanup(self) -> None:
        if self.logic.keepTemporaryFiles:
            return
        shutil.rmtree(self.workDir, ignore_errors=True)


class InpaintLogic:
    """Batch-usable logic (no widget, no Qt).

    ``python`` / ``env`` override the backend interpreter and its environment. ``warm``: run local jobs on the
    session's warm worker (default: when the server packages are installed and no ``commandBuilder`` is given);
    ``commandBuilder`` (default ``runner.inpaintCommand``) builds the one-shot backend command line and
    ``workerCommandBuilder`` (default ``worker.workerCommand``) the worker's (tests substitute fakes).
    """

    def __init__(self, scene=None, python: Optional[str] = None, env: Optional[dict] = None,
                 keepTemporaryFiles: bool = False, commandBuilder: Optional[Callable[..., list]] = None,
                 warm: Optional[bool] = None, workerCommandBuilder: Optional[Callable[..., list]] = None):
        import slicer

        self.scene = scene or slicer.mrmlScene
        self.python = python
        self._env = env
        self.keepTemporaryFiles = keepTemporaryFiles
        self.commandBuilder = commandBuilder or inpaintCommand
        self.workerCommandBuilder = workerCommandBuilder
        self.warm = warm if warm is not None else commandBuilder is None

    def environment(self) -> dict:
        return dict(self._env) if self._env is not None else backendEnvironment()

    def useWarmWorker(self) -> bool:
        if not self.warm:
            return False
        from .worker import serverAvailable

        return serverAvailable()

    def worker(self, params: InpaintParameters):
        """The session's warm worker for this interpreter and the registry of ``params`` (a worker for another
        registry is stopped); the first job starts it."""
        from .worker import getWorker

        return getWorker(self.python, self.environment(), self.registryFor(params), self.workerCommandBuilder)

    @staticmethod
    def registryFor(params: InpaintParameters) -> Optional[str]:
        if params.registry:
            return params.registry
        if os.environ.get("SPINE_LDM_REGISTRY"):
            return None  # let the backend use the environment's registry
        bundled = defaultRegistryPath()
        return bundled if os.path.exists(bundled) else None

    @staticmethod
    def remoteToken(params: InpaintParameters, token: str = "") -> str:
        if token:
            return token
        if params.remoteTokenFile:
            from .remote import readTokenFile

            return readTokenFile(params.remoteTokenFile)
        return os.environ.get("SPINE_LDM_TOKEN", "")

    def start(self, inputVolume, landmarkNode, params: InpaintParameters, discCentersNode=None,
              onEvent: Optional[Callable[[InpaintJob, dict], None]] = None, token: str = "") -> InpaintJob:
        """Validate, write the input, start the first backend run; returns the running job."""
        if inputVolume is None:
            raise ValueError("select an input volume")
        params = params.normalized()
        workDir = tempfile.mkdtemp(prefix="SpineInpaint-")
        try:
            request = nodesLib.prepareBackendInput(inputVolume, landmarkNode, params, workDir,
                                                   discCentersNode=discCentersNode)
            token = self.remoteToken(params, token) if params.backend == "remote" else ""
            job = InpaintJob(self, inputVolume, request, params, workDir, token=token, onEvent=onEvent)
            return job.start()
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def run(self, inputVolume, landmarkNode, params: Optional[InpaintParameters] = None, discCentersNode=None,
            timeout: Optional[float] = None, log: Optional[Callable[[str], None]] = print, token: str = "") -> list:
        """Blocking run for scripts: returns the new volume nodes, raises RuntimeError on failure."""

        def onEvent(job, e):
            if log is None:
                return
            kind = e.get("event")
            if kind == "log" and e.get("stream") != "stderr":
                log(e.get("message", ""))
            elif kind == "progress" and (int(e.get("step", 0)) % 10 == 0 or e.get("step") == e.get("of")):
                log(job.progressText())
            elif kind == "finished":
                log(e.get("message", ""))

        job = self.start(inputVolume, landmarkNode, params or InpaintParameters(), discCentersNode,
                         onEvent=onEvent, token=token)
        state = job.wait(timeout)
        if state == RUNNING:
            job.cancel()
            raise RuntimeError(f"SpineInpaint timed out after {timeout} s (cancelled)")
        if state != DONE:
            raise RuntimeError(job.message)
        return job.outputNodes
