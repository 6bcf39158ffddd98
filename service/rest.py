"""The REST face: FastAPI routes that translate HTTP to engine calls and typed errors to status codes.

Status codes come from `service.errors.STATUS_BY_ERROR`, shared with gRPC. The
model loads on a background thread after start-up, so `/healthz` answers at
once and `/readyz` turns 200 when the model is loaded, verified and warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from xmag import __version__
from xmag.errors import RetryLaterError, XmagError
from xmag.model_repo import MANIFEST_FILE
from xmag.result_schema import HeatmapLinks
from xmag.service import schemas
from xmag.service.engine import Engine, EngineHolder
from xmag.service.errors import INTERNAL, status_of
from xmag.service.jobs import EngineResult
from xmag.service.loading import load_engine
from xmag.service.metrics import ServiceMetrics
from xmag.service.results import ResultStore
from xmag.service.settings import ServiceSettings
from xmag.slide.reader import require_reader_backend

log = logging.getLogger("xmag.rest")

UNAUTHORISED = JSONResponse(
    {"error": {"code": "unauthorised", "message": "a valid API key is required: send 'Authorization: Bearer <key>'"}},
    status_code=401,
    headers={"WWW-Authenticate": "Bearer"},
)

ERROR_RESPONSES = {
    status: {"model": schemas.ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 429, 500, 503, 504)
}

EngineFactory = Callable[[ServiceSettings, ServiceMetrics], Engine]


def error_response(error: BaseException) -> JSONResponse:
    status = status_of(error).http
    if status != INTERNAL.http:
        body = {"error": {"code": error.code, "message": str(error)}}
    else:
        body = {"error": {"code": "internal", "message": "internal error; the server log has the details"}}
    headers = {}
    if isinstance(error, RetryLaterError):  # queue full, not ready, Triton gone
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(settings: ServiceSettings, engine_factory: EngineFactory = load_engine) -> FastAPI:
    """The REST application; the engine is built by `engine_factory` on a background thread at start-up."""
    metrics = ServiceMetrics()
    holder = EngineHolder()
    store = ResultStore(settings.result_cache_size)

    def load() -> None:
        try:
            engine = engine_factory(settings, metrics)
            engine.warm_up()
            holder.engine = engine
        except Exception as error:  # noqa: BLE001 - reported by /readyz and every /v1 call
            holder.failure = str(error) if isinstance(error, XmagError) else f"{type(error).__name__}: {error}"
            log.error("the model failed to load: %s", holder.failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # This lifespan is the process's: it loads the engine once and hosts the gRPC face beside REST.
        grpc_face = None
        if settings.grpc:
            from xmag.service.grpc_face import start_grpc_face

            grpc_face = await start_grpc_face(holder, settings, metrics)
            app.state.grpc_port = grpc_face.port
        loader = threading.Thread(target=load, name="xmag-model-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            if grpc_face is not None:
                await grpc_face.stop(grace_s=settings.request_timeout_s)
            await asyncio.to_thread(loader.join)
            if holder.engine is not None:
                # uvicorn has already waited for open requests; this stops the worker threads.
                await asyncio.to_thread(holder.engine.close, settings.request_timeout_s)

    app = FastAPI(
        title="XMAG slide classification",
        version=__version__,
        description="Slide-level predictions and attention maps from whole-slide images, with a 5x pathology encoder.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.engine_holder = holder
    app.state.grpc_port = None  # set at start-up when gRPC is served

    bearer = HTTPBearer(auto_error=False, description="An API key, when the service is configured with any.")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not settings.api_keys:
            return
        offered = credentials.credentials.encode() if credentials is not None else b""
        # compare_digest against every key, so the time taken does not tell which key was close.
        if not any([hmac.compare_digest(offered, key.encode()) for key in settings.api_keys]):
            raise _Unauthorised()

    @app.exception_handler(_Unauthorised)
    async def _on_unauthorised(request: Request, error: _Unauthorised) -> JSONResponse:
        return UNAUTHORISED

    @app.exception_handler(XmagError)
    async def _on_xmag_error(request: Request, error: XmagError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected %s while answering %s", type(error).__name__, request.url.path)
        log.debug("unexpected error", exc_info=error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that cannot be parsed, an unknown path, a wrong method) in our error shape.
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            {"error": {"code": codes.get(error.status_code, "http_error"), "message": str(error.detail)}},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _on_invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'body'}: {problem['msg']}"
            for problem in error.errors()
        )
        return JSONResponse({"error": {"code": "invalid_request", "message": problems}}, status_code=422)

    app.add_middleware(_RequestCounter, metrics=metrics)

    @app.get("/healthz", response_model=schemas.HealthResponse, tags=["operations"])
    def healthz() -> schemas.HealthResponse:
        """Alive: the process answers (it may still be loading the model)."""
        return schemas.HealthResponse(status="ok")

    @app.get(
        "/readyz",
        response_model=schemas.HealthResponse,
        tags=["operations"],
        responses={503: {"model": schemas.HealthResponse}},
    )
    def readyz():
        """Ready: the model is loaded, verified and warmed up, and the service is not shutting down."""
        engine = holder.engine
        if engine is not None and engine.ready:
            return schemas.HealthResponse(
                status="ready", detail=f"{engine.model.info.name} v{engine.model.info.version}"
            )
        detail = (
            f"model failed to load: {holder.failure}"
            if holder.failure
            else ("shutting down" if engine is not None else "loading the model")
        )
        return JSONResponse(schemas.HealthResponse(status="not ready", detail=detail).model_dump(), status_code=503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    )
    def prometheus_metrics() -> Response:
        """Prometheus metrics (names start with xmag_)."""
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(
        "/v1/models",
        response_model=schemas.ModelsResponse,
        tags=["classification"],
        dependencies=[Depends(authorised)],
        responses=ERROR_RESPONSES,
    )
    def models() -> schemas.ModelsResponse:
        """The model being served: tasks and their classes, provenance, and how the encoder backend was chosen."""
        model = holder.require().model
        return schemas.ModelsResponse(
            model=model.info,
            tasks=[schemas.TaskInfo(name=name, class_names=classes) for name, classes in model.tasks.items()],
            tile_size_px=model.spec.tile_size_px,
            target_mpp=model.spec.target_mpp,
            backend_measurements=[schemas.BackendMeasurement(**m) for m in model.backend_measurements],
        )

    @app.post(
        "/v1/classify",
        response_model=schemas.ClassifyResponse,
        tags=["classification"],
        dependencies=[Depends(authorised)],
        responses=ERROR_RESPONSES,
    )
    async def classify(body: schemas.ClassifyRequest, request: Request):
        """Classify one slide: slide-level predictions per task, optionally attention and heatmap links."""
        engine = holder.require()
        job = engine.submit(body.slide_path, body.tasks, fallback_mpp=body.mpp, timeout_s=body.timeout_s)
        waiting = asyncio.wrap_future(job.future)
        # Poll for the client going away, so a viewer that gives up does not keep the encoder busy.
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                job.cancel()
        result: EngineResult = waiting.result()  # raises the job's typed error, mapped by the handler above
        if body.heatmap:
            store.put(result)
        return _classify_response(result, engine, body, str(request.base_url).rstrip("/"))

    @app.get(
        "/v1/results/{result_id}/heatmaps/{task}.png",
        tags=["classification"],
        response_class=Response,
        dependencies=[Depends(authorised)],
        responses={200: {"content": {"image/png": {}}, "description": "PNG heatmap."}, **ERROR_RESPONSES},
    )
    def heatmap_png(result_id: str, task: str) -> Response:
        """The attention of one task over the slide thumbnail (bright = high attention)."""
        return Response(store.heatmap_png(result_id, task), media_type="image/png")

    @app.get(
        "/v1/results/{result_id}/attention/{task}.geojson",
        tags=["classification"],
        response_class=Response,
        dependencies=[Depends(authorised)],
        responses={200: {"content": {"application/geo+json": {}}, "description": "GeoJSON."}, **ERROR_RESPONSES},
    )
    def attention_geojson(result_id: str, task: str) -> Response:
        """Tiles as QuPath detections with the attention as a measurement (level-0 pixel coordinates)."""
        import json

        return Response(json.dumps(store.geojson(result_id, task)), media_type="application/geo+json")

    return app


class _Unauthorised(Exception):
    pass


class _RequestCounter:
    """Counts every answer by route template and status (plain ASGI: BaseHTTPMiddleware would hide disconnects)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The route's template, not the URL: bounded label values, and no slide or result ids in metrics.
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels("rest", endpoint, str(status)).inc()


def _classify_response(result: EngineResult, engine: Engine, body: schemas.ClassifyRequest, base_url: str):
    heatmaps = None
    if body.heatmap:
        heatmaps = {
            task: HeatmapLinks(
                png_url=f"{base_url}/v1/results/{result.job_id}/heatmaps/{task}.png",
                geojson_url=f"{base_url}/v1/results/{result.job_id}/attention/{task}.geojson",
            )
            for task in result.slide.predictions
        }
    return engine.describe(result, return_attention=body.return_attention, heatmaps=heatmaps)


def run_service(
    app: FastAPI, settings: ServiceSettings, say: Callable[[str], None], require_manifest: bool = True
) -> None:
    """Check what can be checked before start (slide roots, reader backend, repository), then serve until SIGTERM.

    Each check raises a clear error instead of a service whose every answer
    would fail; a repository that is there but damaged is reported by /readyz.
    """
    import uvicorn

    missing = [str(root) for root in settings.slide_roots if not root.is_dir()]
    if missing:
        raise ValueError(f"slide root(s) {missing} do not exist or are not directories")
    require_reader_backend(settings.reader_backend)
    if require_manifest and not (Path(settings.model_repo or "") / MANIFEST_FILE).is_file():
        raise ValueError(
            f"{settings.model_repo} is not a model repository (no {MANIFEST_FILE}); build one with `xmag export`"
        )
    grpc_note = f", gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc else ""
    say(
        f"serving REST on http://{settings.host}:{settings.port}{grpc_note} (slide roots: "
        f"{', '.join(map(str, settings.slide_roots))}; API keys: {'required' if settings.api_keys else 'none'}); "
        "GET /readyz turns 200 once the model is warm"
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
