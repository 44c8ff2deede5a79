"""Bahdanau (additive) and Luong (multiplicative) attention over an encoder memory."""

import keras
import tensorflow as tf
from keras import ops

from translator.layers.dense import dense


def masked_softmax(scores, mask):
    """Softmax over the last axis that gives exactly 0 to masked (False) positions.

    Computed in float32 whatever the compute dtype, since bfloat16 softmax sums drift.
    A row with no valid position (an empty source) gets all zeros rather than NaN.
    """
    scores = ops.cast(scores, "float32")
    if mask is None:
        return ops.softmax(scores, axis=-1)
    mask = ops.cast(mask, "bool")
    scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
    weights = ops.softmax(scores, axis=-1)
    return ops.where(mask, weights, ops.zeros_like(weights))


class _Attention(keras.layers.Layer):
    """Shared contract: `precompute(memory)` once per sentence, `call(query, memory, keys, mask)` per step."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        # The memory may carry a Keras mask; the explicit `mask` argument is what is used.
        self.supports_masking = True

    def precompute(self, memory):
        """Keys derived from `memory` (batch, S, memory_dim); computed once, reused every step."""
        raise NotImplementedError

    def read_weights(self, dtype):
        """The scoring weights cast to `dtype`, read once outside a decoding loop."""
        raise NotImplementedError

    def score(self, query, keys, weights):
        """Scores `(B, S)` of a query `(B, d)`, or `(B, G, S)` of `G` queries per sentence
        `(B, G, d)`."""
        raise NotImplementedError

    def attend(self, query, memory, keys, mask, weights, grouped=False):
        """`(context, attention weights)` with pre-read `weights` (see `read_weights`).

        With `grouped=True` the query has `G` rows per row of `memory`, `keys` and `mask`
        (`(G * B, d)`, the rows of sentence `b` being `b * G ... b * G + G - 1`: the beams of
        beam search): each sentence's memory is then read once for its `G` queries, as one
        `(G, d) x (d, S)` product instead of `G` matrix-vector products. At beam 5, batch 64,
        that made the attention 3x faster (bench: 0.7 against 2.1 ms per step).
        """
        if grouped:
            sentences = ops.shape(memory)[0]
            query = ops.reshape(query, (sentences, -1, query.shape[-1]))  # (B, G, d)
            mask = None if mask is None else mask[:, None, :]
            probs = masked_softmax(self.score(query, keys, weights), mask)  # (B, G, S)
            context = ops.einsum("bgs,bsd->bgd", ops.cast(probs, memory.dtype), memory)
            return (
                ops.reshape(context, (-1, memory.shape[-1])),  # (G * B, D)
                ops.reshape(probs, (-1, ops.shape(probs)[-1])),  # (G * B, S)
            )
        probs = masked_softmax(self.score(query, keys, weights), mask)  # (B, S) float32
        context = ops.einsum("bs,bsd->bd", ops.cast(probs, memory.dtype), memory)  # (B, D)
        return context, probs

    def call(self, query, memory, keys=None, mask=None):
        if keys is None:
            keys = self.precompute(memory)
        return self.attend(query, memory, keys, mask, self.read_weights(query.dtype))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="translator")
class BahdanauAttention(_Attention):
    """Additive attention (Bahdanau et al. 2015, arXiv:1409.0473).

    `score(q, k_j) = v^T tanh(W_query q + W_key k_j)`; the softmax over source positions gives the
    weights, their average of the memory the context. Unlike `keras.layers.AdditiveAttention`, the
    query and key projections and `v` are learned. `W_key k_j` is computed once per sentence
    (`precompute`), so a decoding step costs one `(batch, query_dim) x (query_dim, units)` matmul.

    Args:
        units: Width of the hidden scoring layer.

    Call arguments:
        query: `(batch, query_dim)`, the decoder state.
        memory: `(batch, S, memory_dim)`, the encoder outputs.
        keys: Optional `precompute(memory)`; computed when omitted.
        mask: Optional boolean `(batch, S)`, True on real source tokens.

    Returns:
        `(context (batch, memory_dim), weights (batch, S) float32)`; weights sum to 1 over real
        tokens and are exactly 0 on padding.

    Example:

    >>> import numpy as np, translator
    >>> attention = translator.layers.BahdanauAttention(16)
    >>> memory = np.random.rand(2, 5, 8).astype("float32")
    >>> mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    >>> context, weights = attention(np.ones((2, 4), "float32"), memory, mask=mask)
    >>> tuple(context.shape), [round(float(s), 5) for s in np.asarray(weights).sum(-1)]
    ((2, 8), [1.0, 1.0])
    >>> float(np.asarray(weights)[0, 3:].max())
    0.0

    References:
        Bahdanau, Cho & Bengio, "Neural Machine Translation by Jointly Learning to Align and
        Translate", ICLR 2015, arXiv:1409.0473.
    """

    def build(self, query_shape, memory_shape, keys_shape=None, mask_shape=None):
        self.query_kernel = self.add_weight(
            name="query_kernel", shape=(query_shape[-1], self.units), initializer="glorot_uniform"
        )
        self.key_kernel = self.add_weight(
            name="key_kernel", shape=(memory_shape[-1], self.units), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
        self.v = self.add_weight(name="v", shape=(self.units,), initializer="glorot_uniform")
        self.built = True

    def precompute(self, memory):
        return ops.matmul(memory, ops.cast(self.key_kernel, memory.dtype))  # (B, S, units)

    def read_weights(self, dtype):
        return {
            "query_kernel": ops.cast(self.query_kernel, dtype),
            "bias": ops.cast(self.bias, dtype),
            "v": ops.cast(self.v, dtype),
        }

    def score(self, query, keys, weights):
        q = dense(query, weights["query_kernel"], weights["bias"])  # (B, [G,] units)
        if len(query.shape) == 3:
            keys = keys[:, None]  # (B, 1, S, units)
        hidden = ops.tanh(keys + q[..., None, :])  # (B, [G,] S, units)
        return ops.matmul(hidden, weights["v"])  # (B, [G,] S)


@keras.saving.register_keras_serializable(package="translator")
class LuongAttention(_Attention):
    """Multiplicative attention (Luong et al. 2015, arXiv:1508.04025).

    `score = "dot"`: `q . k_j` (query and memory must have the same width);
    `score = "general"`: `q . (W k_j)`, where `W k_j` is computed once per sentence.
    With `scale=True` the score is multiplied by a learned scalar (Vaswani-style stabilisation).

    Args:
        units: Width of the query (for `general`, `W` maps memory_dim -> units).
        score: `"general"` (default) or `"dot"`.
        scale: Whether to learn a scalar multiplier of the scores.

    Call arguments and returns: as for `BahdanauAttention`.

    Example:

    >>> import numpy as np, translator
    >>> attention = translator.layers.LuongAttention(4, score="dot")
    >>> memory = np.eye(3, 4, dtype="float32")[None]  # three one-hot memory vectors
    >>> _, weights = attention(np.array([[9.0, 0, 0, 0]], "float32"), memory)
    >>> int(np.argmax(weights[0]))
    0

    References:
        Luong, Pham & Manning, "Effective Approaches to Attention-based Neural Machine
        Translation", EMNLP 2015, arXiv:1508.04025.
    """

    SCORES = ("dot", "general")

    def __init__(self, units, score="general", scale=False, **kwargs):
        if score not in self.SCORES:
            raise ValueError(f"LuongAttention score must be one of {self.SCORES}, got {score!r}.")
        super().__init__(units, **kwargs)
        self.score_type = score
        self.scale = scale

    def build(self, query_shape, memory_shape, keys_shape=None, mask_shape=None):
        if self.score_type == "general":
            self.kernel = self.add_weight(
                name="kernel", shape=(memory_shape[-1], self.units), initializer="glorot_uniform"
            )
        elif memory_shape[-1] != query_shape[-1]:
            raise ValueError(
                "LuongAttention(score='dot') needs query and memory of the same width, got "
                f"query {query_shape[-1]} and memory {memory_shape[-1]}: use score='general'."
            )
        if self.scale:
            self.gain = self.add_weight(name="gain", shape=(), initializer="ones")
        self.built = True

    def precompute(self, memory):
        if self.score_type == "general":
            return ops.matmul(memory, ops.cast(self.kernel, memory.dtype))  # (B, S, units)
        return memory

    def read_weights(self, dtype):
        return {"gain": ops.cast(self.gain, dtype)} if self.scale else {}

    def score(self, query, keys, weights):
        if len(query.shape) == 3:
            scores = tf.einsum("bgd,bsd->bgs", query, keys)  # (B, G, S)
        else:
            scores = tf.einsum("bd,bsd->bs", query, keys)  # (B, S)
        if self.scale:
            scores = scores * weights["gain"]
        return scores

    def get_config(self):
        return {**super().get_config(), "score": self.score_type, "scale": self.scale}
