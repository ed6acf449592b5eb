"""Shared, generic pytest fixtures for the SpineInpaint test suites.

* ``make_volume(spacing, direction, size, origin, dtype, center)``: a 3D ``sitk.Image`` whose
  voxels sample a smooth, asymmetric test pattern defined in **physical LPS mm**, so the
  same anatomy-free "object" is seen by volumes of any orientation/spacing and linear
  interpolation errors are small and predictable.
* ``smooth_pattern(points_lps, dtype)``: the analytic pattern itself (reference values).
* ``shared_data``: Path to ``<repo>/../shared/data/lumbar_t2`` (skips the test when absent).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_LUMBAR_T2 = REPO_ROOT.parent / "shared" / "data" / "lumbar_t2"

# Output intensity scale per dtype: pattern in [~0.05, ~0.95] times this.
_SCALE = {np.dtype(np.uint8): 250.0, np.dtype(np.int16): 2000.0, np.dtype(np.uint16): 2000.0,
          np.dtype(np.float32): 1000.0, np.dtype(np.float64): 1000.0}


def _pattern01(points_lps: np.ndarray) -> np.ndarray:
    """Smooth asymmetric field in ~[0.05, 0.95]; wavelengths 60-110 mm, no symmetry planes."""
    p = np.asarray(points_lps, dtype=np.float64)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return (0.5 + 0.16 * np.sin(x / 11.0 + 0.3) + 0.13 * np.cos(y / 13.0 + 0.2)
            + 0.11 * np.sin(z / 17.0 + 1.0) + 0.03 * np.sin((x + y - z) / 9.0))


def pattern_values(points_lps, dtype=np.float32) -> np.ndarray:
    """Pattern values (float64) at LPS points, in the intensity scale used for ``dtype``."""
    return _pattern01(points_lps) * _SCALE[np.dtype(dtype)]


def voxel_centres_lps(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (K, J, I, 3) (numpy order)."""
    ni, nj, nk = image.GetSize()
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = d * np.asarray(image.GetSpacing())[None, :]
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    idx = np.stack([ii, jj, kk], axis=-1).astype(np.float64)
    return np.asarray(image.GetOrigin())[None, None, None, :] + idx @ m.T


def _make_volume(spacing=(1.0, 1.0, 1.0), direction=None, size=(48, 48, 24), origin=None,
                 dtype=np.float32, center=(0.0, 0.0, 0.0)) -> sitk.Image:
    """3D image (ITK-order ``size``/``spacing``, row-major 3x3 ``direction``) sampling the smooth
    pattern. When ``origin`` is None the grid's centre is placed at ``center`` (LPS mm)."""
    dtype = np.dtype(dtype)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    size = [int(s) for s in size]
    sp = np.asarray(spacing, dtype=np.float64)
    if origin is None:
        half = (np.asarray(size, dtype=np.float64) - 1) / 2.0
        origin = np.asarray(center, dtype=np.float64) - (d * sp[None, :]) @ half
    img = sitk.Image(size, sitk.sitkUInt8)
    img.SetSpacing([float(v) for v in sp])
    img.SetDirection([float(v) for v in d.reshape(-1)])
    img.SetOrigin([float(v) for v in origin])
    vals = pattern_values(voxel_centres_lps(img), dtype)
    if np.issubdtype(dtype, np.integer):
        vals = np.rint(vals)
    out = sitk.GetImageFromArray(vals.astype(dtype))
    out.CopyInformation(img)
    return out


@pytest.fixture
def make_volume():
    """Factory: ``make_volume(spacing, direction, size, origin=None, dtype=np.float32, center=(0,0,0))``."""
    return _make_volume


@pytest.fixture
def smooth_pattern():
    """The analytic test pattern: ``smooth_pattern(points_lps, dtype=np.float32) -> float64 array``."""
    return pattern_values


@pytest.fixture
def voxel_centres():
    """``voxel_centres(image) -> (K, J, I, 3)`` LPS coordinates of every voxel centre."""
    return voxel_centres_lps


@pytest.fixture
def shared_data() -> Path:
    """``<repo>/../shared/data/lumbar_t2``; the test is skipped when it is absent."""
    if not SHARED_LUMBAR_T2.is_dir():
        pytest.skip(f"shared data not available at {SHARED_LUMBAR_T2}")
    return SHARED_LUMBAR_T2
