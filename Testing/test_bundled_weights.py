"""The bundled demo weights (SpineInpaint/Resources/Models.json, ``demo-small-*``) do what the README says.

They are trained on phantoms (``python -m model_training make-demo-weights``); these tests pin their behaviour on a
healthy phantom the weights never saw (seed 0 is not a training study): every registered file verifies, and the
weighted / masked models paint the pathology at the landmark: the mean intensity in a 8 x 8 mm patch at the landmark
of the sagittal slice drops (a herniation puts dark disc material into the bright CSF; a stenosis narrows the bright
thecal sac). The weighted model also grades the condition at one landmark: a small herniation darkens least, a
severe stenosis most, and the stenosis also darkens the canal behind the landmark (ligamentum flavum / facets)
more than a herniation does. Geometry and the bit-identical far field are tested in test_pipeline.py. Not pinned
because the weights do not do it on this phantom (see model_training/README.md, section 5): masked herniation at
the L4-L5 disc margin, and RePaint (its change at the landmark is small).
"""
from __future__ import annotations

import numpy as np
import pytest

from spine_ldm import pipeline, registry
from spine_ldm.demo import METHODS, _phantom_case, landmark_patch_change

DEMO_IDS = ("demo-small-weighted", "demo-small-masked", "demo-small-full")


def _bundled() -> str:
    return str(registry.package_registry_path())


def test_bundled_registry_has_the_demo_models_and_they_verify():
    ids = {e.id: e for e in registry.list_models(_bundled())}
    assert set(DEMO_IDS) <= set(ids)
    for i in DEMO_IDS:
        assert ids[i].config == "small"
        for name, st in registry.verify(i, _bundled()).items():
            assert st.status == "ok", (i, name, st.message())
    assert {ids[i].files["autoencoder"].sha256 for i in DEMO_IDS} == {ids[DEMO_IDS[0]].files["autoencoder"].sha256}


@pytest.fixture(scope="module")
def phantom():
    return _phantom_case(seed=0)


@pytest.mark.parametrize("method,level,condition,kind,limit", [
    ("weighted", "L4-L5", "dh_moderate_large", "dh", -0.10),
    ("weighted", "L3-L4", "ccs_severe", "ccs", -0.10),
    ("masked", "L3-L4", "ccs_severe", "ccs", -0.10),
])
def test_demo_weights_paint_the_pathology_at_the_landmark(phantom, method, level, condition, kind, limit):
    assert method in METHODS
    image, discs, lms = phantom
    lm = lms[(level, kind)]
    res = pipeline.inpaint(image, lm, level, condition, method=method, samples=1, seed=0, steps=50, device="cpu",
                           disc_center_lps=discs[level], registry=_bundled())
    out = res.outputs[0]
    change = landmark_patch_change(out, image, lm)
    assert change < limit, f"{method} {condition}: landmark patch change {change:+.3f} (want < {limit})"


def test_weighted_demo_model_grades_the_condition_at_one_landmark(phantom):
    image, discs, lms = phantom
    lm = lms[("L4-L5", "dh")]
    behind = tuple(np.asarray(lm) + np.array([0.0, 12.0, 0.0]))   # 12 mm posterior (LPS: +y)
    at, post = {}, {}
    for cond in ("dh_small", "dh_moderate_large", "ccs_severe"):
        res = pipeline.inpaint(image, lm, "L4-L5", cond, method="weighted", samples=1, seed=0, steps=50,
                               device="cpu", disc_center_lps=discs["L4-L5"], registry=_bundled())
        at[cond] = landmark_patch_change(res.outputs[0], image, lm)
        post[cond] = landmark_patch_change(res.outputs[0], image, behind)
    assert at["dh_small"] > at["dh_moderate_large"] + 0.05, at
    assert at["ccs_severe"] < at["dh_moderate_large"] - 0.05, at
    assert post["ccs_severe"] < post["dh_moderate_large"] - 0.05, post
