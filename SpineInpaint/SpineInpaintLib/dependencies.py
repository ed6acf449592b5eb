"""First-use dependency check and install, and the GPU / CPU message.

Policy (same as SlicerNNUnet / SlicerTotalSegmentator):

- torch is never pip-installed here: it comes from the *PyTorch* extension (``PyTorchUtils``), which picks the
  build matching the GPU driver. Without that extension the user gets a clear message saying what to install.
- The other backend packages (``Resources/requirements.txt``: monai, einops, ...) are installed with pinned
  versions only when the user presses Apply (never at module load), one by one with ``--no-deps`` so that pip never
  replaces Slicer's own numpy, SimpleITK, vtk or torch. Any of those appearing in the requirements file is refused.
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
MINIMUM_TORCH = ">=2.1"
#: rough seconds per network evaluation per sample on a 2-core CPU, by model config (see platform notes)
CPU_SECONDS_PER_STEP = {"small": 0.03, "paper": 0.12}
CPU_OVERHEAD_SECONDS = 6.0  # python + torch import, weights load, autoencoder, paste-back


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


def missingRequirements(requirements: Optional[list[str]] = None) -> list[str]:
    reqs = readRequirements() if requirements is None else requirements
    return [r for r in reqs if not isSatisfied(r)]


def checkProtected(requirements: list[str]) -> None:
    bad = [r for r in requirements if requirementName(r).lower() in PROTECTED]
    if bad:
        raise DependencyError(f"requirements must not include Slicer-managed packages: {', '.join(bad)}")


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


def ensureTorch(askConfirmation: bool = True) -> str:
    """Install torch through PyTorchUtils if needed; returns the installed version or raises DependencyError."""
    status = torchStatus()
    if status.installed:
        from packaging.specifiers import SpecifierSet

        if not SpecifierSet(MINIMUM_TORCH).contains(status.version.split("+")[0], prereleases=True):
            raise DependencyError(f"PyTorch {status.version} is too old ({MINIMUM_TORCH} needed): update it with "
                                  "the 'PyTorch Util' module")
        return status.version
    if not status.pyTorchExtension:
        raise DependencyError(status.message())
    import PyTorchUtils  # noqa: the PyTorch extension, only inside Slicer

    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                           torchVersionRequirement=MINIMUM_TORCH)
    if torch is None:
        raise DependencyError("PyTorch installation was cancelled or failed: the module cannot run without it")
    return installedVersion("torch") or "unknown"


def installRequirements(requirements: Optional[list[str]] = None, pipInstall: Optional[Callable] = None,
                        log: Callable[[str], None] = print) -> list[str]:
    """pip-install the missing pinned requirements with ``--no-deps``; returns what was installed."""
    reqs = readRequirements() if requirements is None else requirements
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


def estimateCpuSeconds(steps: int, samples: int, config: str = "small", methods=1) -> float:
    """Rough CPU run time: overhead + network evaluations (steps + 1 warm-up) x samples, per method.

    ``methods``: a count of PLMS runs, or the method names (RePaint counts ``REPAINT_FACTOR`` times).
    """
    perStep = CPU_SECONDS_PER_STEP.get(config, CPU_SECONDS_PER_STEP["paper"])
    names = ["weighted"] * int(methods) if isinstance(methods, int) else list(methods)
    return sum(CPU_OVERHEAD_SECONDS + (int(steps) + 1) * int(samples) * perStep *
               (REPAINT_FACTOR if m == "repaint" else 1.0) for m in names)


def deviceMessage(info: DeviceInfo, requested: str = "auto", steps: int = 50, samples: int = 1,
                  config: str = "small", methods: int = 1) -> str:
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
    seconds = estimateCpuSeconds(steps, samples, config, methods)
    return f"running on CPU, expect ~{int(round(seconds))} s"
