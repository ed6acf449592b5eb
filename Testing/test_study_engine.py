"""Reader-study engine: creation, blinding, per-reader order, answers, resume, concurrency, crash safety."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spine_ldm.errors import InputError
from spine_ldm.study import blind
from spine_ldm.study.engine import (METHODS, Study, create_study, inpainted_sources, make_demo_study, normalize_values,
                                   parse_mix, real_sources, reader_order)
from spine_ldm.study.store import AnswerStore, hash_token

FAST = (2.0, 2.0, 4.3)  # coarse phantom spacing: the tests need geometry and blinding, not image quality
HIDDEN_WORDS = ("weighted", "masked", "repaint", "inpaint", "real_pathological", "real_healthy", "truth",
                "spine_ldm", "demo-small", "provenance", "healthy")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return make_demo_study(root / "s", n_inpainted_per_method=2, n_real_pathological=2, n_real_healthy=2, seed=3,
                           phantom_spacing=FAST)


def _hidden_strings(study: Study) -> list[str]:
    truth = study.load_truth()
    out = list(HIDDEN_WORDS)
    for t in truth.values():
        src = Path(t["source"])
        out += [src.name, src.stem, str(src.parent)]
    return out


def _fresh_reader(study: Study, name: str, seed: int | None = None):
    reader, token = study.add_reader(name, seed)
    return study.session(token), token


# ----------------------------------------------------------------------------- creation
def test_demo_study_layout_and_truth(demo):
    truth = demo.load_truth()
    assert len(demo.cases) == 10 and set(truth) == set(demo.case_ids)
    kinds = [t["truth"] for t in truth.values()]
    assert kinds.count("inpainted") == 6 and kinds.count("real_pathological") == 2 and kinds.count("real_healthy") == 2
    assert sorted(t["method"] for t in truth.values() if t["truth"] == "inpainted") == sorted(METHODS * 2)
    # healthy controls are asked about the studied condition, never "none"
    assert {c["condition"] for c in demo.cases} == {"dh_moderate_large"}
    assert {t["true_condition"] for t in truth.values() if t["truth"] == "real_healthy"} == {"none"}
    for c in demo.cases:
        assert blind.is_case_id(c["case_id"]) and c["volume"] == f"volumes/{c['case_id']}.nrrd"
        assert (demo.root / c["volume"]).is_file()
    assert sorted(p.name for p in (demo.root / "volumes").iterdir()) == sorted(f"{c}.nrrd" for c in demo.case_ids)


def test_served_volumes_are_blind_fsu_crops(demo):
    truth = demo.load_truth()
    for cid in demo.case_ids:
        p = demo.volume_path(cid)
        fields = blind.nrrd_header_fields(p)
        assert set(fields) <= blind.ALLOWED_NRRD_FIELDS, set(fields) - blind.ALLOWED_NRRD_FIELDS
        assert fields["type"] == "float"
        img = sitk.ReadImage(str(p))
        assert img.GetMetaDataKeys() == [] or all(not k.startswith("spine_ldm") for k in img.GetMetaDataKeys())
        assert sitk.GetArrayViewFromImage(img).shape == (64, 32, 16)  # demo FSU (SI, AP, LR)
        # the landmark is at (0, 0, 0) mm in every served volume: the crop centre minus landmark is the geometric centre
        centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
        t = truth[cid]
        np.testing.assert_allclose(centre, np.subtract(t["center_lps"], t["landmark_lps"]), atol=1e-3)
        header = blind.nrrd_header_text(p)
        for word in _hidden_strings(demo):
            assert word not in header


def test_source_provenance_was_present_and_is_stripped(demo):
    src = Path(next(t["source"] for t in demo.load_truth().values() if t["truth"] == "inpainted"))
    r = sitk.ImageFileReader()
    r.SetFileName(str(src))
    r.ReadImageInformation()
    assert "spine_ldm_method" in r.GetMetaDataKeys()  # the test would be vacuous otherwise
    for p in (demo.root / "volumes").iterdir():
        assert b"spine_ldm" not in p.read_bytes()


def test_study_json_has_no_hidden_field(demo):
    text = (demo.root / "study.json").read_text()
    for word in _hidden_strings(demo):
        assert word not in text, word
    for c in json.loads(text)["cases"]:
        assert set(c) == {"case_id", "level", "condition", "landmark_lps", "volume"}


def test_fov_whole_keeps_grid_and_same_for_real_and_inpainted(tmp_path):
    st = make_demo_study(tmp_path / "w", n_inpainted_per_method=1, n_real_pathological=1, n_real_healthy=1, fov="whole",
                         phantom_spacing=FAST)
    truth = st.load_truth()
    for cid in st.case_ids:
        src = sitk.ReadImage(truth[cid]["source"])
        shown = sitk.ReadImage(str(st.volume_path(cid)))
        assert shown.GetSize() == src.GetSize() and shown.GetSpacing() == src.GetSpacing()
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(src), rtol=1e-6)
        np.testing.assert_allclose(np.subtract(src.GetOrigin(), shown.GetOrigin()), truth[cid]["landmark_lps"], atol=1e-4)


def test_create_with_mix_and_seed_is_reproducible(tmp_path, demo):
    src_dir = Path(next(iter(demo.load_truth().values()))["source"]).parent
    inp = inpainted_sources(str(src_dir / "inpainted_*.nrrd"))
    real = real_sources(src_dir / "real.csv")
    assert {c["method"] for c in inp} == set(METHODS)
    assert inp[0]["landmark_lps"] == tuple(json.loads(sitk.ReadImage(inp[0]["path"]).GetMetaData("spine_ldm_landmark_lps")))
    picks = []
    for run in range(2):
        st = create_study(tmp_path / f"m{run}", inp, real, mix="weighted=1,masked=2,real_healthy=1", seed=7,
                          fsu_shape=(32, 16, 8))
        t = st.load_truth()
        assert sorted(x["method"] or x["truth"] for x in t.values()) == ["masked", "masked", "real_healthy", "weighted"]
        picks.append(sorted(x["source"] for x in t.values()))
    assert picks[0] == picks[1]
    with pytest.raises(InputError, match="asks for 5 repaint cases but only 2"):
        create_study(tmp_path / "bad", inp, real, mix="repaint=5")
    with pytest.raises(InputError, match="already holds a study"):
        create_study(tmp_path / "m0", inp, real)


def test_inputs_are_validated(tmp_path):
    img = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    sitk.WriteImage(img, str(tmp_path / "plain.nrrd"))
    with pytest.raises(InputError, match="lacks provenance header key"):
        inpainted_sources(str(tmp_path / "plain.nrrd"))
    with pytest.raises(InputError, match="no inpainted volumes match"):
        inpainted_sources(str(tmp_path / "nothing_*.nrrd"))
    (tmp_path / "r.csv").write_text("path,level,condition,landmark_lps\nplain.nrrd,L4-5,dh_small,1 2\n")
    with pytest.raises(InputError, match="landmark_lps must be 3"):
        real_sources(tmp_path / "r.csv")
    (tmp_path / "r.csv").write_text("path,level,condition,landmark_lps\nplain.nrrd,L9-L10,none,1 2 3\n")
    with pytest.raises(InputError, match="unknown level"):
        real_sources(tmp_path / "r.csv")
    with pytest.raises(InputError, match="--mix key 'fake' unknown"):
        parse_mix("fake=3")
    assert parse_mix("inpainted=all, real_healthy=2") == {"inpainted": None, "real_healthy": 2}


def test_yaml_study_file_loads(tmp_path, demo):
    import shutil

    import yaml

    d = tmp_path / "y"
    shutil.copytree(demo.root, d, ignore=shutil.ignore_patterns("answers.sqlite*"))
    data = json.loads((d / "study.json").read_text())
    (d / "study.json").unlink()
    (d / "study.yaml").write_text(yaml.safe_dump(data))
    st = Study.load(d)
    assert st.case_ids == demo.case_ids
    data["version"] = 99
    (d / "study.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="version 99"):
        Study.load(d)


# ----------------------------------------------------------------------------- readers, order, answers
def test_reader_order_reproducible_per_seed_and_different_across_readers(demo):
    ids = demo.case_ids
    assert reader_order(ids, 11) == reader_order(list(reversed(ids)), 11)
    assert sorted(reader_order(ids, 11)) == sorted(ids)
    orders = {tuple(reader_order(ids, s)) for s in range(8)}
    assert len(orders) == 8
    s1, _ = _fresh_reader(demo, "order-a", seed=11)
    s2, _ = _fresh_reader(demo, "order-b", seed=12)
    assert s1.order == reader_order(ids, 11) and s2.order == reader_order(ids, 12) and s1.order != s2.order


def test_tokens_stored_hashed_and_authentication(demo):
    reader, token = demo.add_reader("hash-check")
    # read the raw files in ANOTHER process: open()/close() of a database file in this process would drop
    # SQLite's POSIX locks held by our own connections (a documented way to corrupt a database)
    probe = subprocess.run([sys.executable, "-c", "import sys, glob; raw = b''.join(open(p, 'rb').read() for p in "
                            "glob.glob(sys.argv[1] + '/answers.sqlite*')); print(sys.argv[2].encode() in raw, "
                            "sys.argv[3].encode() in raw)", str(demo.root), token, hash_token(token)],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["False", "True"], probe.stderr
    assert demo.store.authenticate(token) == reader
    assert demo.store.authenticate(token + "x") is None and demo.store.authenticate("") is None
    con = sqlite3.connect(demo.root / "answers.sqlite")
    assert con.execute("SELECT token_hash FROM readers WHERE name='hash-check'").fetchone()[0] == hash_token(token)
    with pytest.raises(InputError, match="already exists"):
        demo.add_reader("hash-check")
    with pytest.raises(InputError, match="unknown reader token"):
        demo.session("not-a-token")


def test_answers_append_only_last_wins_and_resume(demo):
    s, _ = _fresh_reader(demo, "resume")
    assert s.resume_index() == 0
    for i in range(3):
        r = s.answer(s.order[i], {"realistic": "yes", "pathology_present": i % 2 == 0, "confidence": 4}, seconds=2.5 + i)
        assert r["answered"] == i + 1
    assert s.resume_index() == 3
    # incomplete answer (one required question missing) does not count as answered
    r = s.answer(s.order[3], {"realistic": "no"})
    assert r["complete"] is False and s.resume_index() == 3
    # change an earlier answer: new row, last wins, history kept
    s.answer(s.order[1], {"realistic": "no", "pathology_present": "no"}, seconds=1.0)
    hist = demo.store.history(s.reader.reader_id, s.order[1])
    assert [h.values["realistic"] for h in hist] == ["yes", "no"]
    assert s.answers()[s.order[1]].values == {"realistic": "no", "pathology_present": "no"}
    assert s.answers()[s.order[0]].values == {"realistic": "yes", "pathology_present": "yes", "confidence": 4}
    assert s.answers()[s.order[2]].seconds == 4.5
    # a new session object for the same reader (a restart) resumes at the same place
    s2 = type(s)(demo, s.reader)
    assert s2.resume_index() == 3 and s2.case(3)["answer"] == {"realistic": "no"}
    # time on case: measured from the last view when the client sends none
    s.case(4, record_view=True)
    s.answer(s.order[4], {"realistic": "yes", "pathology_present": "no"})
    sec = s.answers()[s.order[4]].seconds
    assert sec is not None and 0.0 <= sec < 600


def test_answer_validation(demo):
    q = demo.questions
    assert normalize_values(q, {"realistic": "Y", "pathology_present": False}) == (
        {"realistic": "yes", "pathology_present": "no"}, True)
    with pytest.raises(InputError, match="takes yes/no"):
        normalize_values(q, {"realistic": "maybe"})
    with pytest.raises(InputError, match="integer 1-5"):
        normalize_values(q, {"confidence": 7})
    with pytest.raises(InputError, match="unknown question id"):
        normalize_values(q, {"method": "weighted"})
    s, _ = _fresh_reader(demo, "validation")
    with pytest.raises(InputError, match="no case"):
        s.answer("0123456789abcdef", {"realistic": "yes"})
    with pytest.raises(InputError, match="out of range"):
        s.case(len(demo.cases))


def test_readers_are_isolated(demo):
    a, _ = _fresh_reader(demo, "iso-a")
    b, _ = _fresh_reader(demo, "iso-b")
    a.answer(a.order[0], {"realistic": "yes", "pathology_present": "yes", "comment": "A's note"})
    assert b.answers() == {}
    assert b.case(b.order.index(a.order[0]))["answer"] == {}
    b.answer(a.order[0], {"realistic": "no", "pathology_present": "no"})
    assert a.answers()[a.order[0]].values["comment"] == "A's note"
    assert a.answers()[a.order[0]].values["realistic"] == "yes"


def test_concurrent_readers_threads(demo):
    sessions = [_fresh_reader(demo, f"thread-{i}")[0] for i in range(4)]
    errors = []

    def work(s):
        try:
            for k, cid in enumerate(s.order):
                s.answer(cid, {"realistic": "yes" if k % 2 else "no", "pathology_present": "yes"}, seconds=k)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = [threading.Thread(target=work, args=(s,)) for s in sessions]
    [t.start() for t in th]
    [t.join(60) for t in th]
    assert not errors
    for s in sessions:
        ans = s.answers()
        assert len(ans) == len(demo.cases) and s.resume_index() == s.total
        assert [ans[c].values["realistic"] for c in s.order] == ["yes" if k % 2 else "no" for k in range(s.total)]
    assert demo.store.integrity_check() == "ok"


_WRITER = textwrap.dedent("""
    import sys
    from spine_ldm.study.engine import Study
    st = Study.load(sys.argv[1]); s = st.session(sys.argv[2]); n = int(sys.argv[3])
    i = 0
    while n < 0 or i < n:
        cid = s.order[i % s.total]
        s.answer(cid, {"realistic": "yes", "pathology_present": "no", "comment": f"w{i}"}, seconds=float(i))
        print(i, flush=True)
        i += 1
""")


def test_concurrent_reader_processes(demo, tmp_path):
    toks = [_fresh_reader(demo, f"proc-{i}")[1] for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(demo.root), t, "15"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for t in toks]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == [str(i) for i in range(15)]
    for t in toks:
        s = demo.session(t)
        hist = [a for a in demo.store.all_rows() if a.reader_id == s.reader.reader_id]
        assert [a.values["comment"] for a in hist] == [f"w{i}" for i in range(15)]
    assert demo.store.integrity_check() == "ok"


def test_sigkill_during_writes_loses_at_most_one_answer(tmp_path):
    st = make_demo_study(tmp_path / "k", n_inpainted_per_method=1, n_real_pathological=1, n_real_healthy=1,
                         phantom_spacing=FAST)
    _, token = st.add_reader("killed")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(st.root), token, "-1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in p.stdout:
            acked.append(int(line))
            if len(acked) >= 40:
                break
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    assert len(acked) >= 40, p.stderr.read()
    store = AnswerStore(st.root / "answers.sqlite")
    assert store.integrity_check() == "ok"
    rows = store.all_rows()
    comments = [r.values["comment"] for r in rows]
    # every acknowledged (committed) answer is present, in order; at most the in-flight ones beyond them
    assert comments[: len(acked)] == [f"w{i}" for i in acked]
    assert comments == [f"w{i}" for i in range(len(comments))]
    # the store is writable again after the crash
    s = st.session(token)
    s.answer(s.order[0], {"realistic": "no", "pathology_present": "no"})
    assert s.answers()[s.order[0]].values["realistic"] == "no"


def test_cli_demo_add_reader_export(tmp_path, capsys):
    from spine_ldm.study.cli import main
    from spine_ldm.study.report import export_answers

    assert main(["demo", "--out", str(tmp_path / "c"), "--per-method", "1", "--real-pathological", "1",
                 "--real-healthy", "0", "--phantom-spacing", "2", "2", "4.3"]) == 0
    capsys.readouterr()
    assert main(["add-reader", str(tmp_path / "c"), "carol", "--seed", "5"]) == 0
    token = capsys.readouterr().out.strip()
    st = Study.load(tmp_path / "c")
    s = st.session(token)
    assert s.order == reader_order(st.case_ids, 5)
    s.answer(s.order[0], {"realistic": "yes", "pathology_present": "yes"}, seconds=3)
    s.answer(s.order[0], {"realistic": "no", "pathology_present": "yes"}, seconds=4)
    assert main(["export", str(tmp_path / "c"), "--out", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["realistic"] == "no" and rows[0]["reader"] == "carol" and "truth" not in rows[0]
    assert export_answers(tmp_path / "c", tmp_path / "h.csv", history=True, truth_path=st.truth_path()) == 2
    import csv

    hist = list(csv.DictReader((tmp_path / "h.csv").open()))
    assert [h["realistic"] for h in hist] == ["yes", "no"] and hist[0]["truth"] in ("inpainted", "real_pathological")
    assert main(["add-reader", str(tmp_path / "c"), "carol"]) == 2  # duplicate name: InputError exit code


def test_reads_provenance_written_by_the_pipeline(tmp_path):
    """Contract with pipeline.write_outputs: spine_ldm_* keys from provenance_header() are what create reads."""
    pipeline = pytest.importorskip("spine_ldm.pipeline")
    img = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    prov = {"spine_ldm_version": "0.1.0", "model_id": "demo-small-masked", "method": "masked", "seed": 3,
            "landmark_lps": [1.5, -2.0, 3.25], "disc_center_lps": None, "level": "L4-L5",
            "condition": "ccs_severe", "weights_sha256": {"unet": "ab" * 32}, "input": "/secret/patient_x.nrrd"}
    for k, v in pipeline.provenance_header(prov).items():
        img.SetMetaData(k, v)
    sitk.WriteImage(img, str(tmp_path / "out.nrrd"))
    (src,) = inpainted_sources(str(tmp_path))
    assert (src["method"], src["level"], src["condition"]) == ("masked", "L4-L5", "ccs_severe")
    assert src["landmark_lps"] == (1.5, -2.0, 3.25) and src["disc_center_lps"] is None
    assert src["provenance"]["input"] == "/secret/patient_x.nrrd"


def test_warns_when_an_inpainted_case_comes_from_a_real_case_in_the_study(tmp_path):
    img = sitk.Image(40, 40, 40, sitk.sitkFloat32) + 1.0
    img.SetOrigin((-20.0, -20.0, -20.0))
    sitk.WriteImage(img, str(tmp_path / "patient_7.nrrd"))
    out = sitk.Image(img)
    for k, v in {"method": "weighted", "level": "L4-L5", "condition": "dh_small", "landmark_lps": "[0, 0, 0]",
                 "input": "patient_7.nrrd"}.items():
        out.SetMetaData(f"spine_ldm_{k}", v)
    sitk.WriteImage(out, str(tmp_path / "out.nrrd"))
    (tmp_path / "real.csv").write_text("path,level,condition,landmark_lps\npatient_7.nrrd,L4-L5,none,0 0 0\n")
    st = create_study(tmp_path / "s", inpainted_sources(str(tmp_path / "out.nrrd")), real_sources(tmp_path / "real.csv"),
                      fov="whole")
    assert len(st.warnings) == 1 and "patient_7.nrrd" in st.warnings[0]
    assert json.loads(st.truth_path().read_text())["warnings"] == st.warnings
    assert "patient_7" not in (st.root / "study.json").read_text()


def test_study_package_imports_no_heavy_or_gui_modules():
    code = ("import sys, SimpleITK as sitk\n"
            "import spine_ldm.study.engine, spine_ldm.study.report, spine_ldm.study.web, spine_ldm.study.cli\n"
            "from spine_ldm.study.blind import crop_fov\n"
            "img = sitk.Image(100, 100, 100, sitk.sitkFloat32); img.SetOrigin((-50, -50, -50)); crop_fov(img, (0, 0, 0))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'slicer', 'qt', 'ctk', 'vtk', 'monai')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
