"""`translator serve`: the translation REST service (FastAPI on uvicorn).

Two APIs over one model:

- `POST /v1/translate`: `{"text": "..."}` or `{"texts": [...]}` with optional `beam_size`,
  `n_best`, `length_penalty` and `return_alignment` (`translate.py`).
- TensorFlow Serving's REST dialect: `POST /v1/models/{name}[/versions/{v}]:predict` (row and
  columnar formats, both signatures), `GET /v1/models/{name}[/versions/{v}]` (status) and
  `GET /v1/models/{name}[/versions/{v}]/metadata`, with TF Serving's JSON shapes and its
  `{"error": ...}` bodies, so clients can move to a TF Serving deployment unchanged
  (`tfserving.py`).

Plus `GET /healthz` (process up), `GET /readyz` (model loaded and warmed up), `GET /metrics`
(Prometheus text), `/openapi.json`, `/docs`, and the browser page in `translator/static/` at `/`
(`app.py`).

The model runs behind a backend (`backends.py`): `SavedModelBackend` loads the TF Serving export
in-process (the default), `RemoteBackend` forwards to a TF Serving deployment over its REST API.
Either way a `MicroBatcher` (`batching.py`) merges concurrent requests with equal decoding
options into model calls of bounded size and cost, and splits larger requests.

Bad input never gives a 5xx: every problem with a request is a JSON 4xx saying what was wrong
(`errors.py`, `middleware.py`). Abuse is bounded (`service.py`, `connections.py`): a request's
cost (texts x beam x maximum output length, and its alignment values) is checked before it is
queued, every request has a deadline, a client that leaves has its queued work dropped, slow
clients are disconnected, and shutdown takes at most --shutdown-timeout seconds.

Modules, each importing only those below it: `testing`, `app`, `connections`, `tfserving` and
`translate`, `service`, `middleware`, `batching`, `backends`, `metrics`, `protocol`, `errors`,
`settings`.
"""

from translator.server.app import app_from_env, check_export, create_app, serve
from translator.server.backends import (
    Backend,
    LengthModel,
    RemoteBackend,
    SavedModelBackend,
    SignatureInfo,
    create_backend,
    decoding_defaults,
)
from translator.server.batching import MicroBatcher
from translator.server.errors import ApiError, BackendError, ModelInputError, ModelLoadError
from translator.server.metrics import Metrics
from translator.server.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from translator.server.service import ServiceState
from translator.server.settings import ServerSettings

__all__ = [
    "ApiError",
    "Backend",
    "BackendError",
    "LengthModel",
    "BodyLimitMiddleware",
    "MicroBatcher",
    "Metrics",
    "ModelInputError",
    "ModelLoadError",
    "RemoteBackend",
    "RequestMetricsMiddleware",
    "SavedModelBackend",
    "ServerSettings",
    "ServiceState",
    "SignatureInfo",
    "app_from_env",
    "check_export",
    "create_app",
    "create_backend",
    "decoding_defaults",
    "serve",
]
