"""FSU geometry: frame axes, known indices, extract/paste-back round trips, dtype and
bit-identity guarantees, input errors, latent grid, normalisation, disc-centre estimate."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm import geometry as g
from spine_ldm.errors import InputError

CANON = np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]]).T  # columns = FSU axes (LR, AP, SI)
SAGITTAL = np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).T  # columns: i -> P, j -> I, k -> R (typical sagittal)


def rot_x(deg):
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def rot_z(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


# name -> (spacing ITK, direction (columns = axes), size ITK, oblique?)
CASES = {
    "identity": ((1.0, 1.0, 1.0), np.eye(3), (70, 100, 100), False),
    "flipped_ras": ((1.0, 1.0, 1.0), np.diag([-1.0, -1.0, 1.0]), (70, 100, 100), False),
    "oblique15": ((0.8, 0.8, 2.0), rot_x(15) @ SAGITTAL, (130, 130, 40), True),
    "oblique15_twisted": ((0.8, 0.8, 2.0), rot_z(-10) @ rot_x(15) @ SAGITTAL, (130, 130, 40), True),
    "anisotropic": ((0.6, 0.6, 4.3), SAGITTAL, (170, 170, 15), False),
    "axial": ((0.7, 0.7, 3.0), np.eye(3), (130, 130, 34), False),
}
CENTER = np.array([2.3, -1.7, 3.1])
SPEC = g.FSUSpec()
CENTER_IDX = np.array([15.5, 31.5, 63.5])  # (i, j, k) = (LR, AP, SI): (size - 1) / 2


def _vol(make_volume, name, dtype=np.float32):
    spacing, d, size, _ = CASES[name]
    return make_volume(spacing=spacing, direction=d, size=size, dtype=dtype)


def _frame_index(frame: sitk.Image, pts: np.ndarray) -> np.ndarray:
    """Independent reference: continuous index of points in an orthonormal frame."""
    r = np.asarray(frame.GetDirection()).reshape(3, 3)
    return ((pts - np.asarray(frame.GetOrigin())) @ r) / np.asarray(frame.GetSpacing())


def _hash(img: sitk.Image) -> str:
    return hashlib.sha256(sitk.GetArrayViewFromImage(img).tobytes()).hexdigest()


def test_lps_ras_roundtrip():
    assert g.lps_to_ras((1.5, -2.0, 3.0)) == (-1.5, 2.0, 3.0)
    assert g.ras_to_lps((-1.5, 2.0, 3.0)) == (1.5, -2.0, 3.0)
    p = (12.25, -7.5, 0.125)
    assert g.ras_to_lps(g.lps_to_ras(p)) == p


def test_fsuspec_defaults():
    assert SPEC.shape == (128, 64, 32)
    assert SPEC.spacing_mm == pytest.approx((0.625, 1.25, 1.5625))
    assert SPEC.itk_size == (32, 64, 128)
    small = g.FSUSpec.small()
    assert small.shape == (64, 32, 16) and small.size_mm == (80.0, 80.0, 50.0)
    assert small.spacing_mm == pytest.approx((1.25, 2.5, 3.125))
    assert g.FSUSpec.from_dict(json.loads(json.dumps(small.to_dict()))) == small
    with pytest.raises(InputError):
        g.FSUSpec(shape=(0, 64, 32))


@pytest.mark.parametrize("name", list(CASES))
def test_frame_axes_canonical_and_centered(make_volume, name):
    img = _vol(make_volume, name)
    frame = g.fsu_frame(img, CENTER, SPEC)
    r = np.asarray(frame.GetDirection()).reshape(3, 3)
    assert frame.GetSize() == (32, 64, 128)
    assert frame.GetSpacing() == pytest.approx((1.5625, 1.25, 0.625))
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
    if CASES[name][3]:
        d = np.asarray(img.GetDirection()).reshape(3, 3)
        for a in range(3):
            # each FSU axis is +- one of the input's own axes, and the one closest to canonical
            dots = d.T @ r[:, a]
            assert np.max(np.abs(dots)) == pytest.approx(1.0, abs=1e-12)
            assert r[:, a] @ CANON[:, a] > math.cos(math.radians(20))
    else:
        np.testing.assert_allclose(r, CANON, atol=1e-12)
    # the frame centre is exactly the requested point
    centre = frame.TransformContinuousIndexToPhysicalPoint(CENTER_IDX.tolist())
    np.testing.assert_allclose(centre, CENTER, atol=1e-9)
    np.testing.assert_allclose(g.disc_frame_index(frame, CENTER), CENTER_IDX, atol=1e-9)
    np.testing.assert_allclose(g.disc_frame_index(frame, CENTER, order="numpy"), CENTER_IDX[::-1], atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_point_superior_lands_16_voxels_up(make_volume, name):
    img = _vol(make_volume, name)
    fsu = g.extract_fsu(img, CENTER, SPEC)
    k_dir = np.asarray(fsu.GetDirection()).reshape(3, 3)[:, 2]
    up = -k_dir  # superior along the FSU's SI axis
    if not CASES[name][3]:
        np.testing.assert_allclose(up, [0, 0, 1], atol=1e-12)  # 10 mm superior in LPS = +10 z
    idx = g.disc_frame_index(fsu, CENTER + 10.0 * up)
    np.testing.assert_allclose(idx, CENTER_IDX + [0, 0, -16.0], atol=1e-9)
    idx = g.disc_frame_index(fsu, CENTER + 10.0 * np.asarray(fsu.GetDirection()).reshape(3, 3)[:, 1])
    np.testing.assert_allclose(idx, CENTER_IDX + [0, 8.0, 0], atol=1e-9)  # 10 mm posterior = 8 AP voxels


@pytest.mark.parametrize("name", list(CASES))
def test_extract_samples_the_physical_pattern(make_volume, smooth_pattern, voxel_centres, name):
    img = _vol(make_volume, name)
    fsu = g.extract_fsu(img, CENTER, SPEC)
    assert fsu.GetPixelID() == sitk.sitkFloat32
    arr = sitk.GetArrayFromImage(fsu)
    assert arr.shape == (128, 64, 32)
    ref = smooth_pattern(voxel_centres(fsu))
    err = np.abs(arr - ref)
    assert err.max() < 10.0, f"{name}: max error {err.max():.2f} on a 0-1000 pattern"
    # anatomy orientation: value at the FSU numpy [k, j, i] equals the pattern at that point
    p = fsu.TransformIndexToPhysicalPoint((3, 50, 100))
    assert arr[100, 50, 3] == pytest.approx(smooth_pattern(np.array(p)), abs=10.0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("delta", [0.0, 100.0])
def test_extract_paste_back_roundtrip(make_volume, voxel_centres, name, delta):
    img = _vol(make_volume, name)
    sigma, thr = 8.0, 1e-3
    landmark = CENTER + np.array([1.0, 3.0, -2.0])
    fsu = g.extract_fsu(img, CENTER, SPEC)
    mod = sitk.GetImageFromArray(sitk.GetArrayFromImage(fsu) + np.float32(delta))
    mod.CopyInformation(fsu)
    out = g.paste_back(img, mod, landmark, sigma, threshold=thr)
    a_in = sitk.GetArrayFromImage(img).astype(np.float64)
    a_out = sitk.GetArrayFromImage(out).astype(np.float64)

    pts = voxel_centres(img)
    w = np.exp(-np.sum((pts - landmark) ** 2, axis=-1) / (2 * sigma**2))
    fidx = _frame_index(fsu, pts)
    inside = np.all((fidx >= -0.5) & (fidx < np.asarray(fsu.GetSize()) - 0.5), axis=-1)
    untouched = (w < thr) | ~inside
    assert untouched.sum() > 0.5 * untouched.size
    np.testing.assert_array_equal(a_out[untouched], a_in[untouched])  # bit-identical
    blended = ~untouched
    assert blended.sum() > 1000
    err = np.abs(a_out[blended] - (a_in[blended] + w[blended] * delta))
    assert err.max() < 15.0, f"{name}: max deviation {err.max():.2f}"
    if delta:
        peak = np.unravel_index(np.argmax(np.where(blended, w, 0)), w.shape)
        assert a_out[peak] - a_in[peak] == pytest.approx(delta * w[peak], abs=15.0)
        assert w[peak] > 0.9


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_paste_back_dtype_geometry_and_input_untouched(make_volume, dtype):
    img = make_volume(spacing=(0.6, 0.6, 4.3), direction=rot_x(15) @ SAGITTAL, size=(170, 170, 15), dtype=dtype)
    img.SetMetaData("spine_ldm_test", "kept")
    img.SetMetaData("Modality", "MR")
    before_hash, before_arr = _hash(img), sitk.GetArrayFromImage(img).copy()
    geom = (img.GetOrigin(), img.GetSpacing(), img.GetDirection(), img.GetPixelID())
    landmark = img.TransformIndexToPhysicalPoint((85, 85, 7))  # exactly on a voxel centre: W = 1 there
    fsu = g.extract_fsu(img, landmark, g.FSUSpec.small())
    big = sitk.GetImageFromArray(sitk.GetArrayFromImage(fsu) + np.float32(70000.0))  # beyond every dtype max
    big.CopyInformation(fsu)

    out = g.paste_back(img, big, landmark, 10.0)

    assert _hash(img) == before_hash
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), before_arr)
    assert (img.GetOrigin(), img.GetSpacing(), img.GetDirection(), img.GetPixelID()) == geom
    assert (out.GetOrigin(), out.GetSpacing(), out.GetDirection(), out.GetPixelID()) == geom
    assert out.GetMetaData("spine_ldm_test") == "kept" and out.GetMetaData("Modality") == "MR"
    a_out = sitk.GetArrayViewFromImage(out)
    assert a_out.dtype == np.dtype(dtype)
    at_lm = a_out[7, 85, 85]
    if np.issubdtype(np.dtype(dtype), np.integer):
        assert at_lm == np.iinfo(dtype).max  # rounded and clipped, no wrap-around
        assert a_out.min() >= before_arr.min()
    else:
        assert at_lm == pytest.approx(before_arr[7, 85, 85] + 70000.0, abs=10.0)


def test_paste_back_far_landmark_returns_identical_copy(make_volume):
    img = _vol(make_volume, "identity", np.int16)
    fsu = g.extract_fsu(img, CENTER, SPEC)
    out = g.paste_back(img, fsu, (300.0, 300.0, 300.0), 16.0)
    assert out is not img
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(img))


def test_paste_back_threshold_limits_region(make_volume):
    img = _vol(make_volume, "identity")
    fsu = g.extract_fsu(img, CENTER, SPEC)
    mod = sitk.GetImageFromArray(sitk.GetArrayFromImage(fsu) + np.float32(50))
    mod.CopyInformation(fsu)
    changed = []
    for thr in (1e-3, 0.1, 0.5):
        out = g.paste_back(img, mod, CENTER, 6.0, threshold=thr)
        changed.append(int(np.count_nonzero(sitk.GetArrayViewFromImage(out) != sitk.GetArrayViewFromImage(img))))
    # changed-voxel count = voxels within radius sigma*sqrt(-2 ln thr) (~4/3 pi r^3 at 1 mm spacing)
    for n, thr in zip(changed, (1e-3, 0.1, 0.5)):
        r = 6.0 * math.sqrt(-2 * math.log(thr))
        assert n == pytest.approx(4 / 3 * math.pi * r**3, rel=0.1)


def test_up_vector_rotates_si_within_sagittal_plane(make_volume):
    img = _vol(make_volume, "identity")
    tilt = math.radians(20)
    up = np.array([0.0, -math.sin(tilt), math.cos(tilt)])  # superior, tilted 20 deg anteriorly
    for given in (up, -3.0 * up):  # direction sign and length of the given vector do not matter
        frame = g.fsu_frame(img, CENTER, SPEC, up_lps=given)
        r = np.asarray(frame.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(r[:, 0], [-1, 0, 0], atol=1e-12)  # LR unchanged
        np.testing.assert_allclose(r[:, 2], -up, atol=1e-12)  # k = superior -> inferior along `up`
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(np.linalg.det(CANON))
        assert r[1, 1] > 0.9  # j still points posterior
        np.testing.assert_allclose(frame.TransformContinuousIndexToPhysicalPoint(CENTER_IDX.tolist()), CENTER, atol=1e-9)
    # an up vector with a left-right component is projected into the sagittal plane
    frame = g.fsu_frame(img, CENTER, SPEC, up_lps=up + [0.5, 0, 0])
    np.testing.assert_allclose(np.asarray(frame.GetDirection()).reshape(3, 3)[:, 2], -up, atol=1e-12)
    with pytest.raises(InputError, match="parallel to the left-right axis"):
        g.fsu_frame(img, CENTER, SPEC, up_lps=(1.0, 0.0, 0.0))


def test_check_point_inside_message(make_volume):
    img = _vol(make_volume, "flipped_ras")  # voxel extent x in [-35, 35], y, z in [-50, 50]
    g.check_point_inside(img, (34.9, -49.9, 49.9))
    with pytest.raises(InputError) as e:
        g.check_point_inside(img, (47.3, 0.0, 0.0))
    assert str(e.value) == "landmark (47.3, 0.0, 0.0) LPS is 12.3 mm outside the volume"
    with pytest.raises(InputError, match=r"disc centre \(0\.0, -53\.0, 54\.0\) LPS is 5\.0 mm outside"):
        g.check_point_inside(img, (0.0, -53.0, 54.0), what="disc centre")


def test_extract_fsu_mostly_outside(make_volume):
    img = _vol(make_volume, "identity")  # voxel extent z in [-50, 50]
    with pytest.raises(InputError) as e:
        g.extract_fsu(img, (0.0, 0.0, 55.0), SPEC)
    msg = str(e.value)
    assert "only 44% of the FSU (80x80x50 mm) lies inside the volume (need 50%)" in msg
    assert "(0.0, 0.0, 55.0) LPS is 5.0 mm outside the volume" in msg
    with pytest.raises(InputError, match=r"only 0% .* 45\.0 mm outside"):
        g.extract_fsu(img, (0.0, 0.0, 95.0), SPEC)
    # 56% inside passes the default and fails a stricter requirement
    fsu = g.extract_fsu(img, (0.0, 0.0, 45.0), SPEC)
    a = sitk.GetArrayViewFromImage(fsu)
    assert np.all(a[:8] == 0) and np.all(a[-8:] != 0)  # superior rows outside -> 0
    with pytest.raises(InputError, match=r"only 56% .*need 60%.*inside but near the edge"):
        g.extract_fsu(img, (0.0, 0.0, 45.0), SPEC, min_inside=0.6)
    assert g.fraction_inside(img, g.fsu_frame(img, (0.0, 0.0, 45.0), SPEC)) == pytest.approx(72 / 128)


def test_latent_frame_centres_are_mean_of_covered_voxels(make_volume):
    img = _vol(make_volume, "oblique15_twisted")
    fsu = g.fsu_frame(img, CENTER, g.FSUSpec.small())
    lat = g.latent_frame(fsu, (4, 4, 1))
    assert lat.GetSize() == (16, 8, 16)  # ITK (LR, AP, SI) = numpy (16, 8, 16)
    assert lat.GetDirection() == fsu.GetDirection()
    assert lat.GetSpacing() == pytest.approx((3.125, 10.0, 5.0))
    for m in [(0, 0, 0), (15, 7, 15), (3, 5, 9)]:
        covered = [fsu.TransformIndexToPhysicalPoint((m[0], m[1] * 4 + b, m[2] * 4 + c))
                   for b in range(4) for c in range(4)]
        np.testing.assert_allclose(lat.TransformIndexToPhysicalPoint(m), np.mean(covered, axis=0), atol=1e-9)
    # factors in numpy order: (2, 1, 4) halves SI and quarters LR
    lat2 = g.latent_frame(fsu, (2, 1, 4))
    assert lat2.GetSize() == (4, 32, 32)
    with pytest.raises(InputError, match="not divisible"):
        g.latent_frame(fsu, (3, 4, 1))


def test_normalization_invertible_and_serialisable():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 200.0, size=(16, 16, 8)).astype(np.float32)
    n = g.Normalization.fit(x)
    lo, hi = np.percentile(x.astype(np.float64), [0.5, 99.5])
    assert (n.lo, n.hi) == pytest.approx((lo, hi))
    assert n.forward(lo) == pytest.approx(-1.0) and n.forward(hi) == pytest.approx(1.0)
    y = n.forward(x.astype(np.float64))
    assert y.max() > 1.0  # no clipping
    np.testing.assert_allclose(n.inverse(y), x, rtol=1e-12, atol=1e-9)
    n2 = g.Normalization.from_dict(json.loads(json.dumps(n.to_dict())))
    assert n2 == n
    const = g.Normalization.fit(np.full((4, 4, 4), 7.0))
    np.testing.assert_allclose(const.inverse(const.forward(np.array([7.0, 9.0]))), [7.0, 9.0])
    torch = pytest.importorskip("torch")
    t = torch.tensor(x)
    assert torch.allclose(n.inverse(n.forward(t)), t, atol=1e-3)


@pytest.mark.parametrize("name", ["identity", "flipped_ras", "anisotropic", "oblique15"])
def test_estimate_disc_center(make_volume, name):
    img = _vol(make_volume, name)
    lm = np.array([1.0, -10.0, 5.0])
    for cond, dist in [("dh_small", 20.0), ("dh_moderate_large", 20.0), ("ccs_severe", 28.0), ("none", 0.0)]:
        c = np.asarray(g.estimate_disc_center(lm, cond, img))
        shift = c - lm
        assert np.linalg.norm(shift) == pytest.approx(dist)
        if dist:
            assert shift[1] < -0.9 * dist  # towards anterior (LPS -y)
            if not CASES[name][3]:
                np.testing.assert_allclose(shift, [0, -dist, 0], atol=1e-12)
            else:  # along the image's own AP axis
                d = np.asarray(img.GetDirection()).reshape(3, 3)
                assert np.max(np.abs(d.T @ shift)) == pytest.approx(dist)
    with pytest.raises(InputError):
        g.estimate_disc_center(lm, "fracture", img)


@pytest.mark.parametrize("name", ["identity", "flipped_ras", "anisotropic", "oblique15", "oblique15_twisted",
                                  "axial"])
def test_estimate_disc_center_follows_the_level_tilt(make_volume, name):
    """With a level the offset turns in the image's sagittal plane (its AP column and the column closest to LPS z)
    by the disc's typical tilt, towards inferior for a positive tilt (L5-S1: 27 degrees)."""
    img = _vol(make_volume, name)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    a = int(np.argmax(np.abs(d[1])))
    ap = d[:, a] * -np.sign(d[1, a])  # towards anterior
    zs = np.abs(d[2]) * (np.arange(3) != a)
    sup = d[:, np.argmax(zs)] * np.sign(d[2, np.argmax(zs)])  # the image's superior column
    lm = np.array([1.0, -10.0, 5.0])
    base = np.asarray(g.estimate_disc_center(lm, "ccs_severe", img)) - lm
    np.testing.assert_allclose(base, 28.0 * ap, atol=1e-12)
    for level, tilt in g.DISC_TILT_DEG.items():
        shift = np.asarray(g.estimate_disc_center(lm, "ccs_severe", img, level=level.replace("-", "/"))) - lm
        assert np.linalg.norm(shift) == pytest.approx(28.0)
        angle = np.degrees(np.arctan2(np.linalg.norm(np.cross(shift, ap)), shift @ ap))
        assert angle == pytest.approx(abs(tilt), abs=1e-9)
        assert np.count_nonzero(np.abs(d.T @ shift) > 1e-9) <= 2  # within the plane of two image columns
        if tilt:
            assert np.sign(shift @ sup) == -np.sign(tilt)  # positive tilt: the centre lies inferior
    assert g.DISC_TILT_DEG["L5-S1"] > 20 and g.estimate_disc_center(lm, "none", img, "L5-S1") == tuple(lm)
    with pytest.raises(InputError, match="unknown level"):
        g.estimate_disc_center(lm, "dh_small", img, level="C5-C6")
    # offset_mm replaces the distance, not the direction
    own = np.asarray(g.estimate_disc_center(lm, "ccs_severe", img, "L5-S1", offset_mm=14.0)) - lm
    np.testing.assert_allclose(own, 0.5 * (np.asarray(g.estimate_disc_center(lm, "ccs_severe", img, "L5-S1")) - lm),
                               atol=1e-12)
    for bad in (-1.0, float("nan")):
        with pytest.raises(InputError, match="offset must be a finite distance"):
            g.estimate_disc_center(lm, "ccs_severe", img, "L5-S1", offset_mm=bad)


def test_herniation_landmark_behind_the_margin_along_the_disc_axis():
    c, m = (1.0, 10.0, -50.0), (1.0, 28.0, -47.0)  # a tilted disc: its AP axis has an SI component
    u = np.subtract(m, c) / np.linalg.norm(np.subtract(m, c))
    for cond, mm in (("dh_small", 1.5), ("dh_moderate_large", 4.0)):
        p = np.asarray(g.herniation_landmark(m, c, cond))
        np.testing.assert_allclose(p - m, mm * u, atol=1e-12)
    assert g.HERNIATION_CENTRE_MM["dh_small"] < g.HERNIATION_CENTRE_MM["dh_moderate_large"]
    with pytest.raises(InputError, match="herniation condition"):
        g.herniation_landmark(m, c, "ccs_severe")
    with pytest.raises(InputError, match="0.00 mm apart"):
        g.herniation_landmark(c, c, "dh_small")


def test_real_ivd11_disc_at_fsu_centre(shared_data):
    from spine_ldm.io import read_volume

    img = read_volume(shared_data / "ivd_11_t2.nrrd")
    lab = read_volume(shared_data / "ivd_11_labels.nrrd")
    discs = json.loads((shared_data / "ivd_11_discs.json").read_text())["discs"]
    centre = discs["L4-L5"]["center_LPS_mm"]
    fsu = g.extract_fsu(img, centre, SPEC)
    np.testing.assert_allclose(np.asarray(fsu.GetDirection()).reshape(3, 3), CANON)
    lab_fsu = g.extract_fsu(lab, centre, SPEC, interpolation="nearest")
    assert lab_fsu.GetPixelID() == lab.GetPixelID()
    assert lab_fsu.GetOrigin() == fsu.GetOrigin() and lab_fsu.GetDirection() == fsu.GetDirection()
    labels = sitk.GetArrayFromImage(lab_fsu)
    assert np.all(labels[62:66, 30:34, 14:18] == 4)  # L4-L5 label around the FSU centre
    # the neighbouring discs are ~33 mm above / below (outside the 2 cm core, inside the FSU)
    assert 3 in labels[:40] and 5 in labels[88:]
    assert 3 not in labels[:, :, 14:18][48:80] and 5 not in labels[:, :, 14:18][48:80]


def test_paste_back_edge_taper_removes_seam(make_volume, voxel_centres):
    img = _vol(make_volume, "identity")
    fsu = g.extract_fsu(img, CENTER, SPEC)
    mod = sitk.GetImageFromArray(sitk.GetArrayFromImage(fsu) + np.float32(100))
    mod.CopyInformation(fsu)
    a_in = sitk.GetArrayFromImage(img).astype(np.float64)
    plain = sitk.GetArrayFromImage(g.paste_back(img, mod, CENTER, 16.0)) - a_in
    taper = sitk.GetArrayFromImage(g.paste_back(img, mod, CENTER, 16.0, edge_taper_mm=5.0)) - a_in
    fidx = _frame_index(fsu, voxel_centres(img))
    size, sp = np.asarray(fsu.GetSize()), np.asarray(fsu.GetSpacing())
    face = np.min(np.minimum(fidx + 0.5, size - 0.5 - fidx) * sp, axis=-1)  # mm to the nearest FSU face
    near = (face > 0) & (face < 1.0)
    deep = face > 5.0
    assert near.sum() > 100
    assert np.abs(plain[near]).max() > 20.0  # the plain blend has a seam (W ~ 0.29 at the LR faces)
    assert np.abs(taper[near]).max() < 10.0
    np.testing.assert_array_equal(taper[deep], plain[deep])
    np.testing.assert_array_equal(taper[face <= 0], 0.0)
    with pytest.raises(InputError, match="edge_taper_mm"):
        g.paste_back(img, mod, CENTER, 16.0, edge_taper_mm=-1.0)


@pytest.mark.parametrize("case", ["ivd_11", "ivd_20", "ivd_25"])
def test_real_ivd_disc_center_estimated_from_posterior_margin(shared_data, case):
    """A landmark on the posterior disc margin, along the disc's own axis (the principal axis of the labelled disc,
    mid-sagittal), gives back the labelled centre within 7 mm at every level with the level-aware estimate; at
    L5-S1 (tilted 24-34 degrees) the AP-only estimate misses by more than 7 mm, the level-aware one by < 4 mm."""
    from spine_ldm.io import read_volume

    img = read_volume(shared_data / f"{case}_t2.nrrd")
    lab = sitk.GetArrayFromImage(read_volume(shared_data / f"{case}_labels.nrrd"))
    discs = json.loads((shared_data / f"{case}_discs.json").read_text())["discs"]
    assert set(discs) == {"L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"}
    for level, d in discs.items():
        ci = d["center_ijk"][0]
        k, j, i = np.nonzero(lab == d["label"])
        pts = np.stack([j, k], 1)[np.abs(i - ci) <= 2].astype(np.float64)  # mid-sagittal slab, (j, k)
        c2 = pts.mean(0)
        axis = np.linalg.eigh(np.cov((pts - c2).T))[1][:, -1]  # the disc's long (AP) axis
        axis *= np.sign(axis[0])  # towards +j = posterior here
        along, across = (pts - c2) @ axis, (pts - c2) @ np.array([-axis[1], axis[0]])
        m2 = c2 + (along[np.abs(across) <= 1.5].max() + 0.5) * axis
        margin = img.TransformContinuousIndexToPhysicalPoint((ci, *m2))
        assert margin[1] > d["center_LPS_mm"][1] + 10  # the margin is posterior (LPS +y) of the centre
        err = np.linalg.norm(np.subtract(g.estimate_disc_center(margin, "dh_small", img, level), d["center_LPS_mm"]))
        assert err < 7.0, level
        if level == "L5-S1":
            ap_only = np.subtract(g.estimate_disc_center(margin, "dh_small", img), d["center_LPS_mm"])
            assert np.linalg.norm(ap_only) > 7.0 and err < 4.0


def test_paste_back_rejects_non_finite_fsu(make_volume):
    img = _vol(make_volume, "identity", np.int16)
    fsu = g.extract_fsu(img, CENTER, SPEC)
    a = sitk.GetArrayFromImage(fsu)
    a[64, 32, 16] = np.nan
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(fsu)
    with pytest.raises(InputError, match=r"inpainted FSU has \d+ NaN/Inf voxels in the blended region"):
        g.paste_back(img, bad, CENTER, 16.0)
    with pytest.raises(InputError, match="interpolation"):
        g.extract_fsu(img, CENTER, SPEC, interpolation="cubic")


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_paste_back_change_mode_adds_only_the_difference(make_volume, dtype):
    """``reference_fsu``: out = original + W (inpainted - reference). An FSU equal to its reference changes nothing
    (the scan keeps its own detail everywhere); a constant +50 difference adds exactly 50 W."""
    img = make_volume(spacing=(0.6, 0.6, 4.3), direction=rot_x(15) @ SAGITTAL, size=(170, 170, 15), dtype=dtype)
    landmark = img.TransformIndexToPhysicalPoint((85, 85, 7))
    fsu = g.extract_fsu(img, landmark, g.FSUSpec.small())
    smooth = sitk.SmoothingRecursiveGaussian(fsu, 3.0)  # a blurry "reconstruction", far from the input
    a_in = sitk.GetArrayFromImage(img)

    same = g.paste_back(img, smooth, landmark, 10.0, reference_fsu=smooth)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(same), a_in)
    blended = g.paste_back(img, smooth, landmark, 10.0)  # the paper's blend loses detail near the landmark
    assert np.abs(sitk.GetArrayViewFromImage(blended).astype(float) - a_in).max() > 5

    plus = sitk.GetImageFromArray(sitk.GetArrayFromImage(smooth) + np.float32(50.0))
    plus.CopyInformation(smooth)
    out = sitk.GetArrayFromImage(g.paste_back(img, plus, landmark, 10.0, reference_fsu=smooth)).astype(np.float64)
    from spine_ldm.weighting import gaussian_weight

    w = gaussian_weight(img, landmark, 10.0).astype(np.float64)
    inside = (w >= 1e-3) & (np.abs(out - a_in) > 0)
    expect = a_in + 50.0 * w
    if np.issubdtype(np.dtype(dtype), np.integer):
        expect = np.rint(expect)
    tol = 1e-3 if not np.issubdtype(np.dtype(dtype), np.integer) else 0.0
    assert inside.sum() > 1000
    np.testing.assert_allclose(out[inside], expect[inside], atol=tol)
    np.testing.assert_array_equal(out[w < 1e-3], a_in[w < 1e-3])

    other = g.extract_fsu(img, np.asarray(landmark) + 3.0, g.FSUSpec.small())
    with pytest.raises(InputError, match="reference FSU must lie on the inpainted FSU's grid"):
        g.paste_back(img, smooth, landmark, 10.0, reference_fsu=other)


def test_paste_back_resolution_knobs(make_volume, voxel_centres):
    """``interpolation="bspline"`` (paste-back and extract_fsu) reproduces a smooth (quadratic) field far better than
    linear resampling;
    ``weight_saturation = s`` pastes min(1, W / s): the full change wherever W >= s, the support W >= threshold * s,
    every other voxel bit-identical."""
    from spine_ldm.weighting import gaussian_weight

    img = make_volume(spacing=(0.6, 0.6, 4.3), direction=rot_x(15) @ SAGITTAL, size=(170, 170, 15), dtype=np.float32)
    landmark = np.asarray(img.TransformIndexToPhysicalPoint((85, 85, 7)))
    spec = g.FSUSpec(shape=(64, 32, 16), size_mm=(100.0, 100.0, 100.0))  # covers every voxel with W >= 1e-3 / 2
    zero = g.extract_fsu(img, landmark, spec) * 0.0

    def field(pts):  # a smooth change of +-50 over the FSU, quadratic in mm
        d = pts - landmark
        return 50.0 * (1.0 - (d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2) / 400.0)

    quad = sitk.GetImageFromArray(field(voxel_centres(zero)).astype(np.float32))
    quad.CopyInformation(zero)
    a_in = sitk.GetArrayFromImage(img).astype(np.float64)
    w = gaussian_weight(img, landmark, 10.0).astype(np.float64)
    expect = field(voxel_centres(img))
    errs = {}
    for interp in ("linear", "bspline"):
        out = sitk.GetArrayFromImage(g.paste_back(img, quad, landmark, 10.0, reference_fsu=zero,
                                                  interpolation=interp)).astype(np.float64)
        core = w > 0.5
        errs[interp] = np.abs(out - a_in - w * expect)[core].max()
        np.testing.assert_array_equal(out[w < 1e-3], a_in[w < 1e-3])
    assert errs["bspline"] < 0.05 < errs["linear"] and errs["bspline"] < errs["linear"] / 10, errs
    scan_quad = sitk.GetImageFromArray(expect.astype(np.float32))  # and the other way: scan -> FSU
    scan_quad.CopyInformation(img)
    for interp in ("linear", "bspline"):
        fsu = g.extract_fsu(scan_quad, landmark, spec, interpolation=interp)
        pts = voxel_centres(fsu)
        core = np.linalg.norm(pts - landmark, axis=-1) < 12.0
        errs[interp] = np.abs(sitk.GetArrayFromImage(fsu) - field(pts))[core].max()
    assert errs["bspline"] < 0.05 < errs["linear"] and errs["bspline"] < errs["linear"] / 10, errs

    plus = zero + 50.0
    for sat in (1.0, 0.5):
        out = sitk.GetArrayFromImage(g.paste_back(img, plus, landmark, 10.0, reference_fsu=zero,
                                                  weight_saturation=sat)).astype(np.float64)
        touched = w >= 1e-3 * sat
        np.testing.assert_allclose((out - a_in)[touched], 50.0 * np.minimum(1.0, w / sat)[touched], atol=1e-3)
        np.testing.assert_array_equal(out[~touched], a_in[~touched])
        assert np.count_nonzero(np.isclose(out - a_in, 50.0, atol=1e-3)) == pytest.approx(
            np.count_nonzero(w >= sat), abs=2)
    for bad in (0.0, 1.5, float("nan"), "half"):
        with pytest.raises(InputError, match=r"weight_saturation must be in \(0, 1\]"):
            g.paste_back(img, plus, landmark, 10.0, weight_saturation=bad)
    with pytest.raises(InputError, match="interpolation must be 'linear' or 'bspline', got 'nearest'"):
        g.paste_back(img, plus, landmark, 10.0, interpolation="nearest")
