"""Browser reader app: API (FastAPI TestClient) blinding / isolation, and end to end in headless Chromium."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from spine_ldm.study import blind  # noqa: E402
from spine_ldm.study.engine import make_demo_study  # noqa: E402
from spine_ldm.study.report import make_report  # noqa: E402
from spine_ldm.study.web import NIIVUE_JS, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test_artifacts"
HIDDEN_WORDS = ("weighted", "masked", "repaint", "inpaint", "real_pathological", "real_healthy", "truth",
                "spine_ldm", "demo-small", "provenance", "healthy", "organizer", "true_condition")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_demo_study(tmp_path_factory.mktemp("web") / "s", n_inpainted_per_method=2, n_real_pathological=2,
                           n_real_healthy=2, seed=5, phantom_spacing=(1.25, 1.25, 4.3))


def _hidden(study) -> list[str]:
    out = list(HIDDEN_WORDS)
    for t in study.load_truth().values():
        p = Path(t["source"])
        out += [p.name, p.stem, str(p.parent)]
    return out


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------------------------- API (no browser)
def test_api_serves_nothing_hidden(study):
    _, token = study.add_reader("api-blind")
    c = TestClient(create_app(study.root))
    served: list[str] = []
    r = c.post("/api/login", json={"token": token})
    assert r.status_code == 200
    served.append(r.text)
    sess = r.json()
    assert sess["reader"] == "api-blind" and sess["total"] == len(study.cases) and sess["resume_index"] == 0
    served.append(c.get("/api/session", headers=_auth(token)).text)
    urls = []
    for i in range(sess["total"]):
        r = c.get(f"/api/case/{i}", headers=_auth(token))
        assert r.status_code == 200
        served.append(r.text)
        case = r.json()
        assert set(case) == {"case_id", "level", "condition", "landmark_lps", "volume_url", "condition_label", "index",
                             "total", "answer", "complete", "questions"}
        urls.append(case["volume_url"])
        v = c.get(case["volume_url"], headers=_auth(token))
        assert v.status_code == 200 and v.content.startswith(b"NRRD")
        assert "content-disposition" not in v.headers
        head = v.content[: v.content.find(b"\n\n")].decode("latin-1")
        served.append(head)
        fields = {ln.split(":", 1)[0].strip().lower() for ln in head.splitlines()[1:] if ln and not ln.startswith("#")}
        assert fields <= blind.ALLOWED_NRRD_FIELDS
        assert b"spine_ldm" not in v.content
    served += urls
    served += [p.name for p in (study.root / "volumes").iterdir()]
    r = c.post("/api/answer", headers=_auth(token),
               json={"case_id": json.loads(served[2])["case_id"], "values": {"realistic": "yes"}, "seconds": 1.5})
    served.append(r.text)
    blob = "\n".join(served)
    for word in _hidden(study):
        assert word not in blob, f"{word!r} leaked to the reader"
    assert len(set(urls)) == len(study.cases)


def test_api_auth_isolation_and_limits(study):
    _, ta = study.add_reader("api-a")
    _, tb = study.add_reader("api-b")
    c = TestClient(create_app(study.root))
    assert c.get("/api/session").status_code == 401
    assert c.get("/api/case/0", headers=_auth("nope")).status_code == 401
    assert c.post("/api/login", json={"token": "nope"}).status_code == 401
    case = c.get("/api/case/0", headers=_auth(ta)).json()
    assert c.get(case["volume_url"]).status_code == 401
    r = c.post("/api/answer", headers=_auth(ta),
               json={"case_id": case["case_id"], "values": {"realistic": "no", "pathology_present": "yes",
                                                            "comment": "only mine"}})
    assert r.status_code == 200 and r.json()["answered"] == 1
    # reader B: nothing answered, and A's answer never shows up
    sb = c.get("/api/session", headers=_auth(tb)).json()
    assert sb["answered"] == 0
    for i in range(sb["total"]):
        cb = c.get(f"/api/case/{i}", headers=_auth(tb)).json()
        assert cb["answer"] == {}
    # B answering the same case does not touch A's answer
    c.post("/api/answer", headers=_auth(tb), json={"case_id": case["case_id"],
                                                   "values": {"realistic": "yes", "pathology_present": "no"}})
    assert c.get("/api/case/0", headers=_auth(ta)).json()["answer"]["comment"] == "only mine"
    # validation and limits
    assert c.post("/api/answer", headers=_auth(ta), json={"case_id": case["case_id"],
                                                          "values": {"realistic": "maybe"}}).status_code == 400
    assert c.post("/api/answer", headers=_auth(ta), json={"case_id": "0123456789abcdef", "values": {}}).status_code == 404
    assert c.post("/api/answer", headers=_auth(ta), content=b"x" * 70000).status_code == 413
    assert c.get("/api/case/999", headers=_auth(ta)).status_code == 404
    assert c.get("/api/volume/..%2Forganizer%2Ftruth", headers=_auth(ta)).status_code == 404
    for path in ("/organizer/truth.json", "/static/package.json", "/static/../organizer/truth.json", "/study.json",
                 "/answers.sqlite", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 404, path
    r = c.get("/")
    assert r.status_code == 200 and "content-security-policy" in r.headers
    assert c.get("/api/session", headers=_auth(ta)).headers["cache-control"] == "no-store"


# ----------------------------------------------------------------------------- browser end to end
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(page, expr: str, timeout: float = 60.0) -> None:
    """Poll a JS expression (page.wait_for_function would need 'unsafe-eval', which the app's CSP forbids)."""
    t0 = time.monotonic()
    while not page.evaluate(expr):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {expr}")
        page.wait_for_timeout(50)


@pytest.fixture()
def server(study):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(study.root), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not srv.started:
        if time.monotonic() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None, reason="no /usr/bin/chromium")
@pytest.mark.skipif(not NIIVUE_JS.exists(), reason="NiiVue not installed (npm ci in spine_ldm/study/web)")
def test_reader_app_end_to_end(study, server):
    sync_api = pytest.importorskip("playwright.sync_api")
    _, ta = study.add_reader("browser-a", seed=21)
    _, tb = study.add_reader("browser-b", seed=22)
    sa = study.session(ta)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.fill("#token", ta)
            page.press("#token", "Enter")

            def at_case(i, what=page):
                _wait(what, f"document.body.dataset.caseIndex === '{i}' && document.body.dataset.ready === '1' && "
                            "document.getElementById('viewer-status').textContent.startsWith('slice')")

            at_case(0)
            assert page.inner_text("#case-id") == sa.order[0]
            # viewer: scroll one sagittal slice with the keyboard, toggle the landmark
            s0 = page.inner_text("#viewer-status")
            page.keyboard.press("ArrowUp")
            assert page.inner_text("#viewer-status") != s0
            page.keyboard.press("l")
            assert not page.is_checked("#landmark")
            page.keyboard.press("l")
            assert page.is_checked("#landmark")
            # Enter without answers: refused, stays on case 1
            page.keyboard.press("Enter")
            assert "Please answer" in page.inner_text("#message")
            answers = [("y", "p", "4"), ("n", "a", None), ("y", "a", "2")]
            for i, (r, pp, conf) in enumerate(answers):
                page.keyboard.press(r)
                page.keyboard.press(pp)
                if conf:
                    page.keyboard.press(conf)
                assert page.get_attribute(f"#q-realistic-{'yes' if r == 'y' else 'no'}", "aria-pressed") == "true"
                page.keyboard.press("Enter")
                at_case(i + 1)
            # reload: the tab keeps its token and resumes at case four
            page.reload()
            at_case(3)
            assert page.inner_text("#case-id") == sa.order[3]
            assert page.inner_text("#progress").startswith(f"4 / {len(study.cases)}")
            page.wait_for_timeout(300)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "reader_app.png"
            page.screenshot(path=str(shot))
            # the viewer actually drew the volume (not a blank canvas)
            import io

            import numpy as np
            from PIL import Image

            def canvas():
                return np.asarray(Image.open(io.BytesIO(page.locator("#gl").screenshot())).convert("L"), dtype=float)

            c1 = canvas()
            assert c1.std() > 10 and c1.max() > 100
            # zoom in (+) changes the picture, reset (0) restores it; a narrower window brightens it
            page.keyboard.press("+")
            page.wait_for_timeout(200)
            assert np.abs(canvas() - c1).mean() > 2
            page.keyboard.press("0")
            page.wait_for_timeout(200)
            assert np.abs(canvas() - c1).mean() < 0.5
            lo, hi = float(page.input_value("#wl-min")), float(page.input_value("#wl-max"))
            page.fill("#wl-max", str(lo + (hi - lo) / 3))
            page.press("#wl-max", "Tab")
            page.wait_for_timeout(200)
            assert canvas().mean() > c1.mean() + 10
            page.keyboard.press("0")
            # going back shows the saved answer
            page.keyboard.press("ArrowLeft")
            at_case(2)
            assert page.get_attribute("#q-pathology_present-no", "aria-pressed") == "true"
            assert page.get_attribute("#q-confidence-2", "aria-pressed") == "true"

            # reader B in a fresh context: starts at case one and never sees A's answers
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            pb = ctx.new_page()
            pb.on("pageerror", lambda e: errors.append(str(e)))
            pb.goto(server + "/")
            pb.fill("#token", tb)
            pb.press("#token", "Enter")
            at_case(0, pb)
            assert "(0 answered)" in pb.inner_text("#progress")
            sb = study.session(tb)
            j = sb.order.index(sa.order[0])
            for k in range(j):
                pb.keyboard.press("ArrowRight")
                at_case(k + 1, pb)
            assert pb.inner_text("#case-id") == sa.order[0]
            assert pb.get_attribute("#q-realistic-yes", "aria-pressed") == "false"
            assert pb.get_attribute("#q-pathology_present-yes", "aria-pressed") == "false"
            ctx.close()
            # a wrong token is refused
            pc = browser.new_page()
            pc.goto(server + "/")
            pc.fill("#token", "wrong-token")
            pc.press("#token", "Enter")
            _wait(pc, "document.getElementById('login-error').textContent.length > 0")
            assert "Unknown token" in pc.inner_text("#login-error")
        finally:
            browser.close()
    assert not errors, errors
    # the store holds exactly what was typed, and the report counts it
    got = sa.answers()
    assert len(got) == 3 and all(a.client == "web" and a.seconds is not None for a in got.values())
    assert got[sa.order[0]].values == {"realistic": "yes", "pathology_present": "yes", "confidence": 4}
    assert got[sa.order[1]].values == {"realistic": "no", "pathology_present": "no"}
    assert got[sa.order[2]].values == {"realistic": "yes", "pathology_present": "no", "confidence": 2}
    out = ARTIFACTS / "reader_app_report"
    rep = make_report(study.root, out, plot=False)
    mine = [r for r in __import__("spine_ldm.study.report", fromlist=["x"]).collect_ratings(study, study.load_truth())
            if r["reader"] == "browser-a"]
    assert len(mine) == 3 and sum(r["realistic"] == "yes" for r in mine) == 2
    assert sum(r["pathology_present"] == "yes" for r in mine) == 1
    assert rep["ratings"] >= 3
