"""The service's exceptions and its one error body, `{"error": message[, "details": [...]]}`."""

from typing import Any

from fastapi.responses import JSONResponse


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


class ModelLoadError(Exception):
    """No version of the model loads: permanent, so `translator serve` exits. The message names
    the model and its versions, never a filesystem path (it reaches clients)."""


class BackendError(Exception):
    """The backend answered an error; `status` is the HTTP status to pass on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# Every 503 says when to come back (overload, loading, shutting down): a client or proxy that
# honours it retries soon, one that does not is no worse off.
RETRY_AFTER = {"Retry-After": "1"}


def error_response(status: int, message: str, details=None, headers=None) -> JSONResponse:
    """The JSON error body every 4xx and 5xx of the service has; a 503 has `Retry-After`."""
    if status == 503:
        headers = {**RETRY_AFTER, **(headers or {})}
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
