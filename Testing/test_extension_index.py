"""Static checks of the rules the Slicer Extensions Index validator applies to a submission.

The validator (Slicer/ExtensionsIndex ``scripts/check_description_files.py``) clones the repository named in the
catalog entry and checks: the entry against the catalog-entry JSON schema, LF line endings, the extension name (no
``Slicer`` prefix) and the git repository name (``Slicer`` prefix), the category (accepted list), the ``scm_url``
scheme, the top-level ``CMakeLists.txt`` (``project()`` name = extension name, icon and screenshot URLs that serve
images), the repository size (< 100 MB) and a license file at the root. Everything that does not need the network
is checked here, against the files of this checkout; the URLs must be raw URLs of files that are in the repository.
What stays manual: the GitHub repository really being named as ``scm_url`` says, its ``3d-slicer-extension`` topic,
and the raw URLs answering once ``main`` is pushed.
"""
from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "SpineInpaint"
ENTRY = REPO / f"{EXTENSION_NAME}.json"
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
# catalog-entry schema v1.0.2: required keys, and every allowed key with its JSON type
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
                "tier": int}
# ACCEPTED_EXTENSION_CATEGORIES of the validator (snapshot 2026-08)
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote",
    "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization",
    "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards"}
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
IMAGE_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


def _entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def _cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_set(name: str) -> str:
    # the validator's own patterns: set(NAME "value") with the value in double quotes
    m = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', _cmake(), re.IGNORECASE)
    assert m, f"{name} is not set as a quoted string in CMakeLists.txt"
    return m.group(1)


def _repo_path(scm_url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(scm_url)
    owner, name = parts.path.strip("/").split("/")[:2]
    return owner, name.removesuffix(".git")


def test_catalog_entry_matches_the_schema():
    raw = ENTRY.read_bytes()
    assert b"\r" not in raw, "the validator refuses CR/CRLF line endings"
    entry = _entry()
    assert SCHEMA_REQUIRED <= set(entry), SCHEMA_REQUIRED - set(entry)
    unknown = set(entry) - set(SCHEMA_TYPES)
    assert not unknown, f"not allowed by the schema (additionalProperties false): {unknown}"
    for key, value in entry.items():
        assert type(value) is SCHEMA_TYPES[key], (key, value)  # bool is not an int here, as in JSON schema
    assert entry["$schema"] == SCHEMA_URL
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert 1 <= entry["tier"] <= 5 and entry.get("scm_type", "git") in ("git", "local")


def test_catalog_entry_names_category_and_dependencies():
    entry = _entry()
    assert not EXTENSION_NAME.lower().startswith("slicer")  # the extension name must not start with Slicer ...
    owner, repo = _repo_path(entry["scm_url"])
    assert repo.startswith(("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")), repo  # ... its repo must
    assert urllib.parse.urlsplit(entry["scm_url"]).scheme in ("git", "https")
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert entry["category"] == _cmake_set("EXTENSION_CATEGORY") == "Image Synthesis"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_dependencies"] == _cmake_set("EXTENSION_DEPENDS").split()
    assert _repo_path(_cmake_set("EXTENSION_HOMEPAGE")) == (owner, repo)
    assert entry["scm_revision"] == "main"


def test_top_level_cmakelists_project_is_the_extension_name():
    m = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", _cmake(), re.IGNORECASE)
    assert m and m[0].strip("\"'") == EXTENSION_NAME == ENTRY.stem


@pytest.mark.parametrize("key", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_icon_and_screenshots_are_raw_urls_of_images_in_this_repository(key):
    entry = _entry()
    owner, repo = _repo_path(entry["scm_url"])
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    urls = _cmake_set(key).split()
    assert urls and (key != "EXTENSION_ICONURL" or len(urls) == 1)
    prefix = f"https://raw.githubusercontent.com/{owner}/{repo}/{entry['scm_revision']}/"
    for url in urls:
        assert url.startswith(prefix), f"{url} is not a raw URL of {owner}/{repo} at {entry['scm_revision']}"
        rel = url[len(prefix):]
        suffix = Path(rel).suffix.lower()
        assert suffix in IMAGE_MAGIC, f"{url}: the validator wants .png/.jpg/.gif"
        assert rel in tracked, f"{rel} is not a file committed to the repository"
        assert (REPO / rel).read_bytes().startswith(IMAGE_MAGIC[suffix]), f"{rel} is not a {suffix} image"


def test_license_at_the_root_and_repository_small():
    assert any((REPO / n).is_file() for n in LICENSE_NAMES)
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    total = sum((REPO / f).stat().st_size for f in files.decode().split("\0") if f and (REPO / f).is_file())
    assert total < 100 * 2 ** 20, f"{total / 2 ** 20:.1f} MB: the validator refuses repositories over 100 MB"


def test_minimum_slicer_version_is_stated_consistently():
    import sys

    sys.path.insert(0, str(REPO / "SpineInpaint"))
    try:
        import SpineInpaintLib
    finally:
        sys.path.remove(str(REPO / "SpineInpaint"))
    version = SpineInpaintLib.MINIMUM_SLICER_VERSION
    assert re.fullmatch(r"5\.\d+", version)
    assert re.search(rf"^find_package\(Slicer {re.escape(version)} REQUIRED\)", _cmake(), re.M)
    assert f"3D Slicer {version} or later" in _cmake_set("EXTENSION_DESCRIPTION")
    assert f"3D Slicer {version} or later" in (REPO / "README.md").read_text(encoding="utf-8")
