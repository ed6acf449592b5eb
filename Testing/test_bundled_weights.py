"""The bundled demo weights (SpineInpaint/Resources/Models.json, ``demo-small-*``) do what README and docs/results say.

They are trained on phantoms (``python -m model_training make-demo-weights``: one LDM per method and pathology
family); these tests pin the phantom benchmark's own figures (``model_training.benchmark``, issue #12) on a few
held-out seeds of its default range (1000-1019; the training phantom seeds are 31-bit hashes, and the benchmark
refuses overlap), with margins below what the committed weights reach (the measured value is in each case's
comment): the cosine of the generated vs the true change within 25 mm of the landmark, the automatic
pathology-present reader, and the per-pathology defaults of the registry. The full tables (20 seeds per condition,
intervals) are in docs/results/. Geometry and the bit-identical far field are tested in test_pipeline.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spine_ldm import pipeline, registry

FAMILIES = {"dh": ("dh_small", "dh_moderate_large"), "ccs": ("ccs_moderate", "ccs_severe")}
MODEL_METHOD = {"weighted": "weighted", "masked": "masked", "repaint": "full"}
#: the recipe's sigma per family (model_training.demo_weights.FAMILY_SIGMA_MM), the pipeline's default per model
SIGMA_MM = {"dh": 8.0, "ccs": 16.0}


def _bundled() -> str:
    return str(registry.package_registry_path())


def _ids() -> dict:
    return {(m, f): f"demo-small-{mm}-{f}" for m, mm in MODEL_METHOD.items() for f in FAMILIES}


def test_bundled_registry_has_one_model_per_method_and_pathology_and_they_verify():
    entries = {e.id: e for e in registry.list_models(_bundled())}
    ids = _ids()
    assert set(ids.values()) <= set(entries)
    for (method, fam), i in ids.items():
        e = entries[i]
        assert e.config == "small" and e.method == MODEL_METHOD[method] and e.extra.get("default") is True
        info = registry.training_info(e)
        assert info["conditions"] == list(FAMILIES[fam]) and info["sigma_mm"] == SIGMA_MM[fam]
        assert info["phantom_seeds"] == {"import_phantoms": {"seed": 0, "n_studies": 1000}}
        for name, st in registry.verify(i, _bundled()).items():
            assert st.status == "ok", (i, name, st.message())
        sd = torch.load(e.files["unet"].local_path(), map_location="cpu", weights_only=True)
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())  # stored compactly
    assert len({entries[i].files["autoencoder"].sha256 for i in ids.values()}) == 1


def test_the_herniation_models_are_guided_per_grade():
    """The bundled weighted / masked DH models learned healthy FSUs (the null condition) and sample with
    classifier-free guidance 2 on DH small (docs/results, validation seeds: judged present 47 % -> 90 %) and 1.25
    on DH moderate/large (graded as asked 65 % -> 100 %); the other models are unguided."""
    for m in ("weighted", "masked"):
        e = registry.get_entry(f"demo-small-{m}-dh", _bundled())
        assert registry.training_info(e)["healthy_fraction"] == 0.2
        assert pipeline.model_guidance(e, condition="dh_small") == 2.0
        assert pipeline.model_guidance(e, condition="dh_moderate_large") == 1.25
    for i in ("demo-small-weighted-ccs", "demo-small-full-dh"):
        assert pipeline.model_guidance(registry.get_entry(i, _bundled()), condition="dh_small") == 1.0


@pytest.mark.parametrize("method", list(MODEL_METHOD))
def test_the_default_model_is_the_pathologys_own(method):
    for fam, conds in FAMILIES.items():
        for c in conds:
            assert pipeline.default_model_for(method, c, _bundled()) == _ids()[(method, fam)]


@pytest.fixture(scope="module")
def reader():
    from model_training.benchmark.readers import load_reader

    return load_reader(registry=_bundled())


def _score(case, method, reader):
    """(cos, r2, present probability) of one sample (seed 0) exactly as benchmark-phantoms measures them."""
    from model_training.benchmark import metrics as M
    from model_training.benchmark.readers import crop, crop_normalization

    h, p = case.healthy.image, case.truth.image
    res = pipeline.inpaint(h, case.landmark, case.level, case.condition, method=method, samples=1, seed=0,
                           steps=50, device="cpu", disc_center_lps=case.disc_center, registry=_bundled(),
                           repaint_resample=5)
    g = res.outputs[0]
    nb = M.Neighbourhood(h, case.landmark, M.COS_RADIUS_MM)
    cos, r2 = M.cos_r2(nb.array(g), nb.array(h), nb.array(p), nb.ball(M.COS_RADIUS_MM))
    norm = crop_normalization(h, case.disc_center)
    present = float(reader.present_prob(crop(g, case.landmark, norm)[None], case.condition)[0])
    return cos, r2, present


# (seed, condition, method, minimum cos); the level is the benchmark's draw for the seed. Measured values in the
# comments (the committed float16 LDMs with the decoder-fine-tuned autoencoder, a 2-core x86 CPU; margins cover
# other CPUs' float rounding).
PINS = [
    (1000, "dh_moderate_large", "weighted", 0.67),   # measured 0.787 (L4-L5; guidance 1.25)
    (1001, "dh_moderate_large", "weighted", 0.67),   # measured 0.794 (L3-L4)
    (1000, "dh_small", "weighted", 0.38),            # measured 0.492 (L4-L5; guidance 2)
    (1002, "dh_small", "weighted", 0.32),            # measured 0.432 (L5-S1)
    (1003, "dh_small", "weighted", 0.42),            # measured 0.543 (L5-S1)
    (1000, "dh_small", "masked", 0.35),              # measured 0.462 (L4-L5; guidance 2)
    (1000, "ccs_severe", "weighted", 0.78),          # measured 0.902
    (1001, "ccs_moderate", "weighted", 0.63),        # measured 0.756
    (1000, "ccs_severe", "masked", 0.62),            # measured 0.752
]


@pytest.mark.parametrize("seed,condition,method,min_cos", PINS)
def test_bundled_models_paint_the_true_pathology_on_held_out_phantoms(seed, condition, method, min_cos, reader):
    from model_training.benchmark.cases import DEFAULT_LEVELS, draw_level, make_case

    case = make_case(seed, draw_level(seed, DEFAULT_LEVELS), condition)
    cos, r2, present = _score(case, method, reader)
    assert cos >= min_cos, f"{method} {condition} seed {seed} ({case.level}): cos {cos:.3f} < {min_cos}"
    assert present > 0.5, f"{method} {condition} seed {seed}: the present reader says {present:.2f}"
    assert np.isfinite(r2)


def test_the_weighted_model_grades_the_herniation_severity():
    """Same healthy phantom and landmark: a small herniation changes less tissue than a moderate/large one (the
    severity conditioning works), as the true twins do."""
    from model_training.benchmark import metrics as M
    from model_training.benchmark.cases import DEFAULT_LEVELS, draw_level, make_case

    level = draw_level(1000, DEFAULT_LEVELS)
    energy, truth = {}, {}
    for cond in ("dh_small", "dh_moderate_large"):
        case = make_case(1000, level, cond)
        h = case.healthy.image
        nb = M.Neighbourhood(h, case.landmark, M.COS_RADIUS_MM)
        ball = nb.ball(M.COS_RADIUS_MM)
        g = pipeline.inpaint(h, case.landmark, level, cond, samples=1, seed=0, steps=50, device="cpu",
                             disc_center_lps=case.disc_center, registry=_bundled()).outputs[0]
        energy[cond] = float(np.abs(nb.array(g) - nb.array(h))[ball].sum())
        truth[cond] = float(np.abs(nb.array(case.truth.image) - nb.array(h))[ball].sum())
    assert truth["dh_small"] < truth["dh_moderate_large"]
    assert energy["dh_small"] < 0.8 * energy["dh_moderate_large"], energy


def test_decoding_the_latent_as_is_keeps_more_of_a_small_herniation_than_snapping_it():
    """Why ``sampling.decode_quantize`` is off: the truth's own reconstruction (a perfect LDM's output) keeps more
    of a small herniation's change when the latent is decoded as is than when it is snapped to the codebook
    (held-out seeds 1000-1003, the 8-seed mean of benchmarks' amp: 0.27 vs 0.20)."""
    from model_training.benchmark import metrics as M
    from model_training.benchmark.cases import DEFAULT_LEVELS, draw_level, make_case
    from model_training.benchmark.run import compose

    amps = {True: [], False: []}
    for seed in range(1000, 1004):
        case = make_case(seed, draw_level(seed, DEFAULT_LEVELS), "dh_small")
        h, p, lm = case.healthy.image, case.truth.image, case.landmark
        nb = M.Neighbourhood(h, lm, M.COS_RADIUS_MM)
        ball = nb.ball(M.COS_RADIUS_MM)
        prov = {"sigma_mm": SIGMA_MM["dh"], "paste_mode": "change"}
        for q in amps:
            kw = dict(disc_center_lps=case.disc_center, device="cpu", registry=_bundled(), decode_quantize=q)
            _, rh = pipeline.reconstruct(h, lm, "dh_small", **kw)
            _, rp = pipeline.reconstruct(p, lm, "dh_small", **kw)
            amps[q].append(M.change_amplitude(nb.array(compose(h, rp, lm, prov, rh)), nb.array(h), nb.array(p), ball))
    assert all(a > b for a, b in zip(amps[False], amps[True])), amps
    assert np.mean(amps[False]) > 1.2 * np.mean(amps[True]), amps
