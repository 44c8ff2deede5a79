"""What `translator serve` is told: the model, the backend and the service's limits."""

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from translator.config import DecodingConfig, field_bounds

SETTINGS_ENV = "TRANSLATOR_SERVE_SETTINGS"  # the settings as JSON, for `--workers` processes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[0-9]{1,18}$"
# The largest beam size the export's `translate` signature accepts.
MAX_BEAM_SIZE = field_bounds(DecodingConfig, "beam_size")[1]


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
    max_beam_size: int = Field(
        16, ge=1, le=MAX_BEAM_SIZE, description="Largest beam_size accepted."
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
        if self.backend is not None and not re.match(r"^https?://[^/\s]+/?$", self.backend):
            raise ValueError(
                f"--backend must be a TF Serving REST base URL such as http://127.0.0.1:8501, "
                f"got {self.backend!r}"
            )
        return self

    @classmethod
    def default(cls, field: str):
        """A field's default value (what the CLI shows and uses when an option is not given)."""
        return cls.model_fields[field].default
