"""Where the model runs: in-process (`SavedModelBackend`) or in TF Serving (`RemoteBackend`).

Both speak TF Serving's terms: signatures by name, a batch of texts plus the signature's scalar
inputs in, a dict of numpy arrays out, and TF Serving's status and metadata JSON.
"""

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from translator.config import decoding_options, load_config
from translator.server.errors import BackendError, ModelInputError
from translator.server.protocol import DEFAULT_SIGNATURE, TRANSLATE_SIGNATURE
from translator.server.settings import ServerSettings

log = logging.getLogger("translator.server")


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


def decoding_defaults(model_dir) -> dict:
    """`beam_size` and `length_penalty` from an export's config.yaml (else the config defaults)."""
    decoding = None
    if model_dir is not None:
        path = Path(model_dir)
        for candidate in (path / "config.yaml", path.parent / "config.yaml"):
            if candidate.is_file():
                decoding = load_config(candidate).decoding
                break
    options = decoding_options(decoding)
    return {"beam_size": options["beam_size"], "length_penalty": options["length_penalty"]}


def trim_padding(outputs: dict) -> dict:
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


class Backend:
    """What the service needs from a model: load, predict, status and metadata.

    `predict`, `load`, `status` and `metadata` may block (the service runs them on a thread);
    the others are quick. The defaults describe one loaded version held in this process.
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

    def serves_version(self, version: int) -> bool:
        """Whether `version` may be asked for (in-process, only the loaded one exists)."""
        return version == self.version

    def status(self, version=None) -> dict:
        """TF Serving's model status JSON (`GET /v1/models/{name}`)."""
        return {
            "model_version_status": [
                {
                    "version": str(self.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def metadata(self, version=None) -> dict:
        """TF Serving's model metadata JSON (`GET /v1/models/{name}/metadata`)."""
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
            "metadata": {"signature_def": self.signature_defs()},
        }

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

    def serves_version(self, version: int) -> bool:
        return True  # TF Serving may hold other versions: it answers for them

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


def create_backend(settings: ServerSettings) -> Backend:
    """`RemoteBackend` when `settings.backend` is set, else `SavedModelBackend`."""
    if settings.backend:
        model_dir = Path(settings.model)
        defaults = decoding_defaults(model_dir if model_dir.is_dir() else None)
        return RemoteBackend(
            settings.backend, settings.name, defaults, timeout=settings.backend_timeout
        )
    return SavedModelBackend(settings.model, settings.name)
