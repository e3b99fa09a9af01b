"""The HTTP service: `create_app(session_factory, ServeConfig)` returns a FastAPI app.

Endpoints (OpenAPI at /openapi.json): POST /v1/ask (JSON evidence record, or a server-sent-events stream of the
loop's steps), POST /v1/chat/completions (OpenAI chat format), GET /v1/packs, /v1/models, /v1/health,
/v1/reports/{id} (the HTML report of a finished request that asked for one) and / (a small web page).
Every error is JSON: {"error": {"message": one line, "type": ...}} with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, MedrwrError
from ..runtime.engine_dialects import EngineError, EngineTimeout
from . import openai_compat as oai
from .config import ServeConfig
from .middleware import ApiKeyAuth, BodyLimit, RequestLog
from .uploads import MAX_IMAGES, decode_data_url, load_prepared, private_workdir, upload_name, write_private
from .worker import AskJob, AskWorker, NotAccepting, QueueFull, RequestCancelled, request_settings

log = logging.getLogger("medrwr_edge.serve")
PAGE_FILE = Path(__file__).with_name("static") / "index.html"
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class UnknownPack(InputError):
    """A request named a pack the server has not loaded."""


def _error(status: int, message: str, kind: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(str(message).split()), "type": kind}}, status, headers=headers)


def create_app(session_factory: Callable[[], Any], config: Optional[ServeConfig] = None) -> FastAPI:
    """`session_factory()` builds the Session (model + packs); it runs once, in the worker thread, at startup."""
    config = config or ServeConfig()
    worker = AskWorker(session_factory, max_queue=config.max_queue, keep_reports=config.keep_reports,
                       log_answers=config.log_answers, engine_parallel=config.engine_parallel)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await worker.start()
        log.info("ready: model %s, %d text pack(s), queue of %d, %d question(s) at a time", _model_name(worker),
                 len(worker.text_pack_names()), config.max_queue, worker.parallel)
        try:
            yield
        finally:
            await worker.stop(config.shutdown_timeout)

    app = FastAPI(
        title="medrwr-edge",
        version=__version__,
        description="Offline Med-RwR: medical reasoning with retrieval, with an evidence record for every answer.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN; this service is offline. The schema is served.
        redoc_url=None,
    )
    app.state.worker = worker
    app.state.config = config

    # ---------------------------------------------------------------- errors: one JSON line, never a traceback
    @app.exception_handler(UnknownPack)
    async def _unknown_pack(request: Request, exc: UnknownPack):
        return _error(404, str(exc), "unknown_pack")

    @app.exception_handler(MedrwrError)
    async def _medrwr_error(request: Request, exc: MedrwrError):
        if isinstance(exc, InputError):
            return _error(400, _message(exc), "invalid_request_error")
        if isinstance(exc, EngineError):
            return _error(*_engine_fault(exc))
        return _error(500, _message(exc), "server_error")

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        return _error(429, str(exc), "queue_full", {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestCancelled)
    async def _cancelled(request: Request, exc: RequestCancelled):
        return _error(503, str(exc), "cancelled")

    @app.exception_handler(NotAccepting)
    async def _not_accepting(request: Request, exc: NotAccepting):
        return _error(503, "the server is shutting down", "unavailable", {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # Field names and problem kinds only: the offending values could be patient data.
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            problems.append(f"{where or 'body'}: {err.get('type', 'invalid')}")
        return _error(400, "invalid request (" + "; ".join(problems) + ")", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return _error(exc.status_code, exc.detail, kinds.get(exc.status_code, "invalid_request_error"))

    # ---------------------------------------------------------------- /v1/ask
    @app.post(
        "/v1/ask",
        summary="Answer a question about image(s) with reasoning-with-retrieval",
        response_description="the evidence record (schema medrwr-edge/evidence/1), or an SSE stream of steps",
    )
    async def ask(
        request: Request,
        question: Optional[str] = Form(None, description="the question"),
        options: list[str] = Form([], description='options such as "A. Pneumonia" (repeat, or one per line)'),
        packs: list[str] = Form([], description="names of loaded text packs to search (default: all)"),
        settings: Optional[str] = Form(None, description="JSON object of per-request settings (seed, temperature, "
                                                         "max_tokens, retrieval, cdir, cdir_threshold, ...)"),
        stream: bool = Form(False, description="stream steps as server-sent events (or send Accept: text/event-stream)"),
        report: bool = Form(False, description="keep the HTML report at /v1/reports/{request_id}"),
        image: list[UploadFile] = File([], description="PNG/JPEG/DICOM; several: the last is the current study"),
    ):
        if question is None:
            raise InputError("missing field 'question'")
        try:
            raw_settings = json.loads(settings) if settings else None
        except json.JSONDecodeError:
            raise InputError("'settings' is not valid JSON") from None
        opts = [line.strip() for o in options for line in o.splitlines() if line.strip()]
        uploads = []
        for i, f in enumerate(image):
            uploads.append((await f.read(), upload_name(i, f.filename, f.content_type)))
        job = await _prepare_job(request, question, opts, packs or None, raw_settings, uploads, report)
        wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
        if wants_stream:
            return _sse_response(job, _submit(job, streaming=True))
        _submit(job, streaming=False)
        record, _ = await _wait(job, request)
        headers = {"X-Report-URL": f"/v1/reports/{job.request_id}"} if report else None
        return JSONResponse(record, headers=headers)

    async def _prepare_job(request, question, options, packs, raw_settings, uploads, want_report) -> AskJob:
        from ..runtime.settings import Question

        request_id = request.scope.get("state", {}).get("request_id") or secrets.token_hex(8)
        settings = request_settings(worker.session.settings, raw_settings, config.max_tokens_limit)
        checked = Question.check(question, options, settings)  # used as is by the worker
        if packs is not None:
            loaded = worker.text_pack_names()
            unknown = [p for p in packs if p not in loaded]
            if unknown:
                raise UnknownPack(f"unknown pack {unknown[0][:80]!r}; loaded: {', '.join(loaded) or 'none'}")
        if len(uploads) > MAX_IMAGES:
            raise InputError(f"{len(uploads)} images; at most {MAX_IMAGES} per question")
        job = AskJob(request_id, checked, [], settings=settings, packs=packs, want_report=want_report)
        if uploads:
            job.workdir = private_workdir()
            try:
                job.image_paths = [write_private(job.workdir, name, data) for data, name in uploads]
                job.images = await run_in_threadpool(load_prepared, job.image_paths, job.workdir, settings)
            except BaseException:
                import shutil

                shutil.rmtree(job.workdir, ignore_errors=True)
                raise
        return job

    def _submit(job: AskJob, streaming: bool) -> int:
        try:
            return worker.submit(job, streaming)
        except BaseException:
            if job.workdir is not None:
                import shutil

                shutil.rmtree(job.workdir, ignore_errors=True)
            raise

    async def _wait(job: AskJob, request: Request):
        """The job's result; cancels it if the client disconnects or this handler is cancelled (shutdown)."""
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel()
                    await asyncio.wait({job.future})
                    break
            return job.future.result()
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _sse_response(job: AskJob, ahead: int) -> StreamingResponse:
        async def events():
            try:
                yield _sse("queued", {"type": "queued", "request_id": job.request_id, "ahead": ahead})
                async for kind, payload in _drain(job):
                    yield _sse(kind, payload)
                try:
                    record, _ = job.future.result()
                except BaseException as e:  # noqa: BLE001 - streamed as an error event
                    yield _sse("error", _error_body(e))
                    return
                yield _sse("record", record)
                yield _sse("done", {"type": "done", "request_id": job.request_id,
                                    "report_url": f"/v1/reports/{job.request_id}" if job.want_report else None})
            finally:
                if not job.future.done():
                    job.cancel()  # the client went away mid-stream: stop generating

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    # ---------------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (evidence in medrwr_evidence)")
    async def chat_completions(request: Request, body: dict[str, Any] = Body(..., description="OpenAI chat request; "
                               "extra fields: medrwr_options (list), medrwr_packs (list), medrwr_settings (object)")):
        parsed = oai.parse_chat_request(body)
        settings = oai.chat_settings(body)
        uploads = []
        for i, url in enumerate(parsed.image_urls[: MAX_IMAGES + 1]):
            data, suffix = decode_data_url(url, i)
            uploads.append((data, f"image-{i + 1}{suffix}"))
        packs = body.get("medrwr_packs")
        if packs is not None and (not isinstance(packs, list) or not all(isinstance(p, str) for p in packs)):
            raise InputError("'medrwr_packs' must be a list of pack names")
        job = await _prepare_job(request, parsed.question, parsed.options, packs or None, settings, uploads, False)
        model, created = _model_name(worker), int(time.time())
        if body.get("stream"):
            _submit(job, streaming=True)
            return StreamingResponse(_chat_stream(job, model, created), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)
        _submit(job, streaming=False)
        record, _ = await _wait(job, request)
        return JSONResponse(oai.completion_response(job.request_id, created, model, record))

    async def _chat_stream(job: AskJob, model: str, created: int):
        rid = job.request_id
        try:
            yield _data(oai.completion_chunk(rid, created, model, {"role": "assistant", "content": ""}))
            async for kind, payload in _drain(job):
                if kind == "keepalive":  # while queued or in a long step: an SSE comment, which clients skip
                    yield _data(None)
                elif kind == "piece":
                    yield _data(oai.completion_chunk(rid, created, model, {"reasoning_content": payload["text"]}))
            try:
                record, _ = job.future.result()
            except BaseException as e:  # noqa: BLE001
                yield _data(_error_body(e))
                return
            yield _data(oai.completion_chunk(rid, created, model, {"content": oai.answer_content(record)}))
            yield _data(oai.final_chunk(rid, created, model, record))
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():
                job.cancel()

    async def _drain(job: AskJob):
        """The job's events until it ends, with ("keepalive", None) after every `keepalive_seconds` of silence (a
        request waiting in the queue sends nothing else): each stream turns it into a comment line, which keeps
        idle proxies from closing the connection."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), config.keepalive_seconds)
            except asyncio.TimeoutError:
                yield "keepalive", None
                continue
            if kind == "end":
                return
            yield kind, payload

    # ---------------------------------------------------------------- facts
    @app.get("/v1/packs", summary="The loaded knowledge and reference-image packs")
    async def packs():
        keep = ("name", "version", "kind", "role", "doc_count", "encoder_sha256", "manifest_sha256")
        return {"packs": [{k: p.get(k) for k in keep} for p in worker.session.pack_records]}

    @app.get("/v1/models", summary="The loaded model (OpenAI list format)")
    async def models():
        info = worker.session.backend.info
        return {"object": "list", "data": [{
            "id": _model_name(worker), "object": "model", "created": 0, "owned_by": "local",
            "medrwr": {"backend": info.name, "has_vision": info.has_vision, "device": info.device,
                       "n_ctx": info.n_ctx, "sha256": info.model_sha256},
        }]}

    @app.get("/v1/health", summary="Liveness, queue depth and counters (no API key needed)")
    async def health():
        c = worker.counters
        return {
            "status": "ok" if worker.accepting else "shutting_down",
            "model": _model_name(worker) if worker.session is not None else None,
            "queue_depth": worker.queue_depth(),
            "in_flight": len(worker.running),
            "parallel": worker.parallel,
            "max_queue": worker.max_queue,
            "accepted": c.accepted, "completed": c.completed, "failed": c.failed, "cancelled": c.cancelled,
            "rejected_queue_full": c.rejected_queue_full,
            "mean_seconds": round(c.service_seconds_ewma, 3) if c.service_seconds_ewma is not None else None,
        }

    @app.get("/v1/reports/{request_id}", response_class=HTMLResponse,
             summary="The HTML report of a finished request that asked for one (report=true)")
    async def report(request_id: str):
        page = worker.reports.get(request_id)
        if page is None:
            return _error(404, "no report for this request id (not asked for, not finished, or expired)", "not_found")
        return HTMLResponse(page, headers={"Content-Security-Policy": REPORT_CSP, "Cache-Control": "no-store"})

    page_html, page_csp = _load_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page_html, headers={"Content-Security-Policy": page_csp, "Cache-Control": "no-store"})

    # Outermost last: request log → CORS (only if asked) → API key → body limit → app.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestLog)
    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(kind: str, payload) -> str:
    if kind == "keepalive":
        return ": keepalive\n\n"
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _data(payload) -> str:
    if payload is None:
        return ": keepalive\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error_body(exc: BaseException) -> dict:
    if isinstance(exc, RequestCancelled):
        return {"error": {"message": str(exc), "type": "cancelled"}}
    if isinstance(exc, InputError):
        return {"error": {"message": _message(exc), "type": "invalid_request_error"}}
    if isinstance(exc, EngineError):  # the status line was sent already (200): the status the error would have had
        status, message, kind = _engine_fault(exc)
        return {"error": {"message": message, "type": kind, "status": status}}
    if isinstance(exc, MedrwrError):
        return {"error": {"message": _message(exc), "type": "server_error"}}
    return {"error": {"message": "internal error (see the server log)", "type": "server_error"}}


def _engine_fault(exc: EngineError) -> tuple[int, str, str]:
    """A fault of the inference server behind `--engine` is an upstream's, not ours: 504 when it did not answer
    within --engine-timeout, 502 when it is unreachable, refused the request, broke off or sent a bad reply."""
    if isinstance(exc, EngineTimeout):
        return 504, _message(exc), "engine_timeout"
    return 502, _message(exc), "engine_error"


def _message(exc: MedrwrError) -> str:
    """A library error in an HTTP client's words: a setting is named by its JSON key (AskSettings' field name)
    under "settings", any other name (an API argument such as `packs`) as itself."""
    from ..runtime.settings import AskSettings

    return exc.worded(lambda name: f"setting {name!r}" if name in AskSettings.__dataclass_fields__ else repr(name))


def _model_name(worker: AskWorker) -> str:
    return Path(worker.session.backend.info.model_path).name


def _load_page() -> tuple[str, str]:
    """The page, and a CSP that allows exactly its one inline script (by hash) and nothing from elsewhere."""
    page = PAGE_FILE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
           "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'")
    return page, csp
