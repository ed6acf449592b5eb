"""The warm local backend (``SpineInpaintLib.worker``): reuse across Applies, restart after a crash, cancel, exit with
Slicer, and the same results as the one-shot process.

The fake worker is the real ``spine_ldm.server.serve`` (same HTTP API, same ``listening`` announcement, same
``--parent-pid`` watchdog) with a fake pipeline in place of ``pipeline.inpaint``: no torch, starts in about a
second. ``test_warm_worker_matches_one_shot_backend`` (slow suite) runs the real backend on random-init tiny weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("fastapi")
psutil = pytest.importorskip("psutil")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SpineInpaint"
sys.path.insert(0, str(MODULE_DIR))
from SpineInpaintLib import nodes, worker  # noqa: E402
from SpineInpaintLib.logic import InpaintLogic  # noqa: E402
from SpineInpaintLib.parameters import InpaintParameters  # noqa: E402

sys.path.insert(0, str(REPO / "Testing"))
import test_slicer_lib  # noqa: E402

scene = test_slicer_lib.scene  # the headless scene fixture

FAKE_WORKER = textwrap.dedent(r'''
    """spine-ldm serve with a fake pipeline: FAKE_WORKER_MODE ok | slow."""
    import argparse, os, sys, time
    import SimpleITK as sitk
    from spine_ldm import pipeline, server
    from spine_ldm.errors import CancelledError

    CALLS = []

    def fake_inpaint(image, landmark, level, condition, progress=None, cancel=None, registry=None, samples=1,
                     seed=0, steps=50, method="weighted", **kw):
        CALLS.append(1)
        img = sitk.ReadImage(str(image))
        total = 100000 if os.environ.get("FAKE_WORKER_MODE") == "slow" else steps + 1
        for s in range(1, total + 1):
            if cancel is not None and cancel():
                raise CancelledError("cancelled")
            if progress:
                progress(s, total)
            if total > 1000:
                time.sleep(0.02)
        outs, provs = [], []
        for k in range(samples):
            arr = sitk.GetArrayFromImage(img)
            arr[arr.shape[0] // 2, 2:5, 2:5] += k + 1
            o = sitk.GetImageFromArray(arr)
            o.CopyInformation(img)
            outs.append(o)
            provs.append({"model_id": f"fake-{method}", "seed": seed + k, "sample_index": k + 1,
                          "server_pid": os.getpid(), "server_call": len(CALLS)})
        return pipeline.InpaintResult(outputs=outs, provenance=provs[0], nfe=total, seconds=0.01, device="cpu",
                                      peak_memory_mb=1.0, provenances=provs)

    server._default_runner = fake_inpaint
    p = argparse.ArgumentParser()
    p.add_argument("--host"); p.add_argument("--port", type=int); p.add_argument("--token-file")
    p.add_argument("--parent-pid", type=int); p.add_argument("--registry")
    a = p.parse_args()
    token = open(a.token_file).read().strip()
    server.serve(host=a.host, port=a.port, token=token, registry=a.registry, parent_pid=a.parent_pid)
''')


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)

    def builder(tokenFile, python=None, registry=None, parentPid=None):
        cmd = worker.workerCommand(tokenFile, python=sys.executable, registry=registry, parentPid=parentPid)
        assert cmd[1:4] == ["-m", "spine_ldm.cli", "serve"]
        return [sys.executable, str(script)] + cmd[4:]

    yield builder
    worker.shutdownWorkers()  # never leave a worker behind


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), env.get("PYTHONPATH", "")])
    return env


def _inputs(scene):
    arr = np.random.default_rng(0).integers(0, 1000, size=(9, 30, 24)).astype(np.int16)
    vol = slicer.util.addVolumeFromArray(arr, name="T2")
    lm = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmark")
    lm.AddControlPoint(vtk.vtkVector3d(12.0, 12.0, 4.0))
    return vol, lm


def _run(logic, vol, lm, **kw):
    job = logic.start(vol, lm, InpaintParameters(steps=3, **kw))
    assert job.wait(timeout=120) == "done", job.message
    return job


def test_worker_is_reused_and_restarts_after_a_crash(scene, fake_worker):
    vol, lm = _inputs(scene)
    logic = InpaintLogic(scene, python=sys.executable, env=_env(), warm=True, workerCommandBuilder=fake_worker)
    assert logic.useWarmWorker()
    first = _run(logic, vol, lm, samples=2)
    w = worker.currentWorker()
    pid = w.process.pid
    provs = [nodes.getProvenanceAttributes(n) for n in first.outputNodes]
    assert [n.GetName() for n in first.outputNodes] == ["T2 DH-mod/large L4-L5 weighted #1",
                                                        "T2 DH-mod/large L4-L5 weighted #2"]
    assert {p["server_pid"] for p in provs} == {pid} and provs[1]["seed"] == 1

    second = _run(logic, vol, lm)  # a second Apply: same process, the pipeline's second call
    prov = nodes.getProvenanceAttributes(second.outputNodes[0])
    assert worker.currentWorker() is w and w.process.pid == pid and w.starts == 1
    assert (prov["server_pid"], prov["server_call"]) == (pid, 2)

    psutil.Process(pid).kill()  # the worker crashes between two Applies
    deadline = time.monotonic() + 10
    while w.poll() != worker.STOPPED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.state == worker.STOPPED
    logs = []
    third = logic.start(vol, lm, InpaintParameters(steps=3), onEvent=lambda j, e: logs.append(e))
    assert third.wait(timeout=120) == "done", third.message
    prov = nodes.getProvenanceAttributes(third.outputNodes[0])
    assert w.starts == 2 and w.process.pid != pid and prov["server_pid"] == w.process.pid
    assert prov["server_call"] == 1
    assert any("backend worker restarted" in e.get("message", "") for e in logs)
    assert not os.path.exists(first.workDir) and not os.path.exists(third.workDir)


def test_worker_cancel_leaves_scene_untouched_and_worker_warm(scene, fake_worker):
    vol, lm = _inputs(scene)
    logic = InpaintLogic(scene, python=sys.executable, env=_env(FAKE_WORKER_MODE="slow"), warm=True,
                         workerCommandBuilder=fake_worker)
    n_nodes = scene.GetNumberOfNodes()
    job = logic.start(vol, lm, InpaintParameters())
    deadline = time.monotonic() + 60
    while job.step == 0 and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.step > 0, job.message
    t0 = time.monotonic()
    job.requestCancel()
    assert time.monotonic() - t0 < 0.1
    while job.state == "running" and time.monotonic() - t0 < 3:
        job.poll()
        time.sleep(0.02)
    assert job.state == "cancelled" and time.monotonic() - t0 < 2.0
    assert scene.GetNumberOfNodes() == n_nodes and "nothing was added" in job.message
    w = worker.currentWorker()
    client = w.client()
    deadline = time.monotonic() + 5
    while client.health()["running"] and time.monotonic() < deadline:  # the server stopped the job itself
        time.sleep(0.05)
    assert not client.health()["running"] and w.poll() == worker.READY


def test_worker_exits_with_its_parent(tmp_path, fake_worker):
    """Slicer killed (no atexit, no aboutToQuit): the server's --parent-pid watchdog ends the worker."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f'''
        import sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from SpineInpaintLib import worker
        builder = lambda tokenFile, python=None, registry=None, parentPid=None: [sys.executable,
            {str(tmp_path / "fake_worker.py")!r}] + worker.workerCommand(tokenFile, parentPid=parentPid)[4:]
        w = worker.getWorker(sys.executable, commandBuilder=builder).ensureStarted()
        while w.poll() != worker.READY:
            time.sleep(0.05)
        print(w.process.pid, flush=True)
        time.sleep(600)
    '''))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        pid = int(parent.stdout.readline())
        assert psutil.pid_exists(pid)
        parent.kill()
        parent.wait(10)
        gone, alive = psutil.wait_procs([psutil.Process(pid)], timeout=10)
        assert not alive, "the worker outlived its parent"
    finally:
        parent.kill()


def test_shutdown_stops_the_worker(scene, fake_worker):
    vol, lm = _inputs(scene)
    logic = InpaintLogic(scene, python=sys.executable, env=_env(), warm=True, workerCommandBuilder=fake_worker)
    _run(logic, vol, lm)
    proc = psutil.Process(worker.currentWorker().process.pid)
    worker.shutdownWorkers()  # what aboutToQuit / interpreter exit call
    gone, alive = psutil.wait_procs([proc], timeout=5)
    assert not alive


@pytest.mark.slow
def test_warm_worker_matches_one_shot_backend(scene, tmp_path):
    """The real backend (tiny random weights): the worker's result is the one-shot process's, voxel for voxel
    (slow: two torch processes; ~45 s on 2 idle cores)."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "Testing"))
    helpers = pytest.importorskip("helpers_models")
    reg = helpers.make_registry(tmp_path / "models")
    spacing = (3.0, 0.625, 0.625)
    arr = np.random.default_rng(1).integers(0, 900, size=(192, 160, 24)).astype(np.int16)
    vol = slicer.util.addVolumeFromArray(arr, name="T2")
    m = vtk.vtkMatrix4x4()
    for r, v in enumerate(spacing):
        m.SetElement(r, r, v)
    for r, v in enumerate((-36.0, -50.0, -60.0)):
        m.SetElement(r, 3, v)
    vol.SetIJKToRASMatrix(m)
    lm = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Landmark")
    lm.AddControlPoint(vtk.vtkVector3d(*(np.array([12, 80, 96]) * spacing + (-36.0, -50.0, -60.0))))
    params = InpaintParameters(steps=2, samples=1, seed=3, device="cpu", registry=str(reg))
    env = _env()
    cold = InpaintLogic(scene, python=sys.executable, env=env, warm=False).run(vol, lm, params, log=None, timeout=300)
    warm_logic = InpaintLogic(scene, python=sys.executable, env=env, warm=True)
    try:
        warm = [warm_logic.run(vol, lm, params, log=None, timeout=300) for _ in range(2)]
        assert worker.currentWorker().starts == 1
        expected = slicer.util.arrayFromVolume(cold[0])
        for out in warm:
            assert np.array_equal(slicer.util.arrayFromVolume(out[0]), expected)
            assert nodes.getProvenanceAttributes(out[0])["weights_sha256"] == \
                nodes.getProvenanceAttributes(cold[0])["weights_sha256"]
    finally:
        worker.shutdownWorkers()
