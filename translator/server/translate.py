"""`POST /v1/translate`: English texts in, French translations out (with n-best lists and
attention alignments on request)."""

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel

from translator.server.errors import ApiError
from translator.server.middleware import require_json_object
from translator.server.protocol import (
    ALIGNMENT_DECIMALS,
    DEFAULT_SIGNATURE,
    TRANSLATE_SIGNATURE,
    ErrorBody,
    RawJSON,
    TranslateResponse,
    dumps,
    finite,
    float_array_json,
    text_items,
    translate_request_model,
)
from translator.server.service import Service, ServiceState
from translator.server.settings import ServerSettings


async def translate(body: BaseModel, state: ServiceState) -> Response:
    """Translates `body.text` or `body.texts`: the plain signature unless options are given.

    The model sees the rows of one `state.predict` (which admits them by cost, within the
    request's deadline); the response is formatted and encoded on a worker thread."""
    state.require_ready()
    backend = state.backend
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
        outputs = await state.predict(DEFAULT_SIGNATURE, None, texts, {}, timeout=body.timeout)
    else:
        alpha = body.length_penalty
        scalars = {
            "beam_size": beam,
            "n_best": body.n_best,
            "length_penalty": float(alpha if alpha is not None else defaults["length_penalty"]),
        }
        outputs = await state.predict(
            TRANSLATE_SIGNATURE,
            None,
            texts,
            scalars,
            alignments=int(body.return_alignment),
            timeout=body.timeout,
        )
    model = {"name": backend.name, "version": str(backend.version)}
    options = (plain, body.n_best, body.return_alignment)
    content = await state.off_loop(_encode, outputs, len(texts), options, model)
    return Response(content, media_type="application/json")


def _encode(outputs: dict, rows: int, options: tuple, model: dict) -> bytes:
    """The response body (on a worker thread: alignments can be large)."""
    plain, n_best, return_alignment = options
    if plain:
        translations = [
            {"text": t, "score": finite(s)}
            for t, s in zip(
                text_items(outputs["translation"]), outputs["score"].tolist(), strict=True
            )
        ]
    else:
        translations = [_translation(outputs, row, n_best, return_alignment) for row in range(rows)]
    return dumps({"translations": translations, "model": model})


def _translation(outputs: dict, row: int, n_best: int, return_alignment: bool) -> dict:
    texts = text_items(outputs["translations"][row])
    scores = [finite(s) for s in outputs["scores"][row].tolist()]
    result: dict[str, Any] = {"text": texts[0], "score": scores[0]}
    if n_best > 1:
        result["n_best"] = [
            {"text": t, "score": s} for t, s in zip(texts[:n_best], scores[:n_best], strict=True)
        ]
    if return_alignment:
        s = int(outputs["source_lengths"][row])
        t = int(outputs["target_lengths"][row][0])
        weights = np.nan_to_num(np.asarray(outputs["alignments"][row][0], np.float64)[:t, :s])
        result["alignment"] = {
            "source_tokens": text_items(outputs["source_tokens"][row][:s]),
            "target_tokens": text_items(outputs["target_tokens"][row][0][:t]),
            "weights": RawJSON(float_array_json(weights, ALIGNMENT_DECIMALS)),
        }
    return result


def translate_router(settings: ServerSettings) -> APIRouter:
    """The `/v1/translate` route. Its request model states this service's limits (text length,
    texts per request, beam size) in the OpenAPI schema, so the route is made per app."""
    TranslateRequest = translate_request_model(settings)

    async def translate_route(body: TranslateRequest, state: Service) -> Response:  # type: ignore[valid-type]
        return await translate(body, state)

    router = APIRouter()
    router.add_api_route(
        "/v1/translate",
        translate_route,
        methods=["POST"],
        name="translate",
        dependencies=[Depends(require_json_object)],
        response_model=TranslateResponse,
        responses={422: {"model": ErrorBody, "description": "Invalid field values."}},
        summary="Translate English text to French",
    )
    return router
