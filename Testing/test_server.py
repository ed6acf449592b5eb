"""spine_ldm.server: token, size limits, job queue, progress, cancel, results; the SpineInpaintLib remote client
against a live loopback server; and bit-identity with the local CLI for the same seed (random-init tiny weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart", reason="python-multipart is needed for multipart uploads")
from fastapi.testclient import TestClient  # noqa: E402

from spine_ldm import server  # noqa: E402
from spine_ldm.errors import CancelledError, InputError  # noqa: E402
from spine_ldm.pipeline import InpaintResult  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PARAMS = {"landmark_lps": [1.0, -2.0, 3.0], "level": "L4-L5", "condition": "dh_moderate_large", "samples": 2,
          "seed": 5, "steps": 4}


def nrrd_bytes(size=(8, 8, 4), value=0) -> bytes:
    img = sitk.Image(list(size), sitk.sitkInt16) + value
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    p = Path(os.environ.get("TMPDIR", "/tmp")) / f"srv_{os.getpid()}_{threading.get_ident()}.nrrd"
    sitk.WriteImage(img, str(p))
    data = p.read_bytes()
    p.unlink()
    return data


class FakeRunner:
    """pipeline.inpaint stand-in: ``steps`` progress calls ``delay`` s apart, honours cancel, adds k+1 per sample."""

    def __init__(self, delay=0.0, error=None):
        self.delay = delay
        self.error = error
        self.calls = []
        self.started = threading.Event()

    def __call__(self, image, landmark_lps, level, condition, method="weighted", samples=1, seed=0, steps=50,
                 sigma_mm=16.0, device="auto", model=None, disc_center_lps=None, progress=None, cancel=None,
                 registry=None):
        self.calls.append(dict(image=image, landmark_lps=landmark_lps, level=level, condition=condition,
                               samples=samples, seed=seed, steps=steps, model=model, registry=registry))
        self.started.set()
        if self.error is not None:
            raise self.error
        for s in range(1, steps + 2):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            time.sleep(self.delay)
            if progress:
                progress(s, steps + 1)
        img = sitk.ReadImage(str(image))
        outs = [sitk.Cast(img + (k + 1), img.GetPixelID()) for k in range(samples)]
        provs = [{"seed": seed + k, "sample_index": k, "model_id": model or "demo-small-weighted"}
                 for k in range(samples)]
        return InpaintResult(outputs=outs, provenance=provs[0], nfe=steps + 1, seconds=0.01, device="cpu",
                             peak_memory_mb=1.0, provenances=provs)


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def factory(runner=None, max_request_mb=64, registry=None):
        app = server.create_app(TOKEN, registry=registry, max_request_mb=max_request_mb, runner=runner or FakeRunner())
        c = TestClient(app)
        clients.append(app)
        return c

    yield factory
    for app in clients:
        app.state.manager.shutdown()


def submit(client, params=PARAMS, data=None, headers=AUTH):
    files = {"image": ("in.nrrd", data if data is not None else nrrd_bytes(), "application/octet-stream")}
    return client.post("/jobs", files=files, data={"params": json.dumps(params)}, headers=headers)


def wait_status(client, jid, states=("done", "error", "cancelled"), timeout=30.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        st = client.get(f"/jobs/{jid}", headers=AUTH).json()
        seen.append(st)
        if st["status"] in states:
            return st, seen
        time.sleep(0.02)
    raise AssertionError(f"job {jid} stuck in {seen[-1]['status']}")


# ---------------------------------------------------------------------------------------------- auth, limits
def test_token_required(make_client, tmp_path):
    c = make_client()
    assert c.get("/health").json()["status"] == "ok"
    r = c.get("/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/models", headers={"Authorization": TOKEN}).status_code == 401  # scheme required
    assert submit(c, headers={}).status_code == 401
    assert submit(c, headers={"Authorization": "Bearer " + TOKEN + "x"}).status_code == 401
    assert c.get("/jobs/abc", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.delete("/jobs/abc").status_code == 401
    assert c.get("/jobs/abc", headers=AUTH).status_code == 404
    with pytest.raises(ValueError):
        server.create_app("", runner=FakeRunner())


def test_models_lists_registry_with_sha_status(make_client, tmp_path):
    w = tmp_path / "a.pt"
    w.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    reg = tmp_path / "Models.json"
    reg.write_text(json.dumps({"version": 1, "models": [
        {"id": "m-ok", "method": "weighted", "config": "small",
         "files": {"autoencoder": {"path": "a.pt", "sha256": sha}, "unet": {"path": "a.pt", "sha256": sha}}},
        {"id": "m-bad", "method": "masked", "config": "small",
         "files": {"autoencoder": {"path": "a.pt", "sha256": "0" * 64}, "unet": {"path": "gone.pt", "sha256": sha}}},
    ]}))
    c = make_client(registry=str(reg))
    models = {m["id"]: m for m in c.get("/models", headers=AUTH).json()["models"]}
    assert models["m-ok"]["status"] == "ok" and models["m-ok"]["sha256"]["unet"] == sha
    assert models["m-bad"]["files"] == {"autoencoder": "corrupt", "unet": "missing"}
    assert models["m-bad"]["status"] == "corrupt"


def test_request_size_limit(make_client):
    c = make_client(max_request_mb=0.01)  # 10 KiB
    big = nrrd_bytes(size=(64, 64, 4))
    r = submit(c, data=big)
    assert r.status_code == 413 and "limit 0.01 MB" in r.json()["detail"]
    # chunked upload without Content-Length: stopped while streaming
    body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.nrrd\"\r\n\r\n" + big + b"\r\n--b--\r\n"

    def chunks():
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    r = c.post("/jobs", content=chunks(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert submit(c, data=nrrd_bytes(size=(8, 8, 4))).status_code == 202  # small requests still pass


def test_invalid_params_are_refused(make_client):
    c = make_client()
    bad = [({**PARAMS, "registry": "/etc"}, "unknown parameter"),
           ({**PARAMS, "model": "../../x.zip"}, "registry id"),
           ({**PARAMS, "level": "L9-L10"}, "unknown level"),
           ({**PARAMS, "landmark_lps": [1, 2]}, "3 numbers"),
           ({k: v for k, v in PARAMS.items() if k != "condition"}, "missing parameter 'condition'"),
           ({**PARAMS, "samples": "2"}, "integer"),
           ({**PARAMS, "device": "tpu"}, "device"),
           ({**PARAMS, "guidance_scale": "strong"}, "guidance_scale must be a finite number"),
           ({**PARAMS, "guidance_scale": True}, "guidance_scale must be a finite number")]
    for params, msg in bad:
        r = submit(c, params=params)
        assert r.status_code == 422 and msg in r.json()["detail"], (params, r.json())
    assert server.validate_params({**PARAMS, "guidance_scale": 2})["guidance_scale"] == 2  # a number passes
    r = c.post("/jobs", files={"params": (None, json.dumps(PARAMS))}, headers=AUTH)
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = c.post("/jobs", content=b"{}", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 415


# ---------------------------------------------------------------------------------------------- jobs
def test_job_progress_result_and_delete(make_client):
    runner = FakeRunner(delay=0.02)
    c = make_client(runner=runner)
    r = submit(c)
    assert r.status_code == 202
    jid = r.json()["id"]
    st, seen = wait_status(c, jid)
    assert st["status"] == "done" and st["outputs"] == 2 and st["nfe"] == 5
    progress = [(s["step"], s["of"]) for s in seen if s["status"] == "running" and s["of"]]
    assert progress and all(of == 5 for _, of in progress) and progress == sorted(progress)
    assert [p["seed"] for p in st["provenances"]] == [5, 6]
    call = runner.calls[0]
    assert call["landmark_lps"] == [1.0, -2.0, 3.0] and call["level"] == "L4-L5" and call["samples"] == 2
    for k in range(2):
        r = c.get(f"/jobs/{jid}/result/{k}", headers=AUTH)
        assert r.status_code == 200
        img = sitk.ReadImage(_tmp_write(r.content))
        assert np.all(sitk.GetArrayFromImage(img) == k + 1)
        assert img.GetSpacing() == (0.7, 0.8, 3.0) and img.GetOrigin() == (1.0, 2.0, 3.0)
        assert json.loads(img.GetMetaData("spine_ldm_seed")) == 5 + k
    assert c.get(f"/jobs/{jid}/result/2", headers=AUTH).status_code == 404
    assert c.delete(f"/jobs/{jid}", headers=AUTH).json()["status"] == "deleted"
    assert c.get(f"/jobs/{jid}", headers=AUTH).status_code == 404


def _tmp_write(data: bytes) -> str:
    p = Path(os.environ.get("TMPDIR", "/tmp")) / f"res_{os.getpid()}_{time.monotonic_ns()}.nrrd"
    p.write_bytes(data)
    return str(p)


def test_cancel_running_and_queued_jobs(make_client):
    runner = FakeRunner(delay=0.05)
    c = make_client(runner=runner)
    first = submit(c, params={**PARAMS, "steps": 400}).json()["id"]
    second = submit(c, params={**PARAMS, "steps": 400}).json()
    assert second["status"] == "queued"
    wait_status(c, first, states=("running",))
    st = c.get(f"/jobs/{second['id']}", headers=AUTH).json()
    assert st["status"] == "queued" and st["position"] == 0
    assert c.delete(f"/jobs/{second['id']}", headers=AUTH).json()["status"] == "cancelled"
    assert c.delete(f"/jobs/{first}", headers=AUTH).json()["status"] == "cancelling"
    st, _ = wait_status(c, first)
    assert st["status"] == "cancelled" and st["step"] < 400
    assert c.get(f"/jobs/{first}/result/0", headers=AUTH).status_code == 409
    assert len(runner.calls) == 1  # the queued job never ran


def test_runner_errors_become_job_errors(make_client):
    c = make_client(runner=FakeRunner(error=InputError("landmark (1, -2, 3) LPS is 41.0 mm outside the volume")))
    jid = submit(c).json()["id"]
    st, _ = wait_status(c, jid)
    assert st["status"] == "error"
    assert st["error"] == {"kind": "input", "message": "landmark (1, -2, 3) LPS is 41.0 mm outside the volume"}
    c2 = make_client(runner=FakeRunner(error=ZeroDivisionError("division by zero")))
    st, _ = wait_status(c2, submit(c2).json()["id"])
    assert st["error"] == {"kind": "error", "message": "internal error (ZeroDivisionError): division by zero"}


# ---------------------------------------------------------------------------------------------- live + client
@pytest.fixture
def live_server(tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    runner = FakeRunner(delay=0.02)
    app = server.create_app(TOKEN, max_request_mb=64, runner=runner)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", runner
    srv.should_exit = True
    t.join(timeout=5)


def test_remote_client_round_trip(live_server, tmp_path):
    sys.path.insert(0, str(REPO / "SpineInpaint"))
    from SpineInpaintLib.remote import RemoteClient, RemoteError, RemoteJob

    url, runner = live_server
    (tmp_path / "in.nrrd").write_bytes(nrrd_bytes())
    with pytest.raises(RemoteError, match="HTTP 401"):
        RemoteClient(url, "wrong").models()
    client = RemoteClient(url, TOKEN)
    assert client.health()["status"] == "ok"
    job = RemoteJob(client, str(tmp_path / "in.nrrd"), PARAMS, str(tmp_path / "out"))
    job.pollInterval = 0.05
    events = []
    assert job.start().wait(timeout=30, onEvent=events.append) == "done", job.error
    kinds = [e["event"] for e in events]
    assert kinds[0] == "log" and "start" in kinds and kinds[-1] == "done" and "progress" in kinds
    outs = job.result["outputs"]
    assert [os.path.basename(p) for p in outs] == ["sample_0.nrrd", "sample_1.nrrd"]
    assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(outs[1])) == 2)
    assert [p["seed"] for p in job.result["provenances"]] == [5, 6]
    # cancel: the job ends 'cancelled' and the server forgets nothing it should keep
    slow = RemoteJob(client, str(tmp_path / "in.nrrd"), {**PARAMS, "steps": 2000}, str(tmp_path / "out2"))
    slow.pollInterval = 0.05
    slow.start()
    while slow.isRunning() and not slow.lastProgress:
        slow.poll()
        time.sleep(0.02)
    assert slow.cancel(timeout=2.0) and slow.state == "cancelled"
    assert not os.path.exists(tmp_path / "out2" / "sample_0.nrrd")


# ---------------------------------------------------------------------------------------------- identity with CLI
def test_server_result_identical_to_cli(make_client, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    # CPU float reductions depend on the thread count: pin both sides to one thread (a fresh CLI process and the
    # pytest process, whose count earlier tests may have changed), so the comparison is about the code paths
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _server_vs_cli(make_client, tmp_path)
    finally:
        torch.set_num_threads(old_threads)


def _server_vs_cli(make_client, tmp_path):
    sys.path.insert(0, str(REPO / "Testing"))
    helpers = pytest.importorskip("helpers_models")
    reg = helpers.make_registry(tmp_path / "models")
    img = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 900, (160, 128, 20)).astype(np.int16))
    img.SetSpacing((3.0, 0.625, 0.625))
    img.SetOrigin((-30.0, -40.0, -50.0))
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(img, str(path))
    landmark = list(img.TransformContinuousIndexToPhysicalPoint((10, 64, 80)))
    params = {"landmark_lps": landmark, "level": "L4-L5", "condition": "dh_moderate_large", "samples": 1,
              "seed": 9, "steps": 2, "device": "cpu"}
    cmd = [sys.executable, "-m", "spine_ldm.cli", "inpaint", str(path), f"--landmark={','.join(map(repr, landmark))}",
           "--level", "L4-L5", "--condition", "dh_moderate_large", "--samples", "1", "--seed", "9", "--steps", "2",
           "--device", "cpu", "--registry", str(reg), "--out", str(tmp_path / "cli.nrrd"), "--progress", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    c = make_client(runner=None, registry=str(reg))
    c.app.state.manager.runner = server._default_runner
    jid = submit(c, params=params, data=path.read_bytes()).json()["id"]
    st, _ = wait_status(c, jid, timeout=300)
    assert st["status"] == "done", st
    served = sitk.ReadImage(_tmp_write(c.get(f"/jobs/{jid}/result/0", headers=AUTH).content))
    local = sitk.ReadImage(str(tmp_path / "cli.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(local))
    assert served.GetOrigin() == local.GetOrigin() and served.GetDirection() == local.GetDirection()
    assert not np.array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(img))
    for key in ("spine_ldm_seed", "spine_ldm_model_id", "spine_ldm_weights_sha256", "spine_ldm_steps"):
        assert served.GetMetaData(key) == local.GetMetaData(key)


# ---------------------------------------------------------------------------------------------- spine-ldm serve
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait_health(url, proc, timeout=60.0):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=1.0).json()
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


@pytest.mark.parametrize("mode", ["token-file", "generated"])
def test_cli_serve_end_to_end(tmp_path, mode):
    """``spine-ldm serve`` (the pipeline helper's CLI) starts this server with the given or a printed token."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "spine_ldm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-request-mb", "1"]
    if mode == "token-file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        cmd += ["--token-file", str(tmp_path / "token")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        token = TOKEN
        if mode == "generated":  # printed once on stderr before the server starts
            assert "no --token given" in proc.stderr.readline()
            token = proc.stderr.readline().strip()
            assert len(token) >= 32 and token != TOKEN
        assert _wait_health(url, proc)["status"] == "ok"
        assert httpx.get(url + "/models").status_code == 401
        assert httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        r = httpx.post(url + "/jobs", headers={"Authorization": f"Bearer {token}"},
                       files={"image": ("x.nrrd", b"0" * (2 << 20))}, data={"params": "{}"})
        assert r.status_code == 413 and "limit 1 MB" in r.json()["detail"]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_slicer_logic_runs_on_the_remote_backend(live_server, tmp_path):
    """InpaintLogic with backend='remote': upload, progress, download, nodes with the input's geometry."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    vtk = pytest.importorskip("vtk")
    sys.path.insert(0, str(REPO / "SpineInpaint"))
    from SpineInpaintLib import nodes
    from SpineInpaintLib.logic import InpaintLogic
    from SpineInpaintLib.parameters import InpaintParameters

    url, runner = live_server
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    old = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    try:
        arr = np.arange(6 * 10 * 12, dtype=np.int16).reshape(6, 10, 12)
        vol = slicer.util.addVolumeFromArray(arr, name="T2")
        m = vtk.vtkMatrix4x4()
        for r, row in enumerate([[0, 0, 3.0, -9], [0.8, 0, 0, 4], [0, -0.7, 0, 20]]):
            for c, v in enumerate(row):
                m.SetElement(r, c, v)
        vol.SetIJKToRASMatrix(m)
        landmark = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmark")
        landmark.AddControlPoint(vtk.vtkVector3d(*nodes.ijkToRasMatrix(vol)[:3] @ np.array([5, 4, 3, 1.0])))
        (tmp_path / "token").write_text(TOKEN)
        params = InpaintParameters(backend="remote", remoteUrl=url, remoteTokenFile=str(tmp_path / "token"),
                                   samples=2, seed=3, steps=3)
        out = InpaintLogic(scene).run(vol, landmark, params, log=None, timeout=60)
        assert [n.GetName() for n in out] == ["T2 DH-mod/large L4-L5 weighted #1", "T2 DH-mod/large L4-L5 weighted #2"]
        for k, node in enumerate(out):
            assert np.array_equal(nodes.ijkToRasMatrix(node), nodes.ijkToRasMatrix(vol))
            assert np.array_equal(slicer.util.arrayFromVolume(node), arr + k + 1)
            prov = nodes.getProvenanceAttributes(node)
            assert prov["seed"] == 3 + k and prov["sample_index"] == k
        call = runner.calls[-1]
        np.testing.assert_allclose(call["landmark_lps"], nodes.rasToLps(
            nodes.ijkToRasMatrix(vol)[:3] @ np.array([5, 4, 3, 1.0])))
        assert np.array_equal(slicer.util.arrayFromVolume(vol), arr)  # input untouched
        with pytest.raises(Exception, match="HTTP 401"):
            InpaintLogic(scene).run(vol, landmark, InpaintParameters(backend="remote", remoteUrl=url), log=None,
                                    token="wrong", timeout=60)
    finally:
        slicer.mrmlScene = old
