"""What the routes share: the backend, the settings, the batcher and the metrics of one app,
reached through `request.app.state.service` (the `Service` dependency), and what every model
request goes through: admission by cost, a deadline, the batcher."""

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from translator.server.backends import Backend, public_reason, trim_padding
from translator.server.batching import MicroBatcher
from translator.server.errors import ApiError, BackendError, ModelInputError, ModelLoadError
from translator.server.metrics import Metrics
from translator.server.settings import ServerSettings

log = logging.getLogger("translator.server")


@dataclass
class ServiceState:
    backend: Backend
    settings: ServerSettings
    batcher: MicroBatcher
    metrics: Metrics
    load_error: str | None = None
    # No version of the model loads (and retrying cannot help): `on_fatal(reason)` is told, so
    # that `translator serve` exits instead of answering errors forever.
    fatal: bool = False
    on_fatal: Callable[[str], None] | None = None

    @property
    def ready(self) -> bool:
        return self.backend.loaded

    def require_ready(self) -> None:
        if self.backend.loaded:
            return
        if self.fatal:  # no retry can succeed: not a 503
            raise ApiError(500, f"model {self.backend.name} cannot be served: {self.load_error}")
        reason = self.load_error or "the model is still loading"
        raise ApiError(503, f"not ready: {reason}")

    def admit(
        self,
        signature: str,
        texts: list[str],
        scalars: dict,
        alignments: int = 0,
        padded: bool = False,
    ) -> list[int]:
        """Each text's cost in decoding steps (beam size x its maximum output length), or a
        413 naming the limit a request is over and what it costs.

        Args:
            alignments: Hypotheses per text whose attention weights the response carries.
            padded: Whether those weights are padded to the longest text (`:predict`) rather
                than cut to each text's own lengths (`/v1/translate`).
        """
        limits, lengths = self.settings, self.backend.lengths
        sources = lengths.source_lengths(texts)
        outputs = [lengths.output_length(s) for s in sources]
        beam = int(scalars.get("beam_size") or self.backend.defaults["beam_size"])
        costs = [beam * t for t in outputs]
        worst = max(costs, default=0)
        if worst > limits.max_batch_cost:
            i = costs.index(worst)
            self._refuse(
                "max_batch_cost",
                f"text {i} alone costs {worst} decoding steps (beam size {beam} x up to "
                f"{outputs[i]} output subwords), more than one model call may "
                f"(max_batch_cost, {limits.max_batch_cost}): shorten it or use a smaller "
                "beam_size",
            )
        total = sum(costs)
        if total > limits.max_request_cost:
            self._refuse(
                "max_request_cost",
                f"this request costs {total} decoding steps (its texts x beam size {beam} x "
                f"their maximum output lengths), over the limit of {limits.max_request_cost} "
                "per request (max_request_cost): send fewer or shorter texts, or use a smaller "
                "beam_size",
            )
        if alignments:
            if padded:
                values = len(texts) * alignments * max(outputs) * max(sources)
            else:
                values = alignments * sum(t * s for t, s in zip(outputs, sources, strict=True))
            if values > limits.max_alignment_values:
                self._refuse(
                    "max_alignment_values",
                    f"the alignments asked for hold up to {values} alignment values "
                    f"({alignments} hypotheses per text x output x source subwords), over the "
                    f"limit of {limits.max_alignment_values} (max_alignment_values): send fewer "
                    "or shorter texts, ask for fewer hypotheses, or leave the alignments out "
                    '(return_alignment: false; on :predict, an "output_filter" without '
                    '"alignments")',
                )
        return costs

    def _refuse(self, limit: str, message: str) -> None:
        self.metrics.rejected_budget.labels(limit).inc()
        raise ApiError(413, message)

    async def predict(
        self,
        signature: str,
        version,
        texts: list[str],
        scalars: dict,
        *,
        alignments: int = 0,
        padded: bool = False,
        timeout: float | None = None,
    ) -> dict:
        """One request's outputs: admitted by cost (`admit`), through the batcher within its
        deadline (`timeout`, at most --request-timeout), with padding from other requests cut
        off; the backend's errors as ApiErrors."""
        costs = self.admit(signature, texts, scalars, alignments, padded)
        limit = self.settings.request_timeout
        timeout = limit if timeout is None else min(timeout, limit)
        # Inputs the signature takes per text (a length penalty, in exports that take one per
        # text) do not split the batcher's calls: requests that differ in them still merge.
        info = self.backend.signatures().get(signature)
        per_row = info.row_inputs if info is not None else frozenset()
        rows = {k: v for k, v in scalars.items() if k in per_row}
        scalars = {k: v for k, v in scalars.items() if k not in per_row}
        try:
            outputs = await self.batcher.submit(
                signature, version, texts, scalars, costs=costs, timeout=timeout, rows=rows
            )
        except ModelInputError as e:
            raise ApiError(400, str(e)) from e
        except BackendError as e:
            raise ApiError(e.status, e.message) from e
        return trim_padding(outputs)

    async def off_loop(self, function, *args):
        """`function(*args)` on a worker thread (formatting and encoding a response), so a
        large answer does not hold up the event loop (health checks, other requests)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(function, *args))

    async def call_backend(self, method, *args):
        """A blocking backend method (status, metadata, readiness) on a thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, method, *args)
        except BackendError as e:
            raise ApiError(e.status, e.message) from e

    def begin_shutdown(self) -> None:
        """The server is stopping: queued work is answered 503 now, new work refused."""
        self.batcher.begin_shutdown()

    async def load(self) -> None:
        """Loads the backend on the model thread; retries while a remote one is unreachable.
        When a local export cannot be loaded at all, `on_fatal` is called with the reason."""
        loop = asyncio.get_running_loop()
        while not self.backend.loaded:
            try:
                await loop.run_in_executor(self.batcher.executor, self.backend.load)
                self.load_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported by /readyz
                log.error("cannot load the model: %s", e)  # the logs may name paths
                self.load_error = _client_reason(e, self.settings.model)
                if not self.backend.retry_load:
                    self.fatal = True
                    self._report_versions()
                    if self.on_fatal is not None:
                        self.on_fatal(self.load_error)
                    return
                await asyncio.sleep(2.0)
        self._report_versions()
        self.metrics.model_ready.set(1)

    def _report_versions(self) -> None:
        for version, message in self.backend.failed_versions.items():
            log.warning(
                "model %s version %s is not served: %s", self.backend.name, version, message
            )
            self.metrics.version_load_failed.labels(str(version)).set(1)


def _client_reason(error: Exception, model_path) -> str:
    """A load error in words fit for clients: no filesystem paths."""
    if isinstance(error, ModelLoadError):
        return str(error)
    if isinstance(error, BackendError):
        return f"{type(error).__name__}: {error.message}"
    return public_reason(error, model_path)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_state)]
