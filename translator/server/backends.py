"""Where the model runs: in-process (`SavedModelBackend`) or in TF Serving (`RemoteBackend`).

Both speak TF Serving's terms: signatures by name, a batch of texts plus the signature's scalar
inputs in, a dict of numpy arrays out, and TF Serving's status and metadata JSON.
"""

import functools
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from translator import segmentation
from translator.config import decoding_options, load_config
from translator.files import version_dirs
from translator.server.errors import BackendError, ModelInputError, ModelLoadError
from translator.server.protocol import DEFAULT_SIGNATURE, TRANSLATE_SIGNATURE
from translator.server.settings import ServerSettings, check_backend_url
from translator.tokenizer import sentencepiece_files

log = logging.getLogger("translator.server")


@dataclass
class SignatureInfo:
    """A signature's inputs and outputs as TF Serving's metadata describes them."""

    name: str
    inputs: dict[str, tuple[str, int | None]]  # name -> (dtype, rank or None if unknown)
    outputs: list[str]
    text_input: str | None = None  # the rank-1 DT_STRING input
    # The numeric inputs of rank 0, and of unknown rank -> dtype: one value per call.
    scalars: dict[str, str] = field(default_factory=dict)
    # Those of unknown rank (`translate`'s length_penalty): they also take one value per text,
    # so requests that differ in them can share a model call.
    row_inputs: frozenset[str] = frozenset()

    @classmethod
    def from_metadata(cls, name: str, signature_def: dict) -> "SignatureInfo":
        def rank(info):
            shape = info.get("tensor_shape") or {}
            return None if shape.get("unknown_rank") else len(shape.get("dim") or [])

        inputs = {k: (v.get("dtype", ""), rank(v)) for k, v in signature_def["inputs"].items()}
        info = cls(name, inputs, list(signature_def.get("outputs", {})))
        rows = set()
        for key, (dtype, r) in sorted(inputs.items()):
            if dtype == "DT_STRING" and r == 1 and info.text_input is None:
                info.text_input = key
            elif r in (0, None) and dtype in ("DT_INT32", "DT_INT64", "DT_FLOAT", "DT_DOUBLE"):
                info.scalars[key] = dtype
                if r is None:
                    rows.add(key)
        info.row_inputs = frozenset(rows)
        return info

    @property
    def servable(self) -> bool:
        """Whether this service can feed it: one string vector and numeric scalars."""
        return self.text_input is not None and len(self.scalars) + 1 == len(self.inputs)


def _decoding(model_dir) -> dict:
    """The decoding options of an export's config.yaml (else the config defaults)."""
    decoding = None
    if model_dir is not None:
        path = Path(model_dir)
        for candidate in (path / "config.yaml", path.parent / "config.yaml"):
            if candidate.is_file():
                decoding = load_config(candidate).decoding
                break
    return decoding_options(decoding)


def decoding_defaults(model_dir) -> dict:
    """`beam_size` and `length_penalty` from an export's config.yaml (else the config defaults)."""
    options = _decoding(model_dir)
    return {"beam_size": options["beam_size"], "length_penalty": options["length_penalty"]}


# `translator.inference.Translator`'s `max_source_length`: the graph accepts this many source
# subwords (end-of-sentence included) and refuses more. Not in config.yaml: every export has it.
MAX_SOURCE_LENGTH = 256


@dataclass
class LengthModel:
    """How a text is cut into sentences, how long their subwords and translations can get:
    what a request costs.

    With the export's SentencePiece model, a text's source length is its exact subword count
    (the graph tokenizes with the same model); without one (a remote backend with no local
    export), it is bounded by its characters + 1 (a piece has at least one character; "▁" may
    stand alone before the first). Either way plus `</s>`.

    Args:
        max_length_ratio, max_length_offset: The export's output limit, ratio x source + offset.
        max_source_length: Source subwords (`</s>` included) the graph accepts; it refuses more.
        sentencepiece: Path of the source side's SentencePiece model, or None.
        split_length: The longest source the model was trained on (config `data.max_length`):
            `segment` cuts longer sentences at clause boundaries. None: only the graph's limit.
    """

    max_length_ratio: float = 2.0
    max_length_offset: int = 10
    max_source_length: int = MAX_SOURCE_LENGTH
    sentencepiece: str | None = None
    split_length: int | None = None
    _counter: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_export(cls, model_dir) -> "LengthModel":
        """The limits of an export directory (base or version directory), if it is local."""
        if model_dir is None or not Path(model_dir).is_dir():
            return cls()
        path = Path(model_dir)
        options, split_length = _decoding(path), None
        for folder in (path, path.parent):
            if (folder / "config.yaml").is_file():
                split_length = load_config(folder / "config.yaml").data.max_length
                break
        spm = None
        for folder in (path, path.parent):
            files = sentencepiece_files(folder)
            if files is not None:
                spm = str(files[0])
                break
        return cls(
            options["max_length_ratio"],
            options["max_length_offset"],
            sentencepiece=spm,
            split_length=split_length,
        )

    def count_tokens(self, text: str) -> int:
        """Source subwords of `text`, `</s>` not counted (an upper bound without the
        SentencePiece model). Cached: a request's sentences are counted when it is cut and
        again when it is admitted."""
        if self._counter is None:
            if self.sentencepiece is None:
                count = _characters_bound
            else:
                count = segmentation.sentencepiece_counter(self.sentencepiece)
            self._counter = functools.lru_cache(maxsize=16_384)(count)
        return self._counter(text)

    def source_lengths(self, texts: list[str]) -> list[int]:
        """Each text's source subwords as the graph sees them, `</s>` included."""
        return [self.count_tokens(text) + 1 for text in texts]

    def output_length(self, source_length: int) -> int:
        """The most subwords the search may generate for a source of this length."""
        return math.ceil(self.max_length_ratio * source_length) + self.max_length_offset

    def segment(
        self, text: str, split_sentences: bool = True, protect: bool = True
    ) -> segmentation.Segmented:
        """`text` cut into the units to translate, as `translator.Translator.translate` cuts
        it: sentences (with `split_sentences`), placeholders (with `protect`), and units over
        `split_length` (with `split_sentences`) or over the graph's limit cut at clause
        boundaries."""
        max_tokens = self.max_source_length - 1
        if split_sentences and self.split_length is not None:
            max_tokens = min(max_tokens, self.split_length)
        return segmentation.segment(
            text,
            split_sentences=split_sentences,
            protect=protect,
            max_tokens=max_tokens,
            count_tokens=self.count_tokens,
        )


def _characters_bound(text: str) -> int:
    return len(text) + 1


def trim_padding(outputs: dict) -> dict:
    """Cuts padding shared with other requests of a batch (the `translate` signature's tokens
    and alignments), so a request's outputs do not depend on what it was batched with (except
    with an export of `compute_dtype: adaptive`, whose call picks float32 or bfloat16 by its
    number of rows: a request merged into a large call gets bfloat16 rounding)."""
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
    lengths: LengthModel = LengthModel()  # what a request costs; from the export when local
    # Versions that failed to load -> why (no paths). Never mutated here: a backend that falls
    # back to an older version sets its own.
    failed_versions: dict[int, str] = {}

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
        """TF Serving's model status JSON (`GET /v1/models/{name}`): the served version
        AVAILABLE, and each version that failed to load in state END with its error, as TF
        Serving reports them; only `version` when one is asked for."""
        entries = {}
        if self.loaded:
            entries[int(self.version)] = {
                "version": str(self.version),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        for number, message in self.failed_versions.items():
            entries.setdefault(
                number,
                {
                    "version": str(number),
                    "state": "END",
                    "status": {"error_code": "UNKNOWN", "error_message": message},
                },
            )
        if version is not None:
            entries = {k: v for k, v in entries.items() if k == int(version)}
        return {"model_version_status": [entries[k] for k in sorted(entries, reverse=True)]}

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

    The newest version is served; one that fails to load (or to warm up) is reported and the
    next older one is tried, as TF Serving serves what it can. When none loads, `load` raises
    `ModelLoadError`. Errors meant for clients name versions, never filesystem paths.

    Args:
        path: The export's base directory (latest version) or one version directory.
        name: The model name served in URLs.
    """

    def __init__(self, path, name: str):
        self.path = Path(path)
        self.name = name
        self.defaults = decoding_defaults(self.path)
        self.lengths = LengthModel.from_export(self.path)
        self.failed_versions = {}
        self._loaded_model = None
        self._signature_defs = None
        self._lock = threading.Lock()

    def _candidates(self) -> list[tuple[int, Path]]:
        """The version directories to try, newest first."""
        if (self.path / "saved_model.pb").is_file():
            name = self.path.name
            return [(int(name) if name.isdigit() else 1, self.path)]
        return list(reversed(version_dirs(self.path)))

    def load(self) -> None:
        with self._lock:
            if self.loaded:
                return
            candidates = self._candidates()
            if not candidates:
                raise ModelLoadError(f"model {self.name} has no version to load")
            for number, version_dir in candidates:
                started = time.perf_counter()
                try:
                    self._load_version(number, version_dir)
                except Exception as e:  # noqa: BLE001 - reported, then the next version
                    log.error("version %s of %s (%s) failed to load: %s", number, self.name,
                              version_dir, e)  # fmt: skip
                    self.failed_versions[number] = public_reason(e, self.path)
                    self._loaded_model = self._signature_defs = None
                    continue
                self.loaded = True
                log.info(
                    "loaded %s version %s and warmed it up in %.1f s",
                    version_dir,
                    number,
                    time.perf_counter() - started,
                )
                return
            reasons = "; ".join(f"version {v}: {self.failed_versions[v]}" for v, _ in candidates)
            raise ModelLoadError(f"no version of model {self.name} loads ({reasons})")

    def _load_version(self, number: int, version_dir: Path) -> None:
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        from translator.export import load_saved_model

        loaded, version_dir = load_saved_model(version_dir)
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
        self.version = number
        self.warm_up()

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


# An absolute path (POSIX or Windows) inside an error message.
_PATH = re.compile(
    r"(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/:;,()\[\]{}<>|]+[\\/])+[^\s'\"\\/:;,()\[\]{}<>|]*"
)


def public_reason(error: BaseException, *paths) -> str:
    """What went wrong, for clients: the root cause's type and first line (the errors wrapped
    around it mostly add where it happened), with the given paths and any other absolute path
    cut out: clients learn a model name, not the server's disk."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    text = _first_line(str(error)) if str(error) else ""
    for path in paths:
        for form in sorted({str(path), str(Path(path).resolve())}, key=len, reverse=True):
            if form not in ("", "."):
                text = text.replace(form, "")
    text = _PATH.sub("<path>", text)
    text = re.sub(r"\s+", " ", text).strip(" :")
    reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


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

        check_backend_url(url)  # no credentials: the URL shows in errors and logs
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
    """A TF Serving JSON tensor as numpy: strings as objects, ints as int64, numbers as float32
    (converted in C: an alignment tensor can hold millions of numbers)."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return np.array(value, dtype=object)
    if array.dtype.kind == "U":
        return array.astype(object)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    return array


def create_backend(settings: ServerSettings) -> Backend:
    """`RemoteBackend` when `settings.backend` is set, else `SavedModelBackend`."""
    if settings.backend:
        model_dir = Path(settings.model)
        defaults = decoding_defaults(model_dir if model_dir.is_dir() else None)
        backend = RemoteBackend(
            settings.backend, settings.name, defaults, timeout=settings.backend_timeout
        )
        backend.lengths = LengthModel.from_export(model_dir if model_dir.is_dir() else None)
        return backend
    return SavedModelBackend(settings.model, settings.name)
