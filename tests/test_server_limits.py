"""`translator serve` under abuse (issue 24): admission by cost, deadlines and cancellation,
bounded shutdown, honest health, no secrets or paths in answers, and slow clients.

Most tests run a scripted backend (no TensorFlow) whose model calls can be held on an event, so
that what is queued, running or dropped is decided by the test, not by timing.
"""

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from translator.server import (
    Backend,
    MicroBatcher,
    RemoteBackend,
    SavedModelBackend,
    ServerSettings,
    create_app,
)
from translator.server.testing import free_port

TRANSLATE = "/v1/translate"
PREDICT = "/v1/models/fake:predict"


def _tensor(dtype, rank):
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": "-1"}] * rank}}


SIGNATURE_DEFS = {
    "signature_def": {
        "serving_default": {
            "inputs": {"text": _tensor("DT_STRING", 1)},
            "outputs": {"translation": _tensor("DT_STRING", 1), "score": _tensor("DT_FLOAT", 1)},
            "method_name": "tensorflow/serving/predict",
        },
        "translate": {
            "inputs": {
                "text": _tensor("DT_STRING", 1),
                "beam_size": _tensor("DT_INT32", 0),
                "n_best": _tensor("DT_INT32", 0),
                "length_penalty": _tensor("DT_FLOAT", 0),
            },
            "outputs": {
                "translations": _tensor("DT_STRING", 2),
                "scores": _tensor("DT_FLOAT", 2),
                "alignments": _tensor("DT_FLOAT", 4),
                "source_tokens": _tensor("DT_STRING", 2),
                "target_tokens": _tensor("DT_STRING", 3),
                "source_lengths": _tensor("DT_INT32", 1),
                "target_lengths": _tensor("DT_INT32", 2),
            },
            "method_name": "tensorflow/serving/predict",
        },
    }
}


class ScriptedBackend(Backend):
    """Answers like the export (word for word, one source token per word plus `</s>`), records
    every call's texts, and holds any call with a text starting with "block" until `release`."""

    name = "fake"
    defaults = {"beam_size": 2, "length_penalty": 0.6}

    def __init__(self):
        self.version = 1
        self.loaded = True
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def signature_defs(self):
        return SIGNATURE_DEFS

    def predict(self, signature, version, texts, scalars):
        self.calls.append(list(texts))
        if any(t.startswith("block") for t in texts):
            self.entered.set()
            self.release.wait(20)
        b = len(texts)
        if signature == "serving_default":
            return {
                "translation": np.array([t.upper().encode() for t in texts], dtype=object),
                "score": np.full(b, -0.5, "float32"),
            }
        n = int(scalars["n_best"])
        s = max(len(t.split()) for t in texts) + 1
        t_len = s + 1
        rng = np.random.default_rng(0)
        alignments = rng.random((b, n, t_len, s), dtype=np.float32)
        return {
            "translations": np.array([[t.upper().encode()] * n for t in texts], dtype=object),
            "scores": np.full((b, n), -0.5, "float32"),
            "alignments": alignments,
            "source_tokens": np.full((b, s), b"w", dtype=object),
            "target_tokens": np.full((b, n, t_len), b"W", dtype=object),
            "source_lengths": np.array([len(t.split()) + 1 for t in texts], "int32"),
            "target_lengths": np.array([[len(t.split()) + 2] * n for t in texts], "int32"),
        }


@contextlib.contextmanager
def serving(backend, settings, app=None):
    """A TestClient on the app; whatever happens, held model calls are released at the end."""
    app = app or create_app(backend, settings)
    try:
        with TestClient(app) as client:
            try:
                yield client
            finally:
                backend.release.set()
    finally:
        backend.release.set()


def _settings(**limits):
    return ServerSettings(model_name="fake", **limits)


def _in_thread(function, *args, **kwargs):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def _wait(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _predict_body(texts, beam=4, n_best=4, **extra):
    inputs = {"text": texts, "beam_size": beam, "n_best": n_best, "length_penalty": 0.6}
    return {"signature_name": "translate", "inputs": inputs, **extra}


# -- 1. one request cannot exhaust memory ------------------------------------------------------


def test_alignments_are_budgeted_and_predict_can_filter_them_out():
    """Alignments cost n_best x target x source values per text: over `max_alignment_values`
    the request is refused with a 413 that names the limit and the request's cost, and
    `output_filter` (as in TF Serving's PredictRequest) leaves them out."""
    backend = ScriptedBackend()
    long_text = " ".join(["word"] * 60)  # 62 source tokens (chars + 2: no SentencePiece here)
    settings = _settings(max_alignment_values=100_000)
    with serving(backend, settings) as client:
        refused = client.post(PREDICT, json=_predict_body([long_text], beam=8, n_best=8))
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert "max_alignment_values" in error and "100000" in error, error
        cost = int(re.search(r"(\d+) alignment values", error).group(1))
        assert cost > 100_000
        assert backend.calls == []  # refused before the model

        wanted = ["translations", "scores"]
        body = _predict_body([long_text], beam=8, n_best=8, output_filter=wanted)
        filtered = client.post(PREDICT, json=body)
        assert filtered.status_code == 200, filtered.text
        assert set(filtered.json()["outputs"]) == set(wanted)
        unknown = client.post(PREDICT, json=_predict_body(["a"], output_filter=["logits"]))
        assert unknown.status_code == 400 and "logits" in unknown.json()["error"]

        small = client.post(PREDICT, json=_predict_body(["two words"], beam=2, n_best=2))
        assert small.status_code == 200 and "alignments" in small.json()["outputs"]

        # /v1/translate counts the best hypothesis' alignment, and only when it is asked for.
        texts = [long_text] * 40
        asked = client.post(TRANSLATE, json={"texts": texts, "return_alignment": True})
        assert asked.status_code == 413 and "max_alignment_values" in asked.json()["error"]
        assert client.post(TRANSLATE, json={"texts": texts, "beam_size": 2}).status_code == 200


@pytest.mark.parametrize(
    ("module", "function", "path", "body"),
    [
        ("tfserving", "format_predict", PREDICT, _predict_body(["a b c"], 2, 2)),
        ("translate", "_translation", TRANSLATE, {"text": "a b", "return_alignment": True}),
    ],
    ids=["predict", "translate"],
)
def test_responses_are_encoded_off_the_event_loop(monkeypatch, module, function, path, body):
    """While a response is being encoded, /healthz still answers: the encoding runs on a worker
    thread, not on the event loop."""
    import importlib

    target = importlib.import_module(f"translator.server.{module}")
    encoding, answered = threading.Event(), threading.Event()
    seen = []
    original = getattr(target, function)

    def slow(*args, **kwargs):
        encoding.set()
        seen.append(answered.wait(5))  # the health check must get through meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(target, function, slow)
    with serving(ScriptedBackend(), _settings()) as client:
        pending = _in_thread(client.post, path, json=body)
        assert encoding.wait(10)
        assert client.get("/healthz").status_code == 200
        answered.set()
        assert pending.result(30).status_code == 200
    assert seen == [True]


def test_a_large_alignment_response_is_encoded_compactly():
    """A [4, 8, 64, 64] float alignment output (131,072 numbers) costs a few bytes per number to
    encode, not one Python object or numpy string per number (about 128 bytes each)."""
    backend = ScriptedBackend()
    text = " ".join(["w"] * 63)  # 64 source tokens: alignments [4, 8, 65, 64]
    values = 4 * 8 * 65 * 64
    with serving(backend, _settings(max_alignment_values=1 << 22)) as client:
        body = _predict_body([text] * 4, beam=8, n_best=8)
        assert client.post(PREDICT, json=body).status_code == 200  # warm
        tracemalloc.start()
        try:
            response = client.post(PREDICT, json=body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert response.status_code == 200
    assert np.array(response.json()["outputs"]["alignments"]).shape == (4, 8, 65, 64)
    assert len(response.content) / values < 10  # rounded: "0.12346," at most
    assert peak / values < 64, f"{peak / values:.0f} bytes per number"


# -- 2. cost budget, splitting, deadlines, cancellation ------------------------------------------


def test_requests_over_the_cost_budget_are_refused_naming_the_limit_and_the_cost():
    """Cost = texts x beam x maximum output length (source subwords x 2 + 10): over
    `max_request_cost` a request is refused with a 413 in both dialects; a text that alone
    costs more than one model call may (`max_batch_cost`) is refused too."""
    backend = ScriptedBackend()
    settings = _settings(max_request_cost=20_000, max_batch_cost=5_000)
    text = "x" * 100  # 102 source tokens at most -> 214 output tokens -> 214 x beam
    with serving(backend, settings) as client:
        ok = client.post(TRANSLATE, json={"texts": [text] * 9, "beam_size": 8})
        assert ok.status_code == 200, ok.text  # 9 x 8 x 214 = 15,408
        over = client.post(TRANSLATE, json={"texts": [text] * 12, "beam_size": 8})
        assert over.status_code == 413, over.text
        error = over.json()["error"]
        assert "max_request_cost" in error and "20000" in error and "20544" in error, error
        predict = client.post(PREDICT, json=_predict_body([text] * 12, beam=8, n_best=1))
        assert predict.status_code == 413 and "max_request_cost" in predict.json()["error"]
        row = client.post(TRANSLATE, json={"text": "x" * 1000, "beam_size": 16})
        assert row.status_code == 413 and "max_batch_cost" in row.json()["error"]
    # Only the admitted request reached the model, in calls of at most 5,000: 2 texts each.
    assert sum(len(call) for call in backend.calls) == 9
    assert all(len(call) <= 2 for call in backend.calls), backend.calls


def test_a_request_over_max_batch_size_is_split_and_short_requests_interleave():
    """A 8-text request with max_batch_size 2 runs as four 2-row calls, and a short request
    that arrives meanwhile runs between them instead of waiting for all four."""
    calls, finished = [], []
    started, go_on = threading.Event(), threading.Event()

    def run(signature, version, texts, scalars):
        calls.append(list(texts))
        if len(calls) == 1:
            started.set()
            go_on.wait(10)
        return {"echo": np.array(texts, dtype=object)}

    async def main():
        batcher = MicroBatcher(run, max_batch_size=2, max_wait=0)
        batcher.start()

        async def submit(name, texts):
            result = await batcher.submit("s", None, texts, {})
            finished.append(name)
            return result

        heavy = asyncio.ensure_future(submit("heavy", [f"h{i}" for i in range(8)]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        short = asyncio.ensure_future(submit("short", ["s0"]))
        await asyncio.sleep(0.05)
        go_on.set()
        results = await asyncio.gather(heavy, short)
        await batcher.stop()
        return results

    heavy, short = asyncio.run(main())
    assert list(heavy["echo"]) == [f"h{i}" for i in range(8)]  # its rows, in order
    assert list(short["echo"]) == ["s0"]
    assert all(len(texts) <= 2 for texts in calls), calls
    assert finished == ["short", "heavy"], calls
    assert calls[1] == ["s0"] or "s0" in calls[1]


def _while_the_first_call_runs(first, later, timeout, **batcher_options):
    """Submits the requests `first` (each `(texts, costs)`) to a `MicroBatcher` whose model
    call holds until released when it starts with the first text of `first[0]`; once it is
    held, submits `later` and waits `timeout` seconds, then releases it.

    Returns `(later requests answered while it was held, every request's result (first, then
    later), the texts of each call, the thread (lane) of each call)`.
    """
    calls, lanes = [], []
    started, release = threading.Event(), threading.Event()
    blocker = first[0][0][0]

    def run(signature, version, texts, scalars):
        calls.append(list(texts))
        lanes.append(threading.current_thread().name.split("_")[0])
        if texts[0] == blocker:
            started.set()
            release.wait(10)
        return {"echo": np.array(texts, dtype=object)}

    async def main():
        batcher = MicroBatcher(run, **batcher_options)
        batcher.start()
        loop = asyncio.get_running_loop()

        def submit(requests):
            return [
                asyncio.ensure_future(batcher.submit("s", None, texts, {}, costs=costs))
                for texts, costs in requests
            ]

        held = submit(first)
        await loop.run_in_executor(None, started.wait, 10)
        waiting = submit(later)
        done, _ = await asyncio.wait(waiting, timeout=timeout)
        release.set()
        results = await asyncio.gather(*held, *waiting)
        await batcher.stop()
        return len(done), results

    answered, results = asyncio.run(main())
    return answered, results, calls, lanes


@pytest.mark.parametrize("express_cost", [1000, None], ids=["express-lane", "one-lane"])
def test_short_requests_run_beside_a_heavy_call_on_the_express_lane(express_cost):
    """While a call costing more than `express_cost` runs, cheap requests run beside it on a
    second thread (merged), and the heavy request's next chunk still waits for the main lane;
    without the lane, the short requests wait for the heavy call."""
    answered, (heavy, *shorts), calls, lanes = _while_the_first_call_runs(
        [(["h0", "h1", "h2", "h3"], [2000] * 4)],
        [([f"s{i}"], [100]) for i in range(3)],
        timeout=1.0,
        max_batch_size=4,
        max_wait=0,
        max_batch_cost=4000,
        express_cost=express_cost,
    )
    assert list(heavy["echo"]) == ["h0", "h1", "h2", "h3"]
    assert [list(r["echo"]) for r in shorts] == [["s0"], ["s1"], ["s2"]]
    if express_cost:
        assert answered == 3, calls
        assert calls == [["h0", "h1"], ["s0", "s1", "s2"], ["h2", "h3"]]
        assert lanes == ["model", "model-express", "model"]
    else:
        assert answered == 0, calls
        assert calls[0] == ["h0", "h1"] and ["s0", "s1", "s2"] in calls
        assert set(lanes) == {"model"}


def test_a_call_merged_from_cheap_requests_is_not_heavy():
    """Many cheap requests merged into one call costing more than `express_cost` are ordinary
    batching, not a heavy request: the express lane stays shut, so the requests arriving
    meanwhile wait and run together in the next call (two calls side by side would share the
    cores and merge fewer texts each)."""
    # Six requests of cost 300 arrive together: one call of cost 1,800 > express_cost.
    answered, results, calls, lanes = _while_the_first_call_runs(
        [([f"a{i}"], [300]) for i in range(6)],
        [([f"b{i}"], [300]) for i in range(3)],
        timeout=0.5,
        max_batch_size=8,
        max_wait=0.05,
        max_batch_cost=4000,
        express_cost=1000,
    )
    assert [list(r["echo"]) for r in results] == [[f"a{i}"] for i in range(6)] + [
        [f"b{i}"] for i in range(3)
    ]
    assert answered == 0, calls
    assert calls == [[f"a{i}" for i in range(6)], ["b0", "b1", "b2"]]
    assert set(lanes) == {"model"}


def test_queued_work_past_its_deadline_gets_504_and_never_reaches_the_model():
    backend = ScriptedBackend()
    with serving(backend, _settings(request_timeout=0.5)) as client:
        first = _in_thread(client.post, TRANSLATE, json={"text": "block me"})
        assert backend.entered.wait(10)
        # Per request: a shorter timeout than the server's.
        late = client.post(TRANSLATE, json={"text": "late one", "timeout": 0.2})
        assert late.status_code == 504, late.text
        assert "0.2" in late.json()["error"]
        # The server-wide default, in TF Serving's dialect too.
        queued = client.post(PREDICT, json={"instances": ["late two"]})
        assert queued.status_code == 504, queued.text
        # The running request is answered at its own deadline too, while its call goes on.
        assert first.result(30).status_code == 504
        backend.release.set()
        assert client.post(TRANSLATE, json={"text": "after"}).status_code == 200
        metrics = client.get("/metrics").text
    assert not any(t.startswith("late") for call in backend.calls for t in call), backend.calls
    assert "translator_deadline_exceeded_total 3.0" in metrics


def test_a_client_that_disconnects_stops_its_queued_work():
    """The ASGI app is driven directly: the second request's client goes away while its work is
    queued behind a running call; that work never reaches the model and counts as 499."""
    backend = ScriptedBackend()
    app = create_app(backend, _settings())
    with TestClient(app) as client:
        first = _in_thread(client.post, TRANSLATE, json={"text": "block me"})
        assert backend.entered.wait(10)
        gone = asyncio.Event()
        sent = []
        body = json.dumps({"text": "gone"}).encode()

        async def leaving_client():
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                if messages:
                    return messages.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": TRANSLATE,
                "raw_path": TRANSLATE.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
                "client": ("127.0.0.1", 1),
                "server": ("testserver", 80),
                "state": {},
            }
            await app(scope, receive, send)

        service = app.state.service
        request = client.portal.start_task_soon(leaving_client)
        try:
            assert _wait(lambda: service.batcher.depth == 1)
            client.portal.call(gone.set)
            dropped = _wait(lambda: service.batcher.depth == 0, 5)
        finally:
            client.portal.call(gone.set)
            backend.release.set()
            request.result(30)
        assert first.result(30).status_code == 200
        assert dropped, "the work of a client that left stayed queued"
        assert client.post(TRANSLATE, json={"text": "after"}).status_code == 200
        metrics = client.get("/metrics").text
    assert sent == []
    assert ["gone"] not in backend.calls and not any("gone" in c for c in backend.calls)
    assert (
        'translator_http_requests_total{method="POST",route="/v1/translate",status="499"} 1.0'
        in (metrics)
    )


# -- 3. bounded shutdown -------------------------------------------------------------------------


def test_shutdown_is_bounded_and_queued_work_gets_503():
    """uvicorn with the service's settings, in a thread: at shutdown a queued request is
    answered 503 with Retry-After at once, and the server stops within --shutdown-timeout
    although a model call is still running."""
    from translator.server.app import uvicorn_server

    backend = ScriptedBackend()
    settings = _settings(shutdown_timeout=1.0)
    port = free_port()
    server = uvicorn_server(create_app(backend, settings), settings, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: server.started, 30)
        running = _in_thread(httpx.post, base + TRANSLATE, json={"text": "block"}, timeout=30)
        assert backend.entered.wait(10)
        queued = _in_thread(httpx.post, base + TRANSLATE, json={"text": "queued"}, timeout=30)
        assert _wait(lambda: len(backend.calls) == 1 and _depth(base) == 1)
        stopping = time.monotonic()
        server.should_exit = True
        answer = queued.result(10)
        assert answer.status_code == 503 and answer.headers.get("retry-after"), answer.text
        assert "shutting down" in answer.json()["error"]
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop within its shutdown timeout"
        assert time.monotonic() - stopping < 10
        assert not backend.release.is_set()  # the model call was still running
        cut = running.result(10)  # its client is not left hanging either
        assert cut.status_code == 503 and cut.headers.get("retry-after"), cut.text
    finally:
        backend.release.set()
        server.should_exit = True
        thread.join(10)
    assert backend.calls == [["block"]]


def _depth(base):
    try:
        text = httpx.get(base + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith("translator_queue_depth "):
            return float(line.split()[-1])
    return -1


# -- 4. honest health ----------------------------------------------------------------------------


def test_readyz_is_503_when_the_queue_is_full_and_every_503_has_retry_after():
    backend = ScriptedBackend()
    with serving(backend, _settings(max_queue=1)) as client:
        running = _in_thread(client.post, TRANSLATE, json={"text": "block"})
        assert backend.entered.wait(10)
        queued = _in_thread(client.post, TRANSLATE, json={"text": "queued"})
        try:
            assert _wait(lambda: client.app.state.service.batcher.depth == 1)
            ready = client.get("/readyz")
            refused = client.post(TRANSLATE, json={"text": "refused"})
        finally:
            backend.release.set()
            answers = [running.result(30).status_code, queued.result(30).status_code]
        assert ready.status_code == 503 and ready.headers.get("retry-after"), ready.text
        assert "queue" in ready.json()["error"]
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert answers == [200, 200]
        assert client.get("/readyz").status_code == 200


def _corrupt_copy(export_dir, tmp_path, versions):
    """A copy of the export with `versions` ({number: "good" | "garbage"}) as its versions."""
    target = tmp_path / "model"
    shutil.copytree(export_dir, target, ignore=shutil.ignore_patterns("[0-9]*"))
    for number, kind in versions.items():
        folder = target / str(number)
        if kind == "good":
            shutil.copytree(export_dir / "1", folder)
        else:
            folder.mkdir()
            (folder / "saved_model.pb").write_bytes(b"this is not a SavedModel \x00\xff" * 20)
    return target


def test_a_version_that_fails_to_load_falls_back_to_the_newest_good_one(tiny_export_dir, tmp_path):
    model = _corrupt_copy(tiny_export_dir, tmp_path, {1: "good", 2: "garbage"})
    backend = SavedModelBackend(model, "tiny")
    backend.load()
    assert backend.version == 1
    with TestClient(create_app(backend, ServerSettings(model=str(model)))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["model"] == {"name": "tiny", "version": "1"}
        (failure,) = body["failed_versions"]
        assert failure["version"] == "2" and failure["error"]
        status = client.get("/v1/models/tiny").json()["model_version_status"]
        by_version = {s["version"]: s for s in status}
        assert by_version["1"]["state"] == "AVAILABLE"
        assert by_version["2"]["state"] == "END"
        assert by_version["2"]["status"]["error_code"] != "OK"
        assert by_version["2"]["status"]["error_message"]
        assert client.get("/v1/models/tiny/versions/2").status_code == 200  # its status
        metrics = client.get("/metrics").text
        assert 'translator_model_version_load_failed{version="2"} 1.0' in metrics
        answer = client.post(TRANSLATE, json={"text": "one red cat"})
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        for text in (ready.text, client.get("/v1/models/tiny").text):
            assert str(tmp_path) not in text and "saved_model.pb" not in text, text


def test_load_errors_name_the_model_never_a_path(tiny_export_dir, tmp_path):
    model = _corrupt_copy(tiny_export_dir, tmp_path, {1: "garbage"})
    backend = SavedModelBackend(model, "tiny")
    with TestClient(create_app(backend, ServerSettings(model=str(model)))) as client:
        assert _wait(lambda: client.get("/readyz").json().get("error", "loading") != "")
        assert _wait(lambda: "loading" not in client.get("/readyz").json()["error"], 60)
        ready = client.get("/readyz")
        answer = client.post(TRANSLATE, json={"text": "one red cat"})
    assert ready.status_code == 503 and "tiny" in ready.json()["error"]
    assert answer.status_code == 500, answer.text  # no retry can succeed: not a 503
    for text in (ready.text, answer.text):
        assert str(tmp_path) not in text and "/tmp" not in text and "saved_model" not in text, text
        assert "tiny" in text


def test_serve_exits_at_start_up_when_no_version_loads(tiny_export_dir, tmp_path):
    model = _corrupt_copy(tiny_export_dir, tmp_path, {1: "garbage", 2: "garbage"})
    command = [sys.executable, "-m", "translator.cli", "serve", "--model", str(model)]
    command += ["--port", str(free_port())]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail("serve kept running although no version of the model loads:\n" + stderr[-2000:])
    assert proc.returncode != 0
    assert "version 2" in stderr and "version 1" in stderr, stderr[-3000:]


# -- 5. no secrets, no paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://user:s3cret@127.0.0.1:8501", "http://s3cret@127.0.0.1:8501",
     "http://127.0.0.1:8501/?token=s3cret", "http://127.0.0.1:8501/#s3cret"],
)  # fmt: skip
def test_backend_urls_with_credentials_are_refused_without_echoing_them(url):
    with pytest.raises(ValueError) as refused:
        ServerSettings(model_name="tiny", backend=url)
    assert "s3cret" not in str(refused.value)
    assert "--backend" in str(refused.value)
    with pytest.raises(ValueError) as direct:
        RemoteBackend(url, "tiny")
    assert "s3cret" not in str(direct.value)


def test_serve_refuses_backend_credentials_without_printing_them(tmp_path):
    command = [sys.executable, "-m", "translator.cli", "serve", "--model", str(tmp_path)]
    command += ["--model-name", "tiny", "--backend", "http://admin:s3cret@127.0.0.1:9"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout and "credentials" in proc.stderr


# -- 11. slow clients ----------------------------------------------------------------------------


@pytest.fixture()
def live_server():
    """Starts the service (scripted backend) on uvicorn in a thread with the given settings;
    returns its port. Stopped at the end of the test."""
    from translator.server.app import uvicorn_server

    servers = []

    def start(**limits) -> int:
        settings = _settings(**limits)
        port = free_port()
        server = uvicorn_server(
            create_app(ScriptedBackend(), settings), settings, "127.0.0.1", port
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        assert _wait(lambda: server.started, 30)
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(15)


def _read_until_closed(sock, seconds=10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds} s: {data!r}")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def test_slow_clients_are_disconnected(live_server):
    port = live_server(header_timeout=0.5, body_timeout=0.5)
    with socket.create_connection(("127.0.0.1", port)) as partial_headers:
        partial_headers.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Ty")
        data, seconds = _read_until_closed(partial_headers)
        assert seconds < 5, seconds
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data

    with socket.create_connection(("127.0.0.1", port)) as partial_body:
        partial_body.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": '
        )
        data, seconds = _read_until_closed(partial_body)
        assert seconds < 5 and data.startswith(b"HTTP/1.1 408"), data
        assert b"body" in data

    # A complete request on a healthy connection is still served.
    assert httpx.post(f"http://127.0.0.1:{port}{TRANSLATE}", json={"text": "a"}).status_code == 200


def test_connections_over_the_limit_get_503_and_are_closed(live_server):
    port = live_server(max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            data, _ = _read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after" in data.lower(), data
    finally:
        for sock in idle:
            sock.close()
    assert _wait(lambda: _served(port))  # the closed ones free their places


def _served(port) -> bool:
    try:
        return httpx.post(f"http://127.0.0.1:{port}{TRANSLATE}", json={"text": "a"}).is_success
    except httpx.HTTPError:
        return False
