"""Micro-batching: concurrent requests with equal options become one blocking model call, and
a large request becomes several.

The batcher knows texts, their costs, option keys, deadlines and row-aligned outputs, nothing of
signatures: what the outputs mean (and any padding to cut from a request's rows) is the caller's
business.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from translator.server.errors import ApiError, BackendError, ModelInputError
from translator.server.metrics import Metrics

log = logging.getLogger("translator.server")


@dataclass(eq=False)
class _Request:
    # (signature, version, scalar inputs, names of the per-row inputs): what may share a call
    key: tuple
    texts: list[str]
    costs: list[int]
    chunks: list[tuple[int, int]]  # the [start, stop) rows of each of its model calls
    future: asyncio.Future
    timeout: float | None
    deadline: float | None  # event-loop time
    queued_at: float = 0.0  # event-loop time of its submission
    parts: list[dict] = field(default_factory=list)  # outputs of the chunks done so far
    # Inputs that may differ between the requests of one call: name -> one value for all its
    # texts, or a list of one value per text.
    rows: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Item:
    """One chunk of a request: waiting for, or in, a model call."""

    request: _Request
    start: int
    stop: int

    @property
    def key(self) -> tuple:
        return self.request.key

    @property
    def texts(self) -> list[str]:
        return self.request.texts[self.start : self.stop]

    @property
    def cost(self) -> int:
        return sum(self.request.costs[self.start : self.stop])

    @property
    def live(self) -> bool:
        return not self.request.future.done()

    def row_values(self, name: str) -> list:
        """The per-row input `name`, one value per text of this chunk."""
        value = self.request.rows[name]
        if isinstance(value, list | tuple):
            return list(value[self.start : self.stop])
        return [value] * (self.stop - self.start)


class MicroBatcher:
    """Merges concurrent requests with equal decoding options into model calls of bounded size,
    and splits requests larger than one call.

    A request is cut into chunks of at most `max_batch_size` texts and `max_batch_cost` cost;
    only its first chunk waits in the queue, and each next one joins the back of the queue when
    the previous is done, so a short request that arrives behind a large one waits for one
    chunk, not for all of them. One worker task takes the oldest waiting chunk, adds waiting
    chunks with the same key (signature, version, scalar inputs; inputs the model takes per row,
    such as a length penalty per text, may differ) while the call stays within both limits,
    waits for more when the queue runs dry, and runs the blocking model call on a single
    thread. Each request gets back its own rows, in order.

    **The wait adapts to the load.** After a call that served one request (a lone client), the
    next call waits at most `max_wait` for company, so a single client pays almost nothing.
    After a call that merged several requests (concurrent clients, whose next requests are on
    their way), it waits until it has as many requests as that call merged plus those that were
    already queued when it ended (other clients: counting only the former, two groups of
    clients would take turns, each call merging half of them), the call is full,
    a waiting request cannot join it (other decoding options), or `max_wait_busy` after that
    call ended: the clients just answered come back within a few milliseconds, and one call for
    all of them costs far less than one call each (TF Serving's `batch_timeout_micros`, applied
    only under load). A request arriving later than that pays `max_wait` again.

    **The express lane.** While a heavy call runs (one with a chunk costing more than
    `express_cost`: a big request, not many cheap ones merged), a second thread runs calls of
    the cheap chunks waiting (each at most `express_cost`, merged up to that cost), beside it:
    a short request waits for no heavy request, only shares the CPU with it (as Triton's
    priority levels and a second model instance would). When no heavy call runs, there is one
    call at a time, as without the lane: a call merged from many cheap requests is the
    batching that buys throughput, and a second call beside it would halve both (32 clients of
    one sentence each, 2-core CPU, in one run: 56.0 requests/s when such calls counted as heavy,
    64.8 with the lane off). The price: requests each just under `express_cost`, merged into a
    call of up to `max_batch_cost`, keep the lane shut, and a short request waits for that call,
    as it would behind as many clients' ordinary requests.

    If a merged call fails on one request's input, each request is retried alone, so one bad
    request cannot fail the others. A request whose deadline passes gets a 504 at once; its
    chunks still queued are dropped, never run. A request whose caller is cancelled (its
    client left) is dropped from the queue.

    Args:
        run: The blocking model call, `run(signature, version, texts, scalars) -> outputs`,
            every output an array with one row per text (or a scalar).
        max_batch_size: Texts per call.
        max_wait: Seconds to wait for more requests when the queue runs dry, after a call of
            one request.
        max_wait_busy: The same after a call that merged several requests (None: `max_wait`).
        max_queue: Requests waiting before `submit` refuses with a 503.
        metrics: Where batch sizes, model-call durations, errors and the queue depth go.
        max_batch_cost: Cost per call (None: no limit); a text costing more runs alone.
        express_cost: A call with a chunk costing more is heavy: while one runs, cheap chunks
            run beside it (None or 0: one call at a time, always).
    """

    def __init__(
        self,
        run: Callable[[str, Any, list[str], dict], dict],
        max_batch_size: int = 32,
        max_wait: float = 0.002,
        max_queue: int = 256,
        metrics: Metrics | None = None,
        max_batch_cost: int | None = None,
        express_cost: int | None = None,
        max_wait_busy: float | None = None,
    ):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_cost = max_batch_cost
        self.max_wait = max_wait
        self.max_wait_busy = max_wait if max_wait_busy is None else max(max_wait, max_wait_busy)
        self._ended = 0.0  # when it ended (loop time)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.express_cost = express_cost or None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.express_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-express")
            if self.express_cost
            else None
        )
        self._items: deque[_Item] = deque()
        self._running: list[_Item] = []
        self._express_running: list[_Item] = []
        self._heavy = False  # the main lane runs a chunk costing more than express_cost
        self._last: set[int] = set()  # ids of the requests of the main lane's last call
        self._event: asyncio.Event | None = None
        self._express_event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._express_task: asyncio.Task | None = None
        self.closing = False

    @property
    def depth(self) -> int:
        """Requests waiting for a model call (not counting the one running)."""
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.max_queue

    def _queue_changed(self) -> None:
        self.metrics.queue_depth.set(len(self._items))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._express_event = asyncio.Event()
        self._task = loop.create_task(self._worker())
        if self.express_executor is not None:
            self._express_task = loop.create_task(self._express_worker())

    def begin_shutdown(self) -> None:
        """Refuses new work and answers every queued request 503 (Retry-After) at once; the
        model call that is running finishes, and its requests get their answers."""
        if self.closing:
            return
        self.closing = True
        error = ApiError(503, "the server is shutting down: retry on another instance")
        for item in self._items:
            _settle(item.request, error)
        self._items.clear()
        self._queue_changed()

    async def stop(self) -> None:
        """Stops the worker; every request still waiting (queued or in a model call) gets 503."""
        self.begin_shutdown()
        for task in (self._task, self._express_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._express_task = None
        error = ApiError(503, "the server is shutting down")
        for item in [*self._items, *self._running, *self._express_running]:
            _settle(item.request, error)
        self._items.clear()
        self._running, self._express_running = [], []
        self._queue_changed()
        for executor in (self.executor, self.express_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self,
        signature: str,
        version,
        texts: list[str],
        scalars: dict,
        costs: list[int] | None = None,
        timeout: float | None = None,
        rows: dict | None = None,
    ) -> dict:
        """Queues one request and returns its rows of the outputs.

        Args:
            scalars: Inputs that requests sharing a call must agree on.
            costs: Each text's cost (what `max_batch_cost` bounds); default 0 each.
            timeout: Seconds until the request's deadline: then it is answered 504.
            rows: Inputs the model takes per text (name -> one value, or a list of one per
                text): requests that differ in them still share a call, which gets one value
                when they all agree and a list of one per text otherwise.
        """
        if self.closing:
            raise ApiError(503, "the server is shutting down: retry on another instance")
        if self._task is None or self._task.done():
            raise ApiError(503, "the model worker is not running")
        if len(self._items) >= self.max_queue:
            self.metrics.rejected_overload.inc()
            raise ApiError(
                503, f"the server is overloaded ({self.max_queue} requests waiting): retry later"
            )
        loop = asyncio.get_running_loop()
        texts = list(texts)
        costs = list(costs) if costs is not None else [0] * len(texts)
        rows = dict(rows or {})
        for name, value in rows.items():
            if isinstance(value, list | tuple) and len(value) != len(texts):
                raise ValueError(f"{name} has {len(value)} values for {len(texts)} texts")
        request = _Request(
            key=(signature, version, tuple(sorted(scalars.items())), tuple(sorted(rows))),
            rows=rows,
            texts=texts,
            costs=costs,
            chunks=split_rows(costs, self.max_batch_size, self.max_batch_cost),
            future=loop.create_future(),
            timeout=timeout,
            deadline=None if timeout is None else loop.time() + timeout,
            queued_at=loop.time(),
        )
        self._enqueue(_Item(request, *request.chunks[0]))
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except TimeoutError:
            self._expire(request)
            return request.future.result()  # the 504, unless the answer came at that instant
        except asyncio.CancelledError:  # the caller went away (its client disconnected)
            if not request.future.done():
                request.future.cancel()
            self._drop(request)
            raise

    def _enqueue(self, item: _Item) -> None:
        self._items.append(item)
        self._queue_changed()
        self._event.set()
        self._express_event.set()

    def _drop(self, request: _Request) -> None:
        """Removes a request's queued chunk (its client left before it ran)."""
        kept = deque(item for item in self._items if item.request is not request)
        if len(kept) != len(self._items):
            self.metrics.abandoned.inc()
            self._items = kept
            self._queue_changed()

    def _expire(self, request: _Request) -> None:
        """Answers 504 for a request whose deadline passed (once)."""
        if request.future.done():
            return
        self.metrics.deadline_exceeded.inc()
        request.future.set_exception(
            ApiError(
                504,
                f"the request's deadline of {request.timeout:g} s passed before its "
                "translation was done: retry with fewer texts, a smaller beam_size or a "
                "longer timeout (--request-timeout is the longest)",
            )
        )

    def _usable(self, item: _Item, now: float) -> bool:
        """Whether a queued chunk is worth running: its request still waits, within time."""
        request = item.request
        if request.deadline is not None and now >= request.deadline:
            self._expire(request)
        return item.live

    def _take(self, key: tuple, rows: int, cost: int | None, now: float) -> list[_Item]:
        taken, kept = [], deque()
        while self._items:
            item = self._items.popleft()
            if not self._usable(item, now):
                continue
            fits = len(item.texts) <= rows and (cost is None or item.cost <= cost)
            if item.key == key and fits:
                taken.append(item)
                rows -= len(item.texts)
                if cost is not None:
                    cost -= item.cost
            else:
                kept.append(item)
        self._items = kept
        self._queue_changed()
        return taken

    async def _next(self, loop) -> _Item:
        """The oldest queued chunk still worth running."""
        while True:
            while not self._items:
                self._event.clear()
                await self._event.wait()
            item = self._items.popleft()
            self._queue_changed()
            if self._usable(item, loop.time()):
                return item

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(loop)
            batch = [first]
            rows = self.max_batch_size - len(first.texts)
            cost = None if self.max_batch_cost is None else self.max_batch_cost - first.cost
            now = loop.time()
            merged = len(self._last)  # requests the last main-lane call merged
            busy = merged > 1 and now < self._ended + self.max_wait_busy
            wait_until = max(now + self.max_wait, self._ended + self.max_wait_busy if busy else 0)
            # The requests worth waiting for: the clients the last call just answered come
            # back, and the requests that were already waiting when it ended (other clients)
            # are here. Counting only the former, two groups of clients would take turns, each
            # call merging half of them (at concurrency 32, calls of 8 to 16 texts, not 32).
            expected = 0
            if busy:
                earlier = {
                    id(item.request)
                    for item in (first, *self._items)
                    if item.key == first.key
                    and item.request.queued_at < self._ended
                    and id(item.request) not in self._last  # a split request's next chunk
                    and item.live
                    and (item.request.deadline is None or now < item.request.deadline)
                }
                expected = merged + len(earlier)
            while rows > 0 and (cost is None or cost > 0):
                more = self._take(first.key, rows, cost, loop.time())
                batch += more
                rows -= sum(len(item.texts) for item in more)
                if cost is not None:
                    cost -= sum(item.cost for item in more)
                timeout = wait_until - loop.time()
                if rows <= 0 or timeout <= 0 or (cost is not None and cost <= 0):
                    break
                # Under load, stop once the clients just answered are back, or while other
                # work (it cannot join this call) waits for the model.
                if expected and (len(batch) >= expected or self._items):
                    break
                if not more:
                    self._event.clear()
                    try:
                        await asyncio.wait_for(self._event.wait(), timeout)
                    except TimeoutError:
                        pass
            batch = [item for item in batch if item.live]  # its caller may have left meanwhile
            # A request has at most one chunk queued (see above): one item per request.
            self._last = {id(item.request) for item in batch}
            if batch:
                self._running = batch
                if self.express_cost is not None:
                    self._heavy = any(item.cost > self.express_cost for item in batch)
                    self._express_event.set()
                try:
                    await self._run_guarded(loop, batch, self.executor)
                finally:
                    self._running = []
                    self._heavy = False
            self._ended = loop.time()

    def _take_cheap(self, now: float) -> _Item | None:
        """The oldest queued chunk costing at most `express_cost` still worth running."""
        for item in list(self._items):
            if item.cost <= self.express_cost and self._usable(item, now):
                self._items.remove(item)
                self._queue_changed()
                return item
        self._items = deque(item for item in self._items if item.live)
        self._queue_changed()
        return None

    async def _express_worker(self) -> None:
        """The express lane: while the main lane runs a heavy call, cheap chunks run here."""
        loop = asyncio.get_running_loop()
        while True:
            self._express_event.clear()
            first = self._take_cheap(loop.time()) if self._heavy else None
            if first is None:
                await self._express_event.wait()
                continue
            rows = self.max_batch_size - len(first.texts)
            batch = [first]
            if rows > 0:
                batch += self._take(first.key, rows, self.express_cost - first.cost, loop.time())
            batch = [item for item in batch if item.live]
            if not batch:
                continue
            self._express_running = batch
            try:
                await self._run_guarded(loop, batch, self.express_executor)
            finally:
                self._express_running = []

    async def _run_guarded(self, loop, batch: list[_Item], executor) -> None:
        """`_run_batch`; an unexpected error fails the batch's requests, never the worker."""
        try:
            await self._run_batch(loop, batch, executor)
        except Exception as e:  # noqa: BLE001 - never let one batch stop the worker
            log.exception("model batch failed")
            _fail(batch, e)

    async def _run_batch(self, loop, batch: list[_Item], executor) -> None:
        signature, version, scalars, row_names = batch[0].key
        texts = [text for item in batch for text in item.texts]
        scalars = dict(scalars)
        for name in row_names:
            values = [value for item in batch for value in item.row_values(name)]
            scalars[name] = values[0] if len(set(values)) == 1 else values
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(
                executor, self._run, signature, version, texts, scalars
            )
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1 and isinstance(e, ModelInputError):
                # One request's input broke the merged call: find it, every request alone.
                for item in batch:
                    if item.live:
                        await self._run_batch(loop, [item], executor)
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
            part = {k: v[start:stop] if np.ndim(v) else v for k, v in outputs.items()}
            self._done(item, part)
            start = stop

    def _done(self, item: _Item, part: dict) -> None:
        """One chunk's rows: the request's answer when it was the last, else its next chunk
        joins the back of the queue."""
        request = item.request
        if request.future.done():
            return
        request.parts.append(part)
        if len(request.parts) == len(request.chunks):
            request.future.set_result(concatenate_rows(request.parts))
        elif self.closing:
            _settle(request, ApiError(503, "the server is shutting down: retry later"))
        else:
            self._enqueue(_Item(request, *request.chunks[len(request.parts)]))


def split_rows(costs: list[int], max_rows: int, max_cost: int | None) -> list[tuple[int, int]]:
    """Consecutive `[start, stop)` ranges of at most `max_rows` rows and `max_cost` cost each
    (a row costing more than `max_cost` alone is a range of its own)."""
    chunks, start, total = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and (
            i - start >= max_rows or (max_cost is not None and total + cost > max_cost)
        ):
            chunks.append((start, i))
            start, total = i, 0
        total += cost
    chunks.append((start, len(costs)))
    return chunks


def concatenate_rows(parts: list[dict]) -> dict:
    """The outputs of several calls as one: row-aligned arrays concatenated (padded with zeros
    or empty strings to the longest of each dimension), scalars from the first."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if np.ndim(first) == 0:
            out[key] = first
            continue
        inner = tuple(np.max([np.shape(v)[1:] for v in values], axis=0).tolist())
        out[key] = np.concatenate([_pad(np.asarray(v), inner) for v in values])
    return out


def _pad(array: np.ndarray, inner: tuple) -> np.ndarray:
    if array.shape[1:] == inner:
        return array
    if array.dtype == object:
        fill = type(array.flat[0])() if array.size else b""
        padded = np.full((array.shape[0], *inner), fill, dtype=object)
    else:
        padded = np.zeros((array.shape[0], *inner), dtype=array.dtype)
    padded[(slice(None), *(slice(0, n) for n in array.shape[1:]))] = array
    return padded


def _settle(request: _Request, error: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _fail(batch: list[_Item], error: Exception) -> None:
    """Hands `error` to every request of `batch` still waiting."""
    for item in batch:
        _settle(item.request, error)
