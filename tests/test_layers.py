"""Cells, the sequence layer and attention, against Keras' own layers and hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from translator import layers

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 7, 5)).astype("float32")
MASK = np.ones((4, 7), bool)
MASK[1, 4:] = False  # padded sentence
MASK[2, 1:] = False  # one-token sentence

CASES = {
    "lstm": (lambda: keras.layers.LSTMCell(6), lambda: layers.LSTMCell(6)),
    "gru": (lambda: keras.layers.GRUCell(6), lambda: layers.GRUCell(6)),
    "gru_reset_before": (
        lambda: keras.layers.GRUCell(6, reset_after=False),
        lambda: layers.GRUCell(6, reset_after=False),
    ),
}


def paired_cells(kind):
    """A Keras cell and ours, built, with the same random (non-trivial) weights."""
    make_keras, make_ours = CASES[kind]
    theirs, ours = make_keras(), make_ours()
    theirs.build((None, X.shape[-1]))
    ours.build((None, X.shape[-1]))
    weights = [w + RNG.normal(size=w.shape).astype("float32") * 0.3 for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return theirs, ours


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_cell_weights_have_keras_names_and_shapes(kind):
    theirs, ours = paired_cells(kind)
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    assert [w.path.split("/")[-1] for w in ours.weights] == ["kernel", "recurrent_kernel", "bias"]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_cell_in_keras_rnn_matches_keras_cell_with_mask(kind):
    theirs, ours = paired_cells(kind)
    a = keras.layers.RNN(theirs, return_sequences=True, return_state=True)(X, mask=MASK)
    b = keras.layers.RNN(ours, return_sequences=True, return_state=True)(X, mask=MASK)
    for p, q in zip(a, b, strict=True):
        assert_close(p, q)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_cell_gradients_match_keras(kind):
    theirs, ours = paired_cells(kind)
    x = tf.constant(X)

    def grads(cell):
        rnn = keras.layers.RNN(cell, return_sequences=True)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(rnn(x, mask=MASK) ** 2)
        return tape.gradient(loss, [x, *cell.trainable_variables])

    for p, q in zip(grads(theirs), grads(ours), strict=True):
        assert_close(p, q, atol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("wrapper", ["rnn", "recurrent"])
def test_mixed_bfloat16_gradients_follow_float32_ones(kind, wrapper):
    # Bias gradients sum over batch x time rows: summed in bfloat16 (as CPU BiasAddGrad does)
    # they lose most of their value past a few thousand rows. Graph mode, XLA off.
    make = layers.LSTMCell if kind == "lstm" else layers.GRUCell
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(256, 16, 8)).astype("float32"))
    weights_out = tf.constant(rng.normal(size=(256, 16, 32)).astype("float32"))
    grads = {}
    for policy in ("float32", "mixed_bfloat16"):
        cell = make(32, dtype=policy)
        cell.build((None, 8))
        cell.set_weights([np.full(w.shape, 0.05, "float32") for w in cell.get_weights()])
        if wrapper == "rnn":
            layer = keras.layers.RNN(cell, return_sequences=True, dtype=policy)
        else:
            layer = layers.Recurrent(cell, dtype=policy)

        @tf.function(jit_compile=False)
        def gradients(x, layer=layer, cell=cell):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) * weights_out)
            return tape.gradient(loss, cell.trainable_variables)

        grads[policy] = [np.asarray(g, "float64") for g in gradients(x)]
    for ref, got, var in zip(grads["float32"], grads["mixed_bfloat16"], cell.weights, strict=True):
        error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert error < 0.05, (var.path, error)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gradients_equal_matmul_gradients(rank, with_bias):
    # layers.dense swaps TF's MatMul gradient (a transpose_b MatMul, a third of the float32
    # peak at batch 64 on this CPU) for an Einsum: same values, first and second order.
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 4, 5)[-rank:]).astype("float32"))
    kernel = tf.constant(rng.normal(size=(5, 6)).astype("float32"))
    bias = tf.constant(rng.normal(size=(6,)).astype("float32"))
    out_weights = tf.constant(rng.normal(size=(3, 4, 6)[-rank:]).astype("float32"))

    def grads(fn):
        with tf.GradientTape() as outer:
            outer.watch([x, kernel, bias])
            with tf.GradientTape() as tape:
                tape.watch([x, kernel, bias])
                loss = tf.reduce_sum(tf.tanh(fn()) * out_weights)
            first = tape.gradient(loss, [x, kernel, bias])
            total = sum(tf.reduce_sum(g**2) for g in first if g is not None)
        second = outer.gradient(total, [x, kernel])
        return [fn(), *[g for g in first if g is not None], *second]

    b = bias if with_bias else None
    ours = grads(lambda: layers.dense(x, kernel, b))
    ref = grads(lambda: tf.tensordot(x, kernel, 1) + (bias if with_bias else 0.0))
    assert len(ours) == len(ref) == (6 if with_bias else 5)
    for p, q in zip(ref, ours, strict=True):
        assert_close(p, q)

    @tf.function
    def gradient_graph(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layers.dense(x, kernel, b))
        return tape.gradient(loss, x)

    graph = gradient_graph.get_concrete_function(x).graph
    transposed = [
        op for op in graph.get_operations() if op.type == "MatMul" and op.get_attr("transpose_b")
    ]
    assert transposed == [] and any(op.type == "Einsum" for op in graph.get_operations())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_mixed_bfloat16_cells_compute_gates_in_float32(kind):
    # Under mixed_bfloat16 the matmuls run in bfloat16 and the gate equations in float32
    # (faster on CPU, and rounded once instead of after every operation): a step lands closer
    # to the float32 cell than Keras' bfloat16 cell does, and states stay bfloat16.
    theirs, ours = paired_cells(kind)
    make_keras, make_ours = CASES[kind]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, X.shape[-1])).astype("float32")
    states = [
        rng.normal(size=(512, 6)).astype("float32") for _ in range(2 if kind == "lstm" else 1)
    ]
    bf16 = lambda a: np.asarray(tf.cast(tf.cast(a, tf.bfloat16), tf.float32))  # noqa: E731
    x, states = bf16(x), [bf16(s) for s in states]
    weights = [bf16(w) for w in ours.get_weights()]
    ours.set_weights(weights)
    reference = np.asarray(ours(x, states)[0])
    errors = {}
    for name, make in (("keras", make_keras), ("ours", make_ours)):
        cell = make()
        cell.dtype_policy = keras.DTypePolicy("mixed_bfloat16")
        cell.build((None, X.shape[-1]))
        cell.set_weights(weights)
        out, new_states = cell(x, states)
        if name == "ours":
            assert out.dtype == "bfloat16"
            assert [s.dtype for s in new_states] == ["bfloat16"] * len(new_states)
        errors[name] = np.abs(np.asarray(tf.cast(out, tf.float32)) - reference).mean()
    assert errors["ours"] < 0.8 * errors["keras"], errors


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("go_backwards", [False, True])
def test_recurrent_layer_matches_keras_rnn(kind, go_backwards):
    theirs, ours = paired_cells(kind)
    ref = keras.layers.RNN(
        theirs, return_sequences=True, return_state=True, go_backwards=go_backwards
    )(X, mask=MASK)
    out = layers.Recurrent(ours, return_state=True, go_backwards=go_backwards)(X, mask=MASK)
    ref_outputs = np.asarray(ref[0])
    if go_backwards:  # Keras returns reversed outputs; ours come back in input order.
        ref_outputs = ref_outputs[:, ::-1]
    # Keras carries the last output through padding; ours outputs zeros there (masked anyway).
    assert_close(ref_outputs * MASK[..., None], np.asarray(out[0]) * MASK[..., None])
    assert_close(np.asarray(out[0])[~MASK], 0.0)
    for p, q in zip(ref[1:], out[1:], strict=True):
        assert_close(p, q)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_recurrent_layer_gradients_match_keras_rnn(kind):
    theirs, ours = paired_cells(kind)
    x = tf.constant(X)

    def grads(layer, cell):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, mask=MASK)
            loss = tf.reduce_sum((out * MASK[..., None]) ** 2)
        return tape.gradient(loss, [x, *cell.trainable_variables])

    ref = grads(keras.layers.RNN(theirs, return_sequences=True), theirs)
    for p, q in zip(ref, grads(layers.Recurrent(ours), ours), strict=True):
        assert_close(p, q, atol=2e-5)


def test_recurrent_layer_initial_state_and_last_output():
    theirs, ours = paired_cells("lstm")
    init = [RNG.normal(size=(4, 6)).astype("float32") for _ in range(2)]
    ref = keras.layers.RNN(theirs)(X, initial_state=init)
    out = layers.Recurrent(ours, return_sequences=False)(X, initial_state=init)
    assert_close(ref, out)


def test_cells_inside_keras_bidirectional_match_keras_lstm():
    theirs, ours = paired_cells("lstm")
    ref_layer = keras.layers.Bidirectional(keras.layers.RNN(theirs, return_sequences=True))
    our_layer = keras.layers.Bidirectional(keras.layers.RNN(ours, return_sequences=True))
    ref_layer(X)
    our_layer(X)
    our_layer.set_weights(ref_layer.get_weights())
    assert isinstance(our_layer.backward_layer.cell, layers.LSTMCell)
    assert_close(ref_layer(X, mask=MASK), our_layer(X, mask=MASK))


def test_lstm_golden_values():
    # All-ones weights, x = (1, 1, 1), h = c = 0: every gate pre-activation is 3 + 1 = 4, so
    # c = sigmoid(4) * tanh(4) and h = sigmoid(4) * tanh(c).
    cell = layers.LSTMCell(
        2,
        kernel_initializer="ones",
        recurrent_initializer="ones",
        bias_initializer="ones",
        unit_forget_bias=False,
    )
    zeros = np.zeros((1, 2), "float32")
    h, (_, c) = cell(np.ones((1, 3), "float32"), [zeros, zeros])
    s = 1 / (1 + np.exp(-4.0))
    assert_close(c, np.full((1, 2), s * np.tanh(4.0)))
    assert_close(h, np.full((1, 2), s * np.tanh(s * np.tanh(4.0))))


def test_gru_golden_values():
    # All-ones kernels, zero bias, x = (1, 1, 1), h = 0: z = r = sigmoid(3), n = tanh(3),
    # h = (1 - z) * n.
    cell = layers.GRUCell(2, kernel_initializer="ones", recurrent_initializer="ones")
    h, _ = cell(np.ones((1, 3), "float32"), [np.zeros((1, 2), "float32")])
    z = 1 / (1 + np.exp(-3.0))
    assert_close(h, np.full((1, 2), (1 - z) * np.tanh(3.0)))


def test_unit_forget_bias_initializes_forget_gate_to_one():
    cell = layers.LSTMCell(3)
    cell.build((None, 2))
    assert_close(cell.bias, np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0], "float32"))


@pytest.mark.parametrize(
    "layer",
    [
        layers.LSTMCell(4, dropout=0.1, recurrent_dropout=0.2, unit_forget_bias=False, seed=3),
        layers.GRUCell(4, reset_after=False, recurrent_activation="hard_sigmoid"),
        layers.Recurrent(layers.GRUCell(5), return_state=True, go_backwards=True),
        layers.BahdanauAttention(7),
        layers.LuongAttention(7, score="dot", scale=True),
    ],
)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"].startswith("translator>")
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_dropout_is_off_at_inference_and_fixed_per_sequence_in_training():
    cell = layers.LSTMCell(6, dropout=0.5, seed=1)
    rnn = keras.layers.RNN(cell, return_sequences=True)
    reference = layers.LSTMCell(6)
    ref_rnn = keras.layers.RNN(reference, return_sequences=True)
    rnn(X)
    ref_rnn(X)
    reference.set_weights(cell.get_weights())
    assert_close(rnn(X, training=False), ref_rnn(X))
    # The same input mask on every step: a sequence of identical inputs with a dropped input
    # unit behaves exactly like the same sequence with that unit zeroed.
    x = np.ones((1, 4, 5), "float32")
    out = layers.Recurrent(layers.LSTMCell(6, dropout=0.5, seed=2))
    result = np.asarray(out(x, training=True))
    assert not np.allclose(result, np.asarray(out(x, training=False)))


def test_invalid_arguments_name_the_problem():
    with pytest.raises(ValueError, match="units"):
        layers.LSTMCell(0)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        layers.GRUCell(4, recurrent_dropout=1.5)
    with pytest.raises(ValueError, match="score"):
        layers.LuongAttention(4, score="cosine")


# -- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention",
    [layers.BahdanauAttention(8), layers.LuongAttention(6), layers.LuongAttention(6, score="dot")],
)
def test_attention_weights_sum_to_one_and_are_zero_on_padding(attention):
    query = RNG.normal(size=(4, 6)).astype("float32")
    memory = RNG.normal(size=(4, 7, 6)).astype("float32")
    context, weights = attention(query, memory, mask=MASK)
    weights = np.asarray(weights)
    assert context.shape == (4, 6)
    assert_close(weights.sum(-1), np.ones(4))
    assert np.all(weights[~MASK] == 0.0)
    assert_close(weights[2], np.eye(7)[0])  # one valid position takes all the weight
    assert_close(context, np.einsum("bs,bsd->bd", weights, memory))


@pytest.mark.parametrize(
    "attention",
    [
        layers.BahdanauAttention(8),
        layers.LuongAttention(6),
        layers.LuongAttention(6, score="dot", scale=True),
    ],
)
def test_grouped_attention_equals_attention_over_repeated_memory(attention):
    # grouped=True: 3 queries per sentence (beams) against one memory row each give what
    # each query gives against its own copy of the memory.
    memory = RNG.normal(size=(4, 7, 6)).astype("float32")
    query = RNG.normal(size=(12, 6)).astype("float32")
    attention(query[:4], memory, mask=MASK)  # builds
    if getattr(attention, "scale", False):
        attention.gain.assign(1.7)
    weights = attention.read_weights("float32")
    keys = attention.precompute(memory)
    context, probs = attention.attend(query, memory, keys, MASK, weights, grouped=True)
    repeat = lambda x: np.repeat(x, 3, axis=0)  # noqa: E731
    expected = attention.attend(
        query, repeat(memory), repeat(np.asarray(keys)), repeat(MASK), weights
    )
    assert context.shape == (12, 6) and probs.shape == (12, 7)
    assert_close(context, expected[0])
    assert_close(probs, expected[1])
    assert np.all(np.asarray(probs)[repeat(~MASK)] == 0.0)


def test_luong_general_golden_example():
    attention = layers.LuongAttention(2)
    attention.build((None, 2), (None, 3, 2))
    attention.kernel.assign(np.array([[1.0, 0.0], [0.0, 2.0]], "float32"))
    memory = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], "float32")
    query = np.array([[1.0, 1.0]], "float32")
    # keys = memory @ W = [[1, 0], [0, 2], [1, 2]]; scores = keys . q = [1, 2, 3]
    _, weights = attention(query, memory)
    expected = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert_close(weights[0], expected)


def test_bahdanau_matches_its_formula():
    attention = layers.BahdanauAttention(5)
    query = RNG.normal(size=(2, 3)).astype("float32")
    memory = RNG.normal(size=(2, 4, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    attention.build(query.shape, memory.shape)
    # Random values everywhere: the bias starts at zero, and a zero bias hides a score that
    # forgets it.
    for w in attention.weights:
        w.assign(RNG.normal(size=w.shape).astype("float32"))
    context, weights = attention(query, memory, mask=mask)
    wq, wk, b, v = (np.asarray(w) for w in attention.weights)
    assert np.all(b != 0)
    scores = np.tanh(query[:, None] @ wq + memory @ wk + b) @ v  # (2, 1, 4) @ ... -> (2, 4)
    scores = np.where(mask, scores.reshape(2, 4), -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert_close(weights, expected)
    assert_close(context, np.einsum("bs,bsd->bd", expected, memory))


def test_luong_dot_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="general"):
        layers.LuongAttention(4, score="dot")(
            np.ones((1, 4), "float32"), np.ones((1, 2, 3), "float32")
        )


@pytest.mark.parametrize("cell_class", [layers.LSTMCell, layers.GRUCell])
def test_dropout_masks_are_fixed_per_sequence_and_drawn_anew_per_call(cell_class):
    """Variational dropout (Gal and Ghahramani, 2016): under keras.layers.RNN one input mask
    and one recurrent mask serve every step of a sequence, and the next call draws new ones."""
    cell = cell_class(6, dropout=0.5, recurrent_dropout=0.5, seed=3)
    seen = []
    masks = cell._masks

    def spy(inputs, h_tm1, training):
        dp, rec = masks(inputs, h_tm1, training)
        seen.append((np.asarray(dp), np.asarray(rec)))
        return dp, rec

    cell._masks = spy
    rnn = keras.layers.RNN(cell, unroll=True)  # a Python loop: each step's masks are concrete
    x = np.ones((4, 5, 8), "float32")
    rnn(x, training=True)
    first, seen[:] = list(seen), []
    assert len(first) == 5
    for dp, rec in first[1:]:
        np.testing.assert_array_equal(dp, first[0][0])
        np.testing.assert_array_equal(rec, first[0][1])
    for mask in first[0]:
        assert set(np.unique(mask)) == {0.0, 2.0}  # inverted dropout at rate 0.5
    rnn(x, training=True)
    assert not np.array_equal(seen[0][0], first[0][0])
    assert not np.array_equal(seen[0][1], first[0][1])
