"""The application: assembly (`create_app`), its lifespan, health and metrics routes, the
browser page, and `serve` (what `translator serve` runs on uvicorn)."""

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from translator.files import version_dirs
from translator.server import tfserving
from translator.server.backends import Backend, create_backend
from translator.server.batching import MicroBatcher
from translator.server.metrics import CONTENT_TYPE, Metrics, multiprocess_dir
from translator.server.middleware import (
    BodyLimitMiddleware,
    RequestMetricsMiddleware,
    add_exception_handlers,
)
from translator.server.protocol import ErrorBody, Health
from translator.server.service import Service, ServiceState
from translator.server.settings import SETTINGS_ENV, ServerSettings
from translator.server.translate import translate_router

log = logging.getLogger("translator.server")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# -- health and metrics ------------------------------------------------------------------------

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the process is up",
)
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "Not ready."}},
    summary="Readiness: the model is loaded and warmed up",
)
async def readyz(state: Service):
    backend = state.backend
    problem = state.load_error if not backend.loaded else None
    if problem is None:
        problem = await asyncio.get_running_loop().run_in_executor(None, backend.check_ready)
    if problem is not None:
        return JSONResponse({"status": "not ready", "error": problem}, status_code=503)
    return {"status": "ready", "model": {"name": backend.name, "version": str(backend.version)}}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(state: Service):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


# -- the page ----------------------------------------------------------------------------------


async def index():
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return {"service": "translator", "docs": "/docs", "translate": "POST /v1/translate"}


def _add_static(app: FastAPI) -> None:
    """The browser page: `translator/static/index.html` at `/`, its files under `/static/` and
    also at the top level (`/app.js`), so the page may refer to them relatively."""
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    if not STATIC_DIR.is_dir():
        return
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            app.add_api_route(
                f"/{path.name}",
                _file_route(path),
                methods=["GET", "HEAD"],
                name=f"static:{path.name}",
                include_in_schema=False,
            )


def _file_route(path: Path):
    async def static_file():
        return FileResponse(path)

    return static_file


# -- the app -----------------------------------------------------------------------------------


def _document_model_name(app: FastAPI, name: str) -> None:
    """The served model's name as the example of every `{name}` path parameter in the schema."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operations in build()["paths"].values():
                for operation in operations.values():
                    for param in operation.get("parameters", []):
                        if param["in"] == "path" and param["name"] == "name":
                            param["schema"]["examples"] = [name]
        return app.openapi_schema

    app.openapi = openapi


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Starts the batcher and loads the backend in the background; stops both at shutdown."""
    state: ServiceState = app.state.service
    state.metrics.model_ready.set(int(state.backend.loaded))
    state.batcher.start()
    loader = asyncio.get_running_loop().create_task(state.load())
    try:
        yield
    finally:
        loader.cancel()
        await state.batcher.stop()
        state.backend.close()
        state.metrics.close()


def create_app(backend: Backend | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving `backend` (default: from `settings`).

    The backend is loaded (and warmed up) in the background after start-up unless it is
    loaded already: `/healthz` answers at once, `/readyz` and the model routes once loaded.
    """
    settings = settings or ServerSettings()
    backend = backend or create_backend(settings)
    metrics = Metrics()
    batcher = MicroBatcher(
        backend.predict,
        max_batch_size=settings.max_batch_size,
        max_wait=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        metrics=metrics,
    )
    app = FastAPI(
        title="translator",
        version=_package_version(),
        summary="English to French translation: a REST API and TensorFlow Serving's REST API.",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorBody, "description": "Malformed request."},
            405: {"model": ErrorBody, "description": "Wrong HTTP method."},
            413: {"model": ErrorBody, "description": "Body over the size limit."},
            415: {"model": ErrorBody, "description": "Content-Type is not application/json."},
            503: {"model": ErrorBody, "description": "Model not ready, or overloaded."},
        },
    )
    app.state.service = ServiceState(backend, settings, batcher, metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: times it all
    add_exception_handlers(app)
    app.include_router(translate_router(settings))
    app.include_router(tfserving.router)
    app.include_router(router)
    _add_static(app)
    _document_model_name(app, settings.name)
    return app


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("translator")
    except Exception:  # noqa: BLE001
        return "0"


# -- running -----------------------------------------------------------------------------------


def check_export(path) -> None:
    """Fails early, without loading TensorFlow, when `path` holds no SavedModel version."""
    path = Path(path)
    hint = (
        "write one with `translator export --model RUN_DIR --out DIR`, or pass --backend URL to "
        "forward to TF Serving"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"no model export at {path}: {hint}")
    if (path / "saved_model.pb").is_file():
        return
    if not any((p / "saved_model.pb").is_file() for _, p in version_dirs(path)):
        raise FileNotFoundError(f"{path} holds no SavedModel version (1/, 2/, ...): {hint}")


def app_from_env() -> FastAPI:
    """The app for uvicorn's worker processes (`--workers N`): settings come from the env."""
    settings = ServerSettings.model_validate_json(os.environ.get(SETTINGS_ENV, "{}"))
    return create_app(settings=settings)


def serve(
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    access_log: bool = False,
) -> int:
    """Runs the service with uvicorn until SIGINT/SIGTERM (what `translator serve` calls).

    With `PROMETHEUS_MULTIPROC_DIR` set, `/metrics` reports every worker of `--workers N`
    together; the samples a previous run left in that directory are removed first.
    """
    import uvicorn

    if not settings.backend:
        check_export(settings.model)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines", host)
    log.info(
        "serving model %s from %s on http://%s:%d (%d worker(s))",
        settings.name,
        settings.backend or settings.model,
        host,
        port,
        workers,
    )
    if multiprocess_dir():
        for stale in Path(multiprocess_dir()).glob("*.db"):  # a previous run's samples
            stale.unlink()
    common = dict(host=host, port=port, access_log=access_log, log_level="info")
    if workers > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run("translator.server:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings=settings), **common)
    return 0
