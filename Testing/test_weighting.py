"""Gaussian weight maps on anisotropic oblique grids and point sets; ROI threshold."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm.errors import InputError
from spine_ldm.weighting import (gaussian_weight, gaussian_weight_points, roi_mask, squared_distance_map,
                                 weight_radius_mm)


def _oblique_grid(size=(21, 17, 9), spacing=(0.5, 0.8, 4.0)):
    a, b = math.radians(15), math.radians(-25)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    d = rz @ rx @ np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).T
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    img.SetDirection(d.reshape(-1).tolist())
    img.SetOrigin((12.5, -40.25, 7.0))
    return img


def _brute_force(grid, landmark, sigma):
    ni, nj, nk = grid.GetSize()
    w = np.zeros((nk, nj, ni))
    for k in range(nk):
        for j in range(nj):
            for i in range(ni):
                p = np.asarray(grid.TransformIndexToPhysicalPoint((i, j, k)))
                w[k, j, i] = math.exp(-np.sum((p - landmark) ** 2) / (2 * sigma**2))
    return w


def test_peak_one_at_landmark_and_one_sigma_along_each_axis():
    grid = _oblique_grid()
    sigma = 4.0
    c = (10, 8, 4)
    lm = np.asarray(grid.TransformIndexToPhysicalPoint(c))
    w = gaussian_weight(grid, lm, sigma)
    assert w.dtype == np.float32 and w.shape == (9, 17, 21)
    assert w[c[2], c[1], c[0]] == 1.0
    assert w.max() == 1.0 and np.argmax(w) == np.ravel_multi_index((c[2], c[1], c[0]), w.shape)
    e = math.exp(-0.5)
    # one sigma = 8 voxels along i (0.5 mm), 5 along j (0.8 mm), 1 along k (4 mm), either side
    for di, dj, dk in [(8, 0, 0), (-8, 0, 0), (0, 5, 0), (0, -5, 0), (0, 0, 1), (0, 0, -1)]:
        assert w[c[2] + dk, c[1] + dj, c[0] + di] == pytest.approx(e, abs=1e-6)
    # i = 0 is 10 voxels = 5 mm away; diagonal (8, 5, 0) voxels: d^2 = 4^2 + 4^2
    assert w[c[2], c[1], 0] == pytest.approx(math.exp(-0.5 * (5.0 / 4) ** 2), abs=1e-6)
    assert w[c[2], c[1] + 5, c[0] + 8] == pytest.approx(math.exp(-1.0), abs=1e-6)


def test_matches_brute_force_on_oblique_grid_off_voxel_landmark():
    grid = _oblique_grid(size=(11, 9, 5))
    lm = np.asarray(grid.TransformContinuousIndexToPhysicalPoint((4.3, 3.7, 2.2)))
    w = gaussian_weight(grid, lm, 3.0)
    np.testing.assert_allclose(w, _brute_force(grid, lm, 3.0), rtol=1e-6, atol=1e-7)
    d2 = squared_distance_map(grid, lm)
    assert d2.min() > 0


def test_points_and_roi():
    lm = np.array([1.0, 2.0, 3.0])
    pts = lm + np.array([[0, 0, 0], [16.0, 0, 0], [0, -16.0, 0], [0, 0, 32.0], [9.6, 12.8, 0]])
    w = gaussian_weight_points(pts, lm, 16.0)
    assert w.dtype == np.float32 and w.shape == (5,)
    np.testing.assert_allclose(w, [1.0, math.exp(-0.5), math.exp(-0.5), math.exp(-2.0), math.exp(-0.5)], rtol=1e-6)
    np.testing.assert_array_equal(roi_mask(w, 0.5), [True, True, True, False, True])
    np.testing.assert_array_equal(roi_mask(w, 0.61), [True, False, False, False, False])
    # ROI threshold 0.1 <=> distance <= sigma * sqrt(-2 ln 0.1) = 34.34 mm for sigma 16
    r = weight_radius_mm(16.0, 0.1)
    assert r == pytest.approx(16.0 * math.sqrt(2 * math.log(10)))
    w2 = gaussian_weight_points(lm + np.array([[r - 0.01, 0, 0], [r + 0.01, 0, 0]]), lm, 16.0)
    np.testing.assert_array_equal(roi_mask(w2), [True, False])


def test_roi_volume_on_grid():
    grid = sitk.Image([61, 61, 61], sitk.sitkUInt8)
    grid.SetOrigin((-30.0, -30.0, -30.0))
    sigma, thr = 8.0, 0.1
    m = roi_mask(gaussian_weight(grid, (0.0, 0.0, 0.0), sigma), thr)
    r = weight_radius_mm(sigma, thr)
    assert m.sum() == pytest.approx(4 / 3 * math.pi * r**3, rel=0.03)
    assert m[30, 30, 30] and not m[30, 30, 30 + int(math.ceil(r))]


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_bad_sigma(sigma):
    with pytest.raises(InputError, match="sigma"):
        gaussian_weight_points([[0, 0, 0]], (0, 0, 0), sigma)


def test_bad_landmark():
    with pytest.raises(InputError, match="landmark"):
        gaussian_weight(_oblique_grid(), (0.0, float("nan"), 1.0), 5.0)
