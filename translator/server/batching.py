"""Micro-batching: concurrent requests with equal options become one blocking model call.

The batcher knows texts, option keys and row-aligned outputs, nothing of signatures: what the
outputs mean (and any padding to cut from a request's rows) is the caller's business.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from translator.server.errors import ApiError, BackendError, ModelInputError
from translator.server.metrics import Metrics

log = logging.getLogger("translator.server")


@dataclass
class _Item:
    key: tuple
    texts: list[str]
    future: asyncio.Future


class MicroBatcher:
    """Merges concurrent requests with equal decoding options into one model call.

    One worker task takes the oldest waiting request, adds every waiting request with the same
    key (signature, version, scalar inputs) while the batch holds at most `max_batch_size`
    texts, waits up to `max_wait` seconds for more when the queue runs dry, and runs the
    blocking model call on a single thread. Each request gets back only its own rows, in order.
    A request is never split; one larger than `max_batch_size` runs alone.

    If a merged call fails, each request is retried alone, so one bad request cannot fail the
    others.

    Args:
        run: The blocking model call, `run(signature, version, texts, scalars) -> outputs`,
            every output an array with one row per text (or a scalar).
        max_batch_size: Texts per call.
        max_wait: Seconds to wait for more requests when the queue runs dry.
        max_queue: Requests waiting before `submit` refuses with a 503.
        metrics: Where batch sizes, model-call durations, errors and the queue depth go.
    """

    def __init__(
        self,
        run: Callable[[str, Any, list[str], dict], dict],
        max_batch_size: int = 32,
        max_wait: float = 0.002,
        max_queue: int = 256,
        metrics: Metrics | None = None,
    ):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._items: deque[_Item] = deque()
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self._items)

    def _queue_changed(self) -> None:
        self.metrics.queue_depth.set(len(self._items))

    def start(self) -> None:
        self._event = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for item in self._items:
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the server is shutting down"))
        self._items.clear()
        self._queue_changed()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        """Queues one request and returns its rows of the outputs."""
        if self._task is None or self._task.done():
            raise ApiError(503, "the model worker is not running")
        if len(self._items) >= self.max_queue:
            self.metrics.rejected_overload.inc()
            raise ApiError(
                503, f"the server is overloaded ({self.max_queue} requests waiting): retry later"
            )
        key = (signature, version, tuple(sorted(scalars.items())))
        item = _Item(key, list(texts), asyncio.get_running_loop().create_future())
        self._items.append(item)
        self._queue_changed()
        self._event.set()
        return await item.future

    def _take(self, key: tuple, room: int) -> list[_Item]:
        taken, kept = [], deque()
        while self._items:
            item = self._items.popleft()
            if item.key == key and len(item.texts) <= room:
                taken.append(item)
                room -= len(item.texts)
            else:
                kept.append(item)
        self._items = kept
        self._queue_changed()
        return taken

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._event.clear()
                await self._event.wait()
            first = self._items.popleft()
            self._queue_changed()
            batch = [first]
            room = self.max_batch_size - len(first.texts)
            deadline = loop.time() + self.max_wait
            while room > 0:
                more = self._take(first.key, room)
                batch += more
                room -= sum(len(item.texts) for item in more)
                timeout = deadline - loop.time()
                if room <= 0 or timeout <= 0:
                    break
                if not more:
                    self._event.clear()
                    try:
                        await asyncio.wait_for(self._event.wait(), timeout)
                    except TimeoutError:
                        pass
            batch = [item for item in batch if not item.future.done()]  # drop cancelled ones
            if batch:
                try:
                    await self._run_batch(loop, batch)
                except Exception as e:  # noqa: BLE001 - never let one batch stop the worker
                    log.exception("model batch failed")
                    _fail(batch, e)

    async def _run_batch(self, loop, batch: list[_Item]) -> None:
        signature, version, scalars = batch[0].key
        texts = [text for item in batch for text in item.texts]
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(
                self.executor, self._run, signature, version, texts, dict(scalars)
            )
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1 and isinstance(e, ModelInputError):
                # One request's input broke the merged call: find it, every request alone.
                for item in batch:
                    await self._run_batch(loop, [item])
                return
            # Anything else (the backend is down, a timeout) would fail every request alike.
            self.metrics.model_errors.inc()
            _fail(batch, e)
            return
        rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in outputs.items()}
        if any(n is not None and n != len(texts) for n in rows.values()):
            self.metrics.model_errors.inc()
            message = f"the model returned {rows} rows for {len(texts)} texts: outputs do not match"
            _fail(batch, BackendError(502, message))
            return
        self.metrics.observe_batch(len(texts), len(batch), time.perf_counter() - started)
        start = 0
        for item in batch:
            stop = start + len(item.texts)
            if not item.future.done():
                item.future.set_result({k: v[start:stop] for k, v in outputs.items()})
            start = stop


def _fail(batch: list[_Item], error: Exception) -> None:
    """Hands `error` to every request of `batch` still waiting."""
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
