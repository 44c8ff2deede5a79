"""The attention decoder: one `step()` shared by teacher forcing and by inference."""

import contextlib

import keras
import tensorflow as tf
from keras import ops

from translator.layers import BahdanauAttention, LuongAttention, dense, make_cell

ATTENTIONS = ("luong", "bahdanau")


@keras.saving.register_keras_serializable(package="translator")
class AttentionDecoder(keras.layers.Layer):
    """Stacked recurrent decoder with attention, input feeding and a vocabulary projection.

    One decoding step, for target token `y_{t-1}` (Luong et al. 2015, section 3):

    ```
    x_t      = [embed(y_{t-1}); a_{t-1}]               input feeding (a_0 = 0)
    h_t      = stacked cells(x_t, states_{t-1})        dropout + residual between layers
    c_t, w_t = attention(h_t, memory)                  Bahdanau (additive) or Luong (dot/general)
    a_t      = tanh(W_a [c_t; h_t])                    the attentional vector
    logits_t = W_out a_t + b_out                       float32, over the target vocabulary
    ```

    `step()` is that equation, and both paths use it: `call()` (teacher forcing) loops it over
    the target in one `tf.while_loop`, and `decode_step()` runs it once for beam search. For speed
    `call()` hoists what does not depend on the previous step out of the loop: the embedding half
    of the first cell's input projection (one matmul for all steps), the attention keys, and the
    vocabulary projection (one `(batch*T, units) x (units, vocab)` matmul after the loop).

    Args:
        vocab_size: Target vocabulary size.
        embedding_dim: Target embedding width.
        units: Units of every decoder layer (and width of the attentional vector).
        num_layers: Stacked decoder layers.
        cell_type: `"lstm"` or `"gru"`.
        attention: `"luong"` or `"bahdanau"`.
        attention_score: For Luong: `"general"` or `"dot"`.
        input_feeding: Feed the previous attentional vector into the first layer.
        dropout: Dropout on embeddings, between layers and before the projection.
        residual: Residual connections between layers (all have width `units`).
        tie_embeddings: Use the transposed embedding matrix as the output projection (needs
            `embedding_dim == units`).
        embedding: Optional `keras.layers.Embedding` to share (e.g. with the encoder).
        seed: Seed of the dropout masks.

    Call arguments (`call`):
        target_in_ids: int `(batch, T)`, BOS-shifted target.
        constants: dict from `prepare_constants` (`memory`, `keys`, `memory_mask`).
        initial_state: From the bridge, see `initial_state`.
        training: Whether dropout is active.

    Returns:
        `call`: float32 logits `(batch, T, vocab_size)` and attention weights `(batch, T, S)`.
    """

    def __init__(
        self,
        vocab_size,
        embedding_dim,
        units,
        num_layers=1,
        cell_type="lstm",
        attention="luong",
        attention_score="general",
        input_feeding=True,
        dropout=0.0,
        residual=True,
        tie_embeddings=False,
        embedding=None,
        seed=None,
        **kwargs,
    ):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
        if tie_embeddings and embedding_dim != units:
            raise ValueError(
                "tie_embeddings needs embedding_dim == decoder units, got "
                f"embedding_dim={embedding_dim} and units={units}."
            )
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.units = units
        self.num_layers = num_layers
        self.cell_type = cell_type
        self.attention_type = attention
        self.attention_score = attention_score
        self.input_feeding = input_feeding
        self.dropout = dropout
        self.residual = residual
        self.tie_embeddings = tie_embeddings
        self.seed = seed
        self.embedding = embedding or keras.layers.Embedding(
            vocab_size, embedding_dim, name="target_embedding"
        )
        self.cells = [make_cell(cell_type, units, name=f"cell_{i}") for i in range(num_layers)]
        if attention == "luong":
            self.attention = LuongAttention(units, score=attention_score, name="attention")
        else:
            self.attention = BahdanauAttention(units, name="attention")
        self.attentional_layer = keras.layers.Dense(
            units, activation="tanh", use_bias=False, name="attentional"
        )
        if not tie_embeddings:
            self.projection = keras.layers.Dense(vocab_size, name="projection")
        self.output_bias_tied = None
        # The `(units, vocab)` output kernel precomputed by the caller (see `output_kernel`).
        self._output_kernel = None
        # The `(vocab, gates*units)` input table precomputed by the caller (see `input_table`).
        self._input_table = None
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def states_per_layer(self):
        return 2 if self.cell_type == "lstm" else 1

    def build(self, memory_shape):
        batch = memory_shape[0]
        if not self.embedding.built:
            self.embedding.build((batch, None))
        first_input = self.embedding_dim + (self.units if self.input_feeding else 0)
        self.cells[0].build((batch, first_input))
        for cell in self.cells[1:]:
            cell.build((batch, self.units))
        self.attention.build((batch, self.units), memory_shape)
        self.attentional_layer.build((batch, self.units + memory_shape[-1]))
        if self.tie_embeddings:
            self.output_bias_tied = self.add_weight(
                name="output_bias", shape=(self.vocab_size,), initializer="zeros"
            )
        else:
            self.projection.build((batch, self.units))
        self.built = True

    # -- pieces of the step ------------------------------------------------------------------

    def prepare_constants(self, memory, memory_mask):
        """Per-sentence tensors every step reads: the memory, its mask and the attention keys."""
        return {
            "memory": memory,
            "keys": self.attention.precompute(memory),
            "memory_mask": memory_mask,
        }

    def initial_state(self, bridge_states, batch_size):
        """The decoder state: per-layer cell states and the input-feeding vector (zeros)."""
        feed = ops.zeros((batch_size, self.units), dtype=self.compute_dtype)
        cells = [[ops.cast(s, self.compute_dtype) for s in layer] for layer in bridge_states]
        return {"cells": cells, "feed": feed}

    def _embed_projection(self, ids, training):
        """Embedding half of the first cell's input projection: `(..., gates*units)`."""
        embedded = self.embedding(ids)
        if training and self.dropout > 0:
            embedded = keras.random.dropout(embedded, self.dropout, seed=self.seed_generator)
        kernel = ops.cast(self.cells[0].kernel, self.compute_dtype)
        return self.cells[0].project_inputs(
            ops.cast(embedded, self.compute_dtype), kernel=kernel[: self.embedding_dim]
        )

    def read_weights(self):
        """Every weight a step reads, cast to the compute dtype.

        Read once per sequence outside the time loop: a variable read (and, under
        `mixed_bfloat16`, its cast) inside `tf.while_loop` would run on every step, and its
        gradient accumulator would keep XLA from compiling the loop.
        """
        dtype = self.compute_dtype

        def cast(v):
            return None if v is None else ops.cast(v, dtype)

        return {
            "cells": [
                {
                    "kernel": cast(cell.kernel),
                    "recurrent_kernel": cast(cell.recurrent_kernel),
                    "bias": cast(cell.bias),
                }
                for cell in self.cells
            ],
            "attention": self.attention.read_weights(dtype),
            "attentional": cast(self.attentional_layer.kernel),
        }

    def step(self, projected, state, constants, weights, dropout_masks=None, grouped=False):
        """One decoding step from the embedding half of the first projection.

        Args:
            projected: `(batch, gates*units)`, `_embed_projection(y_{t-1})`.
            state: `{"cells": [[h, c], ...], "feed": a_{t-1}}`.
            constants: from `prepare_constants`.
            weights: from `read_weights()`.
            dropout_masks: Optional per-sequence masks `(batch, units)` for layers 1..L-1.
            grouped: The constants have one row per sentence and `batch` is a multiple of
                their rows (the beams of a sentence, consecutive; see `attend`).

        Returns:
            `(attentional (batch, units), new_state, attention weights (batch, S) float32)`.
        """
        w = weights["cells"]
        if self.input_feeding:
            feed_kernel = weights.get("feed_kernel")
            if feed_kernel is None:
                feed_kernel = w[0]["kernel"][self.embedding_dim :]
            projected = projected + dense(state["feed"], feed_kernel)
        x, first = self.cells[0].recurrent_step(
            projected, state["cells"][0], **self._step_kwargs(w[0])
        )
        new_cells = [first]
        for i, cell in enumerate(self.cells[1:], start=1):
            inputs = x if dropout_masks is None else x * dropout_masks[i - 1]
            h, layer_state = cell.recurrent_step(
                cell.project_inputs(inputs, kernel=w[i]["kernel"], bias=w[i]["bias"]),
                state["cells"][i],
                **self._step_kwargs(w[i]),
            )
            x = h + x if self.residual else h
            new_cells.append(layer_state)
        context, probs = self.attention.attend(
            x,
            constants["memory"],
            constants["keys"],
            constants["memory_mask"],
            weights["attention"],
            grouped=grouped,
        )
        attentional = ops.tanh(
            dense(ops.concatenate([context, x], axis=-1), weights["attentional"])
        )
        return attentional, {"cells": new_cells, "feed": attentional}, probs

    def _step_kwargs(self, cell_weights):
        kwargs = {"recurrent_kernel": cell_weights["recurrent_kernel"]}
        if self.cell_type == "gru":
            kwargs["bias"] = cell_weights["bias"]
        return kwargs

    def project(self, attentional, training=False):
        """Vocabulary logits (float32) from attentional vectors `(..., units)`."""
        if training and self.dropout > 0:
            attentional = keras.random.dropout(attentional, self.dropout, seed=self.seed_generator)
        if self.tie_embeddings:
            matrix = ops.cast(self.embedding.embeddings, attentional.dtype)
            logits = ops.matmul(attentional, ops.transpose(matrix)) + ops.cast(
                self.output_bias_tied, attentional.dtype
            )
        else:  # the Dense layer's weights, through `dense` for its faster input gradient
            logits = dense(attentional, self.projection.kernel, self.projection.bias)
        return ops.cast(logits, "float32")

    def _layer_dropout_masks(self, batch_size, training):
        if not (training and self.dropout > 0 and self.num_layers > 1):
            return None
        ones = ops.ones((batch_size, self.units), dtype=self.compute_dtype)
        return [
            keras.random.dropout(ones, self.dropout, seed=self.seed_generator)
            for _ in range(self.num_layers - 1)
        ]

    # -- the two paths -----------------------------------------------------------------------

    def inference_weights(self, projection_dtype=None):
        """`read_weights()` plus every per-step weight view decoding needs, computed once.

        A decoding loop that captures these (see `decode_step`) does no weight work per step:
        the first cell's kernel split into its embedding and input-feeding halves, and the
        output projection as a `(units, vocab)` matrix. With tied embeddings that is the
        transposed embedding matrix, and transposing it inside the loop (or multiplying by it
        with `transpose_b`) cost 3x the matmul itself at batch 32 on this CPU (measured:
        5.5 ms against 1.9 ms for a (32, 512) x (512, 8000) float32 product).

        `projection_dtype="bfloat16"` stores the output projection (the largest matmul of a
        step) in bfloat16, so `decode_step` runs it in bfloat16 (the logits are rounded to
        bfloat16 before the float32 bias): faster on CPUs with bfloat16 matrix units, at a small
        cost in precision.
        """
        weights = self.read_weights()
        dtype = self.compute_dtype
        out_dtype = projection_dtype or dtype
        kernel = weights["cells"][0]["kernel"]
        weights["embed_kernel"] = kernel[: self.embedding_dim]
        if self.input_feeding:
            weights["feed_kernel"] = kernel[self.embedding_dim :]
        if self.tie_embeddings:
            kernel = self._output_kernel
            if kernel is None:
                # Transposed once per call, and kept as it is: without the `Snapshot`,
                # grappler folds the transpose into the step before the loop as a
                # `transpose_b` product, which cost more than the transpose itself (one
                # sentence at beam 5 through `translate`: 79 against 61 ms on the 2-core EPYC
                # without AVX-512).
                kernel = tf.raw_ops.Snapshot(input=ops.transpose(self.embedding.embeddings))
            bias = self.output_bias_tied
        else:
            kernel, bias = self.projection.kernel, self.projection.bias
        weights["output_kernel"] = ops.cast(kernel, out_dtype)
        weights["output_bias"] = ops.cast(bias, "float32")
        if self._input_table is not None:
            weights["input_table"] = ops.cast(self._input_table, dtype)
        return weights

    def input_projection_table(self):
        """`(vocab, gates*units)`: the embedding half of the first cell's input projection (with
        its input bias) for every target piece, `_embed_projection` of every id at once.

        A step then gathers its rows instead of multiplying its embeddings by the embedding
        half of the kernel, a `(units, gates*units)` matrix read at every step (3 MB of the 28
        a step of the shipped model reads). The table costs `vocab * gates * units` floats of
        memory (47 MB for the shipped model) and one `(vocab, embedding) x (embedding,
        gates*units)` product to build: worth it for a caller that keeps it across calls, as
        the SavedModel does (see `input_table`).
        """
        dtype = self.compute_dtype
        kernel = ops.cast(self.cells[0].kernel, dtype)[: self.embedding_dim]
        embeddings = ops.cast(self.embedding.embeddings, dtype)
        return self.cells[0].project_inputs(embeddings, kernel=kernel)

    @contextlib.contextmanager
    def input_table(self, table):
        """While tracing in this context, `decode_step` (through `inference_weights`) takes the
        embedding half of the first cell's input projection from `table`, the
        `input_projection_table()` kept by the caller, by gathering the step's ids: one row
        read per id instead of the `(embedding, gates*units)` kernel. `None` is a no-op."""
        previous, self._input_table = self._input_table, table
        try:
            yield
        finally:
            self._input_table = previous

    @contextlib.contextmanager
    def output_kernel(self, kernel):
        """While tracing in this context, `inference_weights` takes the tied output kernel, the
        transposed embedding matrix `(units, vocab)`, from `kernel` instead of transposing it.

        For a caller that keeps that transpose across calls (the SavedModel keeps it in memory
        from its first call, see `translator.export`): per call, the transpose of the (8000,
        512) matrix, and the (5, 512) x (512, 8000) product with `transpose_b` that grappler
        folds it into for the step before the loop, cost about 20 of the 80 ms a one-sentence
        beam-5 call took on the 2-core EPYC without AVX-512. A no-op for untied embeddings.
        """
        previous, self._output_kernel = self._output_kernel, kernel
        try:
            yield
        finally:
            self._output_kernel = previous

    def decode_step(self, ids, state, constants, weights=None, grouped=False):
        """Inference step `(ids (N,), state, constants) -> (logits (N, V), state, attention (N, S))`.

        The signature is the step-function contract of `translator.search`. Pass `weights`
        from `inference_weights()`, computed outside the decoding loop, to keep weight work out
        of every step (`Seq2Seq.step_function()` does). With `grouped=True` the constants keep
        one row per sentence for the `N / sentences` consecutive rows of its beams (see
        `translator.search.beam_search`'s `tile_constants`).
        """
        if weights is None:
            weights = self.inference_weights()
        table = weights.get("input_table")
        if table is not None:
            projected = ops.take(table, ids, axis=0)
        else:
            embedded = ops.cast(self.embedding(ids), self.compute_dtype)
            projected = self.cells[0].project_inputs(embedded, kernel=weights["embed_kernel"])
        attentional, state, probs = self.step(projected, state, constants, weights, grouped=grouped)
        kernel, bias = weights["output_kernel"], weights["output_bias"]
        logits = ops.cast(ops.matmul(ops.cast(attentional, kernel.dtype), kernel), bias.dtype)
        # `bias_add`, not `+`: grappler fuses it into the matmul (one pass over the logits).
        return tf.nn.bias_add(logits, bias), state, probs

    def call(self, target_in_ids, constants, initial_state, training=False):
        batch = ops.shape(target_in_ids)[0]
        projected = self._embed_projection(target_in_ids, training)  # (B, T, G)
        projected = tf.transpose(projected, [1, 0, 2])  # time-major (T, B, G)
        steps = tf.shape(projected)[0]
        inputs_ta = tf.TensorArray(projected.dtype, size=steps).unstack(projected)
        masks = self._layer_dropout_masks(batch, training)
        weights = self.read_weights()
        outputs_ta = tf.TensorArray(self.compute_dtype, size=steps)
        weights_ta = tf.TensorArray(tf.float32, size=steps)

        def body(t, state, outputs_ta, weights_ta):
            attentional, state, probs = self.step(
                inputs_ta.read(t), state, constants, weights, masks
            )
            return t + 1, state, outputs_ta.write(t, attentional), weights_ta.write(t, probs)

        _, _, outputs_ta, weights_ta = tf.while_loop(
            lambda t, *_: t < steps,
            body,
            (tf.constant(0), initial_state, outputs_ta, weights_ta),
            maximum_iterations=steps,
        )
        attentional = tf.transpose(outputs_ta.stack(), [1, 0, 2])  # (B, T, units)
        probs = tf.transpose(weights_ta.stack(), [1, 0, 2])  # (B, T, S)
        return self.project(attentional, training), probs

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "num_layers": self.num_layers,
            "cell_type": self.cell_type,
            "attention": self.attention_type,
            "attention_score": self.attention_score,
            "input_feeding": self.input_feeding,
            "dropout": self.dropout,
            "residual": self.residual,
            "tie_embeddings": self.tie_embeddings,
            "seed": self.seed,
        }
