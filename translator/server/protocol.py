"""The service's request and response models (pydantic), and how tensors become JSON values."""

import json
import math
import re
import secrets
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from translator.config import DecodingConfig, field_bounds
from translator.server.settings import ServerSettings

DEFAULT_SIGNATURE = "serving_default"
TRANSLATE_SIGNATURE = "translate"
LENGTH_PENALTY_BOUNDS = field_bounds(DecodingConfig, "length_penalty")
ALIGNMENT_DECIMALS = 5  # attention weights in responses: 0.12346, not 0.123456789
Timeout = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
TIMEOUT_DESCRIPTION = (
    "Seconds this request may wait and run before it is answered 504 (default and maximum: "
    "the server's --request-timeout)."
)


def valid_unicode(text: str) -> str:
    """`text` if it encodes as UTF-8, else a ValueError naming the lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text contains a lone surrogate at character {e.start} (not valid Unicode)"
        ) from e
    return text


# -- errors and health -------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Validation problems, one per field (`loc`, `msg`)."
    )


class ModelInfo(BaseModel):
    name: str
    version: str


class VersionFailure(BaseModel):
    version: str
    error: str = Field(description="Why it failed to load (the model is named, no paths).")


class Health(BaseModel):
    status: str
    error: str | None = None
    model: ModelInfo | None = None
    failed_versions: list[VersionFailure] | None = Field(
        None, description="Versions that failed to load; an older one is served instead."
    )


# -- /v1/translate -----------------------------------------------------------------------------


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


class TranslateResponse(BaseModel):
    translations: list[TranslationOut]
    model: ModelInfo


def translate_request_model(settings: ServerSettings) -> type[BaseModel]:
    """The `/v1/translate` body, with the service's limits in its schema."""
    TextField = Annotated[
        str,
        Field(strict=True, max_length=settings.max_text_chars),
        AfterValidator(valid_unicode),
    ]
    low, high = (float(bound) for bound in LENGTH_PENALTY_BOUNDS)

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
            float, Field(strict=True, ge=low, le=high), Field(allow_inf_nan=False)
        ] = Field(None, description="GNMT length penalty alpha; default: the model's config.")
        return_alignment: Annotated[bool, Field(strict=True)] = Field(
            False, description="Also return subword tokens and attention weights."
        )
        segment: Annotated[bool, Field(strict=True)] = Field(
            True,
            description=(
                "Cut each text into sentences (a line break always ends one; over-long "
                "sentences are cut at clause boundaries), translate them all and join their "
                "translations with the text's own spacing. false: each text is translated as "
                "one sentence (still cut at clause boundaries if over the model's source limit)."
            ),
        )
        protect: Annotated[bool, Field(strict=True)] = Field(
            True,
            description="Copy numbers, URLs, e-mail addresses and code-like tokens verbatim.",
        )
        timeout: Timeout = Field(None, description=TIMEOUT_DESCRIPTION)

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


# -- TF Serving's REST API ---------------------------------------------------------------------


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
    # Extensions of TF Serving's REST request (its gRPC PredictRequest has output_filter).
    output_filter: list[str] | None = Field(
        None,
        min_length=1,
        description="Only these outputs (e.g. leave out `alignments`, which cost n_best x "
        "target x source numbers per text); default: every output, as TF Serving.",
    )
    timeout: Timeout = Field(None, description=TIMEOUT_DESCRIPTION)


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


# -- tensors as JSON ---------------------------------------------------------------------------


def text_items(array) -> list:
    """Strings (bytes decoded as UTF-8) from a 1-D array of strings."""
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array]


def jsonable(array: np.ndarray):
    """A tensor as TF Serving writes it: nested lists, strings decoded, floats shortest."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        flat = text_items(array.reshape(-1))
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype.kind == "f":
        # float32 -> its shortest decimal string -> float64: 0.1f prints as 0.1, not 0.10000000149.
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def float_array_json(array, decimals: int) -> str:
    """A float tensor as compact JSON text, rounded to `decimals`, built one innermost row at a
    time: a few bytes per number while encoding, never a Python object per number for the
    whole tensor (nested `tolist()` of a [B, N, T, S] alignment costs ~30 bytes a number, a
    numpy string array 128). NaN and infinities are written as TF Serving writes them."""
    array = np.asarray(array)
    if array.ndim == 0 or array.size == 0:
        return json.dumps(np.round(array.astype(np.float64), decimals).tolist(), allow_nan=True)
    rows = array.reshape(-1, array.shape[-1])
    pieces = [
        json.dumps(np.round(row.astype(np.float64), decimals).tolist(), allow_nan=True,
                   separators=(",", ":"))
        for row in rows
    ]  # fmt: skip
    for size in reversed(array.shape[:-1]):
        pieces = ["[" + ",".join(pieces[i : i + size]) + "]" for i in range(0, len(pieces), size)]
    return pieces[0]


class RawJSON:
    """JSON text to embed as it is in what `dumps` writes (e.g. from `float_array_json`)."""

    def __init__(self, text: str):
        self.text = text


def dumps(value, allow_nan: bool = False) -> bytes:
    """`value` as compact UTF-8 JSON, with every `RawJSON` inside it written verbatim."""
    raws: list[str] = []
    nonce = secrets.token_hex(8)  # placeholders no text of a request can forge

    def default(item):
        if isinstance(item, RawJSON):
            raws.append(item.text)
            return f"\x00{nonce}:{len(raws) - 1}\x00"
        raise TypeError(f"{type(item).__name__} is not JSON serializable")

    text = json.dumps(
        value, ensure_ascii=False, allow_nan=allow_nan, separators=(",", ":"), default=default
    )
    if raws:
        placeholder = re.compile(rf'"\\u0000{nonce}:(\d+)\\u0000"')
        text = placeholder.sub(lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "backslashreplace")


def finite(value) -> float | None:
    """A float32 score as its shortest decimal (-1.7885305), or None when not finite."""
    value = float(str(np.float32(value)))
    return value if math.isfinite(value) else None
