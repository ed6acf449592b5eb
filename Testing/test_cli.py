"""spine-ldm CLI end to end: ``python -m spine_ldm`` subprocesses (JSON-lines protocol, exit codes) and in-process
``cli.main`` for the remaining error paths. Random-init small weights, 2 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers_models import corrupt, make_model_zip, make_registry, make_test_volume
from spine_ldm import cli
from spine_ldm.geometry import herniation_landmark, lps_to_ras
from spine_ldm.weighting import gaussian_weight

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    regp = make_registry(d / "reg")
    img, lm, disc = make_test_volume()
    p = d / "in.nrrd"
    sitk.WriteImage(img, str(p))
    return d, regp, p, lm, disc


def _vec(v):
    return ",".join(f"{x:.4f}" for x in v)


def _run(args, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "spine_ldm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _events(stdout: str):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_inpaint_json_protocol_outputs_and_far_field(setup, tmp_path):
    d, regp, inp, lm, disc = setup
    out = tmp_path / "res.nrrd"
    r = _run(["inpaint", str(inp), "--landmark", _vec(lm), "--disc-center", _vec(disc), "--level", "L4-L5",
              "--condition", "dh_moderate_large", "--samples", "2", "--seed", "5", "--steps", "2", "--device", "cpu",
              "--registry", str(regp), "--out", str(out), "--progress", "json"])
    assert r.returncode == 0, r.stderr
    ev = _events(r.stdout)
    assert ev[0]["event"] == "start" and ev[0]["samples"] == 2 and ev[0]["steps"] == 2 and ev[0]["device"] == "cpu"
    prog = [e for e in ev if e["event"] == "progress"]
    assert [e["step"] for e in prog] == list(range(1, len(prog) + 1)) and prog[-1]["step"] == prog[-1]["of"]
    assert all(e["stage"] == "sample" for e in prog)
    done = ev[-1]
    assert done["event"] == "done" and done["nfe"] == 3
    assert done["outputs"] == [str(tmp_path / "res_1.nrrd"), str(tmp_path / "res_2.nrrd")]
    assert done["device"].startswith("cpu") and done["seconds"] > 0 and done["peak_memory_mb"] > 0
    assert done["provenance"]["seed"] == 5 and [p["seed"] for p in done["provenances"]] == [5, 6]
    src = sitk.ReadImage(str(inp))
    a_in = sitk.GetArrayFromImage(src)
    far = gaussian_weight(src, lm, 16.0) < 1e-3
    for k, path in enumerate(done["outputs"]):
        o = sitk.ReadImage(path)
        for f in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection", "GetPixelID"):
            assert getattr(o, f)() == getattr(src, f)(), f
        a = sitk.GetArrayFromImage(o)
        np.testing.assert_array_equal(a[far], a_in[far])
        assert not np.array_equal(a, a_in)
        assert o.GetMetaData("spine_ldm_seed") == str(5 + k)
        assert o.GetMetaData("spine_ldm_model_id") == "demo-small-weighted"
        assert json.loads(o.GetMetaData("spine_ldm_landmark_lps")) == pytest.approx(list(lm), abs=1e-3)


def test_corrupt_weights_error_json_and_exit_code(setup, tmp_path):
    d, _, inp, lm, disc = setup
    regp = make_registry(tmp_path / "r")
    data = json.loads(regp.read_text())
    unet = regp.parent / data["models"][0]["files"]["unet"]["path"]
    corrupt(unet)
    out = tmp_path / "x.nrrd"
    r = _run(["inpaint", str(inp), "--landmark", _vec(lm), "--level", "L4-L5", "--condition", "dh_small",
              "--steps", "2", "--device", "cpu", "--out", str(out), "--progress", "json"],
             env_extra={"SPINE_LDM_REGISTRY": str(regp)})
    assert r.returncode == 3
    err = _events(r.stdout)[-1]
    assert err["event"] == "error" and err["kind"] == "model"
    assert f"weights file {unet.resolve()} sha256 mismatch: expected " in err["message"]
    assert r.stderr.strip().splitlines() == [f"spine-ldm: error: {err['message']}"]  # one line, no traceback
    assert not out.exists()
    # models verify reports it too (exit 3)
    v = _run(["models", "--registry", str(regp), "verify", "demo-small-weighted"])
    assert v.returncode == 3 and "unet: corrupt" in v.stdout and "autoencoder: ok" in v.stdout


def _main(argv, capsys):
    rc = cli.main(argv)
    c = capsys.readouterr()
    return rc, c.out, c.err


@pytest.mark.parametrize("change, code, message", [
    ({"--condition": "tumour"}, 2, "unknown condition 'tumour'"),
    ({"--level": "L6-L7"}, 2, "unknown level 'L6-L7'"),
    ({"--landmark": "0,900,0"}, 2, "LPS is"),
    ({"image": "missing.nrrd"}, 2, "does not exist"),
    ({"image": "nan.nrrd"}, 2, "NaN"),
    ({"--device": "cuda:7"} if not __import__("torch").cuda.is_available() else {"--device": "tpu"}, 4, "device"),
    ({"--model": "no-such-model"}, 3, "unknown model 'no-such-model'"),
    ({"--samples": "0"}, 2, "--samples must be >= 1"),
    ({"--landmark": "1,2"}, 2, "--landmark must be 3"),
    ({"--guidance-scale": "2"}, 2, "trained without the healthy condition, so it cannot be guided"),
])
def test_error_paths(setup, tmp_path, capsys, change, code, message):
    d, regp, inp, lm, disc = setup
    nan = tmp_path / "nan.nrrd"
    img = sitk.ReadImage(str(inp), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(img)
    a[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(nan))
    args = {"image": str(inp), "--landmark": _vec(lm), "--level": "L4-L5", "--condition": "dh_small"}
    args.update(change)
    if args["image"] in ("missing.nrrd", "nan.nrrd"):
        args["image"] = str(tmp_path / args["image"])
    out = tmp_path / "o.nrrd"
    argv = ["inpaint", args.pop("image"), *[x for kv in args.items() for x in kv], "--steps", "1",
            "--registry", str(regp), "--out", str(out), "--progress", "json"]
    rc, so, se = _main(argv, capsys)
    assert rc == code, (so, se)
    err = _events(so)[-1]
    assert err["event"] == "error" and message in err["message"]
    assert se.count("\n") == 1 and se.startswith("spine-ldm: error: ") and message in se
    assert not out.exists()


def test_ras_and_lps_landmarks_agree(setup, tmp_path, capsys):
    d, regp, inp, lm, disc = setup
    common = ["--level", "L4-L5", "--condition", "ccs_severe", "--steps", "1", "--seed", "2", "--device", "cpu",
              "--registry", str(regp), "--progress", "none"]
    rc1, so1, _ = _main(["inpaint", str(inp), "--landmark", _vec(lm), "--disc-center", _vec(disc), *common,
                         "--out", str(tmp_path / "lps.nrrd")], capsys)
    ras, dras = lps_to_ras(lm), lps_to_ras(disc)
    rc2, so2, _ = _main(["inpaint", str(inp), "--coords", "ras", "--landmark", _vec(ras), "--disc-center",
                         _vec(dras), *common, "--out", str(tmp_path / "ras.nrrd")], capsys)
    assert rc1 == rc2 == 0
    assert so1.strip() == str(tmp_path / "lps.nrrd") and so2.strip() == str(tmp_path / "ras.nrrd")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lps.nrrd")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ras.nrrd")))
    np.testing.assert_array_equal(a, b)


def test_negative_vector_argument_is_accepted():
    assert cli._fix_negative_vectors(["--landmark", "-1.5,2,3", "--seed", "-1"]) == \
        ["--landmark=-1.5,2,3", "--seed", "-1"]


def test_models_list_import_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPINE_LDM_CACHE", str(tmp_path / "cache"))
    regp = make_registry(tmp_path / "reg")
    rc, so, _ = _main(["models", "--registry", str(regp), "list", "--json"], capsys)
    assert rc == 0 and [m["id"] for m in json.loads(so)] == ["demo-small-weighted", "demo-small-masked",
                                                             "demo-small-full"]
    zp = make_model_zip(tmp_path / "m.zip", model_id="zipped")
    rc, so, _ = _main(["models", "import", str(zp)], capsys)
    assert rc == 0 and "imported zipped" in so
    rc, so, _ = _main(["models", "--registry", str(regp), "list"], capsys)
    assert rc == 0 and so.splitlines()[-1].startswith("zipped")
    rc, so, se = _main(["models", "import", str(zp)], capsys)
    assert rc == 3 and "already imported" in se


def test_demo_without_registered_weights_is_a_model_error(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "Models.json"
    empty.write_text('{"version": 1, "models": []}')
    rc, so, se = _main(["demo", "--registry", str(empty), "--out", str(tmp_path / "demo"), "--progress", "none"],
                       capsys)
    assert rc == 3 and "demo weights are not registered" in se and "a weighted model for dh_moderate_large" in se


def test_phantom_command_writes_case(tmp_path, capsys):
    out = tmp_path / "ph"
    rc, so, se = _main(["phantom", "--out", str(out), "--seed", "1", "--spacing", "2,2,4.3", "--dh",
                        "L4-L5:moderate_large", "--progress", "json"], capsys)
    assert rc == 0, se
    done = _events(so)[-1]
    assert done["event"] == "done"
    assert [(p["condition"], p["level"]) for p in done["result"]["pathologies"]] == [("dh_moderate_large", "L4-L5")]
    img = sitk.ReadImage(str(out / "t2.nrrd"))
    assert img.GetSpacing() == pytest.approx((2.0, 2.0, 4.3))
    rc, so, se = _main(["phantom", "--out", str(out), "--dh", "L4-L5:huge"], capsys)
    assert rc == 2 and "huge" in se


def test_demo_slice_orientation_superior_up_anterior_left():
    from spine_ldm.demo import sagittal_slice

    img, lm, disc = make_test_volume()
    a = np.zeros(sitk.GetArrayFromImage(img).shape, np.float32)
    marked = sitk.GetImageFromArray(a)
    marked.CopyInformation(img)
    # bright blob 15 mm superior and 15 mm anterior of the centre (LPS: z up, y posterior)
    p = np.asarray(disc) + np.array([0.0, -15.0, 15.0])
    idx = marked.TransformPhysicalPointToIndex(tuple(p))
    marked[idx] = 1000.0
    sl = sagittal_slice(marked, disc, width_mm=60, height_mm=60, pixel_mm=1.0)
    r, c = np.unravel_index(np.argmax(sl), sl.shape)
    assert r < 30 and c < 30  # upper-left quadrant: superior up, anterior left


def test_landmark_mark_leaves_the_site_visible():
    """The figures' landmark is a crosshair with a gap: nothing drawn within ``gap`` of the point (a filled ``+``
    hid the small herniation it points at), four ticks beyond it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spine_ldm.demo import mark_landmark

    fig, ax = plt.subplots()
    mark_landmark(ax, 50.0, 40.0, gap=6.0, length=5.0)
    pts = np.concatenate([np.c_[ln.get_xdata(), ln.get_ydata()] for ln in ax.get_lines()])
    plt.close(fig)
    assert len(pts) == 8
    dist = np.hypot(pts[:, 0] - 50.0, pts[:, 1] - 40.0)
    assert sorted(np.round(dist, 6)) == [6.0] * 4 + [11.0] * 4


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from spine_ldm import demo

    regp = make_registry(tmp_path / "reg")
    # --real reads ../shared/data/lumbar_t2/ivd_11_*: stand in a small volume with its discs file
    real = tmp_path / "shared"
    real.mkdir()
    img, lm, disc = make_test_volume()
    sitk.WriteImage(img, str(real / "ivd_11_t2.nrrd"))
    (real / "ivd_11_discs.json").write_text(json.dumps({"discs": {"L4-L5": {"center_LPS_mm": list(disc)}}}))
    monkeypatch.setattr(demo, "shared_lumbar_dir", lambda: real)
    rc, so, se = _main(["demo", "--registry", str(regp), "--out", str(tmp_path / "demo"), "--steps", "1",
                        "--device", "cpu", "--progress", "none", "--real"], capsys)
    assert rc == 0, se
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert len(summary["cases"]) == 9 and Path(summary["png"]).is_file()
    assert sum(c["case"] == "real_ivd11_dh_L4-L5" for c in summary["cases"]) == 3
    # the phantom herniation goes where the models draw one: its centre, 4 mm behind the posterior disc margin
    _, discs, lms = demo._phantom_case(seed=0)
    dh = [c for c in summary["cases"] if c["case"] == "dh_L4-L5"]
    assert len(dh) == 3
    for c in dh:
        np.testing.assert_allclose(c["landmark_lps"], herniation_landmark(lms[("L4-L5", "dh")], discs["L4-L5"],
                                                                          "dh_moderate_large"))
        assert np.linalg.norm(np.subtract(c["landmark_lps"], lms[("L4-L5", "dh")])) == pytest.approx(4.0)
    for c in summary["cases"]:
        for p in c["outputs"]:
            assert Path(p).is_file()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_and_writes_nothing(setup, tmp_path, sig):
    import signal

    d, regp, inp, lm, disc = setup
    out = tmp_path / "never.nrrd"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    # start the child with SIGINT ignored, as a background job of a non-interactive shell gets it: the CLI must
    # still cancel on SIGINT
    p = subprocess.Popen([sys.executable, "-m", "spine_ldm", "inpaint", str(inp), "--landmark", _vec(lm),
                          "--level", "L4-L5", "--condition", "dh_small", "--steps", "200", "--device", "cpu",
                          "--registry", str(regp), "--out", str(out), "--progress", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in p.stdout:
            if json.loads(line)["event"] == "progress":
                p.send_signal(getattr(signal, sig))
                break
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    last = _events(rest)[-1]
    assert last["event"] == "error" and last["kind"] == "cancelled"
    assert list(tmp_path.iterdir()) == []


def test_serve_wiring_and_token_file(tmp_path, capsys, monkeypatch):
    import spine_ldm.server as server

    got = {}
    monkeypatch.setattr(server, "serve", lambda **kw: got.update(kw))
    tok = tmp_path / "tok"
    tok.write_text("s3cret\n")
    rc, so, se = _main(["serve", "--port", "8123", "--token-file", str(tok), "--registry", "R.json",
                        "--max-request-mb", "64"], capsys)
    assert rc == 0, se
    assert got == {"host": "127.0.0.1", "port": 8123, "token": "s3cret", "registry": "R.json", "max_request_mb": 64.0,
                   "parent_pid": None}
    tok.write_text("")
    rc, so, se = _main(["serve", "--token-file", str(tok)], capsys)
    assert rc == 2 and "is empty" in se


def test_no_command_and_models_without_action(capsys):
    rc, so, se = _main([], capsys)
    assert rc == 2 and "inpaint" in so
    rc, so, se = _main(["models"], capsys)
    assert rc == 2 and "expected an action" in se
    rc, so, se = _main(["study"], capsys)
    assert rc == 2 and "study: expected an action" in se
