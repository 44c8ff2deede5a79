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
from translator.server.connections import LIFESPAN_KEY
from translator.server.errors import RETRY_AFTER
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
    responses={503: {"model": Health, "description": "Not ready, overloaded or stopping."}},
    summary="Readiness: the model is loaded and warmed up, and the queue has room",
)
async def readyz(state: Service):
    backend, batcher = state.backend, state.batcher
    problem, status = (state.load_error if not backend.loaded else None), "not ready"
    if problem is None and batcher.closing:
        problem, status = "the server is shutting down", "stopping"
    if problem is None and batcher.full:
        problem = f"the queue is full ({batcher.max_queue} requests waiting, --max-queue)"
        status = "overloaded"
    if problem is None:
        problem = await asyncio.get_running_loop().run_in_executor(None, backend.check_ready)
    if problem is None and not backend.loaded:
        problem = "the model is still loading"
    failed = [
        {"version": str(v), "error": message}
        for v, message in sorted(backend.failed_versions.items(), reverse=True)
    ] or None
    if problem is not None:
        body = {"status": status, "error": problem}
        if failed:
            body["failed_versions"] = failed
        return JSONResponse(body, status_code=503, headers=RETRY_AFTER)
    model = {"name": backend.name, "version": str(backend.version)}
    return Health(status="ready", model=model, failed_versions=failed)


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
    """Starts the batcher and loads the backend in the background; stops both at shutdown.

    The lifespan state carries the service (`LIFESPAN_KEY`) for the connection protocols."""
    state: ServiceState = app.state.service
    state.metrics.model_ready.set(int(state.backend.loaded))
    state.batcher.start()
    loader = asyncio.get_running_loop().create_task(state.load())
    try:
        yield {LIFESPAN_KEY: state}
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
        max_wait_busy=settings.max_wait_busy_ms / 1000.0,
        max_queue=settings.max_queue,
        metrics=metrics,
        max_batch_cost=settings.max_batch_cost,
        express_cost=settings.express_cost,
    )
    app = FastAPI(
        title="translator",
        version=_package_version(),
        summary="English to French translation: a REST API and TensorFlow Serving's REST API.",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorBody, "description": "Malformed request."},
            405: {"model": ErrorBody, "description": "Wrong HTTP method."},
            408: {"model": ErrorBody, "description": "Body not received in time."},
            413: {"model": ErrorBody, "description": "Body or cost over a limit."},
            415: {"model": ErrorBody, "description": "Content-Type is not application/json."},
            500: {"model": ErrorBody, "description": "The model cannot be loaded."},
            503: {"model": ErrorBody, "description": "Not ready, overloaded or stopping."},
            504: {"model": ErrorBody, "description": "The request's deadline passed."},
        },
    )
    app.state.service = ServiceState(backend, settings, batcher, metrics)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
    )
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


STARTUP_FAILURE = 3  # uvicorn's exit status for a worker that could not start


def app_from_env() -> FastAPI:
    """The app for uvicorn's worker processes (`--workers N`): settings come from the env.

    A worker whose model cannot be loaded at all exits with uvicorn's start-up failure status,
    which stops the other workers and the parent (`serve` then returns 1)."""
    settings = ServerSettings.model_validate_json(os.environ.get(SETTINGS_ENV, "{}"))
    app = create_app(settings=settings)

    def exit_worker(reason: str) -> None:
        log.critical("cannot serve model %s: %s", settings.name, reason)
        logging.shutdown()
        os._exit(STARTUP_FAILURE)

    app.state.service.on_fatal = exit_worker
    return app


def uvicorn_config(app, settings: ServerSettings, host: str, port: int, **options):
    """uvicorn's config for the service: its HTTP protocol (header deadline, connection cap,
    shutdown passed on to the service) and the graceful-shutdown timeout."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # By name: `--workers` processes import it (and TensorFlow) only once they have
        # started answering uvicorn's health checks, which a slow import would fail.
        http="translator.server.connections:HTTPProtocol",
        timeout_graceful_shutdown=settings.shutdown_timeout,
        **options,
    )


def uvicorn_server(app: FastAPI, settings: ServerSettings, host: str, port: int, **options):
    """A `uvicorn.Server` running `app` (what `serve` runs; tests run it in a thread). It stops
    by itself when the model cannot be loaded at all."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, settings, host, port, **options))

    def stop(reason: str) -> None:
        log.critical("cannot serve model %s: %s", settings.name, reason)
        server.should_exit = True

    app.state.service.on_fatal = stop
    return server


def serve(
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    access_log: bool = False,
) -> int:
    """Runs the service with uvicorn until SIGINT/SIGTERM (what `translator serve` calls).

    Returns 1 when no version of the model could be loaded (the reason is logged), else 0.
    With `PROMETHEUS_MULTIPROC_DIR` set, `/metrics` reports every worker of `--workers N`
    together; the samples a previous run left in that directory are removed first.
    """
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
    common = dict(access_log=access_log, log_level="info")
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        config = uvicorn_config(
            "translator.server:app_from_env", settings, host, port, factory=True,
            workers=workers, **common,
        )  # fmt: skip
        sock = config.bind_socket()
        supervisor = Multiprocess(config, sockets=[sock])
        try:
            supervisor.run()
        finally:
            sock.close()
        return 1 if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0
    app = create_app(settings=settings)
    server = uvicorn_server(app, settings, host, port, **common)
    server.run()
    return 1 if app.state.service.fatal else 0
