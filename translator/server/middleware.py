"""The HTTP layer around the routes: body size limit, request metrics, the JSON body check
(a dependency of the POST routes) and the exception handlers that give every error as JSON."""

import asyncio
import contextlib
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from translator.server.errors import ApiError, error_response
from translator.server.metrics import Metrics

log = logging.getLogger("translator.server")

# nginx's status for a request whose client disconnected before the response: recorded in the
# metrics (never sent), so that clients going away do not look like server errors.
CLIENT_CLOSED_REQUEST = 499


class RequestMetricsMiddleware:
    """Records every request's route, method, status and duration (outermost middleware).

    A request still running when the server stops waiting for it (uvicorn cancels it after
    --shutdown-timeout) is answered 503 with Retry-After, if nothing was sent yet.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [None]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_status)
            failed = False
        except asyncio.CancelledError:
            if status[0] is not None:
                raise
            response = error_response(
                503, "the server is shutting down: retry later", headers={"Connection": "close"}
            )
            await response(scope, _no_receive, send_status)
            failed = False
        finally:
            if status[0] is None:  # no response: the app failed, or the client left mid-body
                status[0] = 500 if failed else CLIENT_CLOSED_REQUEST
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                label, scope["method"], status[0], time.perf_counter() - started
            )


class BodyLimitMiddleware:
    """Reads a request body whole before the app sees it: over `max_body_bytes` it is refused
    (413), and a body that does not arrive within `body_timeout` seconds gets a 408 and the
    connection is closed (a client trickling its body holds nothing for long).

    While the app runs, the middleware listens for the client going away: then the app is
    cancelled, so work queued for a client that left is dropped (and counted as 499), not run.
    A client that leaves mid-body gets no response (and the app is not called).
    """

    def __init__(self, app, max_body_bytes: int, body_timeout: float | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await self._read_body(scope, receive, send)
        except TimeoutError:
            message = f"the request body was not received within {self.body_timeout:g} s"
            response = error_response(408, message, headers={"Connection": "close"})
            await response(scope, _no_receive, send)
            return
        if body is None:
            return
        await self._run(scope, body, receive, send)

    async def _run(self, scope, body: bytes, receive, send) -> None:
        """The app with the body replayed, cancelled if the client disconnects meanwhile."""
        delivered, finished = False, False
        listener = asyncio.ensure_future(_disconnect(receive))

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.shield(listener)

        async def sending(message):
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        app = asyncio.ensure_future(self.app(scope, replay, sending))
        try:
            await asyncio.wait({app, listener}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not finished:
                app.cancel()  # the client left: drop its queued work
                with contextlib.suppress(asyncio.CancelledError):
                    await app
                return
            await app
        finally:
            for task in (app, listener):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _read_body(self, scope, receive, send) -> bytes | None:
        limit = self.max_body_bytes
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await self._too_large(send, scope)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, scope)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send, scope) -> None:
        response = error_response(
            413, f"the request body is larger than the limit of {self.max_body_bytes} bytes"
        )
        await response(scope, _no_receive, send)


async def _disconnect(receive) -> dict:
    """Waits for the client to go away (the body has been read: nothing else is to come)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


async def _no_receive():
    return {"type": "http.disconnect"}


# -- the JSON body -----------------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def json_object(content_type: str | None, body: bytes) -> dict:
    """A POST body as a JSON object, or the ApiError saying what is wrong with it: a content
    type other than JSON (415), no body, bytes that are not UTF-8, malformed JSON, or JSON that
    is not an object (400)."""
    if content_type is None or not _is_json(content_type):
        raise ApiError(415, f"Content-Type must be application/json, got {content_type!r}")
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from e
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"JSON Parse error: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise ApiError(400, "JSON Parse error: nested too deeply") from e
    except ValueError as e:  # e.g. an integer longer than Python's 4,300 digits
        raise ApiError(400, f"JSON Parse error: {e}") from e
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return parsed


async def require_json_object(request: Request) -> None:
    """Dependency of the POST routes: the body must be a JSON object (415 or 400 otherwise).

    FastAPI parses a JSON body before it solves dependencies and refuses what it cannot parse
    (a 422 or a bare 400); the exception handlers below word those refusals with this same
    check, so a malformed body gets the same answer whichever of the two sees it first.
    """
    json_object(request.headers.get("content-type"), await request.body())


async def _body_parse_error(request: Request) -> ApiError | None:
    """Why FastAPI could not parse this POST body as JSON, in this service's words."""
    if request.method != "POST":
        return None
    try:
        json_object(request.headers.get("content-type"), await request.body())
    except ApiError as e:
        return e
    return None


# -- exception handlers ------------------------------------------------------------------------


def add_exception_handlers(app: FastAPI) -> None:
    """Every error as `{"error": ...}`: ours, Starlette's 404/405, validation and the rest."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and (problem := await _body_parse_error(request)):
            return await api_error(request, problem)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such resource: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}" + (
                f" (allowed: {allowed})" if allowed else ""
            )
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors) and (
            problem := await _body_parse_error(request)
        ):
            return await api_error(request, problem)
        details = [_describe(error) for error in errors]
        summary = "; ".join(
            f"{d['loc']}: {d['msg']}" if d["loc"] else d["msg"] for d in details[:5]
        )
        if request.url.path.startswith("/v1/models/"):
            return error_response(400, summary)  # TF Serving answers InvalidArgument: 400
        return error_response(422, f"invalid request: {summary}", details)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")


def _describe(error: dict) -> dict:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    elif error.get("type") == "missing" and loc == []:
        message = "the request body is missing"
    return {"loc": ".".join(loc), "msg": message}
