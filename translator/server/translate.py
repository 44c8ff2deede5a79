"""`POST /v1/translate`: English texts in (sentences, paragraphs, lines), French translations
out (with n-best lists and attention alignments on request)."""

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel

from translator.inference import Translation, combine_sentences
from translator.server.errors import ApiError
from translator.server.middleware import require_json_object
from translator.server.protocol import (
    ALIGNMENT_DECIMALS,
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
    """Translates `body.text` or `body.texts` as `translator.Translator.translate` does: each
    text cut into sentences (`segment`), numbers and code kept (`protect`), every sentence of
    the request in one `state.predict` through the `translate` signature (admitted by cost,
    within the request's deadline), and each text's translations joined back with its own
    spacing. Cutting and formatting run on a worker thread."""
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
    segmented = await state.off_loop(_segment, texts, backend.lengths, body.segment, body.protect)
    units = [sentence for seg in segmented for sentence in seg.sentences]
    outputs = None
    if units:  # texts that are all empty or whitespace need no model call
        alpha = body.length_penalty
        scalars = {
            "beam_size": beam,
            "n_best": body.n_best,
            "length_penalty": float(alpha if alpha is not None else defaults["length_penalty"]),
        }
        outputs = await state.predict(
            TRANSLATE_SIGNATURE,
            None,
            units,
            scalars,
            alignments=int(body.return_alignment),
            timeout=body.timeout,
        )
    model = {"name": backend.name, "version": str(backend.version)}
    options = (body.n_best, body.return_alignment)
    content = await state.off_loop(_encode, outputs, segmented, options, model)
    return Response(content, media_type="application/json")


def _segment(texts: list[str], lengths, split_sentences: bool, protect: bool) -> list:
    """Each text's `Segmented` (on a worker thread: sentence splitting and subword counts)."""
    return [lengths.segment(text, split_sentences, protect) for text in texts]


def _encode(outputs: dict | None, segmented: list, options: tuple, model: dict) -> bytes:
    """The response body (on a worker thread: alignments can be large)."""
    n_best, return_alignment = options
    translations, row = [], 0
    for seg in segmented:
        count = len(seg.units)
        units = [_unit(outputs, r, return_alignment) for r in range(row, row + count)]
        row += count
        combined = combine_sentences(seg, units, n_best, return_alignment)
        translations.append(_translation(combined, n_best, return_alignment))
    return dumps({"translations": translations, "model": model})


def _unit(outputs: dict, row: int, return_alignment: bool) -> tuple[Translation, np.ndarray]:
    """One sentence's raw result and its hypotheses' target lengths."""
    texts = text_items(outputs["translations"][row])
    scores = [float(s) for s in outputs["scores"][row].tolist()]
    result = Translation(
        text=texts[0], score=scores[0], n_best=list(zip(texts, scores, strict=True))
    )
    if return_alignment:
        s = int(outputs["source_lengths"][row])
        t = int(outputs["target_lengths"][row][0])
        result.source_tokens = text_items(outputs["source_tokens"][row][:s])
        result.target_tokens = text_items(outputs["target_tokens"][row][0][:t])
        result.alignment = np.nan_to_num(
            np.asarray(outputs["alignments"][row][0], np.float32)[:t, :s]
        )
    return result, np.asarray(outputs["target_lengths"][row])


def _translation(combined: Translation, n_best: int, return_alignment: bool) -> dict:
    result: dict[str, Any] = {"text": combined.text, "score": finite(combined.score)}
    if n_best > 1:
        result["n_best"] = [{"text": t, "score": finite(s)} for t, s in combined.n_best]
    if return_alignment:
        result["alignment"] = {
            "source_tokens": combined.source_tokens,
            "target_tokens": combined.target_tokens,
            "weights": RawJSON(float_array_json(combined.alignment, ALIGNMENT_DECIMALS)),
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
