"""What `translator serve` is told: the model, the backend and the service's limits."""

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from translator.config import DecodingConfig, field_bounds

SETTINGS_ENV = "TRANSLATOR_SERVE_SETTINGS"  # the settings as JSON, for `--workers` processes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[0-9]{1,18}$"
# The largest beam size the export's `translate` signature accepts.
MAX_BEAM_SIZE = field_bounds(DecodingConfig, "beam_size")[1]


class ServerSettings(BaseModel):
    """What `translator serve` is told: the model, the backend, and the service's limits.

    The README's REST section has every limit in a table, with its flag and the status a
    request over it gets. Costs are in decoding steps: texts x beam size x the maximum output
    length of each text (the export's `max_length_ratio` x source subwords + `max_length_offset`).
    """

    # Error messages never repeat the input: a refused --backend URL may hold a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

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
    # After a call that merged several requests, their clients' next requests are on their way:
    # waiting for them makes one call where there would be several (4.7x the concurrency-1
    # throughput at concurrency 32 with 20 ms, 3.8x with 2 ms; see the README's REST table).
    # Never shorter than max_wait_ms.
    max_wait_busy_ms: float = Field(
        20.0, ge=0, le=1000, description="Wait for more requests under load (ms)."
    )
    max_queue: int = Field(256, ge=1, description="Requests waiting before 503s.")
    max_text_chars: int = Field(1000, ge=1, description="Characters per text.")
    max_texts: int = Field(64, ge=1, description="Texts per request.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request body size limit.")
    max_beam_size: int = Field(
        16, ge=1, le=MAX_BEAM_SIZE, description="Largest beam_size accepted."
    )
    # A request's cost: the sum over its texts of beam size x maximum output length. 65,536
    # admits 64 ordinary sentences at beam 16, or 7 texts of 1,000 characters at beam 16.
    max_request_cost: int = Field(
        65536, ge=1, description="Decoding steps per request (texts x beam x output length)."
    )
    # One model call's cost (merged requests, or one part of a split request). What a short
    # request may have to wait behind; a text costing more than this alone is refused.
    max_batch_cost: int = Field(16384, ge=1, description="Decoding steps per model call.")
    # While a model call with a chunk (one request's texts, or part of them) costing more runs,
    # cheaper waiting work runs beside it on a second thread (the express lane), so a short
    # request never waits for a heavy one. A call merged from many cheap requests is not heavy:
    # one call at a time gives more throughput. 0: off.
    express_cost: int = Field(
        4096,
        ge=0,
        description="A request (or its part in one call) costing more is heavy: cheaper "
        "calls run beside it.",
    )
    # Attention weights returned per request: n_best x target x source subwords per text.
    max_alignment_values: int = Field(1 << 20, ge=1, description="Alignment numbers per response.")
    request_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait and run (default and maximum)."
    )
    header_timeout: float = Field(10.0, gt=0, description="Seconds to receive request headers.")
    body_timeout: float = Field(30.0, gt=0, description="Seconds to receive a request body.")
    max_connections: int = Field(512, ge=1, description="Open connections per process.")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds to finish running work at shutdown."
    )
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
        if self.backend is not None:
            check_backend_url(self.backend)
        return self

    @classmethod
    def default(cls, field: str):
        """A field's default value (what the CLI shows and uses when an option is not given)."""
        return cls.model_fields[field].default


def check_backend_url(url: str) -> None:
    """A ValueError unless `url` is a bare TF Serving REST base URL (`http[s]://host[:port]`).

    Credentials, paths, queries and fragments are refused, and the message never repeats the
    URL: whatever follows the scheme may be a secret.
    """
    usage = "--backend must be a TF Serving REST base URL such as http://127.0.0.1:8501"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{usage}: this one does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", url):
        raise ValueError(f"{usage}: it needs http:// or https:// and a host")
    if "@" in parts.netloc:
        raise ValueError(
            f"{usage}, without credentials (user:password@): they would show in logs and "
            "errors. Put an authenticating proxy on loopback in front of TF Serving instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.rstrip().endswith("?"):
        raise ValueError(f"{usage}, without a path, query or fragment")
