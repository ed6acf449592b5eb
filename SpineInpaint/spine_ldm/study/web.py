"""Browser reader app: FastAPI over the study engine (``spine-ldm study serve``).

Endpoints (all ``/api/*`` except login need ``Authorization: Bearer <reader token>``):

- ``POST /api/login`` ``{"token"}`` -> reader name, study name, questions, shortcuts, progress
- ``GET  /api/session``              -> same as login
- ``GET  /api/case/{index}``         -> the case at ``index`` in this reader's order (public fields + own answer)
- ``GET  /api/volume/{case_id}``     -> the anonymized NRRD (geometry only)
- ``POST /api/answer``               ``{"case_id", "values": {...}, "seconds", "client"}`` -> progress
  (``client``: "web" (default) or "slicer": the Slicer rating panel can use this server as its store)

Nothing here reads the truth key; responses are built from allow-listed public fields only
(:func:`spine_ldm.study.blind.public_case`). Static files: ``/`` (index.html), ``/static/app.js``,
``/static/style.css`` and NiiVue from ``web/node_modules/@niivue/niivue/dist/index.js`` at
``/static/niivue/index.js`` (install with ``npm ci`` in ``spine_ldm/study/web``; no CDN).
"""


import os
from pathlib import Path

from ..errors import InputError
from ..server import SizeLimitMiddleware
from .blind import is_case_id
from .engine import Study

WEB_DIR = Path(__file__).resolve().parent / "web"
#: NiiVue's self-contained ES module; override with env SPINE_LDM_NIIVUE_JS (e.g. for a non-editable install)
NIIVUE_JS = Path(os.environ.get("SPINE_LDM_NIIVUE_JS") or WEB_DIR / "node_modules" / "@niivue" / "niivue" / "dist" / "index.js")
NPM_HINT = (f"cd {WEB_DIR} && npm ci --no-audit --no-fund "
            "(or set SPINE_LDM_NIIVUE_JS to @niivue/niivue/dist/index.js)")
MAX_BODY = 64 * 1024

_STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
                                "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                                "worker-src 'self' blob:; connect-src 'self' data: blob:; frame-ancestors 'none'"),
}


def niivue_available() -> bool:
    return NIIVUE_JS.is_file()


def create_app(study_dir):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    study = Study.load(study_dir)
    study.store  # open / create the answer store now
    app = FastAPI(title="SpineInpaint reader study", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        resp = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if request.url.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    # outermost (added last): the body limit holds for Content-Length and for streamed (chunked) bodies alike
    app.add_middleware(SizeLimitMiddleware, max_bytes=MAX_BODY, hint="")

    def session_for(request: Request):
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        reader = study.store.authenticate(token)
        if reader is None:
            raise HTTPException(status_code=401, detail="unknown or missing reader token")
        from .engine import ReaderSession

        return ReaderSession(study, reader)

    def session_info(s) -> dict:
        return {"reader": s.reader.name, "study": study.name, "questions": s.questions(),
                "nav_keys": study.data.get("nav_keys", {}), **s.progress()}

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in _STATIC:
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(WEB_DIR / name, media_type=_STATIC[name])

    @app.get("/static/niivue/index.js", include_in_schema=False)
    def niivue():
        if not niivue_available():
            raise HTTPException(status_code=404, detail=f"NiiVue is not installed; run: {NPM_HINT}")
        return FileResponse(NIIVUE_JS, media_type="text/javascript")

    @app.get("/api/health")
    def health():
        return {"ok": True, "niivue": niivue_available()}

    @app.post("/api/login")
    async def login(request: Request):
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise HTTPException(status_code=400, detail="body must be JSON {\"token\": ...}") from None
        token = body.get("token") if isinstance(body, dict) else None
        reader = study.store.authenticate(token if isinstance(token, str) else None)
        if reader is None:
            raise HTTPException(status_code=401, detail="unknown reader token")
        from .engine import ReaderSession

        return session_info(ReaderSession(study, reader))

    @app.get("/api/session")
    def session(request: Request):
        return session_info(session_for(request))

    @app.get("/api/case/{index}")
    def case(index: int, request: Request):
        s = session_for(request)
        if not 0 <= index < s.total:
            raise HTTPException(status_code=404, detail=f"case index {index} out of range 0..{s.total - 1}")
        c = s.case(index, record_view=True)
        c["volume_url"] = f"/api/volume/{c.pop('volume').split('/')[-1].removesuffix('.nrrd')}"
        c["questions"] = s.questions(c["condition"])
        return c

    @app.get("/api/volume/{case_id}")
    def volume(case_id: str, request: Request):
        s = session_for(request)
        if not is_case_id(case_id) or case_id not in s.order:
            raise HTTPException(status_code=404, detail="no such case")
        return FileResponse(study.volume_path(case_id), media_type="application/octet-stream")

    @app.post("/api/answer")
    async def answer(request: Request):
        s = session_for(request)
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise HTTPException(status_code=400, detail="body must be JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("case_id"), str):
            raise HTTPException(status_code=400, detail="body needs case_id (string) and values (object)")
        seconds = body.get("seconds")
        if seconds is not None and not isinstance(seconds, (int, float)):
            raise HTTPException(status_code=400, detail="seconds must be a number")
        if body["case_id"] not in s.order:
            raise HTTPException(status_code=404, detail="no such case")
        client = body.get("client", "web")
        if client not in ("web", "slicer"):
            raise HTTPException(status_code=400, detail="client must be 'web' or 'slicer'")
        return s.answer(body["case_id"], body.get("values") or {}, seconds, client=client)

    return app


def serve(study_dir, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning") -> None:
    import sys

    import uvicorn

    app = create_app(study_dir)
    if not niivue_available():
        print(f"warning: NiiVue not installed, the viewer will not load; run: {NPM_HINT}", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without TLS: reader tokens travel in clear text; "
              "put the app behind an HTTPS reverse proxy", file=sys.stderr)
    print(f"reader study {Study.load(study_dir).name!r} at http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)
