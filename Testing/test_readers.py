"""Automatic readers of the phantom benchmark: the bundled pathology-present reader on held-out phantom seeds, its
registry entry (sha256), the train-reader command, and the C2ST realism reader."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers_models import corrupt
from model_training.benchmark import readers as R
from spine_ldm import registry as reg
from spine_ldm.errors import InputError, ModelError


def test_bundled_reader_is_registered_small_and_verified():
    entry, fref = R.reader_entry(R.DEFAULT_READER_ID)
    assert fref.path.is_file() and fref.path.stat().st_size < 1_000_000
    assert reg.sha256_file(fref.path) == fref.sha256
    assert entry["training"]["heldout"]["present_accuracy"] > 0.9
    reader = R.load_reader()
    assert reader.id == R.DEFAULT_READER_ID


def test_bundled_reader_above_90_percent_on_held_out_phantoms():
    """Seeds the reader never saw (its recorded held-out range, disjoint from its training seeds and the models')."""
    from model_training.benchmark.seeds import parse_seeds, recorded_seeds

    reader = R.load_reader()
    trained = recorded_seeds(reader.entry)
    held = parse_seeds(reader.entry["training"]["heldout_seeds"])[-8:]
    assert not set(held) & trained
    for e in reg.list_models():
        assert not set(held) & (recorded_seeds(e) or set())
    x, y, _ = R.build_dataset(held, log=None)
    res = R.evaluate_reader(reader, x, y)
    assert res["n_decisions"] == 8 * 6  # 2 pathological + 2 healthy crops; healthy ones judged for DH and CCS
    assert res["present_accuracy"] > 0.9, res
    # a blurred copy (generated pathology is smoother than the phantom's) is still read
    assert R.evaluate_reader(reader, R.blurred(x, 1.0), y)["present_accuracy"] > 0.85


def test_registry_rewrite_keeps_the_readers_section(tmp_path):
    src = reg.package_registry_path()
    dst = tmp_path / "Models.json"
    shutil.copy(src, dst)
    shutil.copytree(src.parent / "Models", tmp_path / "Models")
    reg.write_registry(dst, reg.read_registry(dst))  # what export does
    entry, fref = R.reader_entry(R.DEFAULT_READER_ID, dst)
    assert fref.path.is_file()
    R.load_reader(R.DEFAULT_READER_ID, dst)
    corrupt(fref.path)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        R.load_reader(R.DEFAULT_READER_ID, dst)
    with pytest.raises(ModelError, match="unknown reader"):
        R.reader_entry("nope", dst)


def test_train_reader_writes_weights_report_and_refuses_model_seeds(tmp_path):
    reg_path = tmp_path / "Models.json"
    reg_path.write_text(json.dumps({"version": 1, "models": []}))
    rep = R.train_reader([910001, 910002], [910003], tmp_path / "run", epochs=1, jitter=1, registry=reg_path,
                         log=None)
    assert (tmp_path / "run" / "reader.pt").is_file() and (tmp_path / "run" / "reader.json").is_file()
    assert rep["training"]["phantom_seeds"] == "910001-910002" and rep["training"]["n_train_crops"] == 2 * 2 * 2 * 2
    entry = R.register_reader(reg_path, rep, tmp_path / "run" / "reader.pt")
    assert (tmp_path / entry["file"]["path"]).is_file()
    assert R.load_reader(entry["id"], reg_path).entry["file"]["sha256"] == entry["file"]["sha256"]
    with pytest.raises(InputError, match="910002"):
        R.train_reader([910002], [910005], tmp_path / "run2", epochs=1, registry=reg_path, exclude_seeds=[910002],
                       log=None)


def test_present_prob_sums_the_target_type():
    net = R.PresentNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    r = R.PresentReader(net)
    x = np.zeros((2, 20, 20, 16), np.float32)
    e = np.exp(1.0)
    assert r.present_prob(x, "dh_small") == pytest.approx([2 * e / (2 * e + 3)] * 2)
    assert r.present_prob(x, "ccs_severe") == pytest.approx([2 / (2 * e + 3)] * 2)
    with pytest.raises(InputError):
        r.present_prob(x, "none")


def test_c2st_is_near_chance_for_one_distribution_and_near_one_for_a_shift():
    rng = np.random.default_rng(0)
    n_cases, k = 24, 3
    real = rng.normal(size=(n_cases, 6, 6, 4))
    fake = rng.normal(size=(n_cases * k, 6, 6, 4))
    groups_r = np.arange(n_cases)
    groups_f = np.repeat(np.arange(n_cases), k)
    same = R.c2st(real, fake, groups_r, groups_f, n_boot=200)
    assert same["lo"] < 0.5 < same["hi"] and abs(same["auc"] - 0.5) < 0.2
    shifted = R.c2st(real, fake + 0.5, groups_r, groups_f, n_boot=200)
    assert shifted["auc"] > 0.9 and shifted["lo"] > 0.7
    assert np.isnan(R.c2st(real[:1], fake[:3], [0], [0, 0, 0])["auc"])


def test_report_c2st_ceiling_reads_the_ceiling_crops_not_the_outputs():
    """The report's C2ST ceiling tests the truth against the ceiling crops (crop_C_*), the C2ST against the outputs
    (crop_G_*): outputs drawn from the truth's distribution read near chance while a shifted ceiling reads near 1."""
    from model_training.benchmark.report import _c2st

    rng = np.random.default_rng(1)
    cases = []
    for i in range(24):
        p = rng.normal(size=(1, 6, 6, 4))
        cases.append(({"key": f"case{i}"}, {"crop_P": p, "crop_G_weighted": rng.normal(size=(3, 6, 6, 4)),
                                             "crop_C_weighted": p + 0.5}))
    out = _c2st(cases, "weighted", 200)
    ceiling = _c2st(cases, "weighted", 200, fake_kind="C")
    assert abs(out["auc"] - 0.5) < 0.2 and out["n_fake"] == 72
    assert ceiling["auc"] > 0.9 and ceiling["n_fake"] == 24 and ceiling["mean"] == ceiling["auc"]
    assert np.isnan(_c2st(cases, "masked", 10)["auc"])
