"""What the routes share: the backend, the settings, the batcher and the metrics of one app,
reached through `request.app.state.service` (the `Service` dependency)."""

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from translator.server.backends import Backend, trim_padding
from translator.server.batching import MicroBatcher
from translator.server.errors import ApiError, BackendError, ModelInputError
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

    @property
    def ready(self) -> bool:
        return self.backend.loaded

    def require_ready(self) -> None:
        if not self.backend.loaded:
            reason = self.load_error or "the model is still loading"
            raise ApiError(503, f"not ready: {reason}", headers={"Retry-After": "1"})

    async def predict(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        """One request's outputs through the batcher, with padding from its batch cut off;
        the backend's errors as ApiErrors."""
        try:
            outputs = await self.batcher.submit(signature, version, texts, scalars)
        except ModelInputError as e:
            raise ApiError(400, str(e)) from e
        except BackendError as e:
            raise ApiError(e.status, e.message) from e
        return trim_padding(outputs)

    async def call_backend(self, method, *args):
        """A blocking backend method (status, metadata, readiness) on a thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, method, *args)
        except BackendError as e:
            raise ApiError(e.status, e.message) from e

    async def load(self) -> None:
        """Loads the backend on the model thread; retries while a remote one is unreachable."""
        loop = asyncio.get_running_loop()
        while not self.backend.loaded:
            try:
                await loop.run_in_executor(self.batcher.executor, self.backend.load)
                self.load_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reported by /readyz
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("cannot load the model: %s", self.load_error)
                if not self.backend.retry_load:
                    return
                await asyncio.sleep(2.0)
        self.metrics.model_ready.set(1)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_state)]
