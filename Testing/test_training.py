"""Training side of model_training: VQGAN + LDM training (weighted / masked / full), checkpoints and resume
(also after kill -9), DDP (gloo, 2 processes), export to a registry, Table-1 formatting.

Data: a few coarse phantom studies (spine_ldm.phantom) in a manifest; the tiny training config
(model_training/configs/tiny.yaml) on the frozen ``small`` model config. Slow tests (subprocess kill -9, torchrun
DDP) are marked ``slow``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model_training import common as C
from model_training import demo_weights as D
from model_training.demo_weights import generate_phantom_rows
from model_training.manifest import read_manifest, write_manifest
from spine_ldm.errors import InputError, ModelError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "SpineInpaint"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("phantoms")
    rows = generate_phantom_rows(d / "img", 3, seed=7, mix={"dh_moderate_large": 0.6, "ccs_severe": 0.4},
                                 spacing=(1.6, 1.6, 4.3), log=lambda s: None)
    return write_manifest(d / "manifest.csv", rows)


def _tiny(**kw) -> dict:
    return C.load_train_config("tiny", kw)


@pytest.fixture(scope="module")
def ae_run(manifest, tmp_path_factory) -> Path:
    from model_training.train_autoencoder import train_autoencoder

    out = tmp_path_factory.mktemp("ae")
    train_autoencoder(_tiny(steps=12, checkpoint_every=6, lr=2e-3, disc_start=8, roi_l1_weight=1.0), out, manifest=manifest,
                      device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
    return out


@pytest.fixture(scope="module")
def ldm_runs(manifest, ae_run, tmp_path_factory) -> dict:
    from model_training.train_ldm import train_ldm

    runs = {}
    for m in ("weighted", "masked", "full"):
        out = tmp_path_factory.mktemp(f"ldm_{m}")
        train_ldm(_tiny(steps=12, checkpoint_every=12, eval_batch=4), m, ae_run, out, manifest=manifest,
                  device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
        runs[m] = out
    return runs


# --------------------------------------------------------------------------- utilities
def test_atomic_checkpoint_and_ema(tmp_path):
    m = torch.nn.Linear(3, 2)
    ema = C.EMA(m, decay=0.5, warmup=False)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    # shadow = 0.5 * old + 0.5 * new = old + 0.5
    assert torch.allclose(ema.shadow.weight, m.weight - 0.5)
    p = C.save_checkpoint(tmp_path, {"model": m.state_dict(), "ema": ema.state_dict()}, step=7, keep_every=7)
    assert p.name == "last.pt" and (tmp_path / "checkpoints" / "step_0000007.pt").is_file()
    assert not [f for f in p.parent.iterdir() if ".tmp" in f.name]
    st = C.load_checkpoint(tmp_path)
    assert st["step"] == 7 and torch.equal(st["model"]["weight"], m.weight)
    (tmp_path / "bad").mkdir()
    with pytest.raises(ModelError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "bad")


def test_amp_setup_cpu_bf16_only_when_asked():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    ctx, scaler, mode = C.amp_setup(cpu, "bf16")
    with ctx():
        assert (a @ b).dtype == torch.bfloat16
    assert mode == "bf16" and scaler is None
    for amp in ("auto", "fp16", "off", None, True):
        ctx, scaler, mode = C.amp_setup(cpu, amp)
        with ctx():
            assert (a @ b).dtype == torch.float32
        assert mode == "off" and scaler is None
    with pytest.raises(InputError, match="amp must be"):
        C.amp_setup(cpu, "fp8")
    assert isinstance(C.cpu_has_native_bf16(), bool)


def test_resumable_batch_sampler_is_a_function_of_step_and_shards_ranks():
    s = C.ResumableBatchSampler(10, 3, seed=1)
    full = [b for _, b in zip(range(9), iter(s))]
    resumed = [b for _, b in zip(range(4), iter(C.ResumableBatchSampler(10, 3, seed=1, start_step=5)))]
    assert resumed == full[5:9]
    assert [s.batch_for_step(k) for k in range(9)] == full
    r0 = C.ResumableBatchSampler(10, 2, rank=0, world_size=2, seed=1).batch_for_step(0)
    r1 = C.ResumableBatchSampler(10, 2, rank=1, world_size=2, seed=1).batch_for_step(0)
    assert not set(r0) & set(r1)
    with pytest.raises(InputError, match="empty"):
        C.ResumableBatchSampler(0, 2)


def test_latent_weight_matches_geometry_on_the_latent_grid():
    import SimpleITK as sitk

    from spine_ldm import geometry as G
    from spine_ldm import weighting as Wt
    from spine_ldm.models import load_config

    cfg = load_config("small")
    img = sitk.Image(200, 200, 60, sitk.sitkFloat32)
    img.SetSpacing((0.6, 0.6, 4.0))
    frame = G.fsu_frame(img, (60.0, 60.0, 120.0), G.FSUSpec.small())
    lm = (62.0, 70.0, 115.0)
    ref = Wt.gaussian_weight(G.latent_frame(frame, cfg.latent_factors), lm, 16.0)
    ijk = frame.TransformPhysicalPointToContinuousIndex(lm)[::-1]
    w = C.latent_weight(torch.tensor([ijk, [float("nan")] * 3]), cfg, 16.0)
    assert w.shape == (2, 1) + tuple(cfg.latent_shape[1:])
    np.testing.assert_allclose(w[0, 0].numpy(), ref, atol=1e-6)
    assert float(w[1].abs().max()) == 0.0


# --------------------------------------------------------------------------- training decreases the loss
def test_autoencoder_training_decreases_reconstruction_error(ae_run):
    info = json.loads((ae_run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps_done"] == 12
    assert info["eval_l1_final"] < 0.8 * info["eval_l1_initial"], info
    assert info["codebook_usage"]["used"] > 1
    assert math.isfinite(info["latent_scale"]) and info["latent_scale"] > 0
    sd = torch.load(ae_run / "autoencoder.pt", weights_only=True)
    assert float(sd["latent_scale"]) == pytest.approx(info["latent_scale"], rel=1e-5)
    ck = C.load_checkpoint(ae_run)
    assert ck["step"] == 12 and "optimizer_d" in ck and ck["kind"] == "autoencoder"
    lines = [json.loads(x) for x in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/adversarial" in r for r in lines) and any("train/codebook_perplexity" in r for r in lines)
    assert all(r["train/roi_l1"] > 0 for r in lines if "train/l1" in r)  # the landmark ROI term is on
    assert not any("train/adversarial" in r for r in lines if r["step"] <= 8)  # adversarial warm-up


def test_decoder_finetune_keeps_the_latent_space_and_swaps_into_the_registry(manifest, ae_run, ldm_runs, tmp_path,
                                                                              capsys):
    """train: decoder starts from init_weights (the registered autoencoder) and changes only the decoder: encoder,
    codebook and latent_scale come out bit-identical (the LDMs trained on those latents stay valid), the decoder
    moves and its reconstruction error falls; run.json records the mode and the init's sha256. export-decoder
    puts it in place of the registered one for every entry sharing it (same file, new sha256, verified), and
    refuses a run that is not a decoder fine-tune, one whose latent space moved, and a registry without its init."""
    from model_training.export import export_decoder, export_run
    from model_training.train_autoencoder import eval_l1, load_autoencoder, train_autoencoder
    from spine_ldm import registry as R

    reg = tmp_path / "Models.json"
    R.write_registry(reg, [])
    for m in ("weighted", "full"):
        export_run(ldm_runs[m], f"t-{m}", reg, autoencoder_name="t-ae")
    ae_file = tmp_path / "Models" / "t-ae.pt"
    init = torch.load(ae_file, weights_only=True)
    kw = dict(manifest=manifest, device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
    out = tmp_path / "dec"
    train_autoencoder(_tiny(steps=10, checkpoint_every=5, lr=2e-3, disc_start=4, init_weights=str(ae_file),
                            train="decoder"), out, **kw)
    got = torch.load(out / "autoencoder.pt", weights_only=True)
    frozen = [k for k in init if not k.startswith("decoder.")]
    assert "latent_scale" in frozen and any(k.startswith("quantizer.") for k in frozen)
    for k in frozen:
        assert torch.equal(got[k], init[k]), k
    assert any(not torch.equal(got[k], init[k]) for k in init if k.startswith("decoder."))
    info = C.read_run_info(out)
    assert info["train"] == "decoder" and info["init_weights_sha256"] == C.file_sha256(ae_file)
    assert info["latent_scale"] == float(init["latent_scale"])
    assert info["eval_l1_final_ema"] < info["eval_l1_initial"], info
    ae, _, _ = load_autoencoder(out / "autoencoder.pt")
    base, _, _ = load_autoencoder(ae_file)
    x = torch.rand(2, 1, 64, 32, 16)
    assert torch.equal(ae.encode(x), base.encode(x))  # same latents: the LDMs' training data is unchanged
    assert eval_l1(ae, x, quantize=False) != eval_l1(base, x, quantize=False)
    with pytest.raises(InputError, match="set init_weights"):
        train_autoencoder(_tiny(steps=1, train="decoder"), tmp_path / "noinit", **kw)
    with pytest.raises(InputError, match="train must be 'all' or 'decoder'"):
        train_autoencoder(_tiny(steps=1, train="encoder"), tmp_path / "bad", **kw)

    with pytest.raises(InputError, match="train: decoder"):
        export_decoder(ae_run, reg)  # a full autoencoder run: new latents
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run.json").write_text((out / "run.json").read_text())
    k_enc = next(k for k in frozen if k.startswith("encoder.") and got[k].is_floating_point())
    torch.save({**got, k_enc: got[k_enc] + 1e-3}, moved / "autoencoder.pt")
    with pytest.raises(ModelError, match="outside the decoder"):
        export_decoder(moved, reg)
    assert C.file_sha256(ae_file) == info["init_weights_sha256"]  # refused before anything was written
    assert export_decoder(out, reg) == ["t-weighted", "t-full"]
    entries = {e.id: e for e in R.read_registry(reg)}
    for e in entries.values():
        assert e.files["autoencoder"].local_path() == ae_file.resolve()
        assert e.files["autoencoder"].sha256 == C.file_sha256(ae_file) != info["init_weights_sha256"]
        assert R.training_info(e)["autoencoder_decoder_finetune"]["from_sha256"] == info["init_weights_sha256"]
        assert all(s.status == "ok" for s in R.verify(e.id, reg).values())
    loaded = R.load("t-weighted", registry=reg).autoencoder.state_dict()
    k_dec = next(k for k in got if k.startswith("decoder.") and not torch.equal(got[k], init[k]))
    assert torch.equal(loaded[k_dec], got[k_dec]) and torch.equal(loaded[k_enc], init[k_enc])
    from model_training.__main__ import main  # the CLI: already swapped, nothing uses its init any more
    assert main(["export-decoder", "--run", str(out), "--registry", str(reg)]) != 0
    assert "no entry of" in capsys.readouterr().err


def test_roi_l1_counts_only_the_weighted_region():
    from model_training.train_autoencoder import roi_l1

    x = torch.zeros(2, 1, 4, 4, 2)
    rec = x.clone()
    rec[0, 0, 0, 0, 0] = 3.0          # error where W = 0: ignored
    w = torch.zeros_like(x)
    w[1, 0, 1, 1, :] = 1.0
    w[1, 0, 2, 2, :] = 0.5
    assert float(roi_l1(x, rec, w)) == 0.0
    rec[1, 0, 2, 2, 0] = 2.0          # error 2 at weight 0.5: sum(W e) / sum(W) = 1 / 3
    assert float(roi_l1(x, rec, w)) == pytest.approx(1.0 / 3.0)
    assert float(roi_l1(x, rec, torch.zeros_like(x))) == 0.0


@pytest.mark.parametrize("method", ["weighted", "masked", "full"])
def test_ldm_training_decreases_the_loss(ldm_runs, manifest, method):
    info = json.loads((ldm_runs[method] / "run.json").read_text())
    assert info["status"] == "complete" and info["method"] == method
    assert info["eval_loss_final"] < 0.9 * info["eval_loss_initial"], info
    rows = [r for r in read_manifest(manifest)]
    n_patho = sum(r.condition != "none" and r.landmark_lps is not None for r in rows)
    # weighted / masked see only pathological FSUs with a landmark; full sees everything
    assert info["dataset_size"] == (len(rows) if method == "full" else n_patho)
    assert (ldm_runs[method] / "unet.pt").is_file()


def test_encode_dataset_encodes_repeated_rows_once(manifest, ae_run):
    """pathology_repeat lists pathological rows k times; their latents are encoded once and shared (and equal to
    encoding the plain dataset)."""
    from model_training.train_autoencoder import load_autoencoder
    from model_training.train_ldm import encode_dataset

    ae, cfg, _ = load_autoencoder(ae_run)
    calls = []
    real = ae.encode
    ae.encode = lambda x: calls.append(x.shape[0]) or real(x)
    plain = C.build_dataset(manifest, cfg, split=None, cache_dir=manifest.parent / "cache")
    rep = C.build_dataset(manifest, cfg, split=None, cache_dir=manifest.parent / "cache", pathology_repeat=3)
    n_path = sum(r.condition != "none" for r in plain.rows)
    assert n_path > 0 and len(rep) == len(plain) + 2 * n_path
    zp = encode_dataset(ae, plain, "cpu")
    n_plain = sum(calls)
    zr = encode_dataset(ae, rep, "cpu")
    assert n_plain == len(plain) and sum(calls) - n_plain == len(plain)   # no extra encodes for the copies
    assert len(zr) == len(rep)
    for i, r in enumerate(rep.rows):
        j = plain.rows.index(r)
        assert torch.equal(zr.z[i], zp.z[j]) and int(zr.condition[i]) == int(zp.condition[j])


def test_condition_repeat_lists_one_condition_k_times(manifest, ae_run):
    """condition_repeat {c: k} lists the rows of condition c k times (on top of pathology_repeat), the others once;
    bad values are clear errors."""
    from model_training.train_autoencoder import load_autoencoder

    _, cfg, _ = load_autoencoder(ae_run)
    kw = dict(split=None, cache_dir=manifest.parent / "cache")
    plain = C.build_dataset(manifest, cfg, **kw)
    n = {c: sum(r.condition == c for r in plain.rows) for c in ("none", "dh_moderate_large", "ccs_severe")}
    assert n["dh_moderate_large"] > 0 and n["ccs_severe"] > 0
    rep = C.build_dataset(manifest, cfg, condition_repeat={"dh_moderate_large": 3}, **kw)
    got = {c: sum(r.condition == c for r in rep.rows) for c in n}
    assert got == {**n, "dh_moderate_large": 3 * n["dh_moderate_large"]}
    both = C.build_dataset(manifest, cfg, pathology_repeat=2, condition_repeat={"ccs_severe": 2}, **kw)
    got = {c: sum(r.condition == c for r in both.rows) for c in n}
    assert got == {"none": n["none"], "dh_moderate_large": 2 * n["dh_moderate_large"],
                   "ccs_severe": 4 * n["ccs_severe"]}
    assert C.parse_condition_repeat(None) == {} and C.parse_condition_repeat({"DH_small": 2}) == {"dh_small": 2}
    with pytest.raises(InputError, match=r"condition_repeat\[dh_small\] must be an integer >= 1"):
        C.parse_condition_repeat({"dh_small": 0})
    with pytest.raises(InputError, match="must be a mapping"):
        C.parse_condition_repeat("dh_small:2")
    with pytest.raises(InputError, match="unknown"):
        C.parse_condition_repeat({"dh_tiny": 2})


def test_healthy_fraction_adds_healthy_rows_as_that_share(manifest, ae_run):
    """healthy_fraction f adds healthy rows (a seeded draw, no repeats) so they are about f of a pathology
    model's set; capped by the healthy rows there are; 0 adds none; bad values are clear errors."""
    from model_training.train_autoencoder import load_autoencoder

    _, cfg, _ = load_autoencoder(ae_run)
    kw = dict(split=None, cache_dir=manifest.parent / "cache", conditions=("dh_moderate_large", "ccs_severe"))
    plain = C.build_dataset(manifest, cfg, **kw)
    n_path = len(plain.rows)
    assert n_path > 0 and all(r.condition != "none" for r in plain.rows)
    mixed = C.build_dataset(manifest, cfg, healthy_fraction=0.25, **kw)
    healthy = [r for r in mixed.rows if r.condition == "none"]
    assert mixed.rows[:n_path] == plain.rows
    assert len(healthy) == round(0.25 / 0.75 * n_path) > 0 and len(set(map(id, healthy))) == len(healthy)
    again = C.build_dataset(manifest, cfg, healthy_fraction=0.25, **kw)
    assert [(r.study_id, r.level) for r in again.rows] == [(r.study_id, r.level) for r in mixed.rows]  # seeded
    all_healthy = C.select_rows(read_manifest(manifest), None, ("none",))
    capped = C.build_dataset(manifest, cfg, healthy_fraction=0.9, **kw)
    assert sum(r.condition == "none" for r in capped.rows) == min(len(all_healthy), round(9 * n_path))
    assert len(C.build_dataset(manifest, cfg, healthy_fraction=0.0, **kw).rows) == n_path
    for bad in (-0.1, 0.95, "lots"):
        with pytest.raises(InputError, match="healthy_fraction must be"):
            C.build_dataset(manifest, cfg, healthy_fraction=bad, **kw)


def test_init_weights_starts_from_a_state_dict_and_is_recorded(manifest, ae_run, ldm_runs, tmp_path):
    """init_weights: the U-Net starts from an exported (here float16) state dict instead of the random init (its
    fixed-batch eval loss at step 0 equals that model's), run.json records the file's sha256; a state dict of
    another shape is refused."""
    from model_training.train_ldm import train_ldm

    src = torch.load(ldm_runs["weighted"] / "unet.pt", weights_only=True)
    half = tmp_path / "init.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in src.items()}, half)
    kw = dict(manifest=manifest, device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
    train_ldm(_tiny(steps=1, checkpoint_every=1, eval_batch=4, init_weights=str(half)), "weighted", ae_run,
              tmp_path / "ft", **kw)
    train_ldm(_tiny(steps=1, checkpoint_every=1, eval_batch=4), "weighted", ae_run, tmp_path / "scratch", **kw)
    ft, scratch = C.read_run_info(tmp_path / "ft"), C.read_run_info(tmp_path / "scratch")
    assert ft["init_weights_sha256"] == C.file_sha256(half) and "init_weights_sha256" not in scratch
    trained = C.read_run_info(ldm_runs["weighted"])
    assert ft["eval_loss_initial"] != pytest.approx(scratch["eval_loss_initial"], rel=1e-3)
    assert ft["eval_loss_initial"] == pytest.approx(trained["eval_loss_final_ema"], rel=1e-2)
    bad = tmp_path / "bad.pt"
    torch.save({k: v[..., :1].clone() if v.ndim > 1 else v for k, v in src.items()}, bad)
    with pytest.raises(InputError, match="does not fit this U-Net config"):
        train_ldm(_tiny(steps=1, init_weights=str(bad)), "weighted", ae_run, tmp_path / "bad", **kw)
    with pytest.raises(InputError, match="is not a file"):
        train_ldm(_tiny(steps=1, init_weights=str(tmp_path / "none.pt")), "weighted", ae_run, tmp_path / "n", **kw)


def test_weighted_training_refuses_an_empty_selection(manifest, ae_run, tmp_path):
    from model_training.train_ldm import train_ldm

    with pytest.raises(InputError, match="no FSUs match"):
        train_ldm(_tiny(steps=1), "weighted", ae_run, tmp_path, manifest=manifest, conditions=["dh_small"],
                  device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
    with pytest.raises(InputError, match="unknown method"):
        train_ldm(_tiny(steps=1), "repaint", ae_run, tmp_path, manifest=manifest, device="cpu")


# --------------------------------------------------------------------------- resume
def test_interrupted_then_resumed_equals_uninterrupted(manifest, ae_run, tmp_path):
    from model_training.train_ldm import train_ldm

    cfg = _tiny(steps=6, checkpoint_every=2, eval_batch=2)
    kw = dict(manifest=manifest, device="cpu", cache_dir=manifest.parent / "cache", quiet=True)
    train_ldm(cfg, "weighted", ae_run, tmp_path / "a", **kw)
    train_ldm(cfg, "weighted", ae_run, tmp_path / "b", max_steps=3, **kw)  # "crash" after step 3
    ck = C.load_checkpoint(tmp_path / "b")
    assert ck["step"] == 3 and not (tmp_path / "b" / "unet.pt").exists()
    assert all(int(s["step"]) == 3 for s in ck["optimizer"]["state"].values())
    train_ldm(cfg, "weighted", ae_run, tmp_path / "b", resume=True, **kw)
    a, b = C.load_checkpoint(tmp_path / "a"), C.load_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    assert C.state_dict_sha256(a["model"]) == C.state_dict_sha256(b["model"])
    assert C.state_dict_sha256(a["ema"]["model"]) == C.state_dict_sha256(b["ema"]["model"])
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])


def _cli(*args) -> list[str]:
    return [PY, "-m", "model_training", *args]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_continues_identically(manifest, ae_run, tmp_path):
    common = ["train-ldm", "--method", "full", "--autoencoder", str(ae_run), "--config", "tiny", "--manifest",
              str(manifest), "--cache-dir", str(manifest.parent / "cache"), "--device", "cpu", "--quiet",
              "--set", "checkpoint_every=2", "--set", "eval_batch=2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(killed), "--set", "steps=500"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = killed / "checkpoints" / "last.pt"
    t0 = time.time()
    try:
        while time.time() - t0 < 300:
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            if ck.is_file() and C.load_checkpoint(ck)["step"] >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    st = C.load_checkpoint(ck)  # complete (atomic replace), whatever moment the kill hit
    s = st["step"]
    assert s % 2 == 0 and s >= 2
    assert all(int(v["step"]) == s for v in st["optimizer"]["state"].values())
    total = s + 2
    r = subprocess.run(_cli(*common, "--out", str(killed), "--resume", "--set", f"steps={total}"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = tmp_path / "ref"
    r = subprocess.run(_cli(*common, "--out", str(ref), "--set", f"steps={total}"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = C.load_checkpoint(killed), C.load_checkpoint(ref)
    assert a["step"] == b["step"] == total
    assert C.state_dict_sha256(a["model"]) == C.state_dict_sha256(b["model"])
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_process_gloo(manifest, ae_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model_training",
           "train-ldm", "--method", "weighted", "--autoencoder", str(ae_run), "--config", "tiny", "--manifest",
           str(manifest), "--cache-dir", str(manifest.parent / "cache"), "--device", "cpu", "--out", str(out),
           "--quiet", "--set", "steps=10", "--set", "checkpoint_every=5", "--set", "eval_batch=4"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "complete"
    assert info["eval_loss_final"] < info["eval_loss_initial"]
    h0 = (out / "param_sha256_rank0.txt").read_text()
    h1 = (out / "param_sha256_rank1.txt").read_text()
    assert h0 == h1  # replicas identical after DDP training
    assert C.state_dict_sha256(torch.load(out / "unet_raw.pt", weights_only=True)) == h0
    ck = C.load_checkpoint(out)
    assert ck["step"] == 10 and len(ck["rng_per_rank"]) == 2


# --------------------------------------------------------------------------- export
def test_export_writes_a_registry_entry_that_verifies(ldm_runs, tmp_path):
    from model_training.export import export_run
    from spine_ldm import registry as R

    reg = tmp_path / "Models.json"
    R.write_registry(reg, [])
    for m in ("weighted", "full"):
        d = export_run(ldm_runs[m], f"t-{m}", reg, autoencoder_name="t-ae", license="Apache-2.0")
        assert d["files"]["autoencoder"]["path"] == "Models/t-ae.pt"
        assert d["config"] == "small" and d["method"] == m
    entries = {e.id: e for e in R.read_registry(reg)}
    assert set(entries) == {"t-weighted", "t-full"}
    st = R.verify("t-weighted", reg)
    assert all(s.status == "ok" for s in st.values())
    loaded = R.load("t-weighted", registry=reg)
    ema = torch.load(ldm_runs["weighted"] / "unet.pt", weights_only=True)
    k = next(iter(ema))
    assert torch.equal(loaded.unet.state_dict()[k], ema[k])  # the EMA weights were exported
    # re-export replaces in place (no duplicate id) and the CLI verifier accepts the file
    export_run(ldm_runs["weighted"], "t-weighted", reg, autoencoder_name="t-ae")
    assert [e.id for e in R.read_registry(reg)] == ["t-weighted", "t-full"]
    r = subprocess.run([PY, "-m", "spine_ldm", "models", "verify", "t-weighted"],
                       env={**_env(), "SPINE_LDM_REGISTRY": str(reg)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # a corrupted weights file is caught
    (tmp_path / "Models" / "t-full-unet.pt").write_bytes(b"junk")
    with pytest.raises(ModelError):
        from model_training.export import check_entry
        check_entry("t-full", reg)


def test_half_export_stores_float16_within_tolerance_and_refuses_beyond(ldm_runs, tmp_path, monkeypatch):
    from model_training import export as X
    from spine_ldm import registry as R

    reg = tmp_path / "Models.json"
    R.write_registry(reg, [])
    X.export_run(ldm_runs["weighted"], "h-weighted", reg, autoencoder_name="h-ae", half=True)
    sd = torch.load(tmp_path / "Models" / "h-weighted-unet.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    err = R.training_info(R.get_entry("h-weighted", reg))["float16_rel_rms"]
    assert 0 < err < X.HALF_TOLERANCE  # float16 rounding is measurable, and small
    fp32 = torch.load(ldm_runs["weighted"] / "unet.pt", weights_only=True)
    info = json.loads((ldm_runs["weighted"] / "run.json").read_text())
    assert X.half_precision_error(fp32, sd, info["model_config"]) == pytest.approx(err, rel=1e-2)
    assert X.half_precision_error(fp32, fp32, info["model_config"]) == 0.0
    monkeypatch.setattr(X, "HALF_TOLERANCE", err / 2)
    with pytest.raises(ModelError, match="float16 U-Net's noise prediction differs from float32"):
        X.export_run(ldm_runs["weighted"], "h-other", reg, autoencoder_name="h-ae", half=True)
    assert [e.id for e in R.read_registry(reg)] == ["h-weighted"]  # refused before anything was registered
    assert not (tmp_path / "Models" / "h-other-unet.pt").exists()


def test_export_refuses_an_autoencoder_run_and_unfinished_runs(ae_run, ldm_runs, tmp_path):
    from model_training.export import export_run

    with pytest.raises(InputError, match="autoencoder"):
        export_run(ae_run, "x", tmp_path / "Models.json")
    info = json.loads((ldm_runs["masked"] / "run.json").read_text())
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with pytest.raises(ModelError, match="not complete"):
        export_run(half, "x", tmp_path / "Models.json")


# --------------------------------------------------------------------------- evaluation table
def test_table1_is_computed_and_formatted_with_random_features():
    from model_training import evaluate as E

    rng = np.random.default_rng(0)
    real = [rng.random((20, 10, 16)).astype(np.float32) * 0.5 for _ in range(4)]
    col = E.Collected()
    col.real[("L4-L5", "dh_moderate_large")] = real
    col.inpainted[("L4-L5", "dh_moderate_large", "weighted")] = [r.copy() for r in real]  # identical -> FID ~ 0
    col.inpainted[("L4-L5", "dh_moderate_large", "masked")] = [rng.random((20, 10, 16)).astype(np.float32)
                                                               for _ in range(4)]
    same = np.stack([real[0]] * 3)
    col.diversity[("L4-L5", "dh_moderate_large", "weighted")] = [E.ms_ssim_diversity(same)]
    col.diversity[("L4-L5", "dh_moderate_large", "masked")] = [E.ms_ssim_diversity(rng.random((3, 20, 10, 16)))]
    rows = E.compute_table(col, E.make_features("random"), ["masked", "weighted"])
    by = {r["method"]: r for r in rows}
    assert by["weighted"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert by["masked"]["fid"] > 1e-3
    assert by["weighted"]["ms_ssim"] == pytest.approx(1.0, abs=1e-5)  # identical samples: no diversity
    assert by["masked"]["ms_ssim"] < 0.5
    md = E.format_markdown(rows, ["masked", "weighted"])
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Level | Condition | FID Masked | FID Weighted | MS-SSIM Masked")
    assert lines[2].startswith("| L4-L5 | DH-mod/large |") and "**0.00**" in lines[2]
    assert "4/4 / 4" in lines[2]


def test_landmark_delta_measures_a_dark_blob_at_the_centre():
    from model_training import evaluate as E
    from spine_ldm.geometry import FSUSpec

    spec = FSUSpec(shape=(20, 10, 16), size_mm=(25.0, 25.0, 50.0))
    inp = np.full((20, 10, 16), 0.9, np.float32)
    out = inp.copy()
    out[8:12, 4:6, 7:9] = 0.2
    assert E.landmark_delta(out, inp, spec) < -0.3
    assert E.landmark_delta(inp, inp, spec) == 0.0


@pytest.mark.slow
def test_ddp_two_process_gloo_autoencoder(manifest, tmp_path):
    out = tmp_path / "ddp_ae"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model_training",
           "train-autoencoder", "--config", "tiny", "--manifest", str(manifest), "--cache-dir",
           str(manifest.parent / "cache"), "--device", "cpu", "--out", str(out), "--quiet",
           "--set", "steps=4", "--set", "disc_start=2", "--set", "checkpoint_every=2"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    h0 = (out / "param_sha256_rank0.txt").read_text()
    assert h0 == (out / "param_sha256_rank1.txt").read_text()  # incl. the EMA codebook (ddp_sync)
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "complete"
    assert C.load_checkpoint(out)["step"] == 4


def test_evaluate_end_to_end_on_phantoms(manifest, ldm_runs, tmp_path):
    """Pipeline-based Table 1 on the tiny models (random features, 3 steps): runs and writes the files."""
    from model_training import evaluate as E
    from model_training.export import export_run

    reg = tmp_path / "Models.json"
    for m, mid in (("weighted", "e-w"), ("masked", "e-m"), ("full", "e-f")):
        export_run(ldm_runs[m], mid, reg, autoencoder_name="e-ae")
    rows = read_manifest(manifest)
    dh_levels = {r.level for r in rows if r.condition == "dh_moderate_large"}
    lv = sorted(dh_levels)[0]
    keep = [r.replace(split="test") for r in rows if r.level == lv]  # one level keeps the test quick
    test_manifest = write_manifest(tmp_path / "test.csv", keep)
    table = E.run_evaluation(test_manifest, ["weighted", "masked", "repaint"], tmp_path / "eval",
                             conditions=["dh_moderate_large"], samples=2, steps=3, features="random",
                             models={"weighted": "e-w", "masked": "e-m", "repaint": "e-f"}, registry=str(reg),
                             device="cpu", max_per_cell=1, quiet=True)
    assert {r["level"] for r in table} == {lv}
    assert {r["method"] for r in table} == {"weighted", "masked", "repaint"}
    l45 = [r for r in table if r["n_inpainted"] > 0]
    assert l45 and all(r["n_inpainted"] == 1 for r in l45)
    assert any(math.isfinite(r["ms_ssim"]) and 0.0 < r["ms_ssim"] <= 1.0 for r in table)
    assert all(math.isfinite(r["landmark_delta"]) for r in l45)
    md = (tmp_path / "eval" / "table1.md").read_text()
    assert md.startswith("| Level | Condition | FID Weighted")
    assert (tmp_path / "eval" / "table1.csv").read_text().splitlines()[0].startswith("level,condition,method")
    info = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert info["methods"] == ["weighted", "masked", "repaint"] and info["healthy_inputs"] > 0


@pytest.mark.slow
def test_make_demo_weights_recipe_end_to_end_tiny(tmp_path):
    """The bundled-weights recipe at toy size: phantoms -> autoencoder (fp32) -> one LDM per method and pathology
    family in 2 worker processes under CPU bf16 -> float16 export into a registry whose entries verify, share one
    autoencoder, are flagged default per condition and record the phantom seeds."""
    from spine_ldm import pipeline
    from spine_ldm import registry as R

    work, out = tmp_path / "work", tmp_path / "out" / "Models"
    reg = out.parent / "Models.json"
    r = subprocess.run([PY, "-m", "model_training", "make-demo-weights", "--work", str(work), "--out", str(out),
                        "--n-studies", "4", "--ae-steps", "2", "--ldm-steps", "2", "--full-steps", "3", "--finetune-steps", "2", "--jobs", "2", "--cpu-bf16", "on",
                        "--device", "cpu", "--quiet"], env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    timings = json.loads((work / "demo_timings.json").read_text())
    names = [f"{m}-{f}" for m in ("weighted", "masked", "full") for f in ("dh", "ccs")]
    assert timings["ldm_amp"] == "bf16" and {"autoencoder_s", "ldm_wall_s", "total_s",
                                             *(f"{n}_s" for n in names)} <= set(timings)
    assert C.read_run_info(work / "runs" / "autoencoder")["amp"] == "off"
    for n in names:
        info = C.read_run_info(work / "runs" / n)
        assert info["amp"] == "bf16" and info["train_config"]["threads"] == 1
        assert info["steps_done"] == (3 if n.startswith("full") else 2)  # --full-steps: the RePaint models only
        fam = ("dh_small", "dh_moderate_large") if n.endswith("dh") else ("ccs_moderate", "ccs_severe")
        assert info["conditions"] == list(fam)
        assert info["train_config"]["sigma_mm"] == (8.0 if n.endswith("dh") else 16.0)  # FAMILY_SIGMA_MM
    for m in ("weighted", "masked"):  # --finetune-steps: the herniation models' second stage, from the first's EMA
        info = C.read_run_info(work / "runs" / f"{m}-dh-ft")
        assert info["steps_done"] == 2 and info["train_config"]["condition_repeat"] == {"dh_small": 2}
        assert info["init_weights_sha256"] == C.file_sha256(work / "runs" / f"{m}-dh" / "unet.pt")
        assert f"{m}-dh-ft_s" in timings
    assert not (work / "runs" / "full-dh-ft").exists() and not (work / "runs" / "weighted-ccs-ft").exists()
    ids = {e.id: e for e in R.list_models(str(reg))}
    assert set(ids) == {f"demo-small-{n}" for n in names}
    for m in ("weighted", "masked"):
        tr = R.training_info(ids[f"demo-small-{m}-dh"])
        spec = D.FAMILY_FINETUNE["dh"]
        assert tr["steps"] == 4 and tr["finetune"] == {"first_stage_steps": 2, "steps": 2,
                                                       "condition_repeat": {"dh_small": 2},
                                                       "healthy_fraction": spec.get("healthy_fraction", 0.0)}
        if spec.get("healthy_fraction", 0.0) > 0:  # the guided stage: the model learned healthy FSUs
            assert tr["healthy_fraction"] == spec["healthy_fraction"]
            assert ids[f"demo-small-{m}-dh"].extra["guidance_scale"] == spec["guidance_scale"]
        else:
            assert "guidance_scale" not in ids[f"demo-small-{m}-dh"].extra
        unet = torch.load(ids[f"demo-small-{m}-dh"].files["unet"].local_path(), weights_only=True)
        ft = torch.load(work / "runs" / f"{m}-dh-ft" / "unet.pt", weights_only=True)
        assert all(torch.equal(unet[k], ft[k].half()) for k in ft if ft[k].is_floating_point())  # exported: stage 2
    assert "finetune" not in R.training_info(ids["demo-small-weighted-ccs"])
    for i, e in ids.items():
        assert all(st.status == "ok" for st in R.verify(i, str(reg)).values())
        assert e.extra["default"] is True
        assert R.training_info(e)["phantom_seeds"] == {"import_phantoms": {"seed": 0, "n_studies": 4}}
        assert R.training_info(e)["sigma_mm"] == (8.0 if i.endswith("-dh") else 16.0)  # the pipeline's default
        sd = torch.load(e.files["unet"].local_path(), weights_only=True)
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    assert len({e.files["autoencoder"].sha256 for e in ids.values()}) == 1
    assert pipeline.default_model_for("repaint", "ccs_moderate", str(reg)) == "demo-small-full-ccs"
    assert pipeline.default_model_for("weighted", "dh_small", str(reg)) == "demo-small-weighted-dh"


def test_demo_recipe_sigma_per_family_and_runs_of_another_sigma_are_refused(tmp_path):
    """The recipe trains DH at 8 mm and CCS at 16 mm unless --ldm-set sigma_mm overrides both (and DH 12000 steps,
    CCS 6000, unless --ldm-steps / --ldm-set steps overrides both); a weighted/masked
    run folder trained with another sigma is refused (not resumed, not exported), a full one only records it."""
    from model_training.demo_weights import FAMILY_LDM_STEPS, FAMILY_SIGMA_MM, _check_run_sigma, family_sigma, \
        family_steps

    assert FAMILY_SIGMA_MM == {"dh": 8.0, "ccs": 16.0}
    # steps per family too, unless --ldm-steps / --ldm-set steps=N set one count for all
    assert FAMILY_LDM_STEPS == {"dh": 12000, "ccs": 6000}
    assert family_steps("dh", {"steps": 6000}) == 12000 and family_steps("ccs", {"steps": 6000}, []) == 6000
    assert family_steps("dh", {"steps": 2}, 2) == 2 and family_steps("dh", {"steps": 7}, None, ["steps=7"]) == 7
    assert family_steps("dh", {"steps": 6000}, None, ["sigma_mm=12"]) == 12000
    # the second stage (FAMILY_FINETUNE): weighted / masked herniation models only; --finetune-steps 0 skips it
    from model_training.demo_weights import FAMILY_FINETUNE, finetune_config, guidance_extra

    assert FAMILY_FINETUNE == {"dh": {"steps": 10000, "condition_repeat": {"dh_small": 2}, "healthy_fraction": 0.2,
                                      "guidance_scale": {"dh_small": 2.0, "dh_moderate_large": 1.25}}}  # bundled
    base = {"sigma_mm": 8.0, "steps": 12000, "lr": 1e-3}
    assert finetune_config("weighted", "dh", base, None, tmp_path / "unet.pt")["steps"] == 10000
    ft = finetune_config("weighted", "dh", base, 12000, tmp_path / "unet.pt")
    assert ft == {**base, "steps": 12000, "condition_repeat": {"dh_small": 2}, "healthy_fraction": 0.2,
                  "init_weights": str(tmp_path / "unet.pt")}
    assert finetune_config("masked", "dh", base, 5)["steps"] == 5
    assert finetune_config("full", "dh", base) is None and finetune_config("weighted", "ccs", base) is None
    assert finetune_config("weighted", "dh", base, 0) is None
    with pytest.raises(InputError, match="--finetune-steps must be >= 0"):
        finetune_config("weighted", "dh", base, -1)
    assert guidance_extra("weighted", "dh", True) == {"guidance_scale": {"dh_small": 2.0, "dh_moderate_large": 1.25}}
    assert guidance_extra("weighted", "dh", False) == {} and guidance_extra("full", "dh", True) == {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FAMILY_FINETUNE, "dh", {**FAMILY_FINETUNE["dh"], "healthy_fraction": 0.0, "guidance_scale": 2.5})
        assert finetune_config("masked", "dh", base, 5)["healthy_fraction"] == 0.0
        assert guidance_extra("weighted", "dh", True) == {}  # the stage learned no healthy FSUs: unguided
    cfg = {"sigma_mm": 16.0}
    assert family_sigma("dh", cfg) == 8.0 and family_sigma("ccs", cfg, []) == 16.0
    assert family_sigma("dh", {"sigma_mm": 12.0}, ["sigma_mm=12"]) == 12.0
    assert family_sigma("dh", cfg, ["steps=5"]) == 8.0
    old = {"train_config": {"sigma_mm": 16.0}}
    with pytest.raises(InputError, match=r"trained with sigma 16 mm, the recipe now uses 8 mm"):
        _check_run_sigma(tmp_path / "weighted-dh", old, "weighted", 8.0)
    with pytest.raises(InputError, match="move that run folder away"):
        _check_run_sigma(tmp_path / "masked-dh", old, "masked", 8.0)
    _check_run_sigma(tmp_path / "full-dh", old, "full", 8.0)
    _check_run_sigma(tmp_path / "weighted-ccs", old, "weighted", 16.0)
    _check_run_sigma(tmp_path / "weighted-dh", {}, "weighted", 8.0)  # a new run


def test_demo_recipe_prunes_only_superseded_entries(tmp_path):
    """Exporting one family (``--families dh``) must not drop the other family's bundled entries: only the
    previous recipe's one-model-per-method ``demo-small-{method}`` ids are removed, other models stay."""
    from helpers_models import make_registry
    from model_training.demo_weights import prune_superseded
    from spine_ldm import registry as R

    reg = make_registry(tmp_path, ids={"weighted": "demo-small-weighted", "masked": "demo-small-masked-ccs",
                                       "full": "my-own-full"})
    assert prune_superseded(reg) == ["demo-small-weighted"]
    assert [e.id for e in R.read_registry(reg)] == ["demo-small-masked-ccs", "my-own-full"]
    assert prune_superseded(reg) == []


def test_ldm_lr_schedule_warmup_constant_then_cosine_decay():
    """lr_factor_fn: linear warm-up, constant, cosine decay from lr_decay_start * steps to lr_final at the last step;
    without lr_decay_start it stays constant; bad values are refused."""
    from model_training.train_ldm import lr_factor_fn

    f = lr_factor_fn({"steps": 1000, "warmup_steps": 10, "lr_decay_start": 0.6, "lr_final": 0.1})
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(599) == 1.0 and f(600) == 1.0
    assert f(800) == pytest.approx(0.1 + 0.9 * 0.5) and f(1000) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(600, 1000))
    g = lr_factor_fn({"steps": 1000, "warmup_steps": 0})
    assert {g(s) for s in (0, 500, 999)} == {1.0}
    with pytest.raises(InputError, match="lr_decay_start"):
        lr_factor_fn({"steps": 10, "lr_decay_start": 1.5})
