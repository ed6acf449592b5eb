"""pipeline.inpaint end to end on a phantom with random-init small weights (few steps).

Checks: output geometry and pixel type identical to the input, voxels with W < 1e-3 bit-identical, input object
unmodified, reproducibility per seed (and per sample), nfe, progress per step, cancel, error messages.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers_models import corrupt, make_registry
from spine_ldm import pipeline, registry as reg
from spine_ldm.errors import CancelledError, InputError, ModelError
from spine_ldm.weighting import gaussian_weight

STEPS = 2  # PLMS: 3 network evaluations


def _phantom():
    """Healthy phantom (seed 0) at coarse spacing; landmark = L4-L5 posterior disc margin."""
    from spine_ldm import phantom

    case = phantom.generate(seed=0, spacing=(2.0, 2.0, 4.3))
    d = case.landmarks["discs"]["L4-L5"]
    return case.image, tuple(d["posterior_margin_LPS_mm"]), tuple(d["center_LPS_mm"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("reg"))


@pytest.fixture(scope="module")
def case():
    return _phantom()


@pytest.fixture(scope="module")
def weighted2(case, registry):
    img, lm, disc = case
    before = sitk.GetArrayFromImage(img).copy()
    calls = []
    res = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", method="weighted", samples=2, seed=3,
                           steps=STEPS, device="cpu", disc_center_lps=disc, registry=registry,
                           progress=lambda s, t: calls.append((s, t)))
    return res, before, calls


def _assert_same_grid(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetDirection() == b.GetDirection()
    assert a.GetPixelID() == b.GetPixelID()


def _far_mask(img, lm, sigma=16.0):
    return gaussian_weight(img, lm, sigma) < 1e-3


def test_geometry_far_field_and_input_untouched(case, weighted2):
    img, lm, disc = case
    res, before, _ = weighted2
    assert len(res.outputs) == 2
    a_in = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(a_in, before)  # input object unmodified
    far = _far_mask(img, lm)
    assert 0.2 < far.mean() < 0.99
    for out in res.outputs:
        _assert_same_grid(out, img)
        a = sitk.GetArrayFromImage(out)
        assert a.dtype == a_in.dtype
        np.testing.assert_array_equal(a[far], a_in[far])  # bit-identical far field
        near = gaussian_weight(img, lm, 16.0) > 0.5
        assert np.abs(a[near].astype(float) - a_in[near]).mean() > 1.0  # something was inpainted


def test_result_fields_nfe_progress_and_provenance(case, weighted2):
    img, lm, disc = case
    res, _, calls = weighted2
    assert res.nfe == STEPS + 1  # PLMS warm-up
    totals = {t for _, t in calls}
    assert len(totals) == 1
    total = totals.pop()
    assert [s for s, _ in calls] == list(range(1, total + 1))
    assert total == res.nfe  # both samples run as one batch: one chain of network evaluations
    assert res.device.startswith("cpu") and res.seconds > 0 and res.peak_memory_mb > 0
    p0, p1 = res.provenances
    assert p0 == res.provenance
    assert (p0["seed"], p0["sample_index"], p1["seed"], p1["sample_index"]) == (3, 1, 4, 2)
    for key in ("spine_ldm_version", "model_id", "weights_sha256", "method", "steps", "sampler", "sigma_mm",
                "landmark_lps", "landmark_ras", "disc_center_lps", "level", "condition", "device", "created"):
        assert key in p0, key
    assert p0["model_id"] == "demo-small-weighted" and p0["level"] == "L4-L5"
    assert p0["landmark_ras"] == [-lm[0], -lm[1], lm[2]]
    assert p0["weights_sha256"]["unet"] and len(p0["weights_sha256"]["unet"]) == 64
    assert res.fsu_input.GetSize() == (16, 32, 64) and len(res.fsu_outputs) == 2
    assert res.latent_weight.shape == (16, 16, 16) and res.latent_weight.max() > 0.9


def test_reproducible_per_seed_and_per_sample(case, registry, weighted2):
    img, lm, disc = case
    res, _, _ = weighted2
    again = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", samples=1, seed=4, steps=STEPS, device="cpu",
                             disc_center_lps=disc, registry=registry)
    # sample 2 of (seed 3, K=2) uses seed 4: reproducible on its own
    np.testing.assert_allclose(sitk.GetArrayFromImage(again.outputs[0]).astype(float),
                               sitk.GetArrayFromImage(res.outputs[1]).astype(float), atol=1.0)
    a0, a1 = (sitk.GetArrayFromImage(o) for o in res.outputs)
    assert np.abs(a0.astype(float) - a1).max() > 1.0  # different seeds differ
    same = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", samples=1, seed=4, steps=STEPS, device="cpu",
                            disc_center_lps=disc, registry=registry)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same.outputs[0]), sitk.GetArrayFromImage(again.outputs[0]))


@pytest.mark.parametrize("method", ["masked", "repaint"])
def test_baselines_keep_far_field(case, registry, method):
    img, lm, disc = case
    res = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", method=method, steps=STEPS, device="cpu",
                           disc_center_lps=disc, registry=registry)
    out = res.outputs[0]
    _assert_same_grid(out, img)
    far = _far_mask(img, lm)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out)[far], sitk.GetArrayFromImage(img)[far])
    assert res.provenance["method"] == method
    assert res.provenance["model_id"] == {"masked": "demo-small-masked", "repaint": "demo-small-full"}[method]
    assert res.nfe == (STEPS + 1 if method == "masked" else STEPS)


def test_repaint_jump_and_resample_reach_the_sampler(case, registry):
    img, lm, disc = case
    res = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", method="repaint", steps=4, device="cpu",
                           disc_center_lps=disc, registry=registry, repaint_jump=2, repaint_resample=3)
    # RePaint's schedule puts jump points at n = 0, jump, ... < steps - jump: here only n = 0; it goes back
    # `jump` steps (resample - 1) = 2 times: 4 + 1 * 2 * 2 = 8 (the defaults at 50 steps give 50 + 4 * 9 * 10 = 410)
    assert res.nfe == 8
    assert (res.provenance["repaint_jump"], res.provenance["repaint_resample"]) == (2, 3)
    with pytest.raises(InputError, match="resample 1..50"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", method="repaint", steps=4, registry=registry,
                         repaint_resample=0)


def test_cancel_raises_and_returns_nothing(case, registry, tmp_path):
    img, lm, disc = case
    seen = []
    with pytest.raises(CancelledError, match="cancelled"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", steps=STEPS, device="cpu", disc_center_lps=disc,
                         registry=registry, progress=lambda s, t: seen.append(s), cancel=lambda: len(seen) >= 1)
    assert seen == [1, 2]  # cancel is checked before each step; PLMS's first step makes 2 evaluations


def test_errors(case, registry, tmp_path):
    img, lm, disc = case
    with pytest.raises(InputError, match=r"landmark .* LPS is \d+\.\d mm outside the volume"):
        pipeline.inpaint(img, (lm[0], lm[1], lm[2] + 1000.0), "L4-L5", "dh_moderate_large", registry=registry)
    with pytest.raises(InputError, match="unknown level 'L7-L8'"):
        pipeline.inpaint(img, lm, "L7-L8", "dh_moderate_large", registry=registry)
    with pytest.raises(InputError, match="unknown condition 'tumour'"):
        pipeline.inpaint(img, lm, "L4-L5", "tumour", registry=registry)
    with pytest.raises(InputError, match="unknown method"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", method="magic", registry=registry)
    with pytest.raises(ModelError, match="trained for method 'full'.*needs a 'weighted' model"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", model="demo-small-full", registry=registry)
    far_disc = (disc[0], disc[1], disc[2] + 70.0)  # inside the volume, but the FSU no longer holds the landmark
    with pytest.raises(InputError, match=r"landmark \(.*\) LPS lies \d+\.\d mm outside the FSU around the disc centre"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", disc_center_lps=far_disc, registry=registry, device="cpu")
    with pytest.raises(InputError, match="file not found"):
        pipeline.inpaint(tmp_path / "nope.nrrd", lm, "L4-L5", "dh_small", registry=registry)


def test_corrupt_weights_refused(case, tmp_path):
    img, lm, disc = case
    r = make_registry(tmp_path)
    e = reg.get_entry("demo-small-weighted", r)
    corrupt(e.files["autoencoder"].path)
    with pytest.raises(ModelError, match=r"sha256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", steps=1, device="cpu", disc_center_lps=disc, registry=r)


def test_write_outputs_names_and_header(case, weighted2, tmp_path):
    res, _, _ = weighted2
    paths = pipeline.write_outputs(res, tmp_path / "out.nrrd")
    assert [p.name for p in paths] == ["out_1.nrrd", "out_2.nrrd"]
    back = sitk.ReadImage(str(paths[1]))
    assert back.GetMetaData("spine_ldm_seed") == "4"
    assert back.GetMetaData("spine_ldm_method") == "weighted"
    assert back.GetMetaData("spine_ldm_sample_index") == "2"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(res.outputs[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_1.nrrd", "out_2.nrrd"]  # no partial files
    assert pipeline.output_paths("x/a.nii.gz", 2)[1].name == "a_2.nii.gz"
    assert pipeline.output_paths("a.nrrd", 1)[0].name == "a.nrrd"
    # NIfTI keeps no free header keys: the provenance goes to a JSON sidecar per output
    nii = pipeline.write_outputs(res, tmp_path / "nii" / "out.nii.gz")
    assert sorted(p.name for p in (tmp_path / "nii").iterdir()) == ["out_1.json", "out_1.nii.gz", "out_2.json",
                                                                    "out_2.nii.gz"]
    side = json.loads((tmp_path / "nii" / "out_2.json").read_text())
    assert side["image"] == "out_2.nii.gz" and side["spine_ldm_provenance"] == json.loads(json.dumps(
        res.provenances[1], default=str))
    assert side["spine_ldm_provenance"]["seed"] == 4 and side["spine_ldm_provenance"]["method"] == "weighted"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(nii[0]))),
                                  sitk.GetArrayFromImage(res.outputs[0]))


# ---------------------------------------------------------------------------------------------- device.py
def test_select_device_and_errors():
    import torch

    from spine_ldm.device import autocast, select_device
    from spine_ldm.errors import DeviceError

    assert select_device("cpu") == torch.device("cpu")
    auto = select_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            select_device("cuda")
    else:
        with pytest.raises(DeviceError, match="CUDA device"):
            select_device(f"cuda:{torch.cuda.device_count()}")
    with autocast("cpu"):
        assert not torch.is_autocast_enabled()


def test_oom_retry_halves_the_batch_then_gives_up():
    import torch

    from spine_ldm.device import run_with_oom_retry
    from spine_ldm.errors import DeviceError

    seen = []

    def fn(b):
        seen.append(b)
        if b > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return b

    assert run_with_oom_retry(fn, 8) == 2 and seen == [8, 4, 2]

    def never(b):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceError, match="out of GPU memory even with a batch of 1"):
        run_with_oom_retry(never, 3)

    def other(b):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        run_with_oom_retry(other, 4)


def test_peak_memory_reports_something():
    from spine_ldm.device import PeakMemory

    with PeakMemory("cpu") as pm:
        x = np.ones((256, 256, 64), np.float32).sum()
    assert x > 0 and pm.mb > 10 and pm.kind == "process_rss_peak" and pm.seconds >= 0


def test_paste_modes_compose_the_output_from_the_fsus(case, registry, weighted2):
    """Default "change": out = input + W (decoded - reconstruction of the input); "blend": W decoded + (1 - W) input.
    Both are exactly geometry.paste_back of the result's FSUs; the provenance names the mode."""
    from spine_ldm import geometry

    img, lm, disc = case
    res, _, _ = weighted2
    assert res.provenance["paste_mode"] == "change"
    kw = dict(threshold=pipeline.PASTE_THRESHOLD, edge_taper_mm=pipeline.EDGE_TAPER_MM)
    sigma = res.provenance["sigma_mm"]
    change = geometry.paste_back(img, res.fsu_outputs[0], lm, sigma, reference_fsu=res.fsu_reconstruction, **kw)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(change), sitk.GetArrayFromImage(res.outputs[0]))
    blend = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", samples=2, seed=3, steps=STEPS, device="cpu",
                             disc_center_lps=disc, registry=registry, paste_mode="blend")
    assert blend.provenance["paste_mode"] == "blend"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(blend.fsu_outputs[0]),
                                  sitk.GetArrayFromImage(res.fsu_outputs[0]))  # same samples, other composition
    expect = geometry.paste_back(img, res.fsu_outputs[0], lm, sigma, **kw)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(blend.outputs[0]), sitk.GetArrayFromImage(expect))
    assert np.abs(sitk.GetArrayFromImage(blend.outputs[0]).astype(float)
                  - sitk.GetArrayFromImage(res.outputs[0])).max() > 1.0
    with pytest.raises(InputError, match="unknown paste mode 'mix'"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", steps=STEPS, device="cpu", disc_center_lps=disc,
                         registry=registry, paste_mode="mix")


def test_reconstruct_uses_the_inpaint_frame(case, registry, weighted2):
    img, lm, disc = case
    res, _, _ = weighted2
    fsu, recon = pipeline.reconstruct(img, lm, "dh_moderate_large", disc_center_lps=disc, device="cpu",
                                      registry=registry)
    for a, b in ((fsu, res.fsu_input), (recon, res.fsu_reconstruction)):
        _assert_same_grid(a, b)
        np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), rtol=1e-5, atol=1e-3)


def test_estimated_disc_centre_follows_the_level(registry):
    """Without a disc centre the FSU is centred on the level-aware estimate: at the phantom's L5-S1 (tilted ~26
    degrees) it lands near the true centre, where the AP-only estimate would miss by > 6 mm; inpaint records it."""
    from spine_ldm import geometry, phantom

    ph = phantom.generate(seed=0, spacing=(2.0, 2.0, 4.3))
    d = ph.landmarks["discs"]["L5-S1"]
    lm, truth = tuple(d["posterior_margin_LPS_mm"]), np.asarray(d["center_LPS_mm"])
    fsu, _ = pipeline.reconstruct(ph.image, lm, "dh_moderate_large", device="cpu", registry=registry, level="l5/s1")
    centre = np.asarray(fsu.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fsu.GetSize()]))
    np.testing.assert_allclose(centre, geometry.estimate_disc_center(lm, "dh_moderate_large", ph.image, "L5-S1"),
                               atol=1e-6)
    assert np.linalg.norm(centre - truth) < 5.0
    assert np.linalg.norm(np.subtract(geometry.estimate_disc_center(lm, "dh_moderate_large", ph.image), truth)) > 6.0
    res = pipeline.inpaint(ph.image, lm, "L5-S1", "dh_moderate_large", steps=1, device="cpu", registry=registry)
    assert res.provenance["disc_center_estimated"] is True
    np.testing.assert_allclose(res.provenance["disc_center_lps"], centre, atol=1e-3)


def test_decode_quantize_defaults_to_the_config_and_reaches_both_decodes(case, registry, weighted2):
    """The sampled latent and the input's reference reconstruction are decoded the same way: as is by default
    (``sampling.decode_quantize`` False), snapped to the codebook with ``decode_quantize=True``. The samples' latents
    are the same either way, so only the decode differs."""
    import torch

    from spine_ldm.models.autoencoder import VQAutoencoder
    from spine_ldm.models.config import load_config

    assert load_config("small").sampling.decode_quantize is False
    img, lm, disc = case
    res, _, _ = weighted2
    assert res.provenance["decode_quantize"] is False
    kw = dict(samples=2, seed=3, steps=STEPS, device="cpu", disc_center_lps=disc, registry=registry)
    snapped = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", decode_quantize=True, **kw)
    assert snapped.provenance["decode_quantize"] is True
    a, b = (sitk.GetArrayFromImage(r.fsu_reconstruction) for r in (res, snapped))
    assert np.abs(a - b).max() > 1e-3
    _, recon_q = pipeline.reconstruct(img, lm, "dh_moderate_large", disc_center_lps=disc, device="cpu",
                                      registry=registry, decode_quantize=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(recon_q), b, rtol=1e-5, atol=1e-3)
    # the snapped decode is the decoder of the nearest codes: decode(z, quantize=True) == decoder(codes)
    ae = VQAutoencoder(load_config("small")).eval()
    z = torch.randn(1, 3, 16, 16, 16)
    with torch.inference_mode():
        q = ae._quantize_eval(z / ae.latent_scale)
        np.testing.assert_allclose(ae.decode(z, quantize=True), ae.decoder(q), atol=1e-6)
        assert (ae.decode(z, quantize=False) - ae.decoder(q)).abs().max() > 1e-3
    with pytest.raises(InputError, match="decode_quantize must be true or false, got 'yes'"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_small", steps=STEPS, device="cpu", disc_center_lps=disc,
                         registry=registry, decode_quantize="yes")


def _condition_sensitive(registry_path, method: str) -> None:
    """Give the ``method`` entry's U-Net non-zero output layers (MONAI zero-initialises them, so a random U-Net
    predicts eps = 0 whatever its condition) and record the new sha256 in the registry."""
    import hashlib

    import torch

    d = json.loads(registry_path.read_text())
    m = next(m for m in d["models"] if m["method"] == method)
    path = registry_path.parent / m["files"]["unet"]["path"]
    sd = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() > 1 and not v.any():
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
    path.unlink()  # the copy may share the file with the module's registry: write a new one
    torch.save(sd, path)
    m["files"]["unet"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    registry_path.write_text(json.dumps(d))


def _registry_with(tmp_path, registry, edit):
    """A copy of the test registry (same weight files) with ``edit(models_list)`` applied."""
    import shutil

    shutil.copytree(registry.parent / "Models", tmp_path / "Models")
    d = json.loads(registry.read_text())
    edit(d["models"])
    out = tmp_path / "Models.json"
    out.write_text(json.dumps(d))
    return out


def test_sigma_and_roi_default_to_the_models_training_values(case, registry, tmp_path):
    img, lm, disc = case

    def edit(models):
        for m in models:
            m["training"] = {"sigma_mm": 12.0, "roi_threshold": 0.2, "conditions": ["dh_moderate_large"]}

    reg2 = _registry_with(tmp_path, registry, edit)
    kw = dict(steps=STEPS, device="cpu", disc_center_lps=disc, registry=reg2)
    res = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", **kw)
    assert res.provenance["sigma_mm"] == 12.0
    assert pipeline.model_sigma(condition="dh_moderate_large", registry=reg2) == 12.0
    assert pipeline.model_sigma("demo-small-masked", registry=reg2) == 12.0
    assert pipeline.model_sigma(registry=registry) == pipeline.DEFAULT_SIGMA_MM == 16.0  # none recorded
    np.testing.assert_allclose(res.latent_weight.max(), 1.0, atol=0.1)
    masked = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", method="masked", **kw)
    assert masked.provenance["roi_threshold"] == 0.2
    pipeline._SIGMA_WARNED.clear()
    with pytest.warns(UserWarning, match="sigma 16 mm differs from the 12 mm model 'demo-small-weighted'"):
        r16 = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", sigma_mm=16, **kw)
    assert r16.provenance["sigma_mm"] == 16.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", sigma_mm=16, **kw)
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", sigma_mm=12, **kw)  # equal: no warning


def test_guidance_defaults_to_the_model_and_needs_the_healthy_condition(case, registry, tmp_path):
    """A model trained with healthy FSUs (training.healthy_fraction) samples with its registry guidance_scale by
    default: provenance says so, nfe counts both halves of the doubled batch, and the output differs from the
    scale-1 (unguided) output of the same seed inside the weighted region only. A model without the healthy
    condition refuses a scale != 1."""
    img, lm, disc = case
    kw = dict(steps=STEPS, device="cpu", disc_center_lps=disc, seed=5)
    base = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=registry, **kw)
    assert base.provenance["guidance_scale"] == 1.0 and base.nfe == STEPS + 1
    with pytest.raises(InputError, match="trained without the healthy condition, so it cannot be guided"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=registry, guidance_scale=2.0, **kw)

    def edit(models):
        for m in models:
            if m["method"] == "weighted":
                m["training"] = {"healthy_fraction": 0.2, "conditions": ["dh_moderate_large"]}
                m["guidance_scale"] = 2.0

    reg2 = _registry_with(tmp_path, registry, edit)
    _condition_sensitive(reg2, "weighted")
    base = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=reg2, guidance_scale=1, **kw)
    guided = pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=reg2, **kw)
    assert guided.provenance["guidance_scale"] == 2.0 and guided.nfe == 2 * (STEPS + 1)
    a, b = (sitk.GetArrayFromImage(r.outputs[0]) for r in (base, guided))
    assert not np.array_equal(a, b)
    far = _far_mask(img, lm)
    assert np.array_equal(a[far], b[far])  # guidance changes only the weighted region
    assert base.provenance["guidance_scale"] == 1.0 and base.nfe == STEPS + 1
    with pytest.raises(InputError, match="guidance scale must be between 0 and 20"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=reg2, guidance_scale=-1, **kw)
    with pytest.raises(InputError, match="guidance scale must be a number"):
        pipeline.inpaint(img, lm, "L4-L5", "dh_moderate_large", registry=reg2, guidance_scale="strong", **kw)
    # a model whose conditions include healthy (the full models of RePaint) may be guided without the record
    full = reg.ModelEntry(id="f", method="full", config="small", files={},
                          extra={"training": {"conditions": ["none", "dh_small"]}})
    assert pipeline.model_guidance(full, 1.5) == 1.5 and pipeline.model_guidance(full) == 1.0
    only = reg.ModelEntry(id="p", method="weighted", config="small", files={},
                          extra={"training": {"conditions": ["dh_small"]}, "guidance_scale": 3.0})
    with pytest.raises(InputError, match="'p' was trained without the healthy condition"):
        pipeline.model_guidance(only)  # a registry default that the model cannot honour is refused too
    per = reg.ModelEntry(id="c", method="weighted", config="small", files={},
                         extra={"training": {"healthy_fraction": 0.2}, "guidance_scale": {"dh_small": 2.0}})
    assert pipeline.model_guidance(per, condition="DH-small") == 2.0  # per condition, names parsed
    assert pipeline.model_guidance(per, condition="dh_moderate_large") == 1.0  # not listed: unguided
    assert pipeline.model_guidance(per, 1.5, condition="dh_small") == 1.5  # an explicit scale wins
    with pytest.raises(InputError, match="unknown condition 'dh_tiny'"):
        pipeline.model_guidance(reg.ModelEntry(id="d", method="weighted", config="small", files={},
                                               extra={"guidance_scale": {"dh_tiny": 2.0}}), condition="dh_small")


def test_default_model_is_chosen_per_condition(case, registry, tmp_path):
    """Per-pathology models (the paper): entries flagged default with training.conditions; the pipeline picks the
    one whose conditions include the requested condition."""
    img, lm, disc = case

    def edit(models):
        extra = []
        for m in models:
            m["default"] = True
            m["training"] = {"conditions": ["dh_small", "dh_moderate_large"]}
            ccs = json.loads(json.dumps(m))
            ccs["id"] = m["id"] + "-ccs"
            ccs["training"] = {"conditions": ["ccs_moderate", "ccs_severe"]}
            extra.append(ccs)
        models.extend(extra)

    reg2 = _registry_with(tmp_path, registry, edit)
    assert pipeline.default_model_for("weighted", "dh_small", reg2) == "demo-small-weighted"
    assert pipeline.default_model_for("repaint", "ccs_severe", reg2) == "demo-small-full-ccs"
    res = pipeline.inpaint(img, lm, "L4-L5", "ccs_moderate", method="masked", steps=STEPS, device="cpu",
                           disc_center_lps=disc, registry=reg2)
    assert res.provenance["model_id"] == "demo-small-masked-ccs"
    fsu, _ = pipeline.reconstruct(img, lm, "ccs_severe", disc_center_lps=disc, device="cpu", registry=reg2)
    with pytest.raises(ModelError, match="no default weighted model for condition 'none'"):
        pipeline.default_model_for("weighted", "none", reg2)


def test_unflagged_default_is_the_first_model_of_the_method(registry, tmp_path):
    """No entry flagged default: the first registered model of the method (no ids are hard-coded), and a registry
    without such a model says which method is missing."""
    def edit(models):
        first = json.loads(json.dumps(models[0]))
        first["id"] = "my-weighted"
        models.insert(0, first)
        models[:] = [m for m in models if m["method"] != "full"]

    reg2 = _registry_with(tmp_path, registry, edit)
    assert pipeline.default_model_for("weighted", "dh_small", reg2) == "my-weighted"
    assert pipeline.default_model_for("masked", "dh_small", reg2) == "demo-small-masked"
    with pytest.raises(ModelError, match=r"no full model in registry .*the repaint method needs one"):
        pipeline.default_model_for("repaint", "dh_small", reg2)
