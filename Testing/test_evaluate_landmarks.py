"""Evaluation chooses the inpainting landmark per target condition: a healthy FSU gets a stenosis (ccs_*) at its
canal centre (``canal_lps``) and a herniation (dh_*) at ``landmark_lps`` (posterior disc margin); without
``canal_lps`` the stenosis falls back to ``landmark_lps`` and is counted. The pipeline is replaced by a fake that
records the landmark it is given (no model needed); crops are the real ``crop_around`` on a coarse phantom."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from model_training import evaluate as E
from model_training.manifest import Row, write_manifest
from spine_ldm.geometry import herniation_landmark

CFG = SimpleNamespace(fsu_shape=(32, 16, 8), fsu_size_mm=(80.0, 80.0, 50.0), fsu_spacing_mm=(2.5, 5.0, 6.25))


@pytest.fixture(scope="module")
def healthy_rows(tmp_path_factory):
    from model_training.importers.phantom import import_phantoms

    rows = import_phantoms(tmp_path_factory.mktemp("ph"), 1, seed=2, mix={}, spacing=(2.0, 2.0, 4.3))
    assert len(rows) == 5 and all(r.condition == "none" and r.canal_lps is not None for r in rows)
    return rows


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Replace model resolution and pipeline.inpaint; record inpaint landmarks and crop centres."""
    import spine_ldm.registry as registry
    from spine_ldm import pipeline
    from spine_ldm.geometry import FSUSpec, extract_fsu

    calls = {"inpaint": [], "crop": []}
    monkeypatch.setattr(registry, "resolve", lambda name, reg=None: {"id": name})
    monkeypatch.setattr(registry, "load_config_for", lambda entry: CFG)

    def inpaint(image, landmark_lps, level, condition, *, samples=1, disc_center_lps=None, **kw):
        calls["inpaint"].append((level, condition, tuple(landmark_lps)))
        fsu = extract_fsu(image, disc_center_lps, FSUSpec(shape=CFG.fsu_shape, size_mm=CFG.fsu_size_mm))
        return SimpleNamespace(fsu_outputs=[fsu] * samples, seconds=0.0)

    real_crop = E.crop_around

    def crop_around(fsu_img, landmark_lps, spec, norm):
        calls["crop"].append(tuple(landmark_lps))
        return real_crop(fsu_img, landmark_lps, spec, norm)

    monkeypatch.setattr(pipeline, "inpaint", inpaint)
    monkeypatch.setattr(E, "crop_around", crop_around)
    return calls


def _collect(rows, conditions):
    return E.collect(rows, ["weighted"], tuple(conditions), samples=1, steps=1, seed=0, models={"weighted": "w"},
                     device="cpu")


def test_inpaint_landmark_rules():
    base = dict(study_id="s", image_path="a.nrrd", level="L4-L5", disc_center_lps=(0, 0, 0))
    h = Row(**base, landmark_lps=(0, 20, 0), canal_lps=(0, 28, 1))
    assert E.inpaint_landmark(h, "ccs_severe") == ((0.0, 28.0, 1.0), False)
    assert E.inpaint_landmark(h, "CCS-moderate") == ((0.0, 28.0, 1.0), False)
    # a herniation at its centre, behind the posterior disc margin (geometry.herniation_landmark)
    assert E.inpaint_landmark(h, "dh_moderate_large") == ((0.0, 24.0, 0.0), False)
    assert E.inpaint_landmark(h, "dh_small") == ((0.0, 21.5, 0.0), False)
    assert E.inpaint_landmark(h.replace(canal_lps=None), "ccs_severe") == ((0.0, 20.0, 0.0), True)
    assert E.inpaint_landmark(h.replace(canal_lps=None, landmark_lps=None), "ccs_severe") == (None, False)
    assert E.inpaint_landmark(h.replace(landmark_lps=None), "dh_small") == (None, False)
    # a pathological row always uses its own landmark, whatever canal_lps says
    p = h.replace(condition="ccs_severe", landmark_lps=(0, 27, 0))
    assert E.inpaint_landmark(p, "ccs_severe") == ((0.0, 27.0, 0.0), False)


def test_healthy_row_gets_stenosis_at_the_canal_and_herniation_behind_the_margin(healthy_rows, fake_pipeline, capsys):
    r = next(x for x in healthy_rows if x.level == "L4-L5")
    # the two points really differ: the canal centre lies several mm behind the posterior disc margin
    assert r.canal_lps[1] - r.landmark_lps[1] > 4.0
    col, records, stats = _collect([r], ["ccs_severe", "dh_moderate_large"])
    dh = herniation_landmark(r.landmark_lps, r.disc_center_lps, "dh_moderate_large")
    assert np.linalg.norm(np.subtract(dh, r.landmark_lps)) == pytest.approx(4.0)
    assert sorted(fake_pipeline["inpaint"]) == sorted([("L4-L5", "ccs_severe", r.canal_lps),
                                                       ("L4-L5", "dh_moderate_large", dh)])
    # input crop + output crop of each condition centred on that condition's point
    assert sorted(fake_pipeline["crop"]) == sorted([r.canal_lps] * 2 + [dh] * 2)
    assert stats == {"skipped_no_landmark": 0, "healthy_inputs": 1, "pathological_inputs": 0,
                     "ccs_landmark_fallback": 0}
    assert len(col.inpainted[("L4-L5", "ccs_severe", "weighted")]) == 1
    # the fake returns the input unchanged: no intensity change at the landmark
    assert [rec["landmark_delta"] for rec in records] == [0.0, 0.0]
    assert "warning" not in capsys.readouterr().err


def test_missing_canal_falls_back_to_landmark_and_is_counted(healthy_rows, fake_pipeline, capsys):
    rows = [r.replace(canal_lps=None) if r.level in ("L3-L4", "L5-S1") else r for r in healthy_rows]
    no_point = healthy_rows[0].replace(landmark_lps=None, canal_lps=None, image_path="elsewhere.nrrd")
    col, records, stats = _collect(rows + [no_point], ["ccs_severe"])
    assert stats["ccs_landmark_fallback"] == 2 and stats["healthy_inputs"] == 5
    assert stats["skipped_no_landmark"] == 1
    used = {lv: lm for lv, _c, lm in fake_pipeline["inpaint"]}
    for r in rows:
        assert used[r.level] == (r.landmark_lps if r.canal_lps is None else r.canal_lps)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "2 healthy input(s) have no canal_lps" in err


def test_run_evaluation_reports_the_fallback_count(healthy_rows, fake_pipeline, tmp_path):
    rows = [r.replace(split="test", canal_lps=None if r.level == "L1-L2" else r.canal_lps) for r in healthy_rows]
    m = write_manifest(tmp_path / "m.csv", rows)
    E.run_evaluation(m, ["weighted"], tmp_path / "eval", conditions=["ccs_severe", "dh_small"], samples=1,
                     steps=1, features="random", models={"weighted": "w"}, device="cpu", quiet=True)
    info = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert info["ccs_landmark_fallback"] == 1 and info["healthy_inputs"] == 5
    by = {(lv, c): np.asarray(lm) for lv, c, lm in fake_pipeline["inpaint"]}
    assert len(by) == 10
    np.testing.assert_allclose(by[("L2-L3", "ccs_severe")], rows[1].canal_lps)
    np.testing.assert_allclose(by[("L2-L3", "dh_small")],
                               herniation_landmark(rows[1].landmark_lps, rows[1].disc_center_lps, "dh_small"))
    np.testing.assert_allclose(by[("L1-L2", "ccs_severe")], rows[0].landmark_lps)
