"""Seq2Seq: shapes, padding invariance, call() vs decode_step(), saving, and learning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import translator
from tests.tiny import randomize_weights
from translator import Seq2Seq

SOURCE = np.array([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]], "int32")
TARGET_IN = np.array([[2, 11, 12, 13], [2, 14, 15, 0]], "int32")

ARCHITECTURES = {
    "lstm_luong_2x2": dict(cell_type="lstm", encoder_layers=2, decoder_layers=2),
    "gru_bahdanau": dict(cell_type="gru", attention="bahdanau"),
    "lstm_dot_first_bi_3enc": dict(
        encoder_layers=3, bidirectional="first", attention_score="dot", decoder_units=8
    ),
    "gru_no_feed_unidirectional": dict(
        cell_type="gru", bidirectional="none", input_feeding=False, decoder_layers=2
    ),
    "shared_tied": dict(share_embeddings=True, tie_embeddings=True, embedding_dim=16),
}


def tiny_model(**overrides):
    kwargs = dict(
        source_vocab_size=30,
        target_vocab_size=30,
        embedding_dim=8,
        encoder_units=8,
        decoder_units=16,
    )
    kwargs.update(overrides)
    model = Seq2Seq(**kwargs)
    model({"source_ids": SOURCE, "target_in_ids": TARGET_IN})
    return randomize_weights(model)


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


# bfloat16's unit roundoff: rounding a float32 to bfloat16 (8 significant bits, round to
# nearest) changes it by at most this fraction of its value.
BF16 = 2.0**-8


def assert_bfloat16_close(value, reference, factor):
    """`value` is `reference` computed in bfloat16: within `factor` roundings of the largest
    reference magnitude. A network in bfloat16 rounds at every matmul of its chain (embedding,
    encoder, bridge, cells, attention, projection) and the recurrence carries the errors, so
    `factor` is a handful of roundings, not one."""
    reference = np.asarray(reference)
    assert_close(value, reference, atol=factor * BF16 * np.abs(reference).max())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shapes(name):
    model = tiny_model(**ARCHITECTURES[name])
    logits, attention = model(
        {"source_ids": SOURCE, "target_in_ids": TARGET_IN}, return_attention=True
    )
    assert logits.shape == (2, 4, 30) and logits.dtype == tf.float32
    assert attention.shape == (2, 4, 5)
    assert_close(np.asarray(attention).sum(-1), np.ones((2, 4)))
    assert np.all(np.asarray(attention)[1, :, 3:] == 0.0)  # no attention on source padding


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("path", ["decode_step", "step_function", "input_table"])
def test_call_equals_looping_decode_step(name, path):
    # step_function() reads the weights (and their per-step views: the split first kernel,
    # the transposed tied embedding) once; it must give the teacher-forced numbers exactly.
    # With an input table (what a SavedModel keeps), a step gathers the embedding half of the
    # first projection instead of computing it: the same numbers.
    model = tiny_model(**ARCHITECTURES[name])
    logits, attention = model(
        {"source_ids": SOURCE, "target_in_ids": TARGET_IN}, return_attention=True
    )
    if path == "input_table":
        table = model.decoder.input_projection_table()
        assert table.shape == (30, model.decoder.cells[0].kernel.shape[1])
        with model.decoder.input_table(table * (1.0 + 1e-3)):  # a scaled table shows ...
            step = model.step_function()
        constants, state = model.encode(SOURCE)
        wrong, _, _ = step(TARGET_IN[:, 0], state, constants)
        assert not np.allclose(wrong, logits[:, 0], atol=1e-5, rtol=1e-5)  # ... it is read
        with model.decoder.input_table(table):
            step = model.step_function()
    else:
        step = model.decode_step if path == "decode_step" else model.step_function()
    constants, state = model.encode(SOURCE)
    for t in range(TARGET_IN.shape[1]):
        step_logits, state, step_attention = step(TARGET_IN[:, t], state, constants)
        assert step_logits.dtype == tf.float32
        assert_close(step_logits, logits[:, t])
        assert_close(step_attention, attention[:, t])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tiny_models_have_no_zero_weights(name):
    # A zero bias or attention parameter would hide a step that forgets it (see
    # randomize_weights): every weight of the models these tests build has non-zero values.
    model = tiny_model(**ARCHITECTURES[name])
    names = [v.path for v in model.weights]
    assert any("bias" in n for n in names)
    for v in model.weights:
        assert np.count_nonzero(np.asarray(v)) == np.size(v), v.path


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_projection_rounds_the_logits_and_nothing_else(tie):
    # step_function("bfloat16") multiplies bfloat16 copies of the decoder output and the output
    # kernel (accumulating in float32) and adds the float32 bias: the logits may differ from the
    # float32 path by the rounding of the two operands, the state and attention not at all.
    model = tiny_model(share_embeddings=tie, tie_embeddings=tie, embedding_dim=16)
    constants, state = model.encode(SOURCE)
    exact_fn, bf16_fn = model.step_function(), model.step_function("bfloat16")
    ids = TARGET_IN[:, 0]
    exact, exact_state, exact_attention = exact_fn(ids, state, constants)
    rounded, rounded_state, rounded_attention = bf16_fn(ids, state, constants)
    assert rounded.dtype == tf.float32
    # The error bound of that product, element by element: each operand of a_k * W_kj is rounded
    # once (relative error <= BF16 each), the float32 sum adds no more than float32 roundings,
    # and the result is rounded to bfloat16 once before the float32 bias is added.
    decoder = model.decoder
    kernel = decoder.embedding.embeddings if tie else decoder.projection.kernel
    kernel = np.asarray(kernel, np.float64)
    kernel = kernel.T if tie else kernel
    attentional = np.asarray(exact_state["feed"], np.float64)  # the projection's input
    bound = (2 * BF16 + BF16**2) * (np.abs(attentional) @ np.abs(kernel)) + BF16 * np.abs(
        attentional @ kernel
    )
    error = np.abs(np.asarray(rounded, np.float64) - np.asarray(exact, np.float64))
    assert np.all(error <= bound * 1.01 + 1e-6), (error / bound).max()
    assert not np.array_equal(np.asarray(rounded), np.asarray(exact))  # it did run in bfloat16
    assert_close(rounded_attention, exact_attention, atol=0)
    for a, b in zip(tf.nest.flatten(rounded_state), tf.nest.flatten(exact_state), strict=True):
        assert_close(a, b, atol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_beam_search_with_shared_constants_equals_tiled_constants(name):
    # Seq2Seq.step_function(shared_constants=True) with beam_search(tile_constants=False):
    # the beams of a sentence read its memory once per step; the search is the same.
    from translator import search

    model = tiny_model(**ARCHITECTURES[name])
    source = np.array([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0], [4, 3, 0, 0, 0]], "int32")
    constants, state = model.encode(source)
    search_args = dict(
        start_ids=tf.fill([3], 2),
        end_id=3,
        initial_state=state,
        constants=constants,
        max_length=tf.constant([3, 9, 6]),  # sentences leave the batch at different steps
        beam_size=tf.constant(4),
        n_best=2,
        length_penalty=0.6,
        coverage_penalty=0.3,
        return_alignment=True,
    )
    tiled = tf.function(lambda: search.beam_search(model.step_function(), **search_args))()
    shared = tf.function(
        lambda: search.beam_search(
            model.step_function(shared_constants=True), tile_constants=False, **search_args
        )
    )()
    np.testing.assert_array_equal(shared.ids, tiled.ids)
    np.testing.assert_array_equal(shared.lengths, tiled.lengths)
    assert_close(shared.scores, tiled.scores)
    assert_close(shared.alignments, tiled.alignments)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_padding_does_not_change_a_sentence(name):
    model = tiny_model(**ARCHITECTURES[name])
    alone = model({"source_ids": SOURCE[1:, :3], "target_in_ids": TARGET_IN[1:, :3]})
    # Extra source padding, extra target padding, and a longer neighbour in the batch.
    padded = np.pad(SOURCE, [(0, 0), (0, 4)])
    batched = model({"source_ids": padded, "target_in_ids": TARGET_IN})
    assert_close(alone[0], batched[1, :3])


def test_keras_file_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(**ARCHITECTURES["lstm_luong_2x2"], dropout=0.1)
    before = model({"source_ids": SOURCE, "target_in_ids": TARGET_IN})
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Seq2Seq)
    assert loaded.get_config() == model.get_config()
    assert_close(loaded({"source_ids": SOURCE, "target_in_ids": TARGET_IN}), before, atol=0)


def test_config_describes_the_whole_architecture():
    model = tiny_model(**ARCHITECTURES["gru_bahdanau"])
    clone = Seq2Seq.from_config(model.get_config())
    clone({"source_ids": SOURCE, "target_in_ids": TARGET_IN})
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    clone.set_weights(model.get_weights())
    assert_close(
        clone({"source_ids": SOURCE, "target_in_ids": TARGET_IN}),
        model({"source_ids": SOURCE, "target_in_ids": TARGET_IN}),
    )


def test_invalid_architecture_arguments_are_explained():
    with pytest.raises(ValueError, match="joint vocabulary"):
        Seq2Seq(10, 12, share_embeddings=True)
    with pytest.raises(ValueError, match="embedding_dim == decoder units"):
        Seq2Seq(10, 10, embedding_dim=8, decoder_units=16, tie_embeddings=True)
    with pytest.raises(ValueError, match="cell_type"):
        Seq2Seq(10, 10, cell_type="rnn")
    with pytest.raises(ValueError, match="bidirectional"):
        Seq2Seq(10, 10, bidirectional="both")
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(10, 10, attention="transformer")


def test_mixed_bfloat16_gives_float32_logits_close_to_float32():
    model = tiny_model()
    reference = model({"source_ids": SOURCE, "target_in_ids": TARGET_IN})
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = tiny_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(model.get_weights())
    logits = mixed({"source_ids": SOURCE, "target_in_ids": TARGET_IN})
    assert logits.dtype == tf.float32
    assert mixed.decoder.cells[0].kernel.dtype == "float32"  # variables stay float32
    assert_bfloat16_close(logits, reference, factor=16)
    assert not np.array_equal(np.asarray(logits), np.asarray(reference))  # it ran in bfloat16


@pytest.mark.parametrize("name", ["lstm_luong_2x2", "gru_bahdanau", "shared_tied"])
def test_with_compute_dtype_bfloat16_decodes_close_to_float32(name):
    model = tiny_model(**ARCHITECTURES[name])
    inputs = {"source_ids": SOURCE, "target_in_ids": TARGET_IN}
    reference = model(inputs)
    fast = model.with_compute_dtype("bfloat16")
    assert fast is not model and keras.config.dtype_policy().name == "float32"  # restored
    assert model.decoder.compute_dtype == "float32"  # the original is untouched
    layers = [fast, fast.encoder, fast.decoder, fast.bridge, *fast.decoder.cells]
    assert {layer.compute_dtype for layer in layers} == {"bfloat16"}
    for a, b in zip(fast.get_weights(), model.get_weights(), strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    logits = fast(inputs)
    assert logits.dtype == tf.float32
    assert_bfloat16_close(logits, reference, factor=16)
    assert not np.array_equal(np.asarray(logits), np.asarray(reference))  # it ran in bfloat16
    # The decoding path: the step function of the copy, against the float32 model's.
    constants, state = model.encode(SOURCE)
    fast_constants, fast_state = fast.encode(SOURCE)
    exact, _, exact_attention = model.step_function()(TARGET_IN[:, 0], state, constants)
    rounded, _, attention = fast.step_function()(TARGET_IN[:, 0], fast_state, fast_constants)
    assert rounded.dtype == tf.float32
    assert_bfloat16_close(rounded, exact, factor=16)
    # Attention weights are at most 1 and come out of a float32 softmax: a few roundings of 1.
    assert_close(attention, exact_attention, atol=4 * BF16)
    assert model.with_compute_dtype("float32") is model
    assert fast.with_compute_dtype("bfloat16") is fast
    back = fast.with_compute_dtype("float32")
    assert back.decoder.compute_dtype == "float32"
    assert_close(back(inputs), reference, atol=1e-6)
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16, got 'float16'"):
        model.with_compute_dtype("float16")


def test_overfits_a_tiny_parallel_corpus():
    # 16 "sentences": the target is the source reversed with ids shifted, which needs attention.
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    n, length = 16, 5
    src = rng.integers(4, 20, size=(n, length)).astype("int32")
    tgt = src[:, ::-1] + 10
    source_ids = np.concatenate([src, np.full((n, 1), 3)], 1).astype("int32")
    target_in = np.concatenate([np.full((n, 1), 2), tgt], 1).astype("int32")
    target_out = np.concatenate([tgt, np.full((n, 1), 3)], 1).astype("int32")
    model = Seq2Seq(30, 30, embedding_dim=32, encoder_units=32, decoder_units=64, encoder_layers=1)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    history = model.fit(
        {"source_ids": source_ids, "target_in_ids": target_in},
        target_out,
        batch_size=16,
        epochs=150,
        verbose=0,
    )
    assert history.history["loss"][-1] < 0.05 < history.history["loss"][0]
    logits = model({"source_ids": source_ids, "target_in_ids": target_in})
    assert np.mean(np.argmax(logits, -1) == target_out) == 1.0


def test_package_import_registers_custom_objects():
    for name in ["LSTMCell", "GRUCell", "Recurrent", "BahdanauAttention", "LuongAttention"]:
        assert keras.saving.get_registered_object(f"translator>{name}") is getattr(
            translator.layers, name
        )
    for name in ["Seq2Seq", "Encoder", "AttentionDecoder", "DenseBridge"]:
        assert keras.saving.get_registered_object(f"translator>{name}") is getattr(translator, name)
