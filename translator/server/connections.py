"""HTTP connections on uvicorn: a deadline for request headers, a cap on open connections, and
the start of a graceful shutdown passed on to the service.

uvicorn bounds how long an idle keep-alive connection stays open (`timeout_keep_alive`) and the
size of incomplete headers (h11), but not how long a client may take to send its headers: a
client that sends half a request line and stalls would hold its connection for good. The
protocol classes here close a connection whose next request's headers are not complete within
`header_timeout` seconds, and answer a connection beyond `max_connections` with a 503 (with
Retry-After) and close it. The request body's deadline is `BodyLimitMiddleware`'s.

They read the service's settings from the app's lifespan state (`LIFESPAN_KEY`), so they work
in every `--workers` process; without that state they behave as uvicorn's own.
"""

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

LIFESPAN_KEY = "translator.service"  # the ServiceState in the lifespan state


class _Deadlines:
    """Mixed into uvicorn's HTTP protocol classes (httptools' or h11's)."""

    _header_timer: asyncio.TimerHandle | None = None

    def _service(self):
        return getattr(self, "app_state", {}).get(LIFESPAN_KEY)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        service = self._service()
        if service is None:
            return
        limit = service.settings.max_connections
        if len(self.connections) > limit:
            body = json.dumps(
                {"error": f"too many open connections (the limit is {limit}): retry later"}
            ).encode()
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            transport.close()
            return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers have their own deadline

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        service = self._service()
        if service is not None:
            service.begin_shutdown()  # queued work: 503 now, not after the shutdown timeout
        super().shutdown()

    def _arm_header_timer(self) -> None:
        service = self._service()
        if service is None:
            return
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(
            service.settings.header_timeout, self._header_timeout
        )

    def _header_timeout(self) -> None:
        self._header_timer = None
        cycle = self.cycle
        waiting = cycle is None or cycle.response_complete  # no request in progress
        if waiting and not self.transport.is_closing():
            self.transport.close()


class H11HTTPProtocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the service's connection deadlines and limit."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: h11 then
    HTTPProtocol = H11HTTPProtocol
else:

    class HttpToolsHTTPProtocol(_Deadlines, HttpToolsProtocol):
        """uvicorn's httptools protocol with the service's connection deadlines and limit."""

    HTTPProtocol = HttpToolsHTTPProtocol
