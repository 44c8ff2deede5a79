"""The TF Serving export and the `.keras` import, checked in fresh processes."""

import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

TEXTS = ["one red cat", "big house", "", "two small dogs and a green tree"]


def run_python(code, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_export_layout(tiny_export_dir):
    names = sorted(p.name for p in tiny_export_dir.iterdir())
    assert names == ["1", "config.yaml", "model.keras", "spm.model"]  # no temporary leftovers
    version = tiny_export_dir / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    # Readable by a server run as another user (the "other" bits, under the usual umask 022):
    # the SavedModel directory is written under a private temporary name first.
    umask = os.umask(0)
    os.umask(umask)
    for path in [version, *version.rglob("*"), *(tiny_export_dir / n for n in names[1:])]:
        wanted = (0o555 if path.is_dir() else 0o444) & ~umask
        assert path.stat().st_mode & wanted == wanted, (path, oct(path.stat().st_mode))


def test_warmup_requests_replay_as_tf_serving_would(tiny_export_dir):
    """The version carries TF Serving's warm-up file: PredictionLog records, one Predict
    request per signature. Replayed as TF Serving does at load (each request's inputs to its
    signature), they run, fill the working weights, and answer as the Python API."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from translator.export import WARMUP_FILE, WARMUP_TEXTS
    from translator.inference import load

    path = tiny_export_dir / "1" / WARMUP_FILE
    logs = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 2
    requests = [log.predict_log.request for log in logs]
    assert [r.model_spec.signature_name for r in requests] == ["serving_default", "translate"]
    translator = load(tiny_export_dir)
    loaded = tf.saved_model.load(str(tiny_export_dir / "1"))
    assert all(w.numpy().size == 0 for w in loaded.working_weights)
    outputs = []
    for request in requests:
        signature = loaded.signatures[request.model_spec.signature_name]
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        assert set(inputs) == set(signature.structured_input_signature[1])
        outputs.append(signature(**{name: tf.constant(v) for name, v in inputs.items()}))
    assert all(w.numpy().size > 0 for w in loaded.working_weights)
    expected = [r.text for r in translator.translate(list(WARMUP_TEXTS), segment=False)]
    assert [t.decode() for t in outputs[0]["translation"].numpy()] == expected
    assert [t.decode() for t in outputs[1]["translations"].numpy()[:, 0]] == expected
    translate = requests[1].inputs
    assert tf.make_ndarray(translate["beam_size"]) == translator.beam_size
    assert np.isclose(tf.make_ndarray(translate["length_penalty"]), translator.length_penalty)


def test_warmup_option_chooses_the_signatures_and_bad_values_write_nothing(tiny_run_dir, tmp_path):
    """`warmup="serving_default"` (TF Serving with batching, which refuses translate's scalar
    inputs) writes that signature's request alone, `"none"` no file; the CLI offers the same
    choices; an unknown value is refused before anything is written."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from translator.cli import build_parser
    from translator.export import WARMUP_CHOICES, WARMUP_FILE, ExportError, export

    version = export(tiny_run_dir, tmp_path / "batching", warmup="serving_default")
    names = []
    for record in tf.data.TFRecordDataset(str(version / WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        names.append(log.predict_log.request.model_spec.signature_name)
    assert names == ["serving_default"]
    version = export(tiny_run_dir, tmp_path / "none", warmup="none")
    assert not (version / WARMUP_FILE).exists() and not (version / "assets.extra").exists()
    with pytest.raises(ExportError, match="warmup must be one of all, serving_default, none"):
        export(tiny_run_dir, tmp_path / "bad", warmup="translate")
    assert not (tmp_path / "bad").exists()
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]
    (action,) = [a for a in export_parser._actions if a.dest == "warmup"]
    assert action.choices == list(WARMUP_CHOICES) and action.default == "all"


def test_savedmodel_in_a_fresh_process_equals_translator_load(tiny_export_dir):
    """Only tensorflow and tensorflow_text are imported; outputs equal the Python API's."""
    code = f"""
import json, sys
import tensorflow as tf, tensorflow_text
model = tf.saved_model.load({str(tiny_export_dir / "1")!r})
texts = tf.constant({TEXTS!r})
out = model.signatures["translate"](
    text=texts, beam_size=tf.constant(3), n_best=tf.constant(2),
    length_penalty=tf.constant(0.6))
default = model.signatures["serving_default"](text=texts)
assert not any(m == "translator" or m.startswith("translator.") for m in sys.modules)
print(json.dumps({{
    "translations": [[t.decode() for t in row] for row in out["translations"].numpy()],
    "scores": out["scores"].numpy().tolist(),
    "target_tokens": [[t.decode() for t in row] for row in out["target_tokens"].numpy()[:, 0]],
    "alignments": out["alignments"].numpy()[:, 0].tolist(),
    "default": [t.decode() for t in default["translation"].numpy()],
    "default_scores": default["score"].numpy().tolist(),
}}))
"""
    served = json.loads(run_python(code).strip().splitlines()[-1])
    from translator.inference import load

    translator = load(tiny_export_dir)
    # The export translates each text, as it is, as one sentence ("" too): segment=False.
    results = translator.translate(
        TEXTS, beam_size=3, n_best=2, length_penalty=0.6, return_alignment=True, segment=False
    )
    assert served["translations"] == [[t for t, _ in r.n_best] for r in results]
    np.testing.assert_allclose(
        served["scores"], [[s for _, s in r.n_best] for r in results], rtol=1e-5, atol=1e-5
    )
    for row, result in zip(range(len(TEXTS)), results, strict=True):
        tokens = [t for t in served["target_tokens"][row] if t]
        assert tokens == result.target_tokens
        alignment = np.array(served["alignments"][row])
        t, s = result.alignment.shape
        np.testing.assert_allclose(alignment[:t, :s], result.alignment, atol=1e-5)
        assert not alignment[t:].any() and not alignment[:, s:].any()  # zero padding
    defaults = translator.translate(TEXTS, segment=False)  # the config's beam and penalty
    assert served["default"] == [r.text for r in defaults]
    np.testing.assert_allclose(served["default_scores"], [r.score for r in defaults], rtol=1e-5)


def test_saved_model_cli_lists_both_signatures(tiny_export_dir):
    cli = Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run(
        [str(cli), "show", "--dir", str(tiny_export_dir / "1"), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    out = proc.stdout
    signatures = {}
    for block in out.split("signature_def['")[1:]:
        name = block.split("'")[0]
        signatures[name] = block
    assert set(signatures) >= {"serving_default", "translate"}, out[-2000:]
    default, translate = signatures["serving_default"], signatures["translate"]
    for block, entries in (
        (default, [("text", "DT_STRING", "(-1)"), ("translation", "DT_STRING", "(-1)"),
                   ("score", "DT_FLOAT", "(-1)")]),
        (translate, [("text", "DT_STRING", "(-1)"), ("beam_size", "DT_INT32", "()"),
                     ("n_best", "DT_INT32", "()"),
                     ("length_penalty", "DT_FLOAT", "unknown_rank"),  # one, or one per text
                     ("translations", "DT_STRING", "(-1, -1)"), ("scores", "DT_FLOAT", "(-1, -1)"),
                     ("alignments", "DT_FLOAT", "(-1, -1, -1, -1)"),
                     ("source_tokens", "DT_STRING", "(-1, -1)"),
                     ("target_tokens", "DT_STRING", "(-1, -1, -1)")]),
    ):  # fmt: skip
        for name, dtype, shape in entries:
            entry = block.split(f"['{name}'] tensor_info:")[1].split("name:")[0]
            assert dtype in entry and f"shape: {shape}" in entry, (name, entry)


def test_keras_file_loads_in_a_fresh_process_with_identical_logits(tiny_export_dir, tmp_path):
    import keras

    import translator

    model = keras.saving.load_model(tiny_export_dir / "model.keras")
    rng = np.random.default_rng(0)
    inputs = {
        "source_ids": rng.integers(4, model.source_vocab_size, (3, 7)).astype("int32"),
        "target_in_ids": rng.integers(4, model.target_vocab_size, (3, 5)).astype("int32"),
    }
    inputs["source_ids"][1, 4:] = 0
    np.savez(tmp_path / "inputs.npz", **inputs)
    expected = np.asarray(model(inputs))
    code = f"""
import numpy as np, keras
import translator  # registers translator's Keras objects
model = keras.saving.load_model({str(tiny_export_dir / "model.keras")!r})  # safe mode
inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
np.save({str(tmp_path / "logits.npy")!r}, np.asarray(model(inputs)))
t = translator.Translator.from_model(model)  # the tokenizers travel inside the .keras file
print(t.translate("one red cat", beam_size=2).text)
"""
    printed = run_python(code).strip().splitlines()[-1:] or [""]
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)
    assert printed == [translator.load(tiny_export_dir).translate("one red cat", beam_size=2).text]
    with zipfile.ZipFile(tiny_export_dir / "model.keras") as archive:
        assert any(name.endswith(".model") for name in archive.namelist())  # SentencePiece asset


def test_float16_storage_halves_the_export_and_changes_no_output(tiny_run_dir, tmp_path):
    from translator.export import export
    from translator.inference import load

    full = export(tiny_run_dir, tmp_path / "f32", weights_dtype="float32")
    half = export(tiny_run_dir, tmp_path / "f16", weights_dtype="float16")

    def size(path):
        return sum(p.stat().st_size for p in (path / "variables").iterdir())

    assert size(half) < 0.6 * size(full)
    import tensorflow as tf

    loaded = tf.saved_model.load(str(half))
    out = loaded.signatures["serving_default"](text=tf.constant(TEXTS))
    expected = load(tmp_path / "f16").translate(TEXTS, segment=False)
    assert [t.decode() for t in out["translation"].numpy()] == [r.text for r in expected]


@pytest.mark.parametrize(
    ("weights_dtype", "options", "table"),
    [
        ("float16", {}, True),
        ("float32", {}, True),
        ("float16", {}, False),  # a model too big for the table
        ("float16", {"compute_dtype": "adaptive", "bfloat16_rows": 1}, True),  # bfloat16 copy
        ("float32", {"compute_dtype": "adaptive", "bfloat16_rows": 1}, True),
        ("float16", {"projection_dtype": "bfloat16"}, True),
    ],
)
def test_working_weights_are_saved_empty_and_filled_by_the_first_call(
    tiny_tied_run_dir, tmp_path, monkeypatch, weights_dtype, options, table
):
    """What decoding reads is computed by a loaded export's first call and kept: the float16
    weights cast to float32, the tied output kernel (the embedding matrix, transposed) and the
    input table (every target piece's embedding through the first cell's input projection).
    Saved empty, they leave the export its size; the first call, later calls (which read them:
    a changed kernel changes their output) and first calls made at once by several threads all
    translate as the Python API, on every compute path; and so does TF1's loader, the C++
    loader TF Serving uses."""
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf

    from translator.export import export
    from translator.inference import load

    def call(loaded):
        out = loaded.signatures["translate"](
            text=tf.constant(TEXTS),
            beam_size=tf.constant(3),
            n_best=tf.constant(1),
            length_penalty=tf.constant(0.6),
        )
        return [t.decode() for t in out["translations"][:, 0].numpy()], out["scores"][:, 0]

    def check(result):
        texts, scores = result
        assert texts == expected_texts
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)

    if not table:
        monkeypatch.setattr("translator.export.INPUT_TABLE_MAX_BYTES", 0)
    out = tmp_path / "export"
    version = export(tiny_tied_run_dir, out, weights_dtype=weights_dtype, **options)
    results = load(out).translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
    expected_texts, expected_scores = [r.text for r in results], [r.score for r in results]
    assert any(expected_texts)
    loaded = tf.saved_model.load(str(version))
    working = loaded.working_weights
    assert all(w.numpy().size == 0 for w in working)
    check(call(loaded))  # fills them
    stored = loaded.stored_weights
    assert {w.dtype for w in stored} == {tf.as_dtype(weights_dtype)}
    cast = stored if weights_dtype != "float32" else []  # float32 ones are read as they are
    # + the output kernel and the input table
    assert len(working) == len(cast) + 1 + table
    for w, s in zip(working, cast, strict=False):
        np.testing.assert_array_equal(w.numpy(), s.numpy().astype(np.float32))
    weights = [*stored, *loaded.model_variables]  # float16, or float32 (and int seeds)
    (embedding,) = [v for v in weights if "embedding" in v.name]
    kernel = working[len(cast)]
    np.testing.assert_array_equal(kernel.numpy(), embedding.numpy().astype(np.float32).T)
    kept = [(kernel, True)]
    if table:
        # Every piece's embedding times the embedding rows of the first cell's input kernel,
        # plus its input bias (a reset-after GRU's bias is [input; recurrent]), in numpy.
        cell = load(out, compute_dtype="float32").model.decoder.cells[0]
        emb = embedding.numpy().astype(np.float32)
        bias = cell.bias.numpy()
        expected = emb @ cell.kernel.numpy()[: emb.shape[1]] + (bias[0] if bias.ndim == 2 else bias)
        np.testing.assert_allclose(working[-1].numpy(), expected, rtol=1e-5, atol=1e-5)
        # The bfloat16 path (every call of the adaptive graph from 1 row) projects its
        # embeddings per step and reads no table.
        kept.append((working[-1], options.get("bfloat16_rows") != 1))
    check(call(loaded))  # reads them ...
    for value, read in kept:  # ... and nothing else: a changed one shows
        saved = value.numpy()
        value.assign(tf.zeros_like(value))
        assert (call(loaded)[0] != expected_texts) == read
        value.assign(saved)
    check(call(loaded))
    stored_bytes = sum(v.numpy().nbytes for v in weights)
    data = sum(p.stat().st_size for p in (version / "variables").iterdir())
    assert data < 1.05 * stored_bytes + 10_000
    fresh = tf.saved_model.load(str(version))
    with ThreadPoolExecutor(4) as pool:
        for result in pool.map(call, [fresh] * 4):
            check(result)
    assert all(w.numpy().size > 0 for w in fresh.working_weights)
    # TF1's Session loader, as TF Serving's C++ one, restores the variables by the SavedModel's
    # saver, not by its object graph: a Keras variable saved as it is stays uninitialized there
    # (every float32-storage export failed this, keras-team/keras#20095).
    for texts, scores in translate_in_tf1_session(version):
        check((texts, scores))


def translate_in_tf1_session(version):
    """TEXTS through SavedModel `version`'s `translate` signature (beam 3, length penalty 0.6) in
    a TF1 `Session`, in a fresh process, twice (the first call fills the working weights, the
    second reads them): `[(texts, scores), (texts, scores)]`. TF1's loader is the path of TF
    Serving's C++ server."""
    code = f"""
import json
import tensorflow as tf, tensorflow_text
with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], {str(version)!r})
    signature = meta.signature_def["translate"]
    values = dict(text={TEXTS!r}, beam_size=3, n_best=1, length_penalty=0.6)
    feeds = {{signature.inputs[name].name: value for name, value in values.items()}}
    fetches = [signature.outputs[name].name for name in ("translations", "scores")]
    runs = [session.run(fetches, feeds) for _ in range(2)]  # fills, then reads
print(json.dumps([[[t.decode() for t in texts[:, 0]], scores[:, 0].tolist()] for texts, scores in runs]))
"""
    return json.loads(run_python(code).strip().splitlines()[-1])


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_an_untied_float32_export_runs_in_tf1s_loader(
    tiny_run_dir, tmp_path, monkeypatch, compute_dtype
):
    """An untied model stored in float32 without an input table keeps no working weight: every
    read goes straight to the stored variables, which TF1's loader (TF Serving's) must restore;
    and so must a graph built in bfloat16."""
    from translator.export import export
    from translator.inference import load

    monkeypatch.setattr("translator.export.INPUT_TABLE_MAX_BYTES", 0)
    version = export(tiny_run_dir, tmp_path / "e", compute_dtype=compute_dtype)
    results = load(tmp_path / "e").translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
    assert any(r.text for r in results)
    for texts, scores in translate_in_tf1_session(version):
        assert texts == [r.text for r in results]
        np.testing.assert_allclose(scores, [r.score for r in results], rtol=1e-5, atol=1e-5)


def translate_beam_3(version):
    """The `translate` signature of SavedModel `version` on TEXTS, beam 3, length penalty 0.6."""
    import tensorflow as tf

    return tf.saved_model.load(str(version)).signatures["translate"](
        text=tf.constant(TEXTS),
        beam_size=tf.constant(3),
        n_best=tf.constant(1),
        length_penalty=tf.constant(0.6),
    )


def test_bfloat16_projection_export_records_it_and_serves_it(tiny_run_dir, tmp_path):

    from translator.config import load_config
    from translator.export import ExportError, export
    from translator.inference import load

    version = export(tiny_run_dir, tmp_path / "bf16", projection_dtype="bfloat16")
    assert load_config(tmp_path / "bf16" / "config.yaml").decoding.projection_dtype == "bfloat16"
    assert load_config(tiny_run_dir / "config.yaml").decoding.projection_dtype is None  # untouched
    translator = load(tmp_path / "bf16")
    assert translator.projection_dtype == "bfloat16"
    out = translate_beam_3(version)
    expected = translator.translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
    np.testing.assert_allclose(
        out["scores"].numpy()[:, 0], [r.score for r in expected], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ExportError, match="projection_dtype must be float32 or bfloat16"):
        export(tiny_run_dir, tmp_path / "bad", projection_dtype="float16")
    assert not (tmp_path / "bad").exists()  # checked before anything is written
    # A refused version changes nothing beside the versions already there.
    before = {p.name: p.read_bytes() for p in (tmp_path / "bf16").iterdir() if p.is_file()}
    with pytest.raises(ExportError, match="exists already"):
        export(tiny_run_dir, tmp_path / "bf16", version=1, projection_dtype="float32")
    after = {p.name: p.read_bytes() for p in (tmp_path / "bf16").iterdir() if p.is_file()}
    assert after == before


def test_bfloat16_compute_export_records_it_and_serves_it(tiny_run_dir, tmp_path):
    import keras

    from translator.config import load_config
    from translator.export import ExportError, export
    from translator.inference import load

    version = export(tiny_run_dir, tmp_path / "bf16", compute_dtype="bfloat16")
    assert load_config(tmp_path / "bf16" / "config.yaml").decoding.compute_dtype == "bfloat16"
    assert load_config(tiny_run_dir / "config.yaml").decoding.compute_dtype is None  # untouched
    # The .keras model stays a float32 model (only decoding is bfloat16) ...
    model = keras.saving.load_model(tmp_path / "bf16" / "model.keras")
    assert model.decoder.compute_dtype == "float32"
    # ... and load() of the export directory decodes as its SavedModel does.
    translator = load(tmp_path / "bf16")
    assert translator.model.decoder.compute_dtype == "bfloat16"
    out = translate_beam_3(version)
    expected = translator.translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
    assert [t.decode() for t in out["translations"].numpy()[:, 0]] == [r.text for r in expected]
    np.testing.assert_allclose(
        out["scores"].numpy()[:, 0], [r.score for r in expected], rtol=1e-5, atol=1e-5
    )
    float32 = load(tiny_run_dir).translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
    assert [r.score for r in float32] != [r.score for r in expected]  # bfloat16 did run
    with pytest.raises(ExportError, match="compute_dtype must be float32, bfloat16, adaptive"):
        export(tiny_run_dir, tmp_path / "bad", compute_dtype="float16")
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_adaptive_export_picks_bfloat16_for_many_rows_float32_for_few(tiny_run_dir, tmp_path):
    """One SavedModel, both ends: a call of fewer than `bfloat16_rows` rows (sentences x beam
    size) decodes as the float32 model does, a larger one as the bfloat16 model does; the
    weights are stored once; config.yaml records the mode and the threshold."""
    import tensorflow as tf

    from translator.config import load_config
    from translator.export import ExportError, export
    from translator.inference import load

    version = export(
        tiny_run_dir, tmp_path / "a", compute_dtype="adaptive", bfloat16_rows=6,
        weights_dtype="float16",  # as the shipped model is exported
    )  # fmt: skip
    decoding = load_config(tmp_path / "a" / "config.yaml").decoding
    assert (decoding.compute_dtype, decoding.bfloat16_rows) == ("adaptive", 6)
    # The export's model.keras holds the weights rounded as its SavedModel stores them.
    float32 = load(tmp_path / "a", compute_dtype="float32")
    bfloat16 = load(tmp_path / "a", compute_dtype="bfloat16")
    signature = tf.saved_model.load(str(version)).signatures["translate"]

    def served(texts, beam):
        out = signature(
            text=tf.constant(texts),
            beam_size=tf.constant(beam),
            n_best=tf.constant(1),
            length_penalty=tf.constant(0.6),
        )
        return [t.decode() for t in out["translations"].numpy()[:, 0]], out["scores"].numpy()[:, 0]

    def expected(translator, texts, beam):
        results = translator.translate(texts, beam_size=beam, length_penalty=0.6, segment=False)
        return [r.text for r in results], [r.score for r in results]

    for texts, beam, reference in (
        (TEXTS[:1], 5, float32),  # 5 rows
        (TEXTS, 1, float32),  # 4 rows, greedy
        (TEXTS[:2], 3, bfloat16),  # 6 rows
        (TEXTS, 3, bfloat16),  # 12 rows
    ):
        got_texts, got_scores = served(texts, beam)
        want_texts, want_scores = expected(reference, texts, beam)
        assert got_texts == want_texts, (len(texts), beam)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    # The two ends differ (so each check above tells which path ran) ...
    assert expected(float32, TEXTS, 3)[1] != expected(bfloat16, TEXTS, 3)[1]
    assert expected(float32, TEXTS[:1], 5)[1] != expected(bfloat16, TEXTS[:1], 5)[1]
    # ... and the weights are stored once: one embedding matrix, as in a float32 export.
    reader = tf.train.load_checkpoint(str(version / "variables" / "variables"))
    shape = list(float32.model.decoder.embedding.embeddings.shape)
    shapes = reader.get_variable_to_shape_map().values()
    assert sum(1 for s in shapes if list(s) == shape) == 1
    # load() of the directory, with no override, decodes as its SavedModel does.
    translator = load(tmp_path / "a")
    assert (translator.compute_dtype, translator.bfloat16_rows) == ("adaptive", 6)
    assert expected(translator, TEXTS, 3) == expected(bfloat16, TEXTS, 3)
    with pytest.raises(ExportError, match="bfloat16_rows must be at least 1"):
        export(tiny_run_dir, tmp_path / "bad", compute_dtype="adaptive", bfloat16_rows=0)
    with pytest.raises(ExportError, match="applies to compute_dtype adaptive or auto only"):
        export(tiny_run_dir, tmp_path / "bad", compute_dtype="float32", bfloat16_rows=8)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_auto_export_is_resolved_in_the_graph_and_kept_auto_for_load(
    tiny_run_dir, tmp_path, monkeypatch
):
    """`compute_dtype="auto"`: the SavedModel is built for the exporting machine, its
    config.yaml keeps `auto` and the threshold, so `translator.load` of the export resolves it
    on the machine where it runs (float32 where bfloat16 is emulated), and so does
    `load_saved_model` (the REST service's loader) with the SavedModel's own threshold."""
    import tensorflow as tf

    from translator import hardware
    from translator.config import load_config
    from translator.export import export, load_saved_model
    from translator.inference import load

    def has_bfloat16_branch(version):
        """Whether the SavedModel's functions compute anything in bfloat16."""
        signature = tf.saved_model.load(str(version)).signatures["translate"]
        library = signature.graph.as_graph_def().library
        bf16 = tf.bfloat16.as_datatype_enum
        return any(
            attr.type == bf16 or bf16 in attr.list.type
            for function in library.function
            for node in function.node_def
            for attr in node.attr.values()
        )

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    version_a = export(tiny_run_dir, tmp_path / "a", compute_dtype="auto", bfloat16_rows=6)
    assert has_bfloat16_branch(version_a)  # built adaptive, for this (bfloat16) machine
    decoding = load_config(tmp_path / "a" / "config.yaml").decoding
    assert (decoding.compute_dtype, decoding.bfloat16_rows) == ("auto", 6)
    assert load(tmp_path / "a").adaptive
    # Loaded with `load_saved_model` (the REST service's loader), it decodes as built where
    # bfloat16 is fast, and every call in float32 where it is not, as `load` would there.
    float32 = load(tmp_path / "a", compute_dtype="float32")
    bfloat16 = load(tmp_path / "a", compute_dtype="bfloat16")

    def served(loaded):  # 12 rows, over the threshold
        out = loaded.signatures["translate"](
            text=tf.constant(TEXTS),
            beam_size=tf.constant(3),
            n_best=tf.constant(1),
            length_penalty=tf.constant(0.6),
        )
        return out["scores"].numpy()[:, 0]

    def expected(translator):
        results = translator.translate(TEXTS, beam_size=3, length_penalty=0.6, segment=False)
        return [r.score for r in results]

    assert expected(float32) != expected(bfloat16)  # so the scores tell which path ran
    np.testing.assert_allclose(served(load_saved_model(version_a)[0]), expected(bfloat16), 1e-5)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})  # emulated bfloat16
    assert not load(tmp_path / "a").adaptive
    np.testing.assert_allclose(served(load_saved_model(version_a)[0]), expected(float32), 1e-5)
    # An export asked for adaptive (not auto) decodes as built wherever it is loaded.
    version_c = export(tiny_run_dir, tmp_path / "c", compute_dtype="adaptive", bfloat16_rows=6)
    np.testing.assert_allclose(served(load_saved_model(version_c)[0]), expected(bfloat16), 1e-5)
    # Exported where bfloat16 is emulated: a float32 graph, and the threshold kept for others.
    version_b = export(tiny_run_dir, tmp_path / "b", compute_dtype="auto", bfloat16_rows=6)
    assert not has_bfloat16_branch(version_b)  # built float32
    decoding = load_config(tmp_path / "b" / "config.yaml").decoding
    assert (decoding.compute_dtype, decoding.bfloat16_rows) == ("auto", 6)


def test_auto_compute_dtype_is_adaptive_only_with_bfloat16_matmuls(monkeypatch):
    from translator import hardware
    from translator.inference import resolve_compute_dtype

    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"amx_bf16", "avx512f"})
    assert resolve_compute_dtype("auto") == "adaptive"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})  # emulated bfloat16
    assert resolve_compute_dtype("auto") == "float32"
    assert [resolve_compute_dtype(d) for d in (None, "float32", "bfloat16", "adaptive")] == [
        None, "float32", "bfloat16", "adaptive"
    ]  # fmt: skip


def test_versions_are_numbered_and_never_overwritten(tiny_run_dir, tmp_path):
    from translator.export import ExportError, export

    out = tmp_path / "m"
    assert export(tiny_run_dir, out).name == "1"
    assert export(tiny_run_dir, out).name == "2"
    assert export(tiny_run_dir, out, version=7).name == "7"
    with pytest.raises(ExportError, match="exists already"):
        export(tiny_run_dir, out, version=2)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["1", "2", "7"]


def test_a_failed_export_leaves_no_version_behind(tiny_run_dir, tmp_path, monkeypatch):
    import tensorflow as tf

    from translator.export import export

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        export(tiny_run_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # the folder it made goes too
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        export(tiny_run_dir, tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [
        "notes.txt"
    ]  # one that was there stays


def test_clear_errors_for_missing_corrupt_and_foreign_models(tiny_export_dir, tmp_path):
    import tensorflow as tf

    from translator.export import ExportError, load_saved_model
    from translator.inference import load

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (tiny_export_dir / "model.keras").read_bytes()
    (broken / "model.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot load .*broken/model\.keras: it is not a comp"):
        load(broken)
    from translator.export import export

    with pytest.raises(ValueError, match=r"cannot load .*broken/model\.keras"):
        export(broken, tmp_path / "new" / "en-fr")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "en-fr").exists()
    with pytest.raises(ExportError, match="no saved_model.pb and no version"):
        load_saved_model(tmp_path)
    foreign = tmp_path / "foreign"
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x + 1}, input_signature=[tf.TensorSpec([], tf.float32)])
    tf.saved_model.save(module, str(foreign / "1"), signatures={"serving_default": module.f})
    with pytest.raises(ExportError, match=r"lacks the signature\(s\) \['translate'\]"):
        load_saved_model(foreign)
    loaded, path = load_saved_model(tiny_export_dir)
    assert path.name == "1" and "translate" in loaded.signatures


def test_the_tiny_runs_translate_with_trained_non_zero_biases(tiny_run_dir, tiny_separate_run_dir):
    """The fixtures the parity tests rely on: models that produce words (a model that ends every
    sentence at once makes every comparison one of "" with ""), and whose biases are not zero
    (a zero bias hides a step that forgets to add it)."""
    from tests.tiny import WORDS
    from translator.inference import load

    for run_dir in (tiny_run_dir, tiny_separate_run_dir):
        translator = load(run_dir)
        biases = [v for v in translator.model.weights if "bias" in v.path]
        assert any("projection" in v.path for v in biases)
        for v in biases:
            assert np.count_nonzero(np.asarray(v)) == np.size(v), v.path
        for result in translator.translate(["one red cat", "big house", "five blue cars"]):
            assert result.text and set(result.text.split()) <= set(WORDS.values()), result.text


def translate_signature(version, texts, beam_size, length_penalty, n_best=1):
    """The `translate` signature of SavedModel `version`, loaded in this process, as NumPy."""
    import tensorflow as tf

    out = tf.saved_model.load(str(version)).signatures["translate"](
        text=tf.constant(texts),
        beam_size=tf.constant(beam_size),
        n_best=tf.constant(n_best),
        length_penalty=tf.constant(length_penalty, tf.float32),
    )
    return {k: v.numpy() for k, v in out.items()}


def strings(values):
    return [v.decode("utf-8") for v in values if v]


def test_translate_signature_takes_a_length_penalty_per_text(tiny_export_dir):
    """One call with a penalty per text = each text translated alone with its penalty (what
    lets the server merge requests with different penalties into one model call), greedy and
    beam; a scalar still works, and a wrong count is an error that says what to give."""
    import tensorflow as tf

    from translator.inference import load

    signature = tf.saved_model.load(str(tiny_export_dir / "1")).signatures["translate"]

    def served(beam_size, length_penalty):
        out = signature(
            text=tf.constant(TEXTS),
            beam_size=tf.constant(beam_size),
            n_best=tf.constant(1),
            length_penalty=tf.constant(length_penalty, tf.float32),
        )
        return [t.decode() for t in out["translations"].numpy()[:, 0]], out["scores"].numpy()[:, 0]

    alphas = [0.0, 3.0, 0.6, 5.0]  # the range the Python API and the REST API take
    translator = load(tiny_export_dir)
    for beam_size in (1, 3):
        texts, scores = served(beam_size, alphas)
        for row, (text, alpha) in enumerate(zip(TEXTS, alphas, strict=True)):
            [alone] = translator.translate(
                [text], beam_size=beam_size, length_penalty=alpha, segment=False
            )
            assert texts[row] == alone.text
            np.testing.assert_allclose(scores[row], alone.score, rtol=1e-5, atol=1e-5)
        # The penalties reach the scores: the same hypotheses with one penalty score otherwise.
        assert not np.allclose(served(beam_size, 0.0)[1][[1, 3]], scores[[1, 3]])
        np.testing.assert_allclose(served(beam_size, [3.0])[1], served(beam_size, [3.0] * 4)[1])
    for bad in ([0.6, 0.6], [[0.6]] * 4):
        with pytest.raises(tf.errors.InvalidArgumentError, match="one value, or one per text"):
            served(3, bad)
    # Out of the range the Python API, the config and the REST API take, NaN included: refused
    # by the graph itself, for clients that call the signature directly (TF Serving).
    for bad in (-0.1, 5.5, float("nan"), [0.6, float("nan"), 0.6, 0.6], [0.6, 0.6, 9.0, 0.6]):
        with pytest.raises(tf.errors.InvalidArgumentError, match="length_penalty must be between"):
            served(3, bad)
    # A beam over the config's largest (64) would ask for (sentences x beam, vocabulary) logits
    # per step: a client of TF Serving sending beam_size 100000 could exhaust the server.
    with pytest.raises(tf.errors.InvalidArgumentError, match="beam_size must be at most 64"):
        served(65, 0.6)


def test_beam_size_1_is_greedy_through_translator_and_savedmodel(tiny_export_dir):
    """beam_size 1 takes the greedy branch: the same ids, text and score as greedy decoding
    written out by hand over the model's decode_step (with the sentencepiece package's
    tokenizers), through `Translator` and through the SavedModel."""
    from tests.tiny import reference_greedy, sentencepieces
    from translator.inference import load

    translator = load(tiny_export_dir)
    source_sp, target_sp = sentencepieces(tiny_export_dir)
    results = translator.translate(
        TEXTS, beam_size=1, length_penalty=0.6, return_alignment=True, segment=False
    )
    assert any(r.text for r in results)
    for text, result in zip(TEXTS, results, strict=True):
        expected, score, pieces = reference_greedy(translator, source_sp, target_sp, text, 0.6)
        assert result.text == expected
        assert result.target_tokens == pieces
        np.testing.assert_allclose(result.score, score, rtol=1e-5, atol=1e-5)
    served = translate_signature(tiny_export_dir / "1", TEXTS, 1, 0.6)
    assert [t.decode() for t in served["translations"][:, 0]] == [r.text for r in results]
    np.testing.assert_allclose(served["scores"][:, 0], [r.score for r in results], atol=1e-5)
    for row, result in enumerate(results):
        assert strings(served["target_tokens"][row, 0]) == result.target_tokens


def test_separate_vocabularies_run_end_to_end(tiny_separate_run_dir, tiny_separate_export_dir):
    """A run with one SentencePiece model per language: `load()` of the run and of its export,
    and the SavedModel, read English with the English model and write French with the French
    one (the two vocabularies differ in size and pieces, so a swap anywhere shows)."""
    from tests.tiny import WORDS, reference_greedy, sentencepieces
    from translator.inference import load

    source_sp, target_sp = sentencepieces(tiny_separate_export_dir)
    assert not (tiny_separate_export_dir / "spm.model").exists()
    assert source_sp.vocab_size() != target_sp.vocab_size()
    source_vocab = {source_sp.id_to_piece(i) for i in range(source_sp.vocab_size())}
    target_vocab = {target_sp.id_to_piece(i) for i in range(target_sp.vocab_size())}
    french_only = target_vocab - source_vocab
    assert {f"\u2581{w}" for w in WORDS.values()} <= french_only
    texts = ["one red cat", "big house", "five blue cars", "two small dogs and a green tree"]
    found = []
    for directory in (tiny_separate_run_dir, tiny_separate_export_dir):
        translator = load(directory)
        assert translator.model.source_vocab_size == source_sp.vocab_size()
        assert translator.model.target_vocab_size == target_sp.vocab_size()
        results = translator.translate(
            texts, beam_size=2, length_penalty=0.6, return_alignment=True
        )
        for text, result in zip(texts, results, strict=True):
            assert result.source_tokens == [*source_sp.encode_as_pieces(text), "</s>"]
            assert set(result.target_tokens) <= target_vocab and result.target_tokens[-1] == "</s>"
            assert target_sp.decode_pieces(result.target_tokens[:-1]) == result.text
        assert set().union(*(r.target_tokens for r in results)) & french_only  # French words
        greedy = translator.translate(texts, beam_size=1, length_penalty=0.6)
        for text, result in zip(texts, greedy, strict=True):
            expected, score, _ = reference_greedy(translator, source_sp, target_sp, text, 0.6)
            assert result.text == expected
            np.testing.assert_allclose(result.score, score, rtol=1e-5, atol=1e-5)
        found.append((results, greedy))
    (run, run_greedy), (exported, exported_greedy) = found
    assert [r.text for r in run] == [r.text for r in exported]
    assert [r.text for r in run_greedy] == [r.text for r in exported_greedy]
    for beam_size, results in ((2, exported), (1, exported_greedy)):
        served = translate_signature(tiny_separate_export_dir / "1", texts, beam_size, 0.6)
        assert [t.decode() for t in served["translations"][:, 0]] == [r.text for r in results]
        np.testing.assert_allclose(served["scores"][:, 0], [r.score for r in results], atol=1e-5)
        if beam_size == 2:
            for row, result in enumerate(results):
                assert strings(served["source_tokens"][row]) == result.source_tokens
                assert strings(served["target_tokens"][row, 0]) == result.target_tokens


def test_export_holds_the_runs_weights_rounded_to_float16(tiny_run_dir, tiny_export_dir):
    """The float16 export against the run it came from: every weight of its `.keras` model and
    of its SavedModel is the run's weight rounded to float16 (exactly), and the logits differ
    by no more than that rounding can explain."""
    import keras
    import tensorflow as tf

    import translator  # noqa: F401 - registers the custom objects

    run = keras.saving.load_model(tiny_run_dir / "model.keras")
    exported = keras.saving.load_model(tiny_export_dir / "model.keras")
    # (Layer names carry per-process counters: the weights are matched by their order.)
    rounded = []
    changed = 0
    floats = [
        (v, w)
        for v, w in zip(run.variables, exported.variables, strict=True)
        if v.dtype == "float32"  # not the int seed-generator states
    ]
    for v, w in floats:
        assert v.shape == w.shape and w.dtype == "float32", (v.path, w.path)
        expected = np.asarray(v).astype(np.float16)
        rounded.append(expected)
        np.testing.assert_array_equal(np.asarray(w), expected.astype(np.float32), err_msg=v.path)
        changed += not np.array_equal(np.asarray(w), np.asarray(v))
    assert changed  # the run's float32 weights do need rounding
    saved = tf.saved_model.load(str(tiny_export_dir / "1"))
    assert len(saved.stored_weights) == len(rounded)
    for stored, expected in zip(saved.stored_weights, rounded, strict=True):
        assert stored.dtype == tf.float16
        np.testing.assert_array_equal(stored.numpy(), expected, err_msg=stored.name)
    # The logits: float16 keeps 11 significant bits (unit roundoff 2**-11); a handful of
    # roundings of the largest logit bounds what the weight rounding moves them.
    rng = np.random.default_rng(0)
    inputs = {
        "source_ids": rng.integers(4, run.source_vocab_size, (3, 7)).astype("int32"),
        "target_in_ids": rng.integers(4, run.target_vocab_size, (3, 5)).astype("int32"),
    }
    reference = np.asarray(run(inputs))
    logits = np.asarray(exported(inputs))
    np.testing.assert_allclose(logits, reference, atol=16 * 2.0**-11 * np.abs(reference).max())
    assert not np.array_equal(logits, reference)


def _tree(directory):
    """Every path under `directory` (hidden ones too) with its bytes (None for a directory)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


class DiskFull:
    """Replaces the functions that write, rename, link or flush files with wrappers that count
    their calls and raise `OSError(ENOSPC)` at call number `fail_at` (0-based), once."""

    def __init__(self, monkeypatch, fail_at, out_dir):
        import shutil

        import keras
        import tensorflow as tf

        self.calls, self.fail_at, self.out_dir = 0, fail_at, out_dir
        self.failed_in, self.version_visible = None, None
        targets = [
            (os, "replace"), (os, "rename"), (os, "link"), (os, "fsync"),
            (shutil, "copyfile"), (Path, "write_bytes"), (Path, "write_text"),
            (keras.Model, "save"), (tf.saved_model, "save"),
        ]  # fmt: skip
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self.wrap(name, getattr(owner, name)))

    def wrap(self, name, function):
        def wrapper(*args, **kwargs):
            call, self.calls = self.calls, self.calls + 1
            if call == self.fail_at:
                self.failed_in = name
                self.version_visible = (self.out_dir / "2").exists()
                raise OSError(errno.ENOSPC, f"No space left on device (injected in {name})")
            return function(*args, **kwargs)

        return wrapper


def test_an_export_is_published_whole_or_not_at_all(tiny_run_dir, tiny_export_dir, tmp_path):
    import shutil

    import tensorflow as tf

    from translator import inference
    from translator.export import export

    translator = inference.load(tiny_run_dir)

    def write_saved_model(module, path, signatures=None):
        # A stand-in for tf.saved_model.save (what is tested is what becomes visible when):
        # it writes a few files through the functions DiskFull counts.
        path = Path(path)
        (path / "variables").mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"graph")
        (path / "variables" / "variables.index").write_bytes(b"index")

    outcomes, problems = [], []
    for fail_at in range(1000):
        out = tmp_path / f"out{fail_at}"
        shutil.copytree(tiny_export_dir, out)  # an export holding version 1
        before = _tree(out)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(inference, "load", lambda *a, **k: translator)
            patch.setattr(tf.saved_model, "save", write_saved_model)
            disk = DiskFull(patch, fail_at, out)
            try:
                export(tiny_run_dir, out, projection_dtype="bfloat16")
                error = None
            except OSError as e:
                error = e
        after = _tree(out)
        if disk.failed_in is None:  # every step succeeded: the new set is in place
            assert error is None and fail_at > 3
            break
        outcomes.append(disk.failed_in)
        where = f"step {fail_at} ({disk.failed_in})"
        if disk.version_visible:
            # Only flushing the directory can fail once the version is there: too late to undo,
            # and the new set is complete.
            if error is not None or disk.failed_in != "fsync":
                problems.append(f"{where}: after the version appeared: {error!r}")
            if after.keys() - before.keys() != {"2", "2/saved_model.pb", "2/variables",
                                                "2/variables/variables.index", "2/assets.extra",
                                                "2/assets.extra/tf_serving_warmup_requests",
                                                }:  # fmt: skip
                problems.append(f"{where}: published {sorted(after.keys() - before.keys())}")
            continue
        # The failure is reported, and nothing anyone can see changed: same files, same
        # bytes, no temporary litter.
        if error is None or error.errno != errno.ENOSPC:
            problems.append(f"{where}: not reported ({error!r})")
        if after != before:
            changed = sorted(
                k for k in after.keys() | before.keys() if after.get(k) != before.get(k)
            )
            problems.append(f"{where}: visible changes {changed}")
    assert not problems, "\n".join(problems)
    assert {"copyfile", "write_text", "save", "fsync", "link", "replace", "rename"} <= set(outcomes)
    # The complete export: version 2, and the files beside it are the new ones.
    assert sorted(p.name for p in out.iterdir()) == [
        "1", "2", "config.yaml", "model.keras", "spm.model"
    ]  # fmt: skip
    assert after["2/saved_model.pb"] == b"graph"
    assert after["model.keras"] != before["model.keras"]
    assert b"projection_dtype: bfloat16" in after["config.yaml"]
    assert after["1/saved_model.pb"] == before["1/saved_model.pb"]


def test_a_killed_exports_staging_directory_is_removed_by_the_next_one(tmp_path, caplog):
    """`kill -9` during an export leaves its hidden staging directory behind: the next staging
    in that folder removes it, but never one whose owner lives, runs on another host or holds
    its lock, one with no owner recorded, nor one holding the previous files of an
    interrupted publish."""
    import fcntl
    import socket
    import subprocess

    from translator.files import staging_dir

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    host = socket.gethostname()
    out = tmp_path / "export"
    owners = {
        "abandoned": f"{host} {gone.pid}",
        "locked": f"{host} {gone.pid}",  # (a writer that still holds its lock)
        "alive": f"{host} {os.getppid()}",
        "elsewhere": f"another-host {gone.pid}",  # NFS: the lock and the pid are that host's
        "previous": f"{host} {gone.pid}",
        "unowned": None,
    }
    for name, owner in owners.items():
        directory = out / f".export-{name}.tmp"
        (directory / "saved_model").mkdir(parents=True)
        (directory / "model.keras").write_bytes(b"half written")
        if owner is not None:
            (directory / ".owner").write_text(owner + "\n")
    (out / ".export-previous.tmp" / ".previous").mkdir()
    (out / ".export-previous.tmp" / ".previous" / "model.keras").write_bytes(b"the old model")
    (out / ".staging-zzz.tmp").mkdir()  # another prefix: not ours to remove
    holder = os.open(out / ".export-locked.tmp", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with staging_dir(out, prefix=".export-") as staging:
            assert staging.is_dir()
            names = {p.name for p in out.iterdir()}
    finally:
        os.close(holder)
    assert ".export-abandoned.tmp" not in names
    kept = {f".export-{n}.tmp" for n in owners if n != "abandoned"} | {".staging-zzz.tmp"}
    assert kept <= names
    assert "the previous files" in caplog.text and ".export-previous.tmp" in caplog.text
    assert not staging.exists()  # its own directory goes at the end, as before
