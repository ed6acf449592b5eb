"""Backend packages for Slicer's Python (``Resources/requirements.txt``, ``SpineInpaintLib/dependencies.py``).

The panel installs them with ``--no-deps`` (pip must never replace Slicer's numpy / SimpleITK / vtk / torch), so pip
checks nothing: these tests do it against the packages' own metadata, in this environment where the same pins are
installed.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SpineInpaint"))
from SpineInpaintLib import dependencies  # noqa: E402

PROBE_VERSIONS = ("1.13.1", "2.1.0", "2.7.1", "2.8.0", "2.8.1", "2.13.0", "3.0.0")


def _installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def test_torch_minimum_is_what_the_monai_pin_requires():
    reqs = dependencies.readRequirements()
    torch = Requirement(dependencies.torchRequirement(reqs))
    monai = next(Requirement(r) for r in reqs if Requirement(r).name == "monai")
    pinned = next(iter(monai.specifier)).version
    if _installed("monai") != pinned:
        pytest.skip(f"monai {pinned} (the pin) is not installed here")
    needed = next(r for r in dependencies._runtimeRequirements("monai") if r.name == "torch")
    for v in PROBE_VERSIONS:  # the same set of torch versions is accepted
        assert torch.specifier.contains(v) == needed.specifier.contains(v), (v, str(torch), str(needed))
    assert not torch.specifier.contains("2.1.0")  # what the panel used to accept


def test_requirements_are_closed_under_their_dependencies():
    """Every runtime dependency of every installable pin is itself listed (compatibly) or shipped by Slicer."""
    reqs = {Requirement(r).name.lower().replace("_", "-"): Requirement(r)
            for r in dependencies.installableRequirements()}
    problems = []
    for name, req in reqs.items():
        have = _installed(name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            pytest.skip(f"{name} {req.specifier} is not what is installed here ({have})")
        for dep in dependencies._runtimeRequirements(name):
            key = dep.name.lower().replace("_", "-")
            if key == "torch":
                continue  # the PyTorch extension's; its minimum is the torch line
            if key in dependencies.SLICER_PROVIDED:
                continue
            if key not in reqs:
                problems.append(f"{name} needs {dep} which requirements.txt does not list")
                continue
            listed = reqs[key].specifier
            probe = _installed(key)
            if not (dep.specifier.contains(probe, prereleases=True) and listed.contains(probe, prereleases=True)):
                problems.append(f"{name} needs {dep}, requirements.txt has {reqs[key]}")
    assert not problems, problems


def test_requirements_leave_slicer_packages_alone():
    installable = dependencies.installableRequirements()
    names = {dependencies.requirementName(r).lower() for r in installable}
    assert not names & dependencies.PROTECTED
    assert {"monai", "einops", "psutil", "fastapi", "uvicorn", "python-multipart"} <= names
    with pytest.raises(dependencies.DependencyError, match="numpy"):
        dependencies.checkProtected(["numpy==2.0", "monai==1.6.1"])
    calls = []
    assert dependencies.installRequirements(["torch>=2.8", "monai==1.6.1"], pipInstall=calls.append,
                                            log=lambda s: None) == []  # torch is checked, never installed
    with pytest.raises(dependencies.DependencyError, match="could not install surely-not-installed-pkg==1.0"):
        dependencies.installRequirements(["monai==1.6.1", "surely-not-installed-pkg==1.0"],
                                         pipInstall=calls.append, log=lambda s: None)
    assert calls == ["surely-not-installed-pkg==1.0 --no-deps"]  # monai 1.6.1 is present: not reinstalled


def test_old_torch_is_refused_with_how_to_upgrade(monkeypatch):
    spec = str(Requirement(dependencies.torchRequirement()).specifier)
    monkeypatch.setattr(dependencies, "torchStatus",
                        lambda: dependencies.TorchStatus(installed=True, version="2.1.0+cu121", pyTorchExtension=True))
    with pytest.raises(dependencies.DependencyError) as err:
        dependencies.ensureTorch(askConfirmation=False)
    message = str(err.value)
    assert message.startswith("PyTorch 2.1.0+cu121 is too old: SpineInpaint needs torch" + spec)
    assert "monai==1.6.1" in message and "PyTorch Utils" in message and "Uninstall PyTorch" in message
    assert "\n" not in message
    monkeypatch.setattr(dependencies, "torchStatus",
                        lambda: dependencies.TorchStatus(installed=True, version="2.8.0+cpu", pyTorchExtension=True))
    assert dependencies.ensureTorch(askConfirmation=False) == "2.8.0+cpu"


def test_dependency_conflicts_read_the_installed_metadata(monkeypatch):
    if _installed("monai") is None or _installed("torch") is None:
        pytest.skip("monai and torch are not installed")
    assert dependencies.dependencyConflicts(["monai==1.6.1"]) == []
    real = dependencies.installedVersion
    monkeypatch.setattr(dependencies, "installedVersion", lambda n: "2.1.0" if n == "torch" else real(n))
    conflicts = dependencies.dependencyConflicts(["monai==1.6.1"])
    assert conflicts == [f"monai {_installed('monai')} needs torch>=2.8.0 (installed: 2.1.0)"]
