"""``python -m model_training benchmark-phantoms`` end to end with tiny random weights: files, columns, resume,
the sigma sweep, --save-volumes and the refusal of training seeds."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers_models import make_registry
from model_training.__main__ import main
from model_training.benchmark.readers import PresentNet
from spine_ldm.errors import InputError

COLUMNS = {"seed", "level", "condition", "method", "sample", "sigma_mm", "paste_mode", "model_id", "cos", "r2",
           "sharp", "sharp_native", "geom", "geom_truth", "geom_ratio", "cos_ceiling", "present_prob", "present",
           "reader_class", "graded", "nfe", "seconds"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    reg = make_registry(d)
    torch.manual_seed(0)
    reader = d / "reader.pt"
    torch.save(PresentNet().state_dict(), reader)
    return d, reg, reader


def _args(out, reg, reader, *extra):
    return ["benchmark-phantoms", "--seeds", "1000", "--out", str(out), "--registry", str(reg), "--reader",
            str(reader), "--features", "random", "--steps", "2", "--repaint-resample", "1", "--n-boot", "50",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def run(setup):
    d, reg, reader = setup
    out = d / "out"
    assert main(_args(out, reg, reader, "--conditions", "dh_moderate_large,ccs_severe", "--samples", "2",
                      "--levels", "L4-L5", "--save-volumes")) == 0
    return out


def test_files_and_columns(run):
    out = run
    for f in ("results.csv", "table1.md", "table2.md", "summary.json", "figures/dh_moderate_large.png",
              "figures/ccs_severe.png", "figures/summary.png"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert COLUMNS <= set(rows[0])
    assert len(rows) == 2 * 3 * 2  # conditions x methods x samples
    assert {r["method"] for r in rows} == {"weighted", "masked", "repaint"}
    assert {(r["level"], r["seed"]) for r in rows} == {("L4-L5", "1000")}
    for r in rows:
        for k in ("cos", "r2", "sharp", "cos_ceiling", "present_prob"):
            assert np.isfinite(float(r[k])), (k, r)
        assert -1.0 <= float(r["cos"]) <= 1.0 and 0.0 <= float(r["present_prob"]) <= 1.0
        assert r["geom_metric"] == ("protrusion_mm3" if r["condition"].startswith("dh") else "canal_area_mm2")
        assert float(r["geom_truth"]) > 0 and int(r["nfe"]) > 0
        assert float(r["graded"]) == float(r["reader_class"] == r["condition"])  # severity honoured by the reader
    nfe = {r["method"]: int(r["nfe"]) for r in rows}
    assert nfe["weighted"] == nfe["masked"] == 3  # PLMS: steps + 1 (warm-up)
    s = json.loads((out / "summary.json").read_text())
    cell = s["sigma"]["model"]["cells"]["dh_moderate_large"]["weighted"]
    rs = [r for r in rows if r["condition"] == "dh_moderate_large" and r["method"] == "weighted"]
    assert cell["graded"]["mean"] == pytest.approx(np.mean([float(r["graded"]) for r in rs]))
    for k in ("cos", "r2", "sharp", "present", "graded", "ms_ssim_2d", "ms_ssim_3d", "fid", "kid", "c2st_auc",
              "c2st_auc_ceiling"):
        assert k in cell, k
    assert cell["n_outputs"] == 2 and cell["n_cases"] == 1 and cell["sigma_mm"] == [16.0]
    assert set(s["models"]) == {"demo-small-weighted", "demo-small-masked", "demo-small-full"}
    assert s["meta"]["command"].startswith("python -m model_training benchmark-phantoms --seeds 1000 --out ")
    t1 = (out / "table1.md").read_text()
    assert "DH-mod/large" in t1 and "Weighted" in t1 and "C2ST AUC" in t1 and "C2ST ceiling" in t1
    assert "L4-L5" in (out / "table2.md").read_text()


def test_saved_volumes_recompute_the_metric(run):
    from model_training.benchmark import metrics as M

    case = run / "cases" / "1000_L4-L5_dh_moderate_large"
    names = {p.name for p in case.iterdir()}
    assert {"healthy.nrrd", "truth.nrrd", "landmark.json", "weighted_1.nrrd", "weighted_2.nrrd", "masked_1.nrrd",
            "repaint_2.nrrd"} <= names
    lm = json.loads((case / "landmark.json").read_text())
    H, P, G = (sitk.ReadImage(str(case / f)) for f in ("healthy.nrrd", "truth.nrrd", "weighted_2.nrrd"))
    assert G.GetMetaData("spine_ldm_method") == "weighted"
    nb = M.Neighbourhood(H, lm["landmark_lps"], M.COS_RADIUS_MM)
    cos, _ = M.cos_r2(nb.array(G), nb.array(H), nb.array(P), nb.ball(M.COS_RADIUS_MM))
    row = next(r for r in csv.DictReader(open(run / "results.csv"))
               if r["condition"] == "dh_moderate_large" and r["method"] == "weighted" and r["sample"] == "2")
    assert cos == pytest.approx(float(row["cos"]), rel=1e-4)


def test_rerun_reuses_finished_cases(setup, run):
    d, reg, reader = setup
    work = run / ".work" / "cases"
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert main(_args(run, reg, reader, "--conditions", "dh_moderate_large,ccs_severe", "--samples", "2",
                      "--levels", "L4-L5")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == mtimes
    assert (run / ".work" / ".gitignore").read_text().strip() == "*"


def test_sigma_sweep_writes_rows_per_sigma_and_a_plot(setup):
    d, reg, reader = setup
    out = d / "sweep"
    import torch

    threads = torch.get_num_threads()
    assert main(_args(out, reg, reader, "--conditions", "ccs_moderate", "--methods", "weighted", "--samples", "1",
                      "--sigma-sweep", "12,24", "--figure-cases", "0", "--threads", str(threads + 1))) == 0
    assert torch.get_num_threads() == threads  # --jobs 1 runs in this process: its thread count is restored
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(float(r["sigma_mm"]) for r in rows) == [12.0, 24.0]
    assert (out / "figures" / "sigma_sweep.png").is_file()
    s = json.loads((out / "summary.json").read_text())
    assert set(s["sigma"]) == {"12", "24"}


def test_training_seeds_are_refused(setup, tmp_path):
    d, reg, reader = setup
    data = json.loads(reg.read_text())
    data["models"][0]["training"] = {"phantom_seeds": [999, 1000]}
    bad = d / "Models-seeds.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"demo-small-weighted.*1000"):
        from model_training.benchmark.run import check_seeds, settings_from_args
        from model_training.__main__ import build_parser

        args = build_parser().parse_args(_args(tmp_path, bad, reader))
        check_seeds(settings_from_args(args), None)
    assert main(_args(tmp_path / "o", bad, reader)) == 2  # the CLI reports it as an input error


def test_a_registry_change_during_the_run_stops_it(setup, tmp_path):
    """New weights landing mid-run would mix two models under one fingerprint: the next case refuses."""
    from model_training.__main__ import build_parser
    from model_training.benchmark import run as RN

    d, reg, reader = setup
    reg2 = tmp_path / "Models.json"
    reg2.write_text(reg.read_text())
    (tmp_path / "Models").symlink_to(d / "Models")
    s = RN.settings_from_args(build_parser().parse_args(_args(tmp_path / "o", reg2, reader)))
    ctx = RN.Context(s, tmp_path / "o", RN.fingerprint(s, RN._reader_sha(RN.Context(s, tmp_path, "").reader)))
    RN._check_unchanged(ctx)
    reg2.write_text(reg2.read_text() + " ")
    with pytest.raises(InputError, match="changed while the benchmark ran"):
        RN._check_unchanged(ctx)


def test_new_weights_for_one_pathology_recompute_only_its_cases(setup, tmp_path):
    """A case's fingerprint holds the registry entries of the models its condition uses: registering new DH weights
    changes the DH fingerprints and keeps the CCS ones (their stored cases stay valid); other settings still count."""
    from model_training.__main__ import build_parser
    from model_training.benchmark import run as RN

    d, reg, reader = setup
    reg2 = tmp_path / "Models.json"
    data = json.loads(reg.read_text())
    reg2.write_text(json.dumps(data))
    (tmp_path / "Models").symlink_to(d / "Models")
    s = RN.settings_from_args(build_parser().parse_args(_args(tmp_path / "o", reg2, reader)))
    rsha = RN._reader_sha(RN.Context(s, tmp_path, "").reader)
    before = {c: RN.fingerprint(s, rsha, c) for c in ("dh_small", "dh_moderate_large", "ccs_severe")}
    assert before["dh_small"] == before["ccs_severe"]  # one model per method serves every condition here
    weighted = next(m for m in data["models"] if m["method"] == "weighted")
    dh = {**json.loads(json.dumps(weighted)), "id": "weighted-dh-new", "default": True}
    dh.setdefault("training", {})["conditions"] = ["dh_small", "dh_moderate_large"]
    dh["files"]["unet"]["sha256"] = "0" * 64  # other weights (not loaded here: only the entry is read)
    data["models"].append(dh)
    weighted["default"] = True
    weighted.setdefault("training", {})["conditions"] = ["ccs_moderate", "ccs_severe"]
    reg2.write_text(json.dumps(data))
    after = {c: RN.fingerprint(s, rsha, c) for c in before}
    assert after["ccs_severe"] != before["ccs_severe"]  # its entry gained the default flag and conditions
    data["models"][-1]["files"]["unet"]["sha256"] = "1" * 64
    reg2.write_text(json.dumps(data))
    again = {c: RN.fingerprint(s, rsha, c) for c in before}
    assert again["ccs_severe"] == after["ccs_severe"]
    assert again["dh_small"] != after["dh_small"] and again["dh_moderate_large"] != after["dh_moderate_large"]
    assert RN.fingerprint({**s, "samples": s["samples"] + 1}, rsha, "ccs_severe") != again["ccs_severe"]
    assert RN.fingerprint(s, None, "ccs_severe") != again["ccs_severe"]  # the reader counts too
    # the model config's values count, not only its name: a changed default recomputes the cases
    from spine_ldm.models import config as MC

    real = MC.config_to_dict
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MC, "config_to_dict", lambda c: {**real(c), "sampling": {**real(c)["sampling"],
                                                                            "decode_quantize": True}})
        changed = {c: RN.fingerprint(s, rsha, c) for c in before}
    assert all(changed[c] != again[c] for c in before)
    assert {c: RN.fingerprint(s, rsha, c) for c in before} == again


def test_an_explicit_guidance_scale_ignores_the_registry_default(setup, tmp_path):
    """A case's fingerprint holds the registry's guidance_scale only when the run leaves guidance to the models:
    with ``--guidance-scale`` the outputs do not depend on it, so a new registry default keeps a guidance sweep's
    cases, while a run on the models' own scales recomputes them."""
    from model_training.__main__ import build_parser
    from model_training.benchmark import run as RN

    d, reg, reader = setup
    reg2 = tmp_path / "Models.json"
    data = json.loads(reg.read_text())
    (tmp_path / "Models").symlink_to(d / "Models")
    for m in data["models"]:
        m.setdefault("training", {})["healthy_fraction"] = 0.2
    reg2.write_text(json.dumps(data))
    own = RN.settings_from_args(build_parser().parse_args(_args(tmp_path / "o", reg2, reader)))
    fixed = RN.settings_from_args(build_parser().parse_args(_args(tmp_path / "o", reg2, reader,
                                                                  "--guidance-scale", "1.5")))
    rsha = RN._reader_sha(RN.Context(own, tmp_path, "").reader)
    before = (RN.fingerprint(own, rsha, "dh_small"), RN.fingerprint(fixed, rsha, "dh_small"))
    assert before[0] != before[1]  # the explicit scale itself counts
    for m in data["models"]:
        m["guidance_scale"] = {"dh_small": 2.0}
    reg2.write_text(json.dumps(data))
    after = (RN.fingerprint(own, rsha, "dh_small"), RN.fingerprint(fixed, rsha, "dh_small"))
    assert after[0] != before[0] and after[1] == before[1]


def _bench_script(name: str = "compare_runs"):
    """benchmarks/<name>.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["seed", "condition", "method", "sample", "sigma_mm", "cos", "present"]
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(cols, r)))


def test_compare_runs_pairs_outputs_by_case_and_sample(tmp_path, capsys):
    """benchmarks/compare_runs.py: rows matched by seed / condition / method / sample / sigma, the paired mean
    difference with a case-bootstrap interval, pooled baselines with a condition filter, clear errors."""
    cr = _bench_script()
    a_rows, b_rows = [], []
    for seed in range(1000, 1006):
        for k in (1, 2):
            base = 0.5 + 0.05 * (seed - 1000) + 0.01 * k  # a wide case-to-case spread ...
            a_rows.append((seed, "dh_small", "weighted", k, 8, base, 1))
            b_rows.append((seed, "dh_small", "weighted", k, 8, base + 0.02 + 0.001 * k, 1))  # ... a small shift
            a_rows.append((seed, "ccs_severe", "weighted", k, 16, 0.8, 1))
    _results_csv(tmp_path / "a", a_rows)
    _results_csv(tmp_path / "b", b_rows)
    _results_csv(tmp_path / "b2", [(1000, "ccs_severe", "weighted", 1, 16, 0.7, 0)])
    recs = cr.compare(cr.load_rows([tmp_path / "a"]), cr.load_rows([tmp_path / "b", tmp_path / "b2"]),
                      ["cos", "present"], n_boot=500)
    by = {(r["condition"], r["metric"]): r for r in recs}
    dh = by[("dh_small", "cos")]
    assert dh["n_cases"] == 6 and dh["n_outputs"] == 12 and dh["b_larger"] == 1.0 and dh["b_smaller"] == 0.0
    # every case moved by the same 0.0215: the interval is that point, however wide the spread between cases
    assert dh["diff"] == pytest.approx(0.0215) and (dh["lo"], dh["hi"]) == pytest.approx((0.0215, 0.0215))
    assert by[("dh_small", "present")]["diff"] == 0.0 and by[("dh_small", "present")]["b_larger"] == 0.0
    cc = by[("ccs_severe", "cos")]  # only the one output both runs hold
    assert cc["n_outputs"] == 1 and cc["diff"] == pytest.approx(-0.1) and cc["b_smaller"] == 1.0
    only = cr.load_rows([f"{tmp_path / 'a'}:ccs_severe"])
    assert {k[1] for k in only} == {"ccs_severe"} and len(only) == 12
    with pytest.raises(SystemExit, match="repeats the row"):
        cr.load_rows([tmp_path / "a", tmp_path / "a"])
    with pytest.raises(SystemExit, match="not found"):
        cr.load_rows([tmp_path / "nope"])
    assert cr.main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--metrics", "cos",
                    "--out", str(tmp_path / "c.json")]) == 0
    assert "| dh_small | weighted | cos | 6 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["records"][0]["metric"] == "cos"
    with pytest.raises(SystemExit, match="share no rows"):
        cr.main(["--a", f"{tmp_path / 'a'}:ccs_severe", "--b", str(tmp_path / "b")])


def test_c2st_bounds_variants_paste_the_truth(setup):
    """benchmarks/c2st_bounds.py: ``taper_sat`` is the truth itself wherever W >= 0.5 and the healthy scan where
    W < 1e-3 * 0.5; cubic resampling through the paper grid keeps more of the true change than linear."""
    from model_training.benchmark import cases as CS, metrics as M
    from spine_ldm.weighting import gaussian_weight

    _, reg, _ = setup
    cb = _bench_script("c2st_bounds")
    case = CS.make_case(1000, "L4-L5", "dh_moderate_large")
    out, sigma = cb.case_variants(case, registry=str(reg))
    assert set(out) == set(cb.VARIANTS)
    H, P = (sitk.GetArrayFromImage(i) for i in (case.healthy.image, case.truth.image))
    w = gaussian_weight(case.healthy.image, case.landmark, sigma)
    sat = sitk.GetArrayFromImage(out["taper_sat"])
    assert np.count_nonzero(w >= 0.5) > 1000 and np.count_nonzero(P[w >= 0.5] != H[w >= 0.5]) > 100
    np.testing.assert_array_equal(sat[w >= 0.5], P[w >= 0.5])
    np.testing.assert_array_equal(sat[w < 5e-4], H[w < 5e-4])
    taper = sitk.GetArrayFromImage(out["taper"])
    assert np.abs(taper[w >= 0.5].astype(float) - P[w >= 0.5]).max() > 10  # W < 1 there: a fraction of the change
    nb = M.Neighbourhood(case.healthy.image, case.landmark, M.COS_RADIUS_MM)
    ball, h, p = nb.ball(M.COS_RADIUS_MM), nb.array(case.healthy.image), nb.array(case.truth.image)
    amp = {k: M.change_amplitude(nb.array(out[k]), h, p, ball) for k in ("paper", "paper_cubic_sat")}
    assert amp["paper_cubic_sat"] > amp["paper"] + 0.1, amp


def test_paste_knobs_repaste_the_same_samples(setup):
    """benchmarks/paste_knobs.py: every variant pastes the pipeline's own samples (``linear`` is its output, checked
    inside); the saturated weight adds the full change where W >= 0.5 (twice the plain one where W = 0.25 ... 0.5)."""
    from model_training.benchmark import cases as CS
    from spine_ldm.weighting import gaussian_weight

    _, reg, _ = setup
    pk = _bench_script("paste_knobs")
    case = CS.make_case(1000, "L4-L5", "dh_moderate_large")
    pasted, out = pk.case_outputs(case, samples=2, registry=str(reg))
    assert set(pasted) == set(pk.VARIANTS) and all(len(v) == 2 for v in pasted.values())
    H = sitk.GetArrayFromImage(case.healthy.image).astype(float)
    w = gaussian_weight(case.healthy.image, case.landmark, float(out.provenance["sigma_mm"]))
    band = (w > 0.3) & (w < 0.45)
    lin, sat = (sitk.GetArrayFromImage(pasted[k][0]).astype(float) - H for k in ("linear", "sat"))
    moved = band & (np.abs(lin) > 2)
    assert moved.sum() > 50
    np.testing.assert_allclose(sat[moved], (lin[moved] / w[moved]) * np.minimum(1, w[moved] / pk.SATURATION), atol=1.0)
    assert not np.array_equal(sitk.GetArrayFromImage(pasted["cubic"][0]), sitk.GetArrayFromImage(pasted["linear"][0]))
