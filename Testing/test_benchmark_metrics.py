"""Oracles of the phantom benchmark's metrics (model_training.benchmark): seeds and the overlap refusal, cos / R^2,
sharpness, the geometry rules, FID / KID / MS-SSIM, AUC and intervals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from model_training.benchmark import metrics as M
from model_training.benchmark import stats as ST
from model_training.benchmark.seeds import (check_disjoint, expand_phantom_seeds, format_seeds, parse_seeds,
                                            recorded_seeds)
from spine_ldm.errors import InputError


# --------------------------------------------------------------------------- seeds
def test_parse_and_format_seeds():
    assert parse_seeds("3-5,9, 4") == [3, 4, 5, 9]
    assert format_seeds([9, 3, 4, 5]) == "3-5,9"
    for bad in ("", "5-3", "a", "-1"):
        with pytest.raises(InputError):
            parse_seeds(bad)


def test_recorded_training_seeds_expand_the_import_recipe():
    from model_training.importers.phantom import _phantom_seed

    rec = {"import_phantoms": {"seed": 0, "n_studies": 60}}
    seeds = expand_phantom_seeds(rec)
    assert seeds == {_phantom_seed(0, i) for i in range(60)} and len(seeds) == 60
    assert expand_phantom_seeds([1, 2, {"import_phantoms": {"seed": 3, "n_studies": 1}}]) == \
        {1, 2, _phantom_seed(3, 0)}
    assert recorded_seeds({"training": {"steps": 3}}) is None
    assert recorded_seeds({"training": {"phantom_seeds": [7, 8]}}) == {7, 8}


def test_bundled_models_record_their_training_seeds_and_overlap_is_refused():
    from spine_ldm import registry as reg

    entries = reg.read_registry(reg.package_registry_path())
    used = {e.id: recorded_seeds(e) for e in entries}
    assert all(v and len(v) >= 60 for v in used.values()), used
    first = entries[0].id
    train_seed = sorted(used[first])[5]
    with pytest.raises(InputError) as e:
        check_disjoint([1000, train_seed], used)
    msg = str(e.value)
    assert first in msg and str(train_seed) in msg and "1000" not in msg.split("seed(s):")[1]
    assert check_disjoint(range(1000, 1020), {**used, "unknown-model": None}) == ["unknown-model"]


# --------------------------------------------------------------------------- cos / R^2
def test_cos_and_r2_oracles():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 7, 8))
    p = h + rng.normal(size=h.shape)
    assert M.cos_r2(p, h, p) == pytest.approx((1.0, 1.0))
    cos, r2 = M.cos_r2(2 * h - p, h, p)  # the negative change
    assert cos == pytest.approx(-1.0) and r2 == pytest.approx(-3.0)
    cos, r2 = M.cos_r2(h, h, p)  # no change at all
    assert np.isnan(cos) and r2 == pytest.approx(0.0)
    assert M.cos_r2(h + 0.5 * (p - h), h, p) == pytest.approx((1.0, 0.75))
    assert M.change_amplitude(h + 0.5 * (p - h), h, p) == pytest.approx(0.5)
    assert M.change_amplitude(2 * h - p, h, p) == pytest.approx(-1.0)
    other = rng.normal(size=h.shape)  # a change orthogonal to the true one adds no amplitude
    other -= (other.ravel() @ (p - h).ravel()) / ((p - h).ravel() @ (p - h).ravel()) * (p - h)
    assert M.change_amplitude(p + other, h, p) == pytest.approx(1.0)
    assert np.isnan(M.change_amplitude(p, h, h))
    mask = np.zeros(h.shape, bool)
    mask[:3] = True
    g = p.copy()
    g[3:] = h[3:] - 5 * (p[3:] - h[3:])  # wrong outside the mask: invisible inside it
    assert M.cos_r2(g, h, p, mask) == pytest.approx((1.0, 1.0))


def _image(arr, spacing=(0.9, 0.9, 4.3)):
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, -20.0, 5.0))
    img.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))  # oblique-free but permuted (like the phantom)
    return img


def test_neighbourhood_uses_physical_mm_from_voxel_centres():
    img = _image(np.zeros((15, 60, 60)))
    p = img.TransformContinuousIndexToPhysicalPoint((30.0, 30.0, 7.0))
    nb = M.Neighbourhood(img, p, 10.0)
    d = np.sqrt(nb.d2[nb.ball(10.0)])
    assert d.max() <= 10.0 and d.min() == pytest.approx(0.0, abs=1e-6)
    # the ball holds ~ 4/3 pi r^3 / voxel volume voxels
    assert abs(np.count_nonzero(nb.ball(10.0)) * nb.voxel_mm3 / (4 / 3 * np.pi * 1000) - 1) < 0.15
    assert np.array_equal(nb.array(img), np.zeros(nb.d2.shape))
    # signed distance to a plane through p with normal +y (LPS)
    pd = nb.plane_distance(p, (0, 1, 0))
    assert pd.min() < -9 and pd.max() > 9 and np.abs(pd[nb.d2 == nb.d2.min()]).max() < 1e-6


# --------------------------------------------------------------------------- sharpness
def test_sharpness_of_the_truth_on_the_model_grid_is_one_and_blur_lowers_it():
    from spine_ldm.geometry import FSUSpec, extract_fsu

    rng = np.random.default_rng(1)
    arr = np.zeros((15, 80, 80), np.float32)
    arr[:, 30:50, 35:45] = 900.0
    arr += rng.normal(0, 30, arr.shape)
    P = _image(arr)
    lm = P.TransformContinuousIndexToPhysicalPoint((40.0, 40.0, 7.0))
    nb = M.Neighbourhood(P, lm, M.COS_RADIUS_MM)
    m = nb.ball(M.SHARP_RADIUS_MM)
    frame = extract_fsu(P, lm, FSUSpec(shape=(64, 32, 16), size_mm=(80, 80, 50)))
    p_fsu = M.through_grid(P, frame, nb)
    ref = M.mean_gradient(p_fsu, nb.spacing, m)
    assert M.mean_gradient(p_fsu, nb.spacing, m) / ref == 1.0
    native = M.mean_gradient(nb.array(P), nb.spacing, m)
    assert ref < native  # the coarser grid loses gradient energy
    blurred = nb.array(sitk.SmoothingRecursiveGaussian(P, 1.5))
    ratio = M.mean_gradient(blurred, nb.spacing, m) / native
    assert ratio < 0.9
    # gradient in intensity per mm: a linear ramp of 2 per mm along a 0.9 mm axis reads 2
    ramp = np.broadcast_to(np.arange(80, dtype=np.float64) * 0.9 * 2, (15, 80, 80))
    assert M.mean_gradient(ramp, (4.3, 0.9, 0.9)) == pytest.approx(2.0)


# --------------------------------------------------------------------------- geometry rules on phantoms
@pytest.fixture(scope="module")
def twins():
    from spine_ldm.phantom import generate

    sp = (0.9, 0.9, 4.3)
    return {k: generate(7, spacing=sp, pathologies=v) for k, v in
            {"none": None, "dh_small": {"L4-L5": "dh_small"}, "dh_ml": {"L4-L5": "dh_moderate_large"},
             "ccs_mod": {"L4-L5": "ccs_moderate"}, "ccs_sev": {"L4-L5": "ccs_severe"}}.items()}


def test_protrusion_rule_reads_the_herniation_volume(twins):
    H = twins["none"]
    disc = H.landmarks["discs"]["L4-L5"]
    u_ap, _, _ = M.disc_axes(disc["center_LPS_mm"], disc["posterior_margin_LPS_mm"])
    disc_ref = M.disc_reference(H.image, disc["center_LPS_mm"])
    vols = {}
    for k in ("dh_small", "dh_ml"):
        P = twins[k]
        info = P.landmarks["pathologies"][0]
        nb = M.Neighbourhood(H.image, info["landmark_LPS_mm"], M.COS_RADIUS_MM)
        h, p = nb.array(H.image), nb.array(P.image)
        v = M.protrusion_mm3(p, h, h, nb, disc_ref, disc["posterior_margin_LPS_mm"], u_ap)
        assert M.protrusion_mm3(h, h, h, nb, disc_ref, disc["posterior_margin_LPS_mm"], u_ap) == 0.0
        assert 0.5 * info["volume_mm3"] < v < 1.2 * info["volume_mm3"], (k, v, info["volume_mm3"])
        vols[k] = v
    assert vols["dh_ml"] > 2 * vols["dh_small"]


def test_canal_area_rule_grades_stenosis_and_tolerates_blur(twins):
    H = twins["none"]
    disc = H.landmarks["discs"]["L4-L5"]
    u_ap, u_lr, _ = M.disc_axes(disc["center_LPS_mm"], disc["posterior_margin_LPS_mm"])
    lm = H.landmarks["canal"]["L4-L5"]["center_LPS_mm"]
    area = {k: M.canal_area_mm2(twins[k].image, H.image, lm, u_ap, u_lr) for k in ("none", "ccs_mod", "ccs_sev")}
    assert area["none"] > 1.2 * area["ccs_mod"] > 1.2 * 1.2 * area["ccs_sev"], area
    assert area["ccs_sev"] > 20
    blurred = M.canal_area_mm2(sitk.SmoothingRecursiveGaussian(twins["ccs_mod"].image, 1.0), H.image, lm, u_ap, u_lr)
    assert blurred == pytest.approx(area["ccs_mod"], rel=0.08)


# --------------------------------------------------------------------------- distributions
def test_fid_equals_monai_and_kid_grows_with_the_shift():
    import torch
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 24)), rng.normal(size=(45, 24)) * 1.3 + 0.2
    assert ST.fid(a, b) == pytest.approx(float(FIDMetric()(torch.tensor(b), torch.tensor(a))), rel=1e-9)
    assert ST.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    x = rng.normal(size=(400, 16))
    near = ST.kid(x[:200], x[200:])
    far = ST.kid(x[:200], x[200:] + 0.5)
    assert abs(near) < 0.2 * far and ST.kid(x[:200], x[200:] + 1.0) > far


def test_fid_and_kid_of_crop_features_grow_with_blur():
    from model_training.evaluate import make_features

    from model_training.benchmark.readers import blurred

    rng = np.random.default_rng(3)
    crops = np.clip(rng.random((24, 20, 20, 16)) * 0.3 + np.linspace(0, 0.6, 20)[None, :, None, None], 0, 1)
    feats = make_features("random")
    f0 = feats(crops[:12]).numpy()
    f_same = feats(crops[12:]).numpy()
    f1 = feats(blurred(crops[12:], 0.7)).numpy()
    f2 = feats(blurred(crops[12:], 1.5)).numpy()
    assert ST.fid(f0, f0) == pytest.approx(0.0, abs=1e-6)
    assert ST.fid(f0, f_same) < ST.fid(f0, f1) < ST.fid(f0, f2)
    assert ST.kid(f0, f_same) < ST.kid(f0, f1) < ST.kid(f0, f2)


def test_fid_bootstrap_interval_is_bias_corrected_and_holds_the_estimate():
    """Resampling cases with replacement repeats them, which inflates FID: the plain percentile interval lies
    above the full-sample estimate (the bug of earlier tables, e.g. FID 24.5 [25.6, 30.4]); ``center`` removes the
    bootstrap's bias estimate, so the interval holds the estimate and keeps its width."""
    from model_training.benchmark.report import _fid_kid

    rng = np.random.default_rng(5)
    real = [rng.normal(size=(6, 8)) for _ in range(20)]
    fake = [rng.normal(size=(6, 8)) * 1.1 + 0.1 for _ in range(20)]

    def stat(idx):
        return ST.fid(np.concatenate([fake[i] for i in idx]), np.concatenate([real[i] for i in idx]))

    est = stat(np.arange(20))
    plain = ST.bootstrap_ci(stat, 20, n_boot=200)
    fixed = ST.bootstrap_ci(stat, 20, n_boot=200, center=est)
    assert plain[0] > est  # the defect: the plain interval misses the estimate
    assert fixed[0] < est < fixed[1]
    assert fixed[1] - fixed[0] == pytest.approx(plain[1] - plain[0], rel=1e-9)
    cases = [({}, {"feat_P": r, "feat_G_weighted": f}) for r, f in zip(real, fake)]
    out = _fid_kid(cases, "weighted", 200)
    assert out["fid"]["mean"] == pytest.approx(est, rel=1e-9)
    assert out["fid"]["lo"] < out["fid"]["mean"] < out["fid"]["hi"]
    assert out["kid"]["lo"] < out["kid"]["mean"] < out["kid"]["hi"]


def test_ms_ssim_diversity_of_identical_samples_is_one():
    from model_training.benchmark.run import _diversity_2d, _diversity_3d

    rng = np.random.default_rng(4)
    c = rng.random((20, 20, 16)).astype(np.float32)
    same = np.stack([c, c, c])
    assert _diversity_3d(same) == pytest.approx(1.0, abs=1e-5)
    assert _diversity_2d(same) == pytest.approx(1.0, abs=1e-5)
    other = np.stack([c, rng.random(c.shape).astype(np.float32)])
    assert _diversity_2d(other) < 0.5 and _diversity_3d(other) < 0.5
    assert np.isnan(_diversity_2d(same[:1]))


# --------------------------------------------------------------------------- AUC and intervals
def test_auc_wilson_and_bootstrap():
    assert ST.auc([2, 3], [0, 1]) == 1.0 and ST.auc([0, 1], [2, 3]) == 0.0 and ST.auc([1, 1], [1, 1]) == 0.5
    p, lo, hi = ST.wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert ST.wilson(0, 10)[1] == 0.0
    vals = np.r_[np.zeros(50), np.ones(50)]
    m, lo, hi = ST.grouped_mean_ci(vals, np.arange(100), n_boot=500)
    assert m == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62
    # K correlated samples per case: the interval is as wide as the number of cases says, not the outputs
    m2, lo2, hi2 = ST.grouped_mean_ci(np.repeat(vals[::10], 10), np.repeat(np.arange(10), 10), n_boot=500)
    assert hi2 - lo2 > 2 * (hi - lo)


def test_summary_json_roundtrip_of_seed_records():
    rec = {"training": {"phantom_seeds": {"import_phantoms": {"seed": 0, "n_studies": 2}}}}
    assert len(recorded_seeds(json.loads(json.dumps(rec)))) == 2
