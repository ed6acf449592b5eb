"""First-use dependency check and install, and the GPU / CPU message.

Policy (same as SlicerNNUnet / SlicerTotalSegmentator):

- torch is never pip-installed here: it comes from the *PyTorch* extension (``PyTorchUtils``), which picks the
  build matching the GPU driver. Without that extension the user gets a clear message saying what to install.
- The other backend packages (``Resources/requirements.txt``: monai, einops, the warm backend's server, ...) are
  installed with pinned versions only when the user presses Apply (never at module load), one by one with
  ``--no-deps`` so that pip never replaces Slicer's own numpy, SimpleITK, vtk or torch. Any of those appearing in the
  requirements file is refused, except the ``torch`` line: it is the minimum the MONAI pin needs (one place), checked
  against the installed torch, never pip-installed.
- Because ``--no-deps`` means pip checks nothing, ``dependencyConflicts`` checks the installed versions against the
  installed packages' own requirements (e.g. monai 1.6.1 needs torch>=2.8) before a local run.
- Nothing here imports torch into the Slicer process: versions are read with ``importlib.metadata`` and the device
  is probed in a short-lived backend subprocess (cached).
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

#: Packages Slicer ships (or the PyTorch extension manages): never installed / upgraded by this module.
PROTECTED = frozenset({"numpy", "simpleitk", "vtk", "torch", "torchvision", "torchaudio", "requests", "packaging",
                       "slicer", "pip", "setuptools"})
#: Packages every 3D Slicer 5.10+ ships: a dependency on them needs no line in requirements.txt.
SLICER_PROVIDED = frozenset({"numpy", "simpleitk", "vtk", "requests", "idna", "certifi", "charset-normalizer",
                             "urllib3", "packaging", "pip", "setuptools", "wheel"})
TORCH = "torch"
#: rough seconds per network evaluation per sample on a 2-core CPU, by model config (see platform notes)
CPU_SECONDS_PER_STEP = {"small": 0.03, "paper": 0.12}
CPU_OVERHEAD_SECONDS = 6.0  # python + torch import, weights load, autoencoder, paste-back
WARM_OVERHEAD_SECONDS = 1.0  # warm backend: torch and the models are already loaded


class DependencyError(Exception):
    """One-line message telling the user what to install."""


def requirementsPath() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt")


def readRequirements(path: Optional[str] = None) -> list[str]:
    out = []
    with open(path or requirementsPath(), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def requirementName(req: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(req).name


def installedVersion(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def isSatisfied(req: str) -> bool:
    from packaging.requirements import Requirement

    r = Requirement(req)
    if r.marker is not None and not r.marker.evaluate():
        return True
    v = installedVersion(r.name)
    return v is not None and (not r.specifier or r.specifier.contains(v, prereleases=True))


def installableRequirements(requirements: Optional[list[str]] = None) -> list[str]:
    """The requirements pip installs (everything but the ``torch`` minimum)."""
    reqs = readRequirements() if requirements is None else requirements
    return [r for r in reqs if requirementName(r).lower() != TORCH]


def torchRequirement(requirements: Optional[list[str]] = None) -> str:
    """The ``torch`` line of requirements.txt (e.g. ``torch>=2.8``): the minimum the MONAI pin needs."""
    reqs = readRequirements() if requirements is None else requirements
    found = [r for r in reqs if requirementName(r).lower() == TORCH]
    if len(found) != 1:
        raise DependencyError(f"{requirementsPath()} must name the torch minimum exactly once (found {len(found)})")
    return found[0]


def missingRequirements(requirements: Optional[list[str]] = None) -> list[str]:
    return [r for r in installableRequirements(requirements) if not isSatisfied(r)]


def checkProtected(requirements: list[str]) -> None:
    bad = [r for r in requirements if requirementName(r).lower() in PROTECTED]
    if bad:
        raise DependencyError(f"requirements must not include Slicer-managed packages: {', '.join(bad)}")


def _runtimeRequirements(name: str) -> list:
    """``Requires-Dist`` of an installed distribution that apply here (no extras, markers evaluated)."""
    from importlib.metadata import requires
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for text in requires(name) or []:
        try:
            r = Requirement(text)
        except InvalidRequirement:
            continue
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(r)
    return out


def dependencyConflicts(requirements: Optional[list[str]] = None) -> list[str]:
    """One line per installed backend package whose own requirements are not met by what is installed (pip, run
    with ``--no-deps``, never checked them), e.g. ``monai 1.6.1 needs torch>=2.8.0 (installed: 2.1.0)``."""
    from packaging.requirements import Requirement

    out = []
    for req in readRequirements() if requirements is None else requirements:
        name = Requirement(req).name
        have = installedVersion(name)
        if have is None:
            continue
        for dep in _runtimeRequirements(name):
            got = installedVersion(dep.name)
            if got is None:
                out.append(f"{name} {have} needs {dep.name}{dep.specifier} (not installed)")
            elif dep.specifier and not dep.specifier.contains(got.split("+")[0], prereleases=True):
                out.append(f"{name} {have} needs {dep.name}{dep.specifier} (installed: {got})")
    return out


@dataclass
class TorchStatus:
    installed: bool
    version: Optional[str]
    pyTorchExtension: bool

    def message(self) -> str:
        if self.installed:
            return f"PyTorch {self.version} installed"
        if self.pyTorchExtension:
            return "PyTorch is not installed yet: it will be installed through the PyTorch extension on Apply"
        return ("PyTorch is required: install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
                "then press Apply again")


def torchStatus() -> TorchStatus:
    import importlib.util

    return TorchStatus(installed=installedVersion("torch") is not None, version=installedVersion("torch"),
                       pyTorchExtension=importlib.util.find_spec("PyTorchUtils") is not None)


def checkTorchVersion(version: str, requirement: Optional[str] = None) -> None:
    """DependencyError (saying how to upgrade through the PyTorch extension) when ``version`` is too old."""
    from packaging.requirements import Requirement

    requirement = requirement or torchRequirement()
    spec = Requirement(requirement).specifier
    if spec.contains(str(version).split("+")[0], prereleases=True):
        return
    pins = [r for r in installableRequirements() if requirementName(r).lower() == "monai"]
    why = f" (required by {pins[0]})" if pins else ""
    raise DependencyError(
        f"PyTorch {version} is too old: SpineInpaint needs torch{spec}{why}. Upgrade it in Slicer: Modules > "
        f"Utilities > PyTorch Utils, click 'Uninstall PyTorch', restart Slicer, set the Torch version requirement to "
        f"'{spec}' and click 'Install PyTorch' (or press Apply here to install it)")


def ensureTorch(askConfirmation: bool = True) -> str:
    """Install torch through PyTorchUtils if needed; returns the installed version or raises DependencyError."""
    from packaging.requirements import Requirement

    requirement = torchRequirement()
    status = torchStatus()
    if status.installed:
        checkTorchVersion(status.version, requirement)
        return status.version
    if not status.pyTorchExtension:
        raise DependencyError(status.message())
    import PyTorchUtils  # noqa: the PyTorch extension, only inside Slicer

    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                           torchVersionRequirement=str(Requirement(requirement).specifier))
    if torch is None:
        raise DependencyError("PyTorch installation was cancelled or failed: the module cannot run without it")
    version = installedVersion("torch") or "unknown"
    checkTorchVersion(version, requirement)
    return version


def installRequirements(requirements: Optional[list[str]] = None, pipInstall: Optional[Callable] = None,
                        log: Callable[[str], None] = print) -> list[str]:
    """pip-install the missing pinned requirements with ``--no-deps``; returns what was installed."""
    reqs = installableRequirements(requirements)
    checkProtected(reqs)
    missing = missingRequirements(reqs)
    if not missing:
        return []
    if pipInstall is None:
        import slicer

        pipInstall = slicer.util.pip_install
    for req in missing:
        log(f"Installing {req} ...")
        pipInstall(f"{req} --no-deps")
    still = missingRequirements(missing)
    if still:
        raise DependencyError(f"could not install {', '.join(still)}: see the Python console for pip's output")
    return missing


# ---------------------------------------------------------------------------------------------- device
PROBE_SCRIPT = (
    "import json\n"
    "try:\n"
    "    import torch\n"
    "    info = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
    "    info['name'] = torch.cuda.get_device_name(0) if info['cuda'] else ''\n"
    "    info['memory_gb'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if info['cuda'] else 0\n"
    "    mps = getattr(torch.backends, 'mps', None)\n"
    "    info['mps'] = bool(mps is not None and mps.is_available())\n"
    "    info['threads'] = torch.get_num_threads()\n"
    "except Exception as e:\n"
    "    info = {'error': f'{type(e).__name__}: {e}'}\n"
    "print(json.dumps(info))\n"
)


@dataclass
class DeviceInfo:
    torch: Optional[str] = None
    cuda: bool = False
    name: str = ""
    memoryGb: float = 0.0
    mps: bool = False
    threads: int = 0
    error: str = ""


_DEVICE_CACHE: dict = {}


def probeDevice(python: Optional[str] = None, env: Optional[dict] = None, timeout: float = 60.0,
                useCache: bool = True) -> DeviceInfo:
    """What the backend process will see (torch version, CUDA device name), probed in a subprocess."""
    from .runner import backendEnvironment, pythonExecutable

    python = python or pythonExecutable()
    if useCache and python in _DEVICE_CACHE:
        return _DEVICE_CACHE[python]
    try:
        out = subprocess.run([python, "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=timeout,
                             env=env or backendEnvironment())
        line = (out.stdout.strip().splitlines() or ["{}"])[-1]
        d = json.loads(line)
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        d = {"error": f"device probe failed: {e}"}
    info = DeviceInfo(torch=d.get("torch"), cuda=bool(d.get("cuda")), name=d.get("name", ""),
                      memoryGb=float(d.get("memory_gb", 0) or 0), mps=bool(d.get("mps")),
                      threads=int(d.get("threads", 0) or 0), error=d.get("error", ""))
    if not info.error:
        _DEVICE_CACHE[python] = info
    return info


#: RePaint resamples (jumps back and re-denoises): ~8x the network evaluations of one PLMS chain (410 for 50 steps)
REPAINT_FACTOR = 8.0


def estimateCpuSeconds(steps: int, samples: int, config: str = "small", methods=1, warm: bool = False) -> float:
    """Rough CPU run time: overhead + network evaluations (steps + 1 warm-up) x samples, per method.

    ``methods``: a count of PLMS runs, or the method names (RePaint counts ``REPAINT_FACTOR`` times). ``warm``: the
    warm backend worker is running (no imports, models loaded), so the per-run overhead is small.
    """
    perStep = CPU_SECONDS_PER_STEP.get(config, CPU_SECONDS_PER_STEP["paper"])
    names = ["weighted"] * int(methods) if isinstance(methods, int) else list(methods)
    overhead = WARM_OVERHEAD_SECONDS if warm else CPU_OVERHEAD_SECONDS
    return sum(overhead + (int(steps) + 1) * int(samples) * perStep *
               (REPAINT_FACTOR if m == "repaint" else 1.0) for m in names)


def deviceMessage(info: DeviceInfo, requested: str = "auto", steps: int = 50, samples: int = 1,
                  config: str = "small", methods: int = 1, warm: bool = False) -> str:
    """'CUDA found: <name>' or 'running on CPU, expect ~N s' (or why the device cannot be used)."""
    if info.error:
        return f"PyTorch not usable by the backend ({info.error})"
    if requested == "cuda" and not info.cuda:
        return "CUDA requested but not available: choose 'auto' or 'cpu'"
    if requested in ("auto", "cuda") and info.cuda:
        mem = f", {info.memoryGb:g} GB" if info.memoryGb else ""
        return f"CUDA found: {info.name}{mem}"
    if requested in ("auto", "mps") and info.mps:
        return "Apple GPU (MPS) found"
    seconds = estimateCpuSeconds(steps, samples, config, methods, warm)
    return f"running on CPU, expect ~{int(round(seconds))} s"
