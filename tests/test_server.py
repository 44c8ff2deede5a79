"""`translator serve`: the REST API, TF Serving's REST dialect, bad input, micro-batching,
the TF Serving backend (against a loopback stub), schemathesis, and one real uvicorn process."""

import asyncio
import base64
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.tfserving_stub import TFServingStub
from translator.server import (
    ApiError,
    Backend,
    BackendError,
    BodyLimitMiddleware,
    Metrics,
    MicroBatcher,
    ModelInputError,
    RemoteBackend,
    RequestMetricsMiddleware,
    SavedModelBackend,
    ServerSettings,
    create_app,
    decoding_defaults,
)
from translator.server.testing import free_port, start_server, stop_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["one red cat", "big house", "", "two small dogs and a green tree"]
VALID = {"text": "one red cat"}


@pytest.fixture(scope="module")
def settings(tiny_export_dir):
    return ServerSettings(model=str(tiny_export_dir))  # the documented default limits


@pytest.fixture(scope="module")
def backend(tiny_export_dir):
    backend = SavedModelBackend(tiny_export_dir, "tiny")
    backend.load()
    return backend


@pytest.fixture(scope="module")
def client(backend, settings):
    with TestClient(create_app(backend, settings)) as client:
        yield client


@pytest.fixture(scope="module")
def reference(backend):
    """The export's own signatures, called directly: what the endpoints must reproduce."""
    import tensorflow as tf

    signatures = backend._loaded_model.signatures

    def call(texts, beam_size=None, n_best=1, length_penalty=None):
        if beam_size is None and length_penalty is None and n_best == 1:
            out = signatures["serving_default"](text=tf.constant(texts))
        else:
            out = signatures["translate"](
                text=tf.constant(texts),
                beam_size=tf.constant(beam_size or backend.defaults["beam_size"]),
                n_best=tf.constant(n_best),
                length_penalty=tf.constant(
                    length_penalty if length_penalty is not None else 0.6, tf.float32
                ),
            )
        return {k: v.numpy() for k, v in out.items()}

    return call


def decode(values):
    return [v.decode("utf-8") for v in values]


# -- /v1/translate -----------------------------------------------------------------------------


def test_translate_one_text_and_several_match_the_export(client, reference):
    one = client.post("/v1/translate", json={"text": TEXTS[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"] == {"name": "tiny", "version": "1"}
    expected = reference(TEXTS)
    assert body["translations"][0]["text"] == decode(expected["translation"])[0]
    many = client.post("/v1/translate", json={"texts": TEXTS}).json()["translations"]
    assert all(set(t) == {"text", "score"} for t in many)  # no n_best/alignment unless asked
    # Each sentence as the export translates it; an empty text is its own translation (as in
    # the Python API): no model call, score 0.
    assert many[2] == {"text": "", "score": 0.0}
    sentences = [i for i, text in enumerate(TEXTS) if text]
    assert [many[i]["text"] for i in sentences] == [
        decode(expected["translation"])[i] for i in sentences
    ]
    np.testing.assert_allclose(
        [many[i]["score"] for i in sentences], expected["score"][sentences], atol=1e-4
    )


def test_n_best_and_alignment_have_the_documented_shape(client, reference):
    body = {"texts": TEXTS, "beam_size": 3, "n_best": 2, "length_penalty": 0.8}
    response = client.post("/v1/translate", json={**body, "return_alignment": True})
    assert response.status_code == 200, response.text
    expected = reference(TEXTS, 3, 2, 0.8)
    for row, t in enumerate(response.json()["translations"]):
        assert set(t) == {"text", "score", "n_best", "alignment"}
        assert t["text"] == t["n_best"][0]["text"]
        a = t["alignment"]
        assert set(a) == {"source_tokens", "target_tokens", "weights"}
        if not TEXTS[row]:  # nothing to translate: empty hypotheses and alignment
            assert t["n_best"] == [{"text": "", "score": 0.0}] * 2
            assert a == {"source_tokens": [], "target_tokens": [], "weights": []}
            continue
        assert [h["text"] for h in t["n_best"]] == decode(expected["translations"][row])
        np.testing.assert_allclose(
            [h["score"] for h in t["n_best"]], expected["scores"][row], atol=1e-4
        )
        s, n = int(expected["source_lengths"][row]), int(expected["target_lengths"][row, 0])
        assert a["source_tokens"] == decode(expected["source_tokens"][row, :s])
        assert a["target_tokens"] == decode(expected["target_tokens"][row, 0, :n])
        assert a["source_tokens"][-1] == "</s>" and "" not in a["source_tokens"]
        weights = np.array(a["weights"])
        assert weights.shape == (len(a["target_tokens"]), len(a["source_tokens"]))  # T x S
        np.testing.assert_allclose(weights, expected["alignments"][row, 0, :n, :s], atol=1e-4)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-3)


PARAGRAPHS = [
    "one red cat. two small dogs!\n\n  big house 3 ",
    "green tree; blue car, five dogs. www.example.com red cat",
    "one red cat",
]


@pytest.fixture(scope="module")
def python_api(tiny_export_dir):
    """`translator.load` on the same export: the Python API the endpoint must agree with."""
    from translator import load

    return load(tiny_export_dir)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beam_size": 3, "n_best": 2, "length_penalty": 0.8},
        {"segment": False},
        {"protect": False},
    ],
    ids=["defaults", "n-best", "no-segment", "no-protect"],
)
def test_paragraphs_are_translated_sentence_by_sentence_like_the_python_api(
    client, python_api, options
):
    """Issue 23: every sentence of a paragraph is translated and joined with the text's own
    spacing, numbers and URLs kept; the same result as `Translator.translate`."""
    response = client.post("/v1/translate", json={"texts": PARAGRAPHS, **options})
    assert response.status_code == 200, response.text
    got = response.json()["translations"]
    expected = python_api.translate(PARAGRAPHS, **options)
    for g, e in zip(got, expected, strict=True):
        assert g["text"] == e.text
        assert g["score"] == pytest.approx(e.score, abs=1e-3)
        if options.get("n_best", 1) > 1:
            assert [h["text"] for h in g["n_best"]] == [t for t, _ in e.n_best]
    if options.get("segment", True):
        assert got[0]["text"].startswith(expected[0].sentences[0].text + " ")
        assert "\n\n  " in got[0]["text"] and got[0]["text"].endswith(" ")
        assert len(expected[0].sentences) == 3
    if options.get("protect", True):
        assert "3" in got[0]["text"] and "www.example.com" in got[1]["text"]


def test_a_paragraphs_alignment_is_block_diagonal_over_its_sentences(client, python_api):
    text = "one red cat. two small dogs."
    body = {"text": text, "beam_size": 2, "return_alignment": True}
    a = client.post("/v1/translate", json=body).json()["translations"][0]["alignment"]
    expected = python_api.translate(text, beam_size=2, return_alignment=True)
    assert a["source_tokens"] == expected.source_tokens
    assert a["target_tokens"] == expected.target_tokens
    assert a["source_tokens"].count("</s>") == 2 and a["target_tokens"].count("</s>") == 2
    weights = np.array(a["weights"])
    np.testing.assert_allclose(weights, expected.alignment, atol=1e-3)
    first = expected.sentences[0]
    rows, columns = len(first.target_tokens), len(first.source_tokens)
    assert not weights[:rows, columns:].any() and not weights[rows:, :columns].any()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    "texts",
    [
        ["", "   ", "\t\n"],
        ["Привет, мир", "漢字とかなの文", "مرحبا بالعالم", "🙂🙃 ✓", "Ünïcödé façade"],
        ["nul\u0000inside", "a" * 100, "ﬁ ligature \u200b zero width"],
    ],
    ids=["empty-and-whitespace", "other-scripts", "odd-characters"],
)
def test_unusual_but_valid_texts_get_a_translation(client, texts):
    for body in ({"texts": texts}, {"texts": texts, "beam_size": 2, "return_alignment": True}):
        response = client.post("/v1/translate", json=body)
        assert response.status_code == 200, response.text
        translations = response.json()["translations"]
        assert len(translations) == len(texts)
        assert all(isinstance(t["text"], str) for t in translations)


def test_a_text_over_the_source_limit_is_translated_whole_never_cut(client, python_api):
    """Issue 24 item 8, issue 23: a text over the model's 255 subwords is cut at clause
    boundaries and every piece translated (with `segment: false` too), never truncated; the
    export's own signatures (`:predict`) refuse it, naming the limit."""
    long = "a " * 400 + "one red cat"  # 806 characters, over 255 subwords
    for options in ({}, {"segment": False, "beam_size": 2}):
        response = client.post("/v1/translate", json={"texts": ["one red cat", long], **options})
        assert response.status_code == 200, response.text
        expected = python_api.translate(long, **options)
        assert response.json()["translations"][1]["text"] == expected.text
        assert len(expected.sentences) >= 2  # cut into pieces, each translated
        assert "".join(s.source for s in expected.sentences).replace(" ", "") == long.replace(
            " ", ""
        )  # every word in exactly one piece
    predict = client.post("/v1/models/tiny:predict", json={"instances": ["a " * 400]})
    assert predict.status_code == 400, predict.text
    assert "over the limit of 255 subwords" in predict.text


# -- TF Serving's REST API ---------------------------------------------------------------------


def test_predict_row_and_columnar_formats_of_serving_default(client, reference):
    expected = reference(TEXTS)
    want = decode(expected["translation"])
    for path in ("/v1/models/tiny:predict", "/v1/models/tiny/versions/1:predict"):
        row = client.post(path, json={"instances": TEXTS})
        assert row.status_code == 200, row.text
        predictions = row.json()["predictions"]
        assert [p["translation"] for p in predictions] == want
        np.testing.assert_allclose([p["score"] for p in predictions], expected["score"], atol=1e-5)
    named = client.post("/v1/models/tiny:predict", json={"instances": [{"text": t} for t in TEXTS]})
    assert [p["translation"] for p in named.json()["predictions"]] == want
    b64 = [{"b64": base64.b64encode(t.encode()).decode()} for t in TEXTS]
    encoded = client.post("/v1/models/tiny:predict", json={"instances": b64})
    assert [p["translation"] for p in encoded.json()["predictions"]] == want
    for inputs in (TEXTS, {"text": TEXTS}):
        body = {"signature_name": "serving_default", "inputs": inputs}
        outputs = client.post("/v1/models/tiny:predict", json=body).json()["outputs"]
        assert set(outputs) == {"translation", "score"}
        assert outputs["translation"] == want


def test_predict_columnar_translate_signature_returns_every_output(client, reference):
    body = {
        "signature_name": "translate",
        "inputs": {"text": TEXTS, "beam_size": 3, "n_best": 2, "length_penalty": 0.6},
    }
    response = client.post("/v1/models/tiny:predict", json=body)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    expected = reference(TEXTS, 3, 2, 0.6)
    assert set(outputs) == set(expected)
    assert outputs["translations"] == [decode(row) for row in expected["translations"]]
    assert outputs["source_lengths"] == expected["source_lengths"].tolist()
    # Padding beyond the longest row is cut, so outputs do not depend on what was batched with.
    s, t = int(expected["source_lengths"].max()), int(expected["target_lengths"].max())
    assert np.array(outputs["alignments"]).shape == (len(TEXTS), 2, t, s)
    np.testing.assert_allclose(
        outputs["alignments"], expected["alignments"][:, :, :t, :s], atol=1e-5
    )
    assert np.array(outputs["source_tokens"]).shape == (len(TEXTS), s)


def test_row_format_cannot_carry_the_translate_scalars(client):
    instance = {"text": "one red cat", "beam_size": 2, "n_best": 1, "length_penalty": 0.6}
    body = {"signature_name": "translate", "instances": [instance]}
    response = client.post("/v1/models/tiny:predict", json=body)
    assert response.status_code == 400
    assert "columnar" in response.json()["error"] and "inputs" in response.json()["error"]


def test_status_and_metadata_have_tf_serving_shapes(client):
    status = client.get("/v1/models/tiny")
    assert status.status_code == 200
    assert status.json() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert client.get("/v1/models/tiny/versions/1").json() == status.json()
    metadata = client.get("/v1/models/tiny/metadata").json()
    assert metadata["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    defs = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "translate"} <= set(defs)
    text = defs["serving_default"]["inputs"]["text"]
    assert text["dtype"] == "DT_STRING" and text["tensor_shape"]["dim"][0]["size"] == "-1"
    assert defs["translate"]["inputs"]["beam_size"]["tensor_shape"]["dim"] == []  # scalar
    assert defs["translate"]["method_name"] == "tensorflow/serving/predict"
    assert client.get("/v1/models/tiny/versions/1/metadata").json() == metadata


# -- bad input ---------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
P = "/v1/models/tiny:predict"
TRANSLATE = "/v1/translate"
BAD = [
    # (id, method, path, request kwargs, status, a fragment of the error message)
    ("malformed-json", "POST", TRANSLATE, dict(content=b'{"text": ', headers=JSON), 400, "JSON"),
    ("json-array", "POST", TRANSLATE, dict(json=["one red cat"]), 400, "JSON object"),
    ("json-null", "POST", TRANSLATE, dict(content=b"null", headers=JSON), 400, "JSON object"),
    ("empty-body", "POST", TRANSLATE, dict(content=b"", headers=JSON), 400, "empty"),
    ("deep-nesting", "POST", TRANSLATE, dict(content=b"[" * 50000, headers=JSON), 400, "JSON"),
    ("invalid-utf8", "POST", TRANSLATE, dict(content=b'{"text": "\xff\xfe"}', headers=JSON), 400, "UTF-8"),
    ("lone-surrogate", "POST", TRANSLATE, dict(content=b'{"text": "\\ud800"}', headers=JSON), 422, "text"),
    ("text-plain", "POST", TRANSLATE, dict(content=b'{"text": "a"}', headers={"Content-Type": "text/plain"}), 415, "application/json"),
    ("form", "POST", TRANSLATE, dict(data={"text": "a"}), 415, "application/json"),
    ("no-content-type", "POST", TRANSLATE, dict(content=b'{"text": "a"}'), 415, "application/json"),
    ("text-not-string", "POST", TRANSLATE, dict(json={"text": 42}), 422, "text"),
    ("texts-not-list", "POST", TRANSLATE, dict(json={"texts": "one red cat"}), 422, "texts"),
    ("text-null", "POST", TRANSLATE, dict(json={"text": None}), 422, "text"),
    ("beam-as-string", "POST", TRANSLATE, dict(json={**VALID, "beam_size": "5"}), 422, "beam_size"),
    ("beam-as-float", "POST", TRANSLATE, dict(json={**VALID, "beam_size": 2.5}), 422, "beam_size"),
    ("alignment-as-string", "POST", TRANSLATE, dict(json={**VALID, "return_alignment": "yes"}), 422, "return_alignment"),
    ("missing-text", "POST", TRANSLATE, dict(json={"beam_size": 2}), 422, "exactly one"),
    ("both-text-and-texts", "POST", TRANSLATE, dict(json={"text": "a", "texts": ["b"]}), 422, "exactly one"),
    ("unknown-field", "POST", TRANSLATE, dict(json={**VALID, "temperature": 0.5}), 422, "temperature: unknown field"),
    ("nested-junk", "POST", TRANSLATE, dict(json={"texts": [{"a": [1, {"b": None}]}, ["x"]]}), 422, "texts.0"),
    ("empty-texts", "POST", TRANSLATE, dict(json={"texts": []}), 422, "texts"),
    ("text-too-long", "POST", TRANSLATE, dict(json={"text": "a" * 1001}), 422, "1000"),
    ("too-many-texts", "POST", TRANSLATE, dict(json={"texts": ["a"] * 65}), 422, "64"),
    ("beam-zero", "POST", TRANSLATE, dict(json={**VALID, "beam_size": 0}), 422, "beam_size"),
    ("beam-too-large", "POST", TRANSLATE, dict(json={**VALID, "beam_size": 17}), 422, "beam_size"),
    ("n-best-zero", "POST", TRANSLATE, dict(json={**VALID, "n_best": 0}), 422, "n_best"),
    ("n-best-over-beam", "POST", TRANSLATE, dict(json={**VALID, "beam_size": 2, "n_best": 3}), 422, "n_best (3)"),
    ("n-best-over-default-beam", "POST", TRANSLATE, dict(json={**VALID, "n_best": 3}), 422, "default"),
    ("negative-length-penalty", "POST", TRANSLATE, dict(json={**VALID, "length_penalty": -1}), 422, "length_penalty"),
    ("nan-length-penalty", "POST", TRANSLATE, dict(content=b'{"text": "a", "length_penalty": NaN}', headers=JSON), 422, "length_penalty"),
    ("huge-int", "POST", TRANSLATE, dict(json={**VALID, "beam_size": 10**30}), 422, "beam_size"),
    ("body-too-large", "POST", TRANSLATE, dict(json={"text": "a" * (1 << 20)}), 413, "limit"),
    ("body-too-large-chunked", "POST", TRANSLATE, dict(content=iter([b'{"text": "'] + [b"a" * 65536] * 20 + [b'"}']), headers=JSON), 413, "limit"),
    ("get-translate", "GET", TRANSLATE, {}, 405, "POST"),
    ("delete-translate", "DELETE", TRANSLATE, {}, 405, "POST"),
    ("put-predict", "PUT", P, dict(json={"instances": ["a"]}), 405, "POST"),
    ("get-predict", "GET", P, {}, 405, "POST"),
    ("post-status", "POST", "/v1/models/tiny", dict(json={}), 405, "GET"),
    ("post-healthz", "POST", "/healthz", dict(json={}), 405, "GET"),
    ("unknown-path", "GET", "/v2/translate", {}, 404, "no such resource"),
    ("unknown-model", "POST", "/v1/models/en-de:predict", dict(json={"instances": ["a"]}), 404, "Latest(en-de)"),
    ("unknown-version", "POST", "/v1/models/tiny/versions/7:predict", dict(json={"instances": ["a"]}), 404, "Specific(tiny, 7)"),
    ("unknown-model-status", "GET", "/v1/models/en-de", {}, 404, "en-de"),
    ("unknown-version-metadata", "GET", "/v1/models/tiny/versions/7/metadata", {}, 404, "7"),
    ("version-not-number", "GET", "/v1/models/tiny/versions/latest", {}, 400, "version"),
    ("traversal-dotdot", "POST", "/v1/models/..:predict", dict(json={"instances": ["a"]}), 400, "Malformed model name"),
    ("traversal-encoded", "POST", "/v1/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd:predict", dict(json={"instances": ["a"]}), 404, ""),
    ("traversal-metadata", "GET", "/v1/models/..%2F..%2Fetc/metadata", {}, 404, ""),
    ("nul-in-name", "GET", "/v1/models/tiny%00", {}, 400, "Malformed model name"),
    ("predict-both-formats", "POST", P, dict(json={"instances": ["a"], "inputs": ["a"]}), 400, "only one"),
    ("predict-no-inputs", "POST", P, dict(json={"signature_name": "serving_default"}), 400, "Missing 'inputs' or 'instances'"),
    ("predict-empty-instances", "POST", P, dict(json={"instances": []}), 400, "No values"),
    ("predict-instances-not-list", "POST", P, dict(json={"instances": "a"}), 400, "instances"),
    ("predict-wrong-keys", "POST", P, dict(json={"instances": [{"txt": "a"}]}), 400, "keys must be equal to: text"),
    ("predict-mixed-rows", "POST", P, dict(json={"instances": [{"text": "a"}, "b"]}), 400, "Expecting object"),
    ("predict-number-text", "POST", P, dict(json={"instances": [1, 2]}), 400, "DT_STRING"),
    ("predict-nested-text", "POST", P, dict(json={"instances": [["a", ["b"]]]}), 400, "DT_STRING"),
    ("predict-bad-b64", "POST", P, dict(json={"instances": [{"b64": "%%%"}]}), 400, "base64"),
    ("predict-unknown-signature", "POST", P, dict(json={"signature_name": "classify", "instances": ["a"]}), 400, '"classify" not found'),
    ("predict-init-op-signature", "POST", P, dict(json={"signature_name": "__saved_model_init_op", "instances": ["a"]}), 400, "not found"),
    ("predict-signature-not-string", "POST", P, dict(json={"signature_name": 3, "instances": ["a"]}), 400, "signature_name"),
    ("predict-unknown-field", "POST", P, dict(json={"instances": ["a"], "examples": []}), 400, "examples"),
    ("predict-columnar-scalar-text", "POST", P, dict(json={"inputs": {"text": "a"}}), 400, "list of strings"),
    ("predict-columnar-unknown-input", "POST", P, dict(json={"inputs": {"text": ["a"], "beam": 2}}), 400, "unknown input"),
    ("predict-translate-missing-input", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 2, "n_best": 1}}), 400, "Missing named input: length_penalty"),
    ("predict-translate-plain-list", "POST", P, dict(json={"signature_name": "translate", "inputs": ["a"]}), 400, "expecting an object"),
    ("predict-beam-float", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 2.5, "n_best": 1, "length_penalty": 0.6}}), 400, "DT_INT32"),
    ("predict-beam-bool", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": True, "n_best": 1, "length_penalty": 0.6}}), 400, "DT_INT32"),
    ("predict-beam-zero", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 0, "n_best": 1, "length_penalty": 0.6}}), 400, "beam_size"),
    ("predict-n-best-over-beam", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 2, "n_best": 3, "length_penalty": 0.6}}), 400, "n_best (3)"),
    ("predict-length-penalty-string", "POST", P, dict(json={"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 2, "n_best": 1, "length_penalty": "0.6"}}), 400, "DT_FLOAT"),
    ("predict-too-many", "POST", P, dict(json={"instances": ["a"] * 65}), 400, "64"),
    ("predict-too-long", "POST", P, dict(json={"instances": ["a" * 1001]}), 400, "1000"),
    ("predict-lone-surrogate", "POST", P, dict(content=b'{"instances": ["\\udfff"]}', headers=JSON), 400, "surrogate"),
    ("predict-surrogate-signature", "POST", P, dict(content=b'{"signature_name": "\\ud800", "instances": ["a"]}', headers=JSON), 400, "not found"),
    ("predict-4301-digit-int", "POST", P, dict(content=b'{"instances": [' + b"9" * 4301 + b"]}", headers=JSON), 400, "JSON Parse error"),
    ("predict-overflowing-float", "POST", P, dict(content=b'{"signature_name": "translate", "inputs": {"text": ["a"], "beam_size": 2, "n_best": 1, "length_penalty": 1' + b"0" * 400 + b"}}", headers=JSON), 400, "length_penalty"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "fragment"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_answering(
    client, method, path, kwargs, status, fragment
):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error, str) and fragment in error, error
    if status == 405:
        assert response.headers.get("allow")
    after = client.post("/v1/translate", json=VALID)
    assert after.status_code == 200 and after.json()["translations"][0]["text"] is not None


def test_validation_errors_list_every_field(client):
    body = {"text": 1, "beam_size": 0, "colour": "red"}
    response = client.post("/v1/translate", json=body)
    assert response.status_code == 422
    locs = {d["loc"] for d in response.json()["details"]}
    assert {"text", "beam_size", "colour"} <= locs


# -- micro-batching ----------------------------------------------------------------------------


def _echo(calls, delay=0.01, poison=None):
    def run(signature, version, texts, scalars):
        calls.append((signature, tuple(texts), tuple(sorted(scalars.items()))))
        if poison is not None and poison in texts:
            raise ModelInputError("poisoned")
        time.sleep(delay)
        return {"echo": np.array(texts, dtype=object), "row": np.arange(len(texts))}

    return run


def test_micro_batcher_merges_equal_options_and_gives_each_request_its_rows():
    calls = []

    async def main():
        batcher = MicroBatcher(_echo(calls), max_batch_size=8, max_wait=0.05, max_queue=100)
        batcher.start()
        jobs = [batcher.submit("s", None, [f"r{i}a", f"r{i}b"], {"k": 1}) for i in range(6)]
        jobs.append(batcher.submit("s", None, ["other"], {"k": 2}))
        jobs.append(batcher.submit("s", None, [f"big{i}" for i in range(12)], {"k": 1}))
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return results, batcher.metrics

    results, metrics = asyncio.run(main())
    for i in range(6):
        assert list(results[i]["echo"]) == [f"r{i}a", f"r{i}b"]
    assert list(results[6]["echo"]) == ["other"]
    assert list(results[7]["echo"]) == [f"big{i}" for i in range(12)]  # its rows, in order
    assert all(len(texts) <= 8 for _, texts, _ in calls)
    # 8 + 4 texts with k=1, the k=2 request, then the big one split in two calls (8 + 4).
    assert [len(texts) for _, texts, _ in calls] == [8, 4, 1, 8, 4]
    assert {s for _, _, s in calls} == {(("k", 1),), (("k", 2),)}
    assert metrics.registry.get_sample_value("translator_batch_requests_count") == 5
    assert metrics.registry.get_sample_value("translator_batch_requests_sum") == 9


def test_micro_batcher_waits_longer_only_after_a_merged_call():
    calls = []

    async def main():
        batcher = MicroBatcher(
            _echo(calls, delay=0.0), max_batch_size=8, max_wait=0.001, max_wait_busy=0.5
        )
        batcher.start()

        def submit(text, options=None):
            return batcher.submit("s", None, [text], options or {})

        async def two_apart(first, second):
            """Two requests 100 ms apart: one call or two?"""
            job = asyncio.ensure_future(submit(first))
            await asyncio.sleep(0.1)
            await asyncio.gather(job, submit(second))

        async def timed(*jobs):
            started = time.perf_counter()
            await asyncio.gather(*jobs)
            return time.perf_counter() - started

        waited = {}
        await submit("alone")
        await two_apart("a", "b")  # a lone client: each request its own call, no waiting
        await asyncio.gather(submit("c"), submit("d"))
        await two_apart("e", "f")  # after a merged call: waits, and makes one call of both
        # Both clients back: no waiting. Other options waiting: no waiting either.
        waited["both back"] = await timed(submit("i"), submit("j"))
        waited["other options"] = await timed(submit("x", {"k": 2}), submit("y"))
        await asyncio.gather(submit("k"), submit("l"))
        await asyncio.sleep(0.6)  # the load went away: a later request pays the short wait
        waited["later"] = await timed(submit("g"))
        await asyncio.gather(submit("m"), submit("n"))
        waited["right after"] = await timed(submit("o"))  # waits for company, in vain
        waited["after a lone call"] = await timed(submit("h"))
        await batcher.stop()
        return waited

    waited = asyncio.run(main())
    assert [texts for _, texts, _ in calls] == [
        *[("alone",), ("a",), ("b",), ("c", "d"), ("e", "f"), ("i", "j"), ("x",), ("y",)],
        *[("k", "l"), ("g",), ("m", "n"), ("o",), ("h",)],
    ]
    assert waited.pop("right after") >= 0.4
    assert all(seconds < 0.25 for seconds in waited.values()), waited


def test_micro_batcher_merges_the_clients_just_answered_with_those_already_waiting():
    """Under load, the requests queued during a call and those of the clients it answered
    (back a moment later) make one call: two groups of clients do not take turns."""
    calls = []

    async def main():
        batcher = MicroBatcher(
            _echo(calls, delay=0.05), max_batch_size=8, max_wait=0.001, max_wait_busy=0.5
        )
        batcher.start()

        def submit(text):
            return batcher.submit("s", None, [text], {})

        async def client(name):  # one request, then another shortly after its answer
            await submit(name)
            await asyncio.sleep(0.01)
            await submit(name + "'")

        first_group = asyncio.gather(client("a1"), client("a2"))
        await asyncio.sleep(0.02)  # the call of a1 and a2 runs: b1 and b2 queue meanwhile
        await asyncio.gather(first_group, submit("b1"), submit("b2"))
        await batcher.stop()

    asyncio.run(main())
    assert [texts for _, texts, _ in calls] == [("a1", "a2"), ("b1", "b2", "a1'", "a2'")]


def test_micro_batcher_merges_requests_that_differ_only_in_per_row_inputs():
    calls = []

    def run(signature, version, texts, scalars):
        calls.append((tuple(texts), dict(scalars)))
        alpha = scalars["alpha"]
        alphas = alpha if isinstance(alpha, list) else [alpha] * len(texts)
        return {"echo": np.array(texts, dtype=object), "alpha": np.array(alphas)}

    async def main():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait=0.05, max_queue=100)
        batcher.start()
        jobs = [
            batcher.submit("s", None, ["a0", "a1"], {"k": 1}, rows={"alpha": 0.5}),
            batcher.submit("s", None, ["b0"], {"k": 1}, rows={"alpha": 1.5}),
            # One value per text, and more texts than one call: its values follow its chunks.
            batcher.submit(
                "s", None, [f"c{i}" for i in range(5)], {"k": 1}, rows={"alpha": [1, 2, 3, 4, 5]}
            ),
            batcher.submit("s", None, ["d0"], {"k": 2}, rows={"alpha": 0.5}),  # not mergeable
        ]
        results = await asyncio.gather(*jobs)
        same = await batcher.submit("s", None, ["e0", "e1"], {"k": 1}, rows={"alpha": 0.7})
        await batcher.stop()
        return results, same

    results, same = asyncio.run(main())
    expected = [[0.5, 0.5], [1.5], [1, 2, 3, 4, 5], [0.5]]
    for result, alphas in zip(results, expected, strict=True):
        assert result["alpha"].tolist() == alphas  # each text decoded with its own value
    by_texts = {texts: scalars for texts, scalars in calls}
    assert by_texts[("a0", "a1", "b0")] == {"k": 1, "alpha": [0.5, 0.5, 1.5]}  # one call
    assert by_texts[("c0", "c1", "c2", "c3")] == {"k": 1, "alpha": [1, 2, 3, 4]}
    assert by_texts[("c4",)] == {"k": 1, "alpha": 5}
    assert by_texts[("d0",)] == {"k": 2, "alpha": 0.5}
    assert len(calls) == 5
    # Texts that agree get one value, as before per-row inputs existed.
    assert by_texts[("e0", "e1")] == {"k": 1, "alpha": 0.7} and same["alpha"].tolist() == [0.7] * 2


def test_micro_batcher_isolates_a_failing_request_and_sheds_load():
    calls = []

    async def main():
        batcher = MicroBatcher(_echo(calls, poison="bad"), max_batch_size=16, max_wait=0.05)
        batcher.start()
        jobs = [batcher.submit("s", None, [t], {}) for t in ("a", "bad", "c")]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert list(results[0]["echo"]) == ["a"] and list(results[2]["echo"]) == ["c"]
    assert isinstance(results[1], ModelInputError)

    # A failure that is not about one request's input (the backend is down) fails the whole
    # batch at once, without one retry per request; the worker keeps serving afterwards.
    calls = []

    def down(signature, version, texts, scalars):
        calls.append(tuple(texts))
        if "x" in texts:
            raise BackendError(502, "TF Serving is unreachable")
        return {"echo": np.array(texts, dtype=object)}

    def short(signature, version, texts, scalars):
        return {"echo": np.array(texts[:1], dtype=object)}  # a backend that drops rows

    async def outage(run, texts):
        batcher = MicroBatcher(run, max_batch_size=16, max_wait=0.05)
        batcher.start()
        results = await asyncio.gather(
            *[batcher.submit("s", None, [t], {}) for t in texts], return_exceptions=True
        )
        after = await batcher.submit("s", None, ["ok"], {})
        await batcher.stop()
        return results, after

    results, after = asyncio.run(outage(down, ["x", "y", "z"]))
    assert all(isinstance(r, BackendError) and r.status == 502 for r in results), results
    assert calls == [("x", "y", "z"), ("ok",)] and list(after["echo"]) == ["ok"]
    results, after = asyncio.run(outage(short, ["a", "b"]))
    assert all(isinstance(r, BackendError) and "rows" in r.message for r in results), results
    assert list(after["echo"]) == ["ok"]

    release = threading.Event()

    def blocking(signature, version, texts, scalars):
        release.wait(5)
        return {"echo": np.array(texts, dtype=object)}

    async def overload():
        batcher = MicroBatcher(blocking, max_batch_size=1, max_wait=0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("s", None, ["1"], {}))
        await asyncio.sleep(0.05)  # the worker holds the first; two more fill the queue
        queued = [asyncio.ensure_future(batcher.submit("s", None, [t], {})) for t in "23"]
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            await batcher.submit("s", None, ["4"], {})
        release.set()
        done = await asyncio.gather(first, *queued)
        await batcher.stop()
        return refused.value, done

    refused, done = asyncio.run(overload())
    assert refused.status == 503 and "overloaded" in refused.message
    assert [list(d["echo"]) for d in done] == [["1"], ["2"], ["3"]]


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(backend, tiny_export_dir):
    settings = ServerSettings(model=str(tiny_export_dir), max_wait_ms=30)
    sentences = [
        f"{a} {b} {c}"
        for a in ("one", "two")
        for b in ("red", "big")
        for c in ("cat", "car", "tree")
    ]
    with TestClient(create_app(backend, settings)) as client:
        solo = [client.post("/v1/translate", json={"text": s}).json() for s in sentences]
        with ThreadPoolExecutor(len(sentences)) as pool:
            together = list(
                pool.map(lambda s: client.post("/v1/translate", json={"text": s}), sentences)
            )
        metrics = client.get("/metrics").text
    for alone, response in zip(solo, together, strict=True):
        assert response.status_code == 200
        got = response.json()["translations"][0]
        assert got["text"] == alone["translations"][0]["text"]
        assert got["score"] == pytest.approx(alone["translations"][0]["score"], abs=1e-4)
    calls = _metric(metrics, "translator_batch_requests_count")
    merged = _metric(metrics, "translator_batch_requests_sum")
    assert merged == 2 * len(sentences)  # every request once (the warm-up ran before)
    assert calls < 2 * len(sentences)  # the concurrent half shared model calls


def test_requests_with_different_length_penalties_share_model_calls(backend, tiny_export_dir):
    """The export takes a length penalty per text, so the service merges requests that differ
    in it (before: one model call per distinct penalty); each still gets its own answer."""
    assert backend.signatures()["translate"].row_inputs == {"length_penalty"}
    settings = ServerSettings(model=str(tiny_export_dir), max_wait_ms=50)
    sentences = ["one red cat", "two big cars", "a small green tree", "big house"]
    requests = [
        {"text": s, "beam_size": 3, "length_penalty": alpha}
        for s in sentences
        for alpha in (0.0, 1.0, 4.0)
    ]
    with TestClient(create_app(backend, settings)) as client:
        solo = [client.post("/v1/translate", json=r).json() for r in requests]
        before = _metric(client.get("/metrics").text, "translator_batch_requests_count")
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: client.post("/v1/translate", json=r), requests))
        calls = _metric(client.get("/metrics").text, "translator_batch_requests_count") - before
        # :predict takes one value or one per text as well
        body = {
            "signature_name": "translate",
            "inputs": {"text": sentences, "beam_size": 3, "n_best": 1,
                       "length_penalty": [0.0, 1.0, 4.0, 1.0]},
        }  # fmt: skip
        predicted = client.post("/v1/models/tiny:predict", json=body)
        body["inputs"]["length_penalty"] = [0.0, 1.0]
        wrong = client.post("/v1/models/tiny:predict", json=body)
    for alone, response in zip(solo, together, strict=True):
        assert response.status_code == 200
        got = response.json()["translations"][0]
        assert got["text"] == alone["translations"][0]["text"]
        assert got["score"] == pytest.approx(alone["translations"][0]["score"], abs=1e-4)
    assert calls <= 2  # 12 requests, 3 penalties: before, one call per penalty at least
    assert len({r["translations"][0]["score"] for r in solo[:3]}) == 3  # the penalty counts
    assert predicted.status_code == 200, predicted.text
    scores = predicted.json()["outputs"]["scores"]
    for i, alpha in enumerate([0.0, 1.0, 4.0, 1.0]):
        k = requests.index({"text": sentences[i], "beam_size": 3, "length_penalty": alpha})
        assert scores[i][0] == pytest.approx(solo[k]["translations"][0]["score"], abs=1e-4)
    assert wrong.status_code == 400 and "one value, or one per text" in wrong.text


def _metric(text, name):
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


def test_metrics_are_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/translate", json=VALID)
    client.post("/v1/translate", json={"text": 1})
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    for status in ("200", "422"):
        labels = (("method", "POST"), ("route", "/v1/translate"), ("status", status))
        assert samples[("translator_http_requests_total", labels)] >= 1
    bucket = (("le", "0.1"), ("route", "/v1/translate"))
    assert ("translator_http_request_duration_seconds_bucket", bucket) in samples
    for name in (
        "translator_batch_texts_count",
        "translator_queue_depth",
        "translator_model_ready",
        "process_resident_memory_bytes",
    ):
        assert (name, ()) in samples, name
    assert samples[("translator_model_ready", ())] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


# -- readiness ---------------------------------------------------------------------------------


class SlowBackend(Backend):
    name = "slow"
    defaults = {"beam_size": 2, "length_penalty": 0.6}

    def __init__(self, fail=False):
        self.release = threading.Event()
        self.fail = fail

    def load(self):
        self.release.wait(10)
        if self.fail:
            raise OSError("disk on fire")
        self.version = 3
        self.loaded = True

    def predict(self, signature, version, texts, scalars):
        n = len(texts)
        if signature == "translate":  # /v1/translate's
            k = int(scalars["n_best"])
            return {
                "translations": np.full((n, k), b"ok", dtype=object),
                "scores": np.zeros((n, k), "float32"),
                "target_lengths": np.ones((n, k), "int32"),
            }
        return {"translation": np.array([b"ok"] * n, dtype=object), "score": np.zeros(n, "float32")}

    def signature_defs(self):
        return {"signature_def": {}}


def test_a_client_leaving_mid_body_is_counted_as_499_not_as_a_server_error():
    reached = []

    async def app(scope, receive, send):  # never reached: the body never arrived
        reached.append(scope)

    metrics = Metrics()
    middleware = RequestMetricsMiddleware(BodyLimitMiddleware(app, max_body_bytes=1000), metrics)
    messages = iter(
        [{"type": "http.request", "body": b'{"text": ', "more_body": True},
         {"type": "http.disconnect"}]
    )  # fmt: skip
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/translate", "headers": []}
    asyncio.run(middleware(scope, receive, send))
    assert not reached and not sent
    counts = {
        tuple(sample.labels.values()): sample.value
        for sample in metrics.requests.collect()[0].samples
        if sample.name.endswith("_total")
    }
    assert counts == {("unmatched", "POST", "499"): 1}


def test_healthz_answers_at_once_and_readyz_waits_for_the_model(tiny_export_dir):
    backend = SlowBackend()
    with TestClient(create_app(backend, ServerSettings(model_name="slow"))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 503
        busy = client.post("/v1/translate", json=VALID)
        assert busy.status_code == 503 and "loading" in busy.json()["error"]
        backend.release.set()
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert client.get("/readyz").json() == {
            "status": "ready",
            "model": {"name": "slow", "version": "3"},
        }
        assert client.post("/v1/translate", json=VALID).json()["translations"] == [
            {"text": "ok", "score": 0.0}
        ]

    broken = SlowBackend(fail=True)
    broken.release.set()
    with TestClient(create_app(broken, ServerSettings(model_name="slow"))) as client:
        time.sleep(0.2)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "disk on fire" in ready.json()["error"]
        assert client.get("/healthz").status_code == 200


# -- the TF Serving backend --------------------------------------------------------------------


def _wait_ready(client, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready: {client.get('/readyz').text}")


def test_remote_backend_forwards_to_tf_serving(client, tiny_export_dir):
    stub = TFServingStub(tiny_export_dir / "1", "tiny")
    try:
        remote = RemoteBackend(stub.url, "tiny", decoding_defaults(tiny_export_dir))
        settings = ServerSettings(model=str(tiny_export_dir), backend=stub.url, max_wait_ms=30)
        with TestClient(create_app(remote, settings)) as gateway:
            _wait_ready(gateway)
            for body in (
                {"texts": TEXTS},
                {"texts": TEXTS, "beam_size": 3, "n_best": 2, "return_alignment": True},
            ):
                via_stub = gateway.post("/v1/translate", json=body).json()["translations"]
                in_process = client.post("/v1/translate", json=body).json()["translations"]
                assert [t["text"] for t in via_stub] == [t["text"] for t in in_process]
                if "return_alignment" in body:
                    assert [t["alignment"]["target_tokens"] for t in via_stub] == [
                        t["alignment"]["target_tokens"] for t in in_process
                    ]
            sent = [b for method, _, b in stub.requests if method == "POST"]
            assert all(set(b) == {"signature_name", "inputs"} for b in sent)  # columnar, always
            assert sent[-1]["signature_name"] == "translate"
            assert sent[-1]["inputs"] == {
                "text": [t for t in TEXTS if t],  # an empty text needs no model call
                "beam_size": 3,
                "n_best": 2,
                "length_penalty": 0.6,
            }

            row = gateway.post("/v1/models/tiny:predict", json={"instances": TEXTS})
            assert (
                row.json()
                == client.post("/v1/models/tiny:predict", json={"instances": TEXTS}).json()
            )
            assert gateway.get("/v1/models/tiny").json() == client.get("/v1/models/tiny").json()
            meta = gateway.get("/v1/models/tiny/metadata").json()
            assert (
                meta["metadata"]["signature_def"]["signature_def"].keys()
                == client.get("/v1/models/tiny/metadata")
                .json()["metadata"]["signature_def"]["signature_def"]
                .keys()
            )
            assert gateway.get("/v1/models/tiny/versions/9").status_code == 404  # TF Serving's 404

            before = len(stub.requests)
            with ThreadPoolExecutor(12) as pool:
                answers = list(
                    pool.map(
                        lambda t: gateway.post("/v1/translate", json={"text": t}),
                        [f"one red {w}" for w in ("cat", "car", "tree", "house")] * 3,
                    )
                )
            assert all(a.status_code == 200 for a in answers)
            assert len(stub.requests) - before < 12  # merged into fewer TF Serving calls

            # Different length penalties merge too: TF Serving gets one value per text.
            texts = ["one red cat", "big house", "two small dogs"]
            before = len(stub.requests)
            with ThreadPoolExecutor(3) as pool:
                answers = list(
                    pool.map(
                        lambda a: gateway.post(
                            "/v1/translate", json={"text": a[0], "length_penalty": a[1]}
                        ),
                        zip(texts, (0.0, 1.0, 2.0), strict=True),
                    )
                )
            assert all(a.status_code == 200 for a in answers)
            alone = [
                client.post("/v1/translate", json={"text": t, "length_penalty": a}).json()
                for t, a in zip(texts, (0.0, 1.0, 2.0), strict=True)
            ]
            for answer, expected in zip(answers, alone, strict=True):
                got, want = answer.json()["translations"][0], expected["translations"][0]
                assert got["text"] == want["text"]
                assert got["score"] == pytest.approx(want["score"], abs=1e-4)
            calls = [b for m, _, b in stub.requests[before:] if m == "POST"]
            assert len(calls) < 3  # merged: one value per text went over
            assert any(isinstance(b["inputs"]["length_penalty"], list) for b in calls)

            stub.fail_next = (400, "assertion failed: [n_best must not be larger than beam_size]")
            refused = gateway.post("/v1/translate", json={"text": "a", "beam_size": 2})
            assert refused.status_code == 400 and "n_best" in refused.json()["error"]
            stub.fail_next = (500, "out of memory")
            assert (
                gateway.post("/v1/translate", json={"text": "a", "beam_size": 2}).status_code == 502
            )
            assert (
                gateway.post("/v1/translate", json={"text": "a", "beam_size": 2}).status_code == 200
            )
            stub.close()
            down = gateway.post("/v1/translate", json={"text": "a", "beam_size": 2})
            assert down.status_code == 502 and "unreachable" in down.json()["error"]
            assert gateway.get("/healthz").status_code == 200
            assert gateway.get("/readyz").status_code == 503
    finally:
        stub.close()


def test_remote_backend_waits_for_tf_serving_to_come_up(tiny_export_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    remote = RemoteBackend(url, "tiny", timeout=5)
    with TestClient(create_app(remote, ServerSettings(model_name="tiny", backend=url))) as gateway:
        time.sleep(0.3)
        waiting = gateway.get("/readyz")
        assert waiting.status_code == 503 and "unreachable" in waiting.json()["error"]
        assert gateway.post("/v1/translate", json=VALID).status_code == 503
        stub = TFServingStub(tiny_export_dir / "1", "tiny", port=port)
        try:
            _wait_ready(gateway, 30)
            assert gateway.post("/v1/translate", json=VALID).status_code == 200
        finally:
            stub.close()


# -- schemathesis ------------------------------------------------------------------------------


# Smaller limits than the defaults keep each generated request cheap; the schema states them.
FUZZ_SETTINGS = ServerSettings(model_name="tiny", max_texts=4, max_text_chars=64, max_beam_size=4)
# The schema does not depend on the model, so it is built at import without loading one
# (schemathesis' lazy `from_fixture` does not work with this pytest).
schema = schemathesis.openapi.from_dict(create_app(settings=FUZZ_SETTINGS).openapi())


@pytest.fixture(scope="module")
def fuzz_client(backend):
    app = create_app(backend, FUZZ_SETTINGS)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@schema.parametrize()
@hypothesis.settings(
    max_examples=int(os.environ.get("TRANSLATOR_SCHEMATHESIS_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(case, fuzz_client):
    if "name" in case.path_parameters and case.path_parameters["name"].startswith("t"):
        case.path_parameters["name"] = "tiny"  # also reach the model, not only 404s
    if isinstance(case.body, dict):
        # A deadline the client chose too short is answered 504 by design, not a server fault.
        case.body.pop("timeout", None)
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    response = fuzz_client.request(
        **{
            k: v
            for k, v in kwargs.items()
            if k in ("method", "url", "headers", "params", "json", "content", "data")
        }
    )
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


# -- docs, the page, packaging -----------------------------------------------------------------


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/translate", "/v1/models/{name}:predict", "/v1/models/{name}/metadata"} <= set(
        spec["paths"]
    )
    request = spec["components"]["schemas"]["TranslateRequest"]
    assert request["properties"]["text"]["maxLength"] == 1000
    assert request["properties"]["texts"]["maxItems"] == 64
    assert "text/html" in client.get("/docs").headers["content-type"]


def test_the_page_and_its_files_are_served(backend, settings, tmp_path, monkeypatch):
    import translator.server.app as server

    (tmp_path / "index.html").write_text('<link href="static/style.css"><script src="app.js">')
    (tmp_path / "style.css").write_text("body{}")
    (tmp_path / "app.js").write_text("// js")
    (tmp_path / ".secret").write_text("no")
    monkeypatch.setattr(server, "STATIC_DIR", tmp_path)
    with TestClient(create_app(backend, settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "static/style.css" in page.text
        assert client.get("/static/style.css").text == "body{}"
        assert client.get("/app.js").text == "// js"  # relative references work too
        for hidden in ("/.secret", "/static/../server.py", "/nothing.js"):
            assert client.get(hidden).status_code == 404


def test_the_page_ships_with_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "static/*" in package_data["translator"]


# -- a real server process ---------------------------------------------------------------------


def test_translator_serve_runs_uvicorn_batches_and_stops_cleanly(tiny_export_dir, tmp_path):
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "wb") as log:
        proc, base = start_server(
            tiny_export_dir, "--max-wait-ms", "20", "--header-timeout", "1",
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        ready = wait_ready(base, proc, 180)
        assert ready, "server not ready in time:\n" + log_path.read_text()[-3000:]
        # A client that stalls in its headers is disconnected after --header-timeout.
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as stalled:
            stalled.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\n")
            assert stalled.recv(1024) == b""  # closed, well within the socket's 20 s
        with httpx.Client(base_url=base, timeout=60) as http:
            assert http.post("/v1/translate", json=VALID).status_code == 200
            assert http.post("/v1/translate", content=b"{", headers=JSON).status_code == 400
            assert http.post("/v1/translate", content=b"\xff", headers=JSON).status_code == 400
            assert (
                http.post("/v1/models/tiny:predict", json={"instances": ["a"] * 200}).status_code
                == 400
            )
            assert http.post("/v1/translate", json=VALID).status_code == 200

            def one(i):
                with httpx.Client(base_url=base, timeout=60) as c:
                    return c.post("/v1/translate", json={"text": f"one red cat {i}"}).status_code

            with ThreadPoolExecutor(16) as pool:
                assert set(pool.map(one, range(32))) == {200}
            metrics = http.get("/metrics").text
            assert _metric(metrics, "translator_batch_requests_sum") > _metric(
                metrics, "translator_batch_requests_count"
            )  # some model calls served several requests

        bench = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "load.py"), "--url", base, "--concurrency", "1", "4",
             "--requests", "12", "--duration", "30", "--beam-size", "2"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr
        assert "errors" in bench.stdout and "gain" in bench.stdout
    finally:
        code = stop_server(proc)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so the exit status
    # says "terminated by SIGTERM", as process supervisors expect).
    log_text = log_path.read_text()
    assert code in (0, -signal.SIGTERM), log_text[-3000:]
    assert "Application shutdown complete" in log_text and "Traceback" not in log_text


def test_translator_serve_refuses_a_missing_export_at_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "translator.cli", "serve", "--model", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no model export" in proc.stderr and "translator export" in proc.stderr


# -- serve/: what a user needs for stock TF Serving --------------------------------------------

SERVE = ROOT / "serve"


def test_models_config_parses_as_tf_serving_model_server_config():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(
        (SERVE / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert model.name == "en-fr" and model.base_path == "/models/en-fr"
    assert model.model_platform == "tensorflow"


def _batching_parameters_class():
    """TF Serving's `BatchingParameters` (session_bundle_config.proto), which the
    tensorflow-serving-api package does not ship, rebuilt field by field."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="batching.proto", package="tensorflow.serving", syntax="proto3"
    )
    file.dependency.append("google/protobuf/wrappers.proto")
    message = file.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for number, name, kind in [
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
    ]:
        message.field.add(
            name=name, number=number, type=F.TYPE_MESSAGE, type_name=kind, label=F.LABEL_OPTIONAL
        )
    message.field.add(
        name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED
    )
    message.field.add(
        name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL
    )
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def test_batching_parameters_parse_as_tf_serving_batching_parameters():
    from google.protobuf import text_format

    params = text_format.Parse(
        (SERVE / "batching.config").read_text(), _batching_parameters_class()()
    )
    assert params.max_batch_size.value >= 1 and params.batch_timeout_micros.value > 0
    assert params.num_batch_threads.value >= 1
    if params.allowed_batch_sizes:
        assert list(params.allowed_batch_sizes)[-1] == params.max_batch_size.value


def test_compose_file_runs_tf_serving_with_the_export_and_the_gateway():
    import yaml

    compose = yaml.safe_load((SERVE / "compose.yaml").read_text())
    services = compose["services"]
    tfserving, gateway = services["tfserving"], services["gateway"]
    assert tfserving["image"].startswith("tensorflow/serving:")
    command = " ".join(tfserving["command"])
    assert "--model_config_file=/config/models.config" in command
    mounts = " ".join(tfserving["volumes"])
    assert "saved_models/en-fr:/models/en-fr" in mounts and "models.config" in mounts
    assert "--backend" in gateway["command"] and "http://tfserving:8501" in gateway["command"]
    for service in (tfserving, gateway):
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", []))  # loopback only


def _readme_requests(path):
    """(method, url path, JSON body) of every curl command in a README."""
    found = []
    text = path.read_text()
    for command in re.findall(r"^curl .*?(?<!\\)$", text, re.M | re.S):
        command = command.replace("\\\n", " ")
        url = re.search(r"http://[^/\s'\"]+(/[^\s'\"]*)", command)
        body = re.search(r"-d '(.*?)'", command, re.S)
        method = "POST" if body else "GET"
        found.append((method, url.group(1), json.loads(body.group(1)) if body else None))
    return found


@pytest.mark.parametrize("readme", ["serve/README.md", "README.md"])
def test_readme_curl_examples_are_accepted_by_our_endpoints(backend, tiny_export_dir, readme):
    requests = _readme_requests(ROOT / readme)
    assert len(requests) >= 4
    settings = ServerSettings(model=str(tiny_export_dir), model_name="en-fr")
    named = copy.copy(backend)  # the loaded model under the name the READMEs use
    named.name = "en-fr"
    with TestClient(create_app(named, settings)) as client:
        for method, path, body in requests:
            response = client.request(method, path, json=body)
            assert response.status_code == 200, (path, body, response.text)


# -- separate vocabularies and greedy decoding, end to end -------------------------------------


@pytest.fixture(scope="module")
def separate_client(tiny_separate_export_dir):
    """The REST API over the export of a run with one SentencePiece model per language."""
    backend = SavedModelBackend(tiny_separate_export_dir, "separate")
    backend.load()
    settings = ServerSettings(model=str(tiny_separate_export_dir))
    with TestClient(create_app(backend, settings)) as client:
        yield client


def test_separate_vocabularies_alignment_tokens_come_from_their_own_vocabulary(
    separate_client, tiny_separate_export_dir
):
    """Source tokens are the English model's pieces of the text, target tokens the French
    model's pieces of the translation, and both equal what `translator.load` returns."""
    from tests.tiny import sentencepieces
    from translator.inference import load

    source_sp, target_sp = sentencepieces(tiny_separate_export_dir)
    source_vocab = {source_sp.id_to_piece(i) for i in range(source_sp.vocab_size())}
    target_vocab = {target_sp.id_to_piece(i) for i in range(target_sp.vocab_size())}
    texts = ["one red cat", "big house", "five blue cars"]
    body = {"texts": texts, "beam_size": 2, "return_alignment": True}
    response = separate_client.post("/v1/translate", json=body)
    assert response.status_code == 200, response.text
    expected = load(tiny_separate_export_dir).translate(texts, beam_size=2, return_alignment=True)
    french = set()
    for text, got, want in zip(texts, response.json()["translations"], expected, strict=True):
        a = got["alignment"]
        assert a["source_tokens"] == [*source_sp.encode_as_pieces(text), "</s>"]
        assert set(a["target_tokens"]) <= target_vocab
        assert target_sp.decode_pieces(a["target_tokens"][:-1]) == got["text"]
        french |= set(a["target_tokens"]) - source_vocab
        assert (got["text"], a["source_tokens"], a["target_tokens"]) == (
            want.text,
            want.source_tokens,
            want.target_tokens,
        )
        assert got["score"] == pytest.approx(want.score, abs=1e-4)
        np.testing.assert_allclose(a["weights"], want.alignment, atol=1e-4)
    assert french  # French pieces, which the English vocabulary does not have


@pytest.mark.parametrize("which", ["joint", "separate"])
def test_beam_size_1_over_rest_is_greedy_decoding(
    which, client, separate_client, tiny_export_dir, tiny_separate_export_dir
):
    """`beam_size: 1` gives greedy decoding written out by hand over the model's decode_step."""
    from tests.tiny import reference_greedy, sentencepieces
    from translator.inference import load

    api, directory = {
        "joint": (client, tiny_export_dir),
        "separate": (separate_client, tiny_separate_export_dir),
    }[which]
    translator = load(directory)
    source_sp, target_sp = sentencepieces(directory)
    body = {"texts": TEXTS, "beam_size": 1, "length_penalty": 0.6, "return_alignment": True}
    response = api.post("/v1/translate", json=body)
    assert response.status_code == 200, response.text
    got = response.json()["translations"]
    assert any(t["text"] for t in got)
    for text, t in zip(TEXTS, got, strict=True):
        if not text:  # nothing to translate (as in the Python API)
            assert (t["text"], t["score"], t["alignment"]["target_tokens"]) == ("", 0.0, [])
            continue
        expected, score, pieces = reference_greedy(translator, source_sp, target_sp, text, 0.6)
        assert t["text"] == expected
        assert t["alignment"]["target_tokens"] == pieces
        assert t["score"] == pytest.approx(score, abs=1e-4)


def test_a_real_tensorflow_input_error_is_a_400_and_anything_else_a_500(backend, monkeypatch):
    """Errors raised by TensorFlow itself, not by the request checks: the export's own assertion
    (n_best > beam_size, which the checks would refuse first) answers 400 with its message; an
    unexpected exception in the backend answers a JSON 500 that names only its type, and the
    service keeps serving."""
    import tensorflow as tf

    settings = ServerSettings(model_name="tiny")
    with pytest.raises(ModelInputError, match="n_best must not be larger than beam_size"):
        backend.predict(
            "translate", None, ["one red cat"], {"beam_size": 1, "n_best": 2, "length_penalty": 0.6}
        )
    predict = backend.predict

    def unchecked(signature, version, texts, scalars):  # past the request checks
        if signature == "translate":
            scalars = {**scalars, "n_best": int(scalars["beam_size"]) + 1}
        return predict(signature, version, texts, scalars)

    monkeypatch.setattr(backend, "predict", unchecked)
    with TestClient(create_app(backend, settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/translate", json={"text": "one red cat", "beam_size": 2})
        assert response.status_code == 400, response.text
        assert "n_best must not be larger than beam_size" in response.json()["error"]

    def broken(signature, version, texts, scalars):
        return {"translation": tf.constant([1.0]) / 0}["missing"]  # a KeyError from real code

    monkeypatch.setattr(backend, "predict", broken)
    with TestClient(create_app(backend, settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/translate", json={"text": "one red cat"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error: KeyError"}
        assert client.get("/healthz").status_code == 200
