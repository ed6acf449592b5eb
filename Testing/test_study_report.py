"""Reader-study report: statistics against hand-computed values, Table 2 on a fixed synthetic answer set."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm.errors import InputError
from spine_ldm.study.engine import _synthetic_volume, create_study, inpainted_sources, real_sources
from spine_ldm.study.report import cohen_kappa, fleiss_kappa, make_report, wilson_interval


# ----------------------------------------------------------------------------- statistics
def test_wilson_interval_textbook_values():
    # 8/10: p = 0.8, z = 1.96 -> 0.4902 .. 0.9433 (Newcombe 1998 / any Wilson table)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    # 3/4: centre (0.75 + z^2/8)/(1 + z^2/4) = 0.62753, half-width 0.32689
    lo, hi = wilson_interval(3, 4)
    assert lo == pytest.approx(0.30064, abs=1e-4) and hi == pytest.approx(0.95441, abs=1e-4)
    # 0/5: lower bound exactly 0, upper z^2/(n + z^2) = 3.8415 / 8.8415
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 8.841459, abs=1e-6)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(InputError):
        wilson_interval(6, 5)


def test_cohen_kappa_from_counts():
    # 2x2 table: both yes 4, both no 3, A yes/B no 2, A no/B yes 1 -> po 0.7, pe 0.6*0.5 + 0.4*0.5 = 0.5 -> 0.4
    a = ["yes"] * 4 + ["no"] * 3 + ["yes"] * 2 + ["no"] * 1
    b = ["yes"] * 4 + ["no"] * 3 + ["no"] * 2 + ["yes"] * 1
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["yes"] * 3, ["yes"] * 3))  # chance agreement 1: undefined


def test_fleiss_kappa_from_counts():
    # Fleiss (1971) / Wikipedia example: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)
    # 4 subjects, 3 raters: P_i = 1, 1/3, 1, 1/3 -> Pbar 2/3; p_yes 0.5 -> Pe 0.5 -> kappa 1/3
    assert fleiss_kappa([[3, 0], [2, 1], [0, 3], [1, 2]]) == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="same number"):
        fleiss_kappa([[3, 0], [1, 1]])


# ----------------------------------------------------------------------------- Table 2 on a fixed answer set
# cases in a fixed order: weighted x2 (L4-L5), masked (L4-L5, L5-S1), repaint x2 (L1-L2), real path x2, healthy x2
CASES = [("weighted", "L4-L5"), ("weighted", "L4-L5"), ("masked", "L4-L5"), ("masked", "L5-S1"),
         ("repaint", "L1-L2"), ("repaint", "L1-L2"), ("real_pathological", "L4-L5"), ("real_pathological", "L4-L5"),
         ("real_healthy", "L4-L5"), ("real_healthy", "L4-L5")]
#            w1   w2   m1   m2   rp1  rp2  p1   p2   h1   h2
R1_REAL = "y    y    y    n    n    n    y    y    y    y".split()
R1_PRES = "y    n    y    y    n    n    y    y    n    n".split()
R2_REAL = "y    n    y    y    n    y    y    y    y    n".split()
R2_PRES = "y    y    n    y    n    y    y    n    n    n".split()
R3_REAL = "y    y    y    y    y    y    y    y    y    n".split()
R3_PRES = "n    n    n    n    n    n    n    n    n    n".split()


@pytest.fixture()
def fixed_study(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for n, (kind, level) in enumerate(CASES):
        img = _synthetic_volume(rng, kind != "real_healthy", shape=(24, 24, 6))
        lm = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
        if kind in ("weighted", "masked", "repaint"):
            for k, v in {"method": kind, "level": level, "condition": "dh_moderate_large",
                         "landmark_lps": json.dumps(list(lm))}.items():
                img.SetMetaData(f"spine_ldm_{k}", v)
            sitk.WriteImage(img, str(src / f"out_{n:02d}.nrrd"))
        else:
            sitk.WriteImage(img, str(src / f"real_{n:02d}.nrrd"))
            rows.append(f"real_{n:02d}.nrrd,{level},{'none' if kind == 'real_healthy' else 'dh_moderate_large'},"
                        f"{lm[0]} {lm[1]} {lm[2]}")
    (src / "real.csv").write_text("path,level,condition,landmark_lps\n" + "\n".join(rows) + "\n")
    st = create_study(tmp_path / "study", inpainted_sources(str(src / "out_*.nrrd")), real_sources(src / "real.csv"),
                      fov="whole", seed=1)
    truth = st.load_truth()
    by_src = {v["source"].rsplit("/", 1)[-1]: k for k, v in truth.items()}
    ids = [by_src[f"{'out' if k in ('weighted', 'masked', 'repaint') else 'real'}_{n:02d}.nrrd"]
           for n, (k, _) in enumerate(CASES)]
    return st, ids


def _answer(st, name, ids, real, pres, seconds=1.0):
    _, tok = st.add_reader(name)
    s = st.session(tok)
    yn = {"y": "yes", "n": "no"}
    for cid, r, p in zip(ids, real, pres):
        s.answer(cid, {"realistic": yn[r], "pathology_present": yn[p]}, seconds=seconds)
    return s


def _rows(path):
    return {(r["group"], r["level"]): r for r in csv.DictReader(path.open())}


def test_table2_two_readers_matches_hand_counts(fixed_study, tmp_path):
    st, ids = fixed_study
    s1 = _answer(st, "r1", ids, ["n"] + R1_REAL[1:], R1_PRES)  # r1 first says "not realistic" for w1 ...
    s1.answer(ids[0], {"realistic": "yes", "pathology_present": "yes"}, seconds=2.0)  # ... then changes it: last wins
    _answer(st, "r2", ids, R2_REAL, R2_PRES, seconds=3.0)
    rep = make_report(st.root, tmp_path / "rep")
    rows = _rows(tmp_path / "rep" / "table2.csv")
    expect = {  # (group, level): (cases, ratings, realistic yes, present yes) counted by hand from the tables above
        ("inpainted:weighted", "L4-L5"): (2, 4, 3, 3), ("inpainted:weighted", "all"): (2, 4, 3, 3),
        ("inpainted:masked", "L4-L5"): (1, 2, 2, 1), ("inpainted:masked", "L5-S1"): (1, 2, 1, 2),
        ("inpainted:masked", "all"): (2, 4, 3, 3),
        ("inpainted:repaint", "L1-L2"): (2, 4, 1, 1),
        ("inpainted:all", "all"): (6, 12, 7, 7), ("inpainted:all", "L4-L5"): (3, 6, 5, 4),
        ("real_pathological", "L4-L5"): (2, 4, 4, 3), ("real_healthy", "all"): (2, 4, 3, 0),
    }
    for key, (cases, ratings, ry, py) in expect.items():
        r = rows[key]
        assert (int(r["cases"]), int(r["ratings"]), int(r["realistic_yes"]), int(r["pathology_present_yes"])) == \
            (cases, ratings, ry, py), key
        assert float(r["realistic_pct"]) == pytest.approx(100 * ry / ratings)
    # Wilson 3/4 (hand-computed above): 30.06 .. 95.44 %
    w = rows[("inpainted:weighted", "all")]
    assert float(w["realistic_ci_low"]) == pytest.approx(30.064, abs=1e-2)
    assert float(w["realistic_ci_high"]) == pytest.approx(95.441, abs=1e-2)
    # 0/4 present among healthy controls: 0 .. z^2/(4+z^2)
    h = rows[("real_healthy", "all")]
    assert float(h["pathology_present_ci_low"]) == 0.0
    assert float(h["pathology_present_ci_high"]) == pytest.approx(100 * 3.841459 / 7.841459, abs=1e-3)
    assert float(w["median_seconds"]) == pytest.approx(2.5)  # r1 2.0 (changed answer) / 1.0, r2 3.0, 3.0
    # agreement: realistic po 0.6, pe 0.7*0.7+0.3*0.3 = 0.58 -> 1/21; present po 0.6, pe 0.5 -> 0.2
    ag = {a["question"]: a for a in csv.DictReader((tmp_path / "rep" / "agreement.csv").open())}
    assert ag["realistic"]["statistic"] == "Cohen's kappa" and int(ag["realistic"]["cases"]) == 10
    assert float(ag["realistic"]["kappa"]) == pytest.approx(1 / 21)
    assert float(ag["pathology_present"]["kappa"]) == pytest.approx(0.2)
    md = (tmp_path / "rep" / "table2.md").read_text()
    assert "| Inpainted (weighted) | dh_moderate_large | all | 2 | 4 | 75% [30-95] | 75% [30-95] |" in md
    assert "Cohen's kappa" in md
    png = tmp_path / "rep" / "table2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert rep["ratings"] == 20


def test_three_readers_fleiss(fixed_study, tmp_path):
    st, ids = fixed_study
    _answer(st, "r1", ids, R1_REAL, R1_PRES)
    _answer(st, "r2", ids, R2_REAL, R2_PRES)
    _answer(st, "r3", ids, R3_REAL, R3_PRES)
    make_report(st.root, tmp_path / "rep", plot=False)
    ag = {a["question"]: a for a in csv.DictReader((tmp_path / "rep" / "agreement.csv").open())}
    # realistic: per-case yes counts 3,2,3,2,1,2,3,3,3,1 -> Pbar 2/3, p_yes 23/30 -> Pe 578/900 -> kappa 22/322
    assert ag["realistic"]["statistic"] == "Fleiss' kappa"
    assert float(ag["realistic"]["kappa"]) == pytest.approx(22 / 322)
    # present: yes counts 2,1,1,2,0,1,2,1,0,0 -> Pbar 16/30, p_yes 1/3 -> Pe 5/9 -> kappa -0.05
    assert float(ag["pathology_present"]["kappa"]) == pytest.approx(-0.05)
    assert not (tmp_path / "rep" / "table2.png").exists()


def test_report_needs_truth(fixed_study, tmp_path):
    st, ids = fixed_study
    moved = tmp_path / "elsewhere.json"
    st.truth_path().rename(moved)
    with pytest.raises(InputError, match="truth key .* not found"):
        make_report(st.root, tmp_path / "rep")
    _answer(st, "r1", ids, R1_REAL, R1_PRES)
    rep = make_report(st.root, tmp_path / "rep", truth_path=moved, plot=False)
    assert rep["ratings"] == 10 and rep["agreement"][0]["statistic"] == "n/a (one reader)"
