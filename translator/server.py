"""`translator serve`: the translation REST service (FastAPI on uvicorn).

Two APIs over one model:

- `POST /v1/translate`: `{"text": "..."}` or `{"texts": [...]}` with optional `beam_size`,
  `n_best`, `length_penalty` and `return_alignment`.
- TensorFlow Serving's REST dialect: `POST /v1/models/{name}[/versions/{v}]:predict` (row and
  columnar formats, both signatures), `GET /v1/models/{name}[/versions/{v}]` (status) and
  `GET /v1/models/{name}[/versions/{v}]/metadata`, with TF Serving's JSON shapes and its
  `{"error": ...}` bodies, so clients can move to a TF Serving deployment unchanged.

Plus `GET /healthz` (process up), `GET /readyz` (model loaded and warmed up), `GET /metrics`
(Prometheus text), `/openapi.json`, `/docs`, and the browser page in `translator/static/` at `/`.

The model runs behind a backend: `SavedModelBackend` loads the TF Serving export in-process (the
default), `RemoteBackend` forwards to a TF Serving deployment over its REST API. Either way a
`MicroBatcher` merges concurrent requests with equal decoding options into one model call.

Bad input never gives a 5xx: every problem with a request is a JSON 4xx saying what was wrong.
"""

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("translator.server")

STATIC_DIR = Path(__file__).with_name("static")
SETTINGS_ENV = "TRANSLATOR_SERVE_SETTINGS"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[0-9]{1,18}$"
DEFAULT_SIGNATURE = "serving_default"
TRANSLATE_SIGNATURE = "translate"
# Bounds of the decoding options on every endpoint (the upper beam size is a setting).
LENGTH_PENALTY_RANGE = (0.0, 5.0)
ALIGNMENT_DECIMALS = 5


# -- settings ----------------------------------------------------------------------------------


class ServerSettings(BaseModel):
    """What `translator serve` is told: the model, the backend, and the service's limits."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "saved_models/en-fr",
        description="Export directory (TF Serving base path). With `backend`, only its "
        "config.yaml is read (decoding defaults) and its name names the model.",
    )
    model_name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Model name in URLs (default: the directory's)."
    )
    backend: str | None = Field(
        None, description="TF Serving REST URL to forward to, e.g. http://127.0.0.1:8501."
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Texts per model call.")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="Wait for more requests (ms).")
    max_queue: int = Field(256, ge=1, description="Requests waiting before 503s.")
    max_text_chars: int = Field(1000, ge=1, description="Characters per text.")
    max_texts: int = Field(64, ge=1, description="Texts per request.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request body size limit.")
    max_beam_size: int = Field(16, ge=1, le=64, description="Largest beam_size accepted.")
    backend_timeout: float = Field(60.0, gt=0, description="Seconds per call to the backend.")

    @property
    def name(self) -> str:
        if self.model_name:
            return self.model_name
        path = Path(self.model)
        name = path.name if path.name else path.resolve().name
        if name.isdigit() and path.parent.name:  # a version directory: name its model
            name = path.parent.name
        return name

    @model_validator(mode="after")
    def _check_name(self):
        if not re.match(NAME_PATTERN, self.name):
            raise ValueError(
                f"model name {self.name!r} (from --model) is not a valid URL model name: pass "
                "--model-name with letters, digits, '.', '_' or '-'"
            )
        if self.backend is not None and not re.match(r"^https?://[^/\s]+/?$", self.backend):
            raise ValueError(
                f"--backend must be a TF Serving REST base URL such as http://127.0.0.1:8501, "
                f"got {self.backend!r}"
            )
        return self


# -- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error answered as `{"error": message}` (plus `details` when given)."""

    def __init__(self, status: int, message: str, details=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        self.headers = headers


class ModelInputError(Exception):
    """The model (or the TF Serving backend) rejected an input: a 400."""


class BackendError(Exception):
    """The backend answered an error; `status` is the HTTP status to pass on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Validation problems, one per field (`loc`, `msg`)."
    )


def _error_response(status: int, message: str, details=None, headers=None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    # Error messages echo parts of the request, which may hold lone surrogates ("\ud800" is valid
    # JSON but not encodable as UTF-8): escape them rather than fail while reporting an error.
    body = _escape_surrogates(body)
    return JSONResponse(body, status_code=status, headers=headers)


def _escape_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escape_surrogates(k): _escape_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_surrogates(v) for v in value]
    return value


# -- signatures --------------------------------------------------------------------------------


@dataclass
class SignatureInfo:
    """A signature's inputs and outputs as TF Serving's metadata describes them."""

    name: str
    inputs: dict[str, tuple[str, int | None]]  # name -> (dtype, rank or None if unknown)
    outputs: list[str]
    text_input: str | None = None  # the rank-1 DT_STRING input
    scalars: dict[str, str] = field(default_factory=dict)  # rank-0 inputs -> dtype

    @classmethod
    def from_metadata(cls, name: str, signature_def: dict) -> "SignatureInfo":
        def rank(info):
            shape = info.get("tensor_shape") or {}
            return None if shape.get("unknown_rank") else len(shape.get("dim") or [])

        inputs = {k: (v.get("dtype", ""), rank(v)) for k, v in signature_def["inputs"].items()}
        info = cls(name, inputs, list(signature_def.get("outputs", {})))
        for key, (dtype, r) in sorted(inputs.items()):
            if dtype == "DT_STRING" and r == 1 and info.text_input is None:
                info.text_input = key
            elif r == 0 and dtype in ("DT_INT32", "DT_INT64", "DT_FLOAT", "DT_DOUBLE"):
                info.scalars[key] = dtype
        return info

    @property
    def servable(self) -> bool:
        """Whether this service can feed it: one string vector and numeric scalars."""
        return self.text_input is not None and len(self.scalars) + 1 == len(self.inputs)


# -- backends ----------------------------------------------------------------------------------


def decoding_defaults(model_dir) -> dict:
    """`beam_size` and `length_penalty` from an export's config.yaml (else the config defaults)."""
    from translator.config import DecodingConfig, load_config

    d = DecodingConfig()
    defaults = {"beam_size": d.beam_size, "length_penalty": d.length_penalty}
    if model_dir is None:
        return defaults
    path = Path(model_dir)
    for candidate in (path / "config.yaml", path.parent / "config.yaml"):
        if candidate.is_file():
            decoding = load_config(candidate).decoding
            return {"beam_size": decoding.beam_size, "length_penalty": decoding.length_penalty}
    return defaults


class Backend:
    """What the service needs from a model: load, predict, status and metadata.

    `predict` and `load` block (they run on the batcher's thread); the others are quick.
    """

    name: str
    version: int | None = None
    loaded: bool = False
    retry_load: bool = False  # keep trying to load (a remote server may come up later)
    defaults: dict

    def load(self) -> None:
        raise NotImplementedError

    def predict(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        raise NotImplementedError

    def signature_defs(self) -> dict:
        """TF Serving's `SignatureDefMap` JSON: `{"signature_def": {name: SignatureDef}}`."""
        raise NotImplementedError

    def check_ready(self) -> str | None:
        """None when the backend answers, else what is wrong (for /readyz)."""
        return None if self.loaded else "the model is not loaded yet"

    def close(self) -> None:
        pass

    # Shared by both backends.

    def signatures(self) -> dict[str, SignatureInfo]:
        """The servable signatures (not `__saved_model_init_op`), parsed once per load."""
        defs = self.signature_defs()
        cached = getattr(self, "_signatures_cache", None)
        if cached is None or cached[0] is not defs:
            parsed = {
                name: SignatureInfo.from_metadata(name, sig)
                for name, sig in defs["signature_def"].items()
                if not name.startswith("__")
            }
            cached = (defs, parsed)
            self._signatures_cache = cached
        return cached[1]

    def warm_up(self) -> None:
        """Runs both signatures once so the first request does not pay for graph set-up."""
        texts = ["A man is riding a bicycle.", "", "Two dogs play in the snow."]
        self.predict(DEFAULT_SIGNATURE, None, texts, {})
        signature = self.signatures().get(TRANSLATE_SIGNATURE)
        if signature is not None and signature.servable:
            beam = int(self.defaults["beam_size"])
            scalars = {
                "beam_size": beam,
                "n_best": min(2, beam),
                "length_penalty": float(self.defaults["length_penalty"]),
            }
            self.predict(TRANSLATE_SIGNATURE, None, texts, scalars)


class SavedModelBackend(Backend):
    """The TF Serving export loaded in-process with `translator.export.load_saved_model`.

    Args:
        path: The export's base directory (latest version) or one version directory.
        name: The model name served in URLs.
    """

    def __init__(self, path, name: str):
        self.path = Path(path)
        self.name = name
        self.defaults = decoding_defaults(self.path)
        self._loaded_model = None
        self._signature_defs = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self.loaded:
                return
            from google.protobuf import json_format
            from tensorflow.core.protobuf import saved_model_pb2

            from translator.export import load_saved_model

            started = time.perf_counter()
            loaded, version_dir = load_saved_model(self.path)
            proto = saved_model_pb2.SavedModel()
            proto.ParseFromString((version_dir / "saved_model.pb").read_bytes())
            defs = {
                name: json_format.MessageToDict(
                    sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
                for name, sig in proto.meta_graphs[0].signature_def.items()
            }
            self._loaded_model = loaded
            self._signature_defs = {"signature_def": defs}
            self.version = int(version_dir.name) if version_dir.name.isdigit() else 1
            self.warm_up()
            self.loaded = True
            log.info(
                "loaded %s version %s and warmed it up in %.1f s",
                version_dir,
                self.version,
                time.perf_counter() - started,
            )

    def signature_defs(self) -> dict:
        return self._signature_defs

    def predict(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        import tensorflow as tf

        info = self.signatures()[signature]
        kwargs = {info.text_input: tf.constant([t.encode("utf-8") for t in texts], tf.string)}
        for key, dtype in info.scalars.items():
            kwargs[key] = tf.constant(scalars[key], _tf_dtype(dtype))
        try:
            out = self._loaded_model.signatures[signature](**kwargs)
        except tf.errors.InvalidArgumentError as e:
            raise ModelInputError(_first_line(e.message)) from e
        return {key: value.numpy() for key, value in out.items()}


def _tf_dtype(name: str):
    import tensorflow as tf

    return {"DT_INT32": tf.int32, "DT_INT64": tf.int64, "DT_FLOAT": tf.float32}.get(
        name, tf.float64
    )


def _first_line(message: str) -> str:
    """The useful part of a TensorFlow error: assertion text without the graph stack."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("assertion failed:"):
            return line
    return lines[0] if lines else "the model rejected the input"


class RemoteBackend(Backend):
    """Forwards to a TensorFlow Serving deployment through its REST API (columnar requests).

    Args:
        url: TF Serving's REST base URL, e.g. `http://tfserving:8501`.
        name: The model name on that server (and in this service's URLs).
        defaults: Decoding defaults used for `/v1/translate` requests that need the `translate`
            signature without naming beam size or length penalty.
        timeout: Seconds per HTTP call.
    """

    retry_load = True

    def __init__(self, url: str, name: str, defaults: dict | None = None, timeout: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self.name = name
        self.defaults = defaults or decoding_defaults(None)
        self._client = httpx.Client(base_url=self.url, timeout=timeout)
        self._signature_defs = None

    def _model_path(self, version=None) -> str:
        path = f"/v1/models/{self.name}"
        return path if version is None else f"{path}/versions/{int(version)}"

    def _request(self, method: str, path: str, body=None, timeout=None):
        import httpx

        try:
            kwargs = {"timeout": timeout} if timeout else {}
            if body is None:
                response = self._client.request(method, path, **kwargs)
            else:
                response = self._client.request(
                    method,
                    path,
                    content=json.dumps(body).encode("utf-8"),
                    headers={"Content-Type": "application/json"},
                    **kwargs,
                )
        except httpx.HTTPError as e:
            raise BackendError(502, f"TF Serving at {self.url} is unreachable: {e}") from e
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400 or not isinstance(payload, dict):
            message = payload.get("error") if isinstance(payload, dict) else None
            message = message or f"HTTP {response.status_code} from TF Serving at {self.url}"
            status = response.status_code if 400 <= response.status_code < 500 else 502
            raise BackendError(status, str(message))
        return payload

    def status(self, version=None) -> dict:
        return self._request("GET", self._model_path(version))

    def metadata(self, version=None) -> dict:
        return self._request("GET", self._model_path(version) + "/metadata")

    def load(self) -> None:
        status = self.status()
        available = [
            int(v["version"])
            for v in status.get("model_version_status", [])
            if v.get("state") == "AVAILABLE"
        ]
        if not available:
            raise BackendError(503, f"TF Serving at {self.url} has no AVAILABLE version yet")
        metadata = self.metadata()
        self._signature_defs = metadata["metadata"]["signature_def"]
        missing = [
            s for s in (DEFAULT_SIGNATURE, TRANSLATE_SIGNATURE) if s not in self.signatures()
        ]
        if missing:
            raise BackendError(502, f"model {self.name} at {self.url} lacks signature(s) {missing}")
        self.version = max(available)
        self.warm_up()
        self.loaded = True
        log.info("forwarding to %s (model %s, version %s)", self.url, self.name, self.version)

    def signature_defs(self) -> dict:
        return self._signature_defs

    def predict(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        inputs: dict[str, Any] = {self.signatures()[signature].text_input: texts}
        inputs.update(scalars)
        body = {"signature_name": signature, "inputs": inputs}
        try:
            payload = self._request("POST", self._model_path(version) + ":predict", body)
        except BackendError as e:
            if e.status == 400:
                raise ModelInputError(e.message) from e
            raise
        outputs = payload.get("outputs")
        if not isinstance(outputs, dict):  # one named output: TF Serving omits the name
            outputs = {self.signatures()[signature].outputs[0]: outputs}
        return {key: _to_array(value) for key, value in outputs.items()}

    def check_ready(self) -> str | None:
        if not self.loaded:
            return "not connected to TF Serving yet"
        try:
            self._request("GET", self._model_path(), timeout=2.0)
        except BackendError as e:
            return e.message
        return None

    def close(self) -> None:
        self._client.close()


def _to_array(value) -> np.ndarray:
    array = np.array(value, dtype=object)
    if array.size and all(isinstance(v, str) for v in array.flat):
        return array
    if array.size and all(isinstance(v, int) and not isinstance(v, bool) for v in array.flat):
        return array.astype(np.int64)
    if array.size and all(isinstance(v, int | float) for v in array.flat):
        return array.astype(np.float32)
    return array


# -- metrics -----------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        lines, cumulative = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{_fmt(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {self.sum:.6f}")
        lines.append(f"{name}_count{braces} {self.count}")
        return lines


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    """Prometheus counters and histograms, rendered in the text exposition format."""

    LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_texts = _Histogram(self.SIZES)
        self.batch_requests = _Histogram(self.SIZES)
        self.model_seconds = _Histogram(self.LATENCY)
        self.model_errors = 0
        self.rejected_overload = 0

    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in self.METHODS else "other"  # clients choose methods
        with self._lock:
            key = (route, method, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, _Histogram(self.LATENCY)).observe(seconds)

    def observe_batch(self, texts: int, requests: int, seconds: float) -> None:
        with self._lock:
            self.batch_texts.observe(texts)
            self.batch_requests.observe(requests)
            self.model_seconds.observe(seconds)

    def render(self, queue_depth: int, ready: bool) -> str:
        with self._lock:
            out = [
                "# HELP translator_http_requests_total HTTP requests by route, method and status.",
                "# TYPE translator_http_requests_total counter",
            ]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(
                    f'translator_http_requests_total{{route="{_label(route)}",method="{method}",'
                    f'status="{status}"}} {n}'
                )
            out += [
                "# HELP translator_http_request_duration_seconds Request latency by route.",
                "# TYPE translator_http_request_duration_seconds histogram",
            ]
            for route, histogram in sorted(self.latency.items()):
                out += histogram.render(
                    "translator_http_request_duration_seconds", f'route="{_label(route)}"'
                )
            out += [
                "# HELP translator_batch_texts Texts per model call (after micro-batching).",
                "# TYPE translator_batch_texts histogram",
                *self.batch_texts.render("translator_batch_texts"),
                "# HELP translator_batch_requests Requests merged into one model call.",
                "# TYPE translator_batch_requests histogram",
                *self.batch_requests.render("translator_batch_requests"),
                "# HELP translator_model_call_seconds Duration of model calls.",
                "# TYPE translator_model_call_seconds histogram",
                *self.model_seconds.render("translator_model_call_seconds"),
                "# HELP translator_model_errors_total Model calls that raised.",
                "# TYPE translator_model_errors_total counter",
                f"translator_model_errors_total {self.model_errors}",
                "# HELP translator_rejected_overload_total Requests refused: queue full.",
                "# TYPE translator_rejected_overload_total counter",
                f"translator_rejected_overload_total {self.rejected_overload}",
                "# HELP translator_queue_depth Requests waiting for the model.",
                "# TYPE translator_queue_depth gauge",
                f"translator_queue_depth {queue_depth}",
                "# HELP translator_model_ready 1 when the model is loaded and warmed up.",
                "# TYPE translator_model_ready gauge",
                f"translator_model_ready {int(ready)}",
            ]
        rss = _rss_bytes()
        if rss is not None:
            out += [
                "# HELP process_resident_memory_bytes Resident memory size in bytes.",
                "# TYPE process_resident_memory_bytes gauge",
                f"process_resident_memory_bytes {rss}",
            ]
        return "\n".join(out) + "\n"


# -- micro-batching ----------------------------------------------------------------------------


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
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, signature: str, version, texts: list[str], scalars: dict) -> dict:
        """Queues one request and returns its rows of the outputs."""
        if self._task is None or self._task.done():
            raise ApiError(503, "the model worker is not running")
        if len(self._items) >= self.max_queue:
            self.metrics.rejected_overload += 1
            raise ApiError(
                503, f"the server is overloaded ({self.max_queue} requests waiting): retry later"
            )
        key = (signature, version, tuple(sorted(scalars.items())))
        item = _Item(key, list(texts), asyncio.get_running_loop().create_future())
        self._items.append(item)
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
        return taken

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._event.clear()
                await self._event.wait()
            first = self._items.popleft()
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
            self.metrics.model_errors += 1
            _fail(batch, e)
            return
        rows = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in outputs.items()}
        if any(n is not None and n != len(texts) for n in rows.values()):
            self.metrics.model_errors += 1
            message = f"the model returned {rows} rows for {len(texts)} texts: outputs do not match"
            _fail(batch, BackendError(502, message))
            return
        self.metrics.observe_batch(len(texts), len(batch), time.perf_counter() - started)
        start = 0
        for item in batch:
            stop = start + len(item.texts)
            if not item.future.done():
                item.future.set_result(_trim({k: v[start:stop] for k, v in outputs.items()}))
            start = stop


def _fail(batch: list[_Item], error: Exception) -> None:
    """Hands `error` to every request of `batch` still waiting."""
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _trim(outputs: dict) -> dict:
    """Cuts padding shared with other requests of a batch (the `translate` signature's tokens
    and alignments), so a request's outputs do not depend on what it was batched with."""
    out = dict(outputs)
    source_lengths = out.get("source_lengths")
    target_lengths = out.get("target_lengths")
    if source_lengths is not None and np.size(source_lengths):
        s = int(np.max(source_lengths))
        if np.ndim(out.get("source_tokens")) == 2:
            out["source_tokens"] = out["source_tokens"][:, :s]
        if np.ndim(out.get("alignments")) == 4:
            out["alignments"] = out["alignments"][..., :s]
    if target_lengths is not None and np.size(target_lengths):
        t = int(np.max(target_lengths))
        if np.ndim(out.get("target_tokens")) == 3:
            out["target_tokens"] = out["target_tokens"][..., :t]
        if np.ndim(out.get("alignments")) == 4:
            out["alignments"] = out["alignments"][:, :, :t, :]
    return out


# -- JSON helpers ------------------------------------------------------------------------------


def _text_items(array) -> list:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array]


def _jsonable(array: np.ndarray):
    """A tensor as TF Serving writes it: nested lists, strings decoded, floats shortest."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        flat = _text_items(array.reshape(-1))
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype.kind == "f":
        # float32 -> its shortest decimal string -> float64: 0.1f prints as 0.1, not 0.10000000149.
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def _finite(value) -> float | None:
    """A float32 score as its shortest decimal (-1.7885305), or None when not finite."""
    value = float(str(np.float32(value)))
    return value if math.isfinite(value) else None


class PredictJSONResponse(JSONResponse):
    """TF Serving writes NaN and Infinity as bare tokens; so does this response."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=True).encode("utf-8")


# -- request and response models ---------------------------------------------------------------


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text contains a lone surrogate at character {e.start} (not valid Unicode)"
        ) from e
    return text


class Hypothesis(BaseModel):
    text: str
    score: float | None = Field(description="Length-normalized log-probability (null: none).")


class Alignment(BaseModel):
    source_tokens: list[str] = Field(description="Source subwords, end-of-sentence included.")
    target_tokens: list[str] = Field(description="Target subwords of the best translation.")
    weights: list[list[float]] = Field(
        description="Attention weights, one row per target token, one column per source token."
    )


class TranslationOut(BaseModel):
    text: str = Field(description="The best translation.")
    score: float | None = Field(description="Its length-normalized log-probability.")
    n_best: list[Hypothesis] | None = Field(
        None, description="Present when n_best > 1: the hypotheses, best first."
    )
    alignment: Alignment | None = Field(
        None, description="Present when return_alignment is true (for the best translation)."
    )


class ModelInfo(BaseModel):
    name: str
    version: str


class TranslateResponse(BaseModel):
    translations: list[TranslationOut]
    model: ModelInfo


class PredictRequest(BaseModel):
    """TF Serving's predict request: `instances` (row format) or `inputs` (columnar format)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"instances": ["A man is riding a bicycle."]},
                {
                    "signature_name": "translate",
                    "inputs": {
                        "text": ["A man is riding a bicycle."],
                        "beam_size": 4,
                        "n_best": 2,
                        "length_penalty": 0.6,
                    },
                },
            ]
        },
    )

    signature_name: Annotated[str, Field(strict=True)] = Field(
        DEFAULT_SIGNATURE, description="`serving_default` or `translate`."
    )
    instances: list[Any] | None = Field(None, description="Row format: one entry per input.")
    inputs: Any = Field(None, description="Columnar format: a list, or an object of tensors.")


class PredictResponse(BaseModel):
    predictions: list[Any] | None = Field(None, description="Row format answer.")
    outputs: Any = Field(None, description="Columnar format answer.")


class VersionStatus(BaseModel):
    version: str
    state: str
    status: dict[str, str]


class ModelStatusResponse(BaseModel):
    model_version_status: list[VersionStatus]


class ModelMetadataResponse(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]


class Health(BaseModel):
    status: str
    error: str | None = None
    model: ModelInfo | None = None


def translate_request_model(settings: ServerSettings) -> type[BaseModel]:
    """The `/v1/translate` body, with the service's limits in its schema."""
    TextField = Annotated[
        str,
        Field(strict=True, max_length=settings.max_text_chars),
        AfterValidator(_valid_unicode),
    ]

    class TranslateRequest(BaseModel):
        """Exactly one of `text` and `texts`; the options default to the model's config."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
                "examples": [
                    {"text": "A man is riding a bicycle."},
                    {
                        "texts": ["Two dogs play in the snow.", "A child is reading."],
                        "beam_size": 5,
                        "n_best": 2,
                        "return_alignment": True,
                    },
                ],
            },
        )

        text: TextField = Field(None, description="One English text.")
        texts: Annotated[
            list[TextField], Field(min_length=1, max_length=settings.max_texts, strict=True)
        ] = Field(None, description="Several English texts (translated in order).")
        beam_size: Annotated[int, Field(strict=True, ge=1, le=settings.max_beam_size)] = Field(
            None, description="Beam width (1 = greedy); default: the model's config."
        )
        n_best: Annotated[int, Field(strict=True, ge=1, le=settings.max_beam_size)] = Field(
            1, description="Hypotheses per text (at most beam_size)."
        )
        length_penalty: Annotated[
            float,
            Field(strict=True, ge=LENGTH_PENALTY_RANGE[0], le=LENGTH_PENALTY_RANGE[1]),
            Field(allow_inf_nan=False),
        ] = Field(None, description="GNMT length penalty alpha; default: the model's config.")
        return_alignment: Annotated[bool, Field(strict=True)] = Field(
            False, description="Also return subword tokens and attention weights."
        )

        @model_validator(mode="after")
        def _check(self):
            if (self.text is None) == (self.texts is None):
                raise ValueError(
                    "give exactly one of `text` (a string) and `texts` (a list of strings)"
                )
            if self.beam_size is not None and self.n_best > self.beam_size:
                raise ValueError(
                    f"n_best ({self.n_best}) must not be larger than beam_size ({self.beam_size})"
                )
            return self

    return TranslateRequest


# -- the TF Serving request format -------------------------------------------------------------


@dataclass
class PredictCall:
    signature: SignatureInfo
    texts: list[str]
    scalars: dict[str, Any]
    row_format: bool


def _string_value(value, where: str, limits: ServerSettings) -> str:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            raw = base64.b64decode(value["b64"], validate=True)
            value = raw.decode("utf-8")
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: {{'b64': ...}} must hold base64 of UTF-8 text") from e
    if not isinstance(value, str):
        raise ApiError(
            400,
            f"{where}: JSON value {_short(value)} is not of expected type: DT_STRING "
            '(a string, or {"b64": "..."})',
        )
    try:
        _valid_unicode(value)
    except ValueError as e:
        raise ApiError(400, f"{where}: {e}") from e
    if len(value) > limits.max_text_chars:
        raise ApiError(
            400, f"{where}: text of {len(value)} characters, the limit is {limits.max_text_chars}"
        )
    return value


def _short(value) -> str:
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar_value(value, name: str, dtype: str, where: str):
    if dtype in ("DT_INT32", "DT_INT64"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(
                400, f"{where}: JSON value {_short(value)} is not of expected type: {dtype}"
            )
        limit = 2**31 if dtype == "DT_INT32" else 2**63
        if not -limit <= value < limit:
            raise ApiError(400, f"{where}: {value} does not fit {dtype}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{where}: JSON value {_short(value)} is not of expected type: {dtype}")
    try:
        number = float(value)
    except OverflowError:
        raise ApiError(400, f"{where}: {_short(value)} is out of the range of {dtype}") from None
    if not math.isfinite(number):
        raise ApiError(400, f"{where}: must be a finite number, got {value}")
    return number


def _check_decoding(scalars: dict, limits: ServerSettings, where: str) -> None:
    """The ranges the graph (and this service) accepts; the graph's own check is the last word."""
    beam = scalars.get("beam_size")
    if beam is not None and not 1 <= beam <= limits.max_beam_size:
        raise ApiError(400, f"{where}beam_size must be between 1 and {limits.max_beam_size}")
    n_best = scalars.get("n_best")
    if n_best is not None and n_best < 1:
        raise ApiError(400, f"{where}n_best must be at least 1")
    if n_best is not None and beam is not None and n_best > beam:
        raise ApiError(400, f"{where}n_best ({n_best}) must not be larger than beam_size ({beam})")
    alpha = scalars.get("length_penalty")
    low, high = LENGTH_PENALTY_RANGE
    if alpha is not None and not low <= alpha <= high:
        raise ApiError(400, f"{where}length_penalty must be between {low:g} and {high:g}")


def parse_predict(
    body: PredictRequest, signatures: dict[str, SignatureInfo], limits: ServerSettings
) -> PredictCall:
    """Reads a TF Serving predict request the way TF Serving does, with this service's limits.

    Row format (`instances`) stacks every instance's values into a batch, so it cannot carry
    rank-0 inputs (the `translate` signature's beam_size, n_best, length_penalty): such a
    request is refused with a 400 that points at the columnar format, as TF Serving refuses it.
    """
    name = body.signature_name or DEFAULT_SIGNATURE  # TF Serving: "" is the default
    if name not in signatures:
        raise ApiError(400, f'Serving signature name: "{name}" not found in signature def')
    signature = signatures[name]
    if not signature.servable:
        raise ApiError(400, f"signature {name!r} has inputs this service cannot feed")
    given = body.model_fields_set
    has_instances, has_inputs = "instances" in given, "inputs" in given
    if has_instances and has_inputs:
        raise ApiError(
            400, "Not formatted correctly: expecting only one of 'inputs' or 'instances'"
        )
    if not has_instances and not has_inputs:
        raise ApiError(400, "Missing 'inputs' or 'instances' key")
    text_key = signature.text_input
    if has_instances:
        instances = body.instances
        if instances is None:
            raise ApiError(400, "Expecting 'instances' to be a list/array")
        if not instances:
            raise ApiError(400, "No values in 'instances' array")
        if signature.scalars:
            raise ApiError(
                400,
                f"signature {name!r} has scalar inputs ({', '.join(sorted(signature.scalars))}) "
                "that the row format ('instances') cannot carry: TF Serving stacks every "
                "instance's values into a batch. Use the columnar format: "
                f'{{"signature_name": "{name}", "inputs": {{"{text_key}": [...], '
                + ", ".join(f'"{k}": ...' for k in sorted(signature.scalars))
                + "}}",
            )
        _check_count(len(instances), limits)
        objects = _is_object(instances[0])
        texts = []
        for i, instance in enumerate(instances):
            where = f"instances[{i}]"
            if objects:
                if not _is_object(instance):
                    raise ApiError(400, f"Expecting object but got list at item {i} of input list")
                if set(instance) != {text_key}:
                    raise ApiError(
                        400,
                        f"Failed to process element: {i} of 'instances' list. JSON object keys "
                        f"must be equal to: {text_key}",
                    )
                instance = instance[text_key]
                where += f".{text_key}"
            elif _is_object(instance):
                raise ApiError(
                    400, f"Expecting value/list but got object at item {i} of input list"
                )
            texts.append(_string_value(instance, where, limits))
        return PredictCall(signature, texts, {}, row_format=True)

    inputs = body.inputs
    if not _is_object(inputs):
        if signature.scalars:
            raise ApiError(
                400,
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                f"required as per tensorinfo_map ({', '.join(sorted(signature.inputs))})",
            )
        inputs = {text_key: inputs}
    unknown = sorted(set(inputs) - set(signature.inputs))
    if unknown:
        raise ApiError(
            400,
            f"unknown input(s) {unknown} for signature {name!r}: it takes "
            f"{sorted(signature.inputs)}",
        )
    for key in sorted(signature.inputs):
        if key not in inputs:
            raise ApiError(400, f"Missing named input: {key} in 'inputs' object.")
    column = inputs[text_key]
    if not isinstance(column, list):
        raise ApiError(
            400, f"inputs.{text_key} must be a list of strings (a tensor of shape [batch])"
        )
    if not column:
        raise ApiError(400, f"inputs.{text_key} is empty: nothing to translate")
    _check_count(len(column), limits)
    texts = [_string_value(v, f"inputs.{text_key}[{i}]", limits) for i, v in enumerate(column)]
    scalars = {
        key: _scalar_value(inputs[key], key, dtype, f"inputs.{key}")
        for key, dtype in signature.scalars.items()
    }
    _check_decoding(scalars, limits, "inputs: ")
    return PredictCall(signature, texts, scalars, row_format=False)


def _is_object(value) -> bool:
    return isinstance(value, dict) and not (set(value) == {"b64"})


def _check_count(n: int, limits: ServerSettings) -> None:
    if n > limits.max_texts:
        raise ApiError(400, f"{n} texts in one request, the limit is {limits.max_texts}")


def format_predict(call: PredictCall, outputs: dict) -> dict:
    names = [k for k in call.signature.outputs if k in outputs] or sorted(outputs)
    columns = {k: _jsonable(outputs[k]) for k in names}
    if call.row_format:
        if len(names) == 1:
            return {"predictions": columns[names[0]]}
        rows = len(call.texts)
        return {"predictions": [{k: columns[k][i] for k in names} for i in range(rows)]}
    if len(names) == 1:
        return {"outputs": columns[names[0]]}
    return {"outputs": columns}


# -- the application ---------------------------------------------------------------------------


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class JSONBodyRoute(APIRoute):
    """Checks a POST body before FastAPI parses it: JSON content type (else 415), UTF-8 and
    well-formed JSON object (else 400). The parsed JSON is cached on the request."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            if request.method == "POST":
                content_type = request.headers.get("content-type")
                if content_type is None or not _is_json(content_type):
                    raise ApiError(
                        415,
                        f"Content-Type must be application/json, got {content_type!r}",
                    )
                body = await request.body()
                if not body.strip():
                    raise ApiError(400, "the request body is empty: send a JSON object")
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ApiError(
                        400, f"the request body is not valid UTF-8 (byte {e.start})"
                    ) from e
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ApiError(
                        400,
                        f"JSON Parse error: {e.msg} at line {e.lineno} column {e.colno}",
                    ) from e
                except RecursionError as e:
                    raise ApiError(400, "JSON Parse error: nested too deeply") from e
                except ValueError as e:  # e.g. an integer longer than Python's 4,300 digits
                    raise ApiError(400, f"JSON Parse error: {e}") from e
                if not isinstance(parsed, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                request._json = parsed  # what FastAPI's request.json() returns
            return await handler(request)

        return checked


# nginx's status for a request whose client disconnected before the response: recorded in the
# metrics (never sent), so that clients going away do not look like server errors.
CLIENT_CLOSED_REQUEST = 499


class LimitsMiddleware:
    """Refuses bodies over the size limit (413) and records request metrics for every route."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive, send_status)
                if body is None:
                    if status[0] == 500:  # no response sent: the client left mid-body
                        status[0] = CLIENT_CLOSED_REQUEST
                    return
                delivered = False

                async def replay():
                    nonlocal delivered
                    if not delivered:
                        delivered = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                label, scope["method"], status[0], time.perf_counter() - started
            )

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
        response = _error_response(
            413, f"the request body is larger than the limit of {self.max_body_bytes} bytes"
        )
        await response(scope, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


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


def create_backend(settings: ServerSettings) -> Backend:
    """`RemoteBackend` when `settings.backend` is set, else `SavedModelBackend`."""
    if settings.backend:
        model_dir = Path(settings.model)
        defaults = decoding_defaults(model_dir if model_dir.is_dir() else None)
        return RemoteBackend(
            settings.backend, settings.name, defaults, timeout=settings.backend_timeout
        )
    return SavedModelBackend(settings.model, settings.name)


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
    state = ServiceState(backend, settings, batcher, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loader = asyncio.get_running_loop().create_task(_load(state))
        try:
            yield
        finally:
            loader.cancel()
            await batcher.stop()
            backend.close()

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
    app.state.service = state
    app.add_middleware(LimitsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    _add_error_handlers(app)
    app.include_router(_api_routes(state))
    _add_static(app)
    return app


async def _load(state: ServiceState) -> None:
    loop = asyncio.get_running_loop()
    while not state.backend.loaded:
        try:
            await loop.run_in_executor(state.batcher.executor, state.backend.load)
            state.load_error = None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by /readyz
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model: %s", state.load_error)
            if not state.backend.retry_load:
                return
            await asyncio.sleep(2.0)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("translator")
    except Exception:  # noqa: BLE001
        return "0"


def _is_predict_path(request: Request) -> bool:
    return request.url.path.endswith(":predict")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and request.method in ("GET", "HEAD"):
            page_file = _static_file(request.url.path)
            if page_file is not None:
                return FileResponse(page_file)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such resource: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}" + (
                f" (allowed: {allowed})" if allowed else ""
            )
        return _error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = [_describe(error) for error in exc.errors()]
        summary = "; ".join(
            f"{d['loc']}: {d['msg']}" if d["loc"] else d["msg"] for d in details[:5]
        )
        if _is_predict_path(request) or request.url.path.startswith("/v1/models/"):
            return _error_response(400, summary)  # TF Serving answers InvalidArgument: 400
        return _error_response(422, f"invalid request: {summary}", details)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}")


def _describe(error: dict) -> dict:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    elif error.get("type") == "missing" and loc == []:
        message = "the request body is missing"
    return {"loc": ".".join(loc), "msg": message}


def _api_routes(state: ServiceState) -> APIRouter:
    settings, backend, batcher = state.settings, state.backend, state.batcher
    router = APIRouter(route_class=JSONBodyRoute)
    TranslateRequest = translate_request_model(settings)
    model_name_param = Annotated[
        str, PathParam(description="The model's name, e.g. en-fr.", examples=[settings.name])
    ]
    version_param = Annotated[
        str, PathParam(pattern=VERSION_PATTERN, description="A model version number.")
    ]
    not_found = {404: {"model": ErrorBody, "description": "No such model or version."}}

    def check_model(name: str, version: str | None) -> int | None:
        if ":" in name:  # GET /v1/models/x:predict
            raise ApiError(405, f"use POST for {name}", headers={"Allow": "POST"})
        if not re.match(NAME_PATTERN, name):
            raise ApiError(
                400, f"Malformed model name {name!r}: use letters, digits, '.', '_' and '-'"
            )
        number = int(version) if version is not None else None
        spec = f"Specific({name}, {number})" if number is not None else f"Latest({name})"
        if name != backend.name:
            raise ApiError(404, f"Servable not found for request: {spec}")
        state.require_ready()
        # In-process, only the loaded (latest) version exists; TF Serving may hold others.
        if number is not None and not isinstance(backend, RemoteBackend):
            if number != backend.version:
                raise ApiError(404, f"Servable not found for request: {spec}")
        return number

    @router.post(
        "/v1/translate",
        response_model=TranslateResponse,
        responses={422: {"model": ErrorBody, "description": "Invalid field values."}},
        summary="Translate English text to French",
    )
    async def translate(body: TranslateRequest) -> JSONResponse:  # type: ignore[valid-type]
        state.require_ready()
        texts = [body.text] if body.texts is None else list(body.texts)
        defaults = backend.defaults
        beam = body.beam_size if body.beam_size is not None else int(defaults["beam_size"])
        if body.n_best > beam:
            raise ApiError(
                422,
                f"invalid request: n_best ({body.n_best}) must not be larger than beam_size "
                f"({beam}, the model's default)",
                [{"loc": "n_best", "msg": f"must not be larger than beam_size ({beam})"}],
            )
        plain = (
            body.beam_size is None
            and body.length_penalty is None
            and body.n_best == 1
            and not body.return_alignment
        )
        if plain:
            outputs = await _submit(batcher, DEFAULT_SIGNATURE, None, texts, {})
            translations = [
                {"text": t, "score": _finite(s)}
                for t, s in zip(
                    _text_items(outputs["translation"]), outputs["score"].tolist(), strict=True
                )
            ]
        else:
            alpha = body.length_penalty
            scalars = {
                "beam_size": beam,
                "n_best": body.n_best,
                "length_penalty": float(alpha if alpha is not None else defaults["length_penalty"]),
            }
            outputs = await _submit(batcher, TRANSLATE_SIGNATURE, None, texts, scalars)
            translations = [
                _translation(outputs, row, body.n_best, body.return_alignment)
                for row in range(len(texts))
            ]
        model = {"name": backend.name, "version": str(backend.version)}
        return JSONResponse({"translations": translations, "model": model})

    async def predict(name: str, version: str | None, body: PredictRequest):
        number = check_model(name, version)
        call = parse_predict(body, backend.signatures(), settings)
        outputs = await _submit(batcher, call.signature.name, number, call.texts, call.scalars)
        return PredictJSONResponse(format_predict(call, outputs))

    predict_doc = dict(
        response_model=PredictResponse,
        responses=not_found,
        summary="TF Serving predict (row or columnar format)",
    )

    @router.post("/v1/models/{name}:predict", **predict_doc)
    async def predict_latest(name: model_name_param, body: PredictRequest):
        return await predict(name, None, body)

    @router.post("/v1/models/{name}/versions/{version}:predict", **predict_doc)
    async def predict_version(name: model_name_param, version: version_param, body: PredictRequest):
        return await predict(name, version, body)

    async def model_status(name: str, version: str | None):
        number = check_model(name, version)
        if isinstance(backend, RemoteBackend):
            return await _remote(backend.status, number)
        return {
            "model_version_status": [
                {
                    "version": str(backend.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    async def model_metadata(name: str, version: str | None):
        number = check_model(name, version)
        if isinstance(backend, RemoteBackend):
            return await _remote(backend.metadata, number)
        return {
            "model_spec": {
                "name": backend.name,
                "signature_name": "",
                "version": str(backend.version),
            },
            "metadata": {"signature_def": backend.signature_defs()},
        }

    status_doc = dict(
        response_model=ModelStatusResponse, responses=not_found, summary="TF Serving model status"
    )
    metadata_doc = dict(
        response_model=ModelMetadataResponse,
        responses=not_found,
        summary="TF Serving model metadata (signatures)",
    )

    @router.get("/v1/models/{name}", **status_doc)
    async def status_latest(name: model_name_param):
        return await model_status(name, None)

    @router.get("/v1/models/{name}/versions/{version}", **status_doc)
    async def status_version(name: model_name_param, version: version_param):
        return await model_status(name, version)

    @router.get("/v1/models/{name}/metadata", **metadata_doc)
    async def metadata_latest(name: model_name_param):
        return await model_metadata(name, None)

    @router.get("/v1/models/{name}/versions/{version}/metadata", **metadata_doc)
    async def metadata_version(name: model_name_param, version: version_param):
        return await model_metadata(name, version)

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
    async def readyz():
        problem = state.load_error if not backend.loaded else None
        if problem is None:
            loop = asyncio.get_running_loop()
            problem = await loop.run_in_executor(None, backend.check_ready)
        if problem is not None:
            return JSONResponse({"status": "not ready", "error": problem}, status_code=503)
        return {
            "status": "ready",
            "model": {"name": backend.name, "version": str(backend.version)},
        }

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def metrics():
        text = state.metrics.render(batcher.depth, backend.loaded)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


async def _submit(batcher: MicroBatcher, signature, version, texts, scalars) -> dict:
    try:
        return await batcher.submit(signature, version, texts, scalars)
    except ModelInputError as e:
        raise ApiError(400, str(e)) from e
    except BackendError as e:
        raise ApiError(e.status, e.message) from e


async def _remote(fetch, version):
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, fetch, version)
    except BackendError as e:
        raise ApiError(e.status, e.message) from e


def _translation(outputs: dict, row: int, n_best: int, return_alignment: bool) -> dict:
    texts = _text_items(outputs["translations"][row])
    scores = [_finite(s) for s in outputs["scores"][row].tolist()]
    result: dict[str, Any] = {"text": texts[0], "score": scores[0]}
    if n_best > 1:
        result["n_best"] = [
            {"text": t, "score": s} for t, s in zip(texts[:n_best], scores[:n_best], strict=True)
        ]
    if return_alignment:
        s = int(outputs["source_lengths"][row])
        t = int(outputs["target_lengths"][row][0])
        weights = np.asarray(outputs["alignments"][row][0], dtype=np.float64)[:t, :s]
        weights = np.nan_to_num(np.round(weights, ALIGNMENT_DECIMALS))
        result["alignment"] = {
            "source_tokens": _text_items(outputs["source_tokens"][row][:s]),
            "target_tokens": _text_items(outputs["target_tokens"][row][0][:t]),
            "weights": weights.tolist(),
        }
    return result


def _static_file(path: str) -> Path | None:
    """A file directly in `translator/static/` named by a one-segment path (`/app.js`), so the
    page may refer to its files relatively as well as under `/static/`."""
    name = path.lstrip("/")
    if not name or "/" in name or name.startswith(".") or not STATIC_DIR.is_dir():
        return None
    for candidate in STATIC_DIR.iterdir():
        if candidate.name == name and candidate.is_file():
            return candidate
    return None


def _add_static(app: FastAPI) -> None:
    """The browser page: `translator/static/index.html` at `/`, its files beside it."""
    from fastapi.staticfiles import StaticFiles

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return {"service": "translator", "docs": "/docs", "translate": "POST /v1/translate"}


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
    if not any(
        (p / "saved_model.pb").is_file() for p in path.iterdir() if p.is_dir() and p.name.isdigit()
    ):
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
    """Runs the service with uvicorn until SIGINT/SIGTERM (what `translator serve` calls)."""
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
    common = dict(host=host, port=port, access_log=access_log, log_level="info")
    if workers > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run("translator.server:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings=settings), **common)
    return 0


__all__ = [
    "ApiError",
    "Backend",
    "MicroBatcher",
    "RemoteBackend",
    "SavedModelBackend",
    "ServerSettings",
    "create_app",
    "serve",
]
