"""TensorFlow Serving's REST dialect: `:predict` (row and columnar formats), model status and
metadata, with TF Serving's JSON shapes and its `{"error": ...}` bodies, so clients can move to
a TF Serving deployment unchanged."""

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.responses import Response

from translator.server.backends import SignatureInfo
from translator.server.errors import ApiError
from translator.server.middleware import require_json_object
from translator.server.protocol import (
    ALIGNMENT_DECIMALS,
    DEFAULT_SIGNATURE,
    LENGTH_PENALTY_BOUNDS,
    ErrorBody,
    ModelMetadataResponse,
    ModelStatusResponse,
    PredictRequest,
    PredictResponse,
    RawJSON,
    dumps,
    float_array_json,
    jsonable,
    valid_unicode,
)
from translator.server.service import Service, ServiceState
from translator.server.settings import NAME_PATTERN, VERSION_PATTERN, ServerSettings

ModelName = Annotated[str, PathParam(description="The model's name, e.g. en-fr.")]
Version = Annotated[str, PathParam(pattern=VERSION_PATTERN, description="A model version number.")]
NOT_FOUND = {404: {"model": ErrorBody, "description": "No such model or version."}}

router = APIRouter()


# Outputs written rounded (attention weights: a large tensor where 5 decimals are plenty).
ROUNDED_OUTPUTS = {"alignments": ALIGNMENT_DECIMALS}
# Outputs that hold one number per hypothesis x target x source subword.
ALIGNMENT_OUTPUTS = ("alignments",)


def check_model(
    state: ServiceState, name: str, version: str | None, failed_too: bool = False
) -> int | None:
    """The version number asked for, once the model name and version are known to exist
    (`failed_too`: also a version that failed to load, whose status says why)."""
    if ":" in name:  # GET /v1/models/x:predict
        raise ApiError(405, f"use POST for {name}", headers={"Allow": "POST"})
    if not re.match(NAME_PATTERN, name):
        raise ApiError(400, f"Malformed model name {name!r}: use letters, digits, '.', '_' and '-'")
    number = int(version) if version is not None else None
    spec = f"Specific({name}, {number})" if number is not None else f"Latest({name})"
    backend = state.backend
    if name != backend.name:
        raise ApiError(404, f"Servable not found for request: {spec}")
    if failed_too and number is not None and number in backend.failed_versions:
        return number
    state.require_ready()
    if number is not None and not backend.serves_version(number):
        raise ApiError(404, f"Servable not found for request: {spec}")
    return number


# -- routes ------------------------------------------------------------------------------------

PREDICT = dict(
    response_model=PredictResponse,
    responses=NOT_FOUND,
    summary="TF Serving predict (row or columnar format)",
    dependencies=[Depends(require_json_object)],
)
STATUS = dict(
    response_model=ModelStatusResponse, responses=NOT_FOUND, summary="TF Serving model status"
)
METADATA = dict(
    response_model=ModelMetadataResponse,
    responses=NOT_FOUND,
    summary="TF Serving model metadata (signatures)",
)


async def predict(state: ServiceState, name: str, version: str | None, body: PredictRequest):
    number = check_model(state, name, version)
    call = parse_predict(body, state.backend.signatures(), state.settings)
    alignments = any(k in ALIGNMENT_OUTPUTS for k in call.outputs)
    outputs = await state.predict(
        call.signature.name,
        number,
        call.texts,
        call.scalars,
        alignments=int(call.scalars.get("n_best", 1)) if alignments else 0,
        padded=True,
        timeout=body.timeout,
    )
    return Response(await state.off_loop(encode_predict, call, outputs), media_type=JSON)


@router.post("/v1/models/{name}:predict", **PREDICT)
async def predict_latest(name: ModelName, body: PredictRequest, state: Service):
    return await predict(state, name, None, body)


@router.post("/v1/models/{name}/versions/{version}:predict", **PREDICT)
async def predict_version(name: ModelName, version: Version, body: PredictRequest, state: Service):
    return await predict(state, name, version, body)


@router.get("/v1/models/{name}", **STATUS)
async def status_latest(name: ModelName, state: Service):
    return await state.call_backend(state.backend.status, check_model(state, name, None))


@router.get("/v1/models/{name}/versions/{version}", **STATUS)
async def status_version(name: ModelName, version: Version, state: Service):
    number = check_model(state, name, version, failed_too=True)
    return await state.call_backend(state.backend.status, number)


@router.get("/v1/models/{name}/metadata", **METADATA)
async def metadata_latest(name: ModelName, state: Service):
    return await state.call_backend(state.backend.metadata, check_model(state, name, None))


@router.get("/v1/models/{name}/versions/{version}/metadata", **METADATA)
async def metadata_version(name: ModelName, version: Version, state: Service):
    return await state.call_backend(state.backend.metadata, check_model(state, name, version))


# -- the request format ------------------------------------------------------------------------


JSON = "application/json"


@dataclass
class PredictCall:
    signature: SignatureInfo
    texts: list[str]
    scalars: dict[str, Any]
    row_format: bool
    outputs: tuple[str, ...] = ()  # the outputs to return (output_filter); () means every one


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
        valid_unicode(value)
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
    low, high = LENGTH_PENALTY_BOUNDS
    for i, value in enumerate(alpha if isinstance(alpha, list) else [alpha]):
        if value is not None and not low <= value <= high:
            name = f"length_penalty[{i}]" if isinstance(alpha, list) else "length_penalty"
            raise ApiError(400, f"{where}{name} must be between {low:g} and {high:g}")


def parse_predict(
    body: PredictRequest, signatures: dict[str, SignatureInfo], limits: ServerSettings
) -> PredictCall:
    """Reads a TF Serving predict request the way TF Serving does, with this service's limits.

    Row format (`instances`) stacks every instance's values into a batch, so it cannot carry
    rank-0 inputs (the `translate` signature's beam_size and n_best): such a request is refused
    with a 400 that points at the columnar format, as TF Serving refuses it. An input of
    unknown rank (`length_penalty` in current exports) takes one number, or a list of one per
    text, in the columnar format.
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
    if has_instances:
        call = _parse_instances(body.instances, signature, limits)
    else:
        call = _parse_inputs(body.inputs, signature, limits)
    call.outputs = tuple(signature.outputs)
    if body.output_filter is not None:
        unknown = sorted(set(body.output_filter) - set(signature.outputs))
        if unknown:
            raise ApiError(
                400,
                f"output_filter: unknown output(s) {unknown} of signature {name!r}: it has "
                f"{sorted(signature.outputs)}",
            )
        call.outputs = tuple(k for k in signature.outputs if k in body.output_filter)
    return call


def _parse_instances(instances, signature: SignatureInfo, limits: ServerSettings) -> PredictCall:
    name, text_key = signature.name, signature.text_input
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
            raise ApiError(400, f"Expecting value/list but got object at item {i} of input list")
        texts.append(_string_value(instance, where, limits))
    return PredictCall(signature, texts, {}, row_format=True)


def _parse_inputs(inputs, signature: SignatureInfo, limits: ServerSettings) -> PredictCall:
    name, text_key = signature.name, signature.text_input
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
    scalars = {}
    for key, dtype in signature.scalars.items():
        value = inputs[key]
        if key in signature.row_inputs and isinstance(value, list):
            # An input of unknown rank takes one value per text, as TF Serving would feed it.
            if len(value) != len(texts):
                raise ApiError(
                    400,
                    f"inputs.{key} has {len(value)} values for {len(texts)} texts: give one "
                    "value, or one per text",
                )
            scalars[key] = [
                _scalar_value(v, key, dtype, f"inputs.{key}[{i}]") for i, v in enumerate(value)
            ]
        else:
            scalars[key] = _scalar_value(value, key, dtype, f"inputs.{key}")
    _check_decoding(scalars, limits, "inputs: ")
    return PredictCall(signature, texts, scalars, row_format=False)


def _is_object(value) -> bool:
    return isinstance(value, dict) and not (set(value) == {"b64"})


def _check_count(n: int, limits: ServerSettings) -> None:
    if n > limits.max_texts:
        raise ApiError(400, f"{n} texts in one request, the limit is {limits.max_texts}")


def format_predict(call: PredictCall, outputs: dict) -> dict:
    """The outputs in the request's format: `predictions` (rows) or `outputs` (columns).

    Only the outputs `call` asks for (its output_filter); large float outputs (`alignments`)
    rounded and pre-encoded, one row at a time (`float_array_json`).
    """
    wanted = call.outputs or tuple(call.signature.outputs)
    names = [k for k in wanted if k in outputs] or sorted(outputs)
    if call.row_format:
        columns = {k: jsonable(_rounded(k, outputs[k])) for k in names}
    else:
        columns = {k: _column(k, outputs[k]) for k in names}
    if call.row_format:
        if len(names) == 1:
            return {"predictions": columns[names[0]]}
        rows = len(call.texts)
        return {"predictions": [{k: columns[k][i] for k in names} for i in range(rows)]}
    if len(names) == 1:
        return {"outputs": columns[names[0]]}
    return {"outputs": columns}


def encode_predict(call: PredictCall, outputs: dict) -> bytes:
    """The response body: TF Serving writes NaN and Infinity as bare tokens, and so does this."""
    return dumps(format_predict(call, outputs), allow_nan=True)


def _rounded(name: str, array):
    decimals = ROUNDED_OUTPUTS.get(name)
    if decimals is None or np.asarray(array).dtype.kind != "f":
        return array
    return np.round(np.asarray(array, dtype=np.float64), decimals)


def _column(name: str, array):
    decimals = ROUNDED_OUTPUTS.get(name)
    if decimals is not None and np.asarray(array).dtype.kind == "f":
        return RawJSON(float_array_json(array, decimals))
    return jsonable(array)
