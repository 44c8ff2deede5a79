"""`Recurrent`: runs a translator cell over a sequence, the input projection out of the loop."""

import keras
import tensorflow as tf
from keras import ops

from translator.layers.cells import GRUCell, tree_flatten


@keras.saving.register_keras_serializable(package="translator")
class Recurrent(keras.layers.Layer):
    """Runs a translator cell over a sequence, the input projection hoisted out of the time loop.

    `keras.layers.RNN(cell)` multiplies each step's input by `kernel` inside the loop: T small
    matmuls. This layer does it for all steps in one `(batch*T, input_dim) x (input_dim, gates*units)`
    matmul, then loops only over the recurrent half (`recurrent_step`). Same numbers as
    `keras.layers.RNN(cell)` (a test checks it), fewer and larger matmuls.

    Masked steps (padding) carry the state through unchanged and output zeros, so a backward
    layer over right-padded sequences starts from the last real token.

    Args:
        cell: A `LSTMCell` or `GRUCell` (anything with `project_inputs` / `recurrent_step`).
        return_sequences: Return all outputs `(batch, T, units)` (default) or the last one.
        return_state: Also return the final states.
        go_backwards: Process the sequence in reverse (outputs are returned in input order).

    Call arguments:
        sequences: `(batch, T, input_dim)`.
        initial_state: Optional list of states, each `(batch, units)`.
        mask: Optional boolean `(batch, T)`, True on real tokens.
        training: Whether dropout is active.

    Returns:
        `outputs` or, with `return_state`, `[outputs, *states]`.

    Example:

    >>> import numpy as np, translator
    >>> layer = translator.layers.Recurrent(translator.layers.GRUCell(8), return_state=True)
    >>> outputs, h = layer(np.ones((2, 5, 3), "float32"))
    >>> tuple(outputs.shape), tuple(h.shape)
    ((2, 5, 8), (2, 8))
    """

    def __init__(
        self, cell, return_sequences=True, return_state=False, go_backwards=False, **kwargs
    ):
        if isinstance(cell, dict):
            cell = keras.saving.deserialize_keras_object(cell)
        super().__init__(**kwargs)
        self.cell = cell
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        self.supports_masking = True

    def build(self, sequences_shape, initial_state_shape=None):
        if not self.cell.built:
            self.cell.build(sequences_shape)
        self.built = True

    def compute_mask(self, sequences, mask=None):
        return mask if self.return_sequences else None

    def call(self, sequences, initial_state=None, mask=None, training=False):
        cell = self.cell
        batch = tf.shape(sequences)[0]
        if initial_state is None:
            initial_state = cell.get_initial_state(batch)
        initial_state = [ops.cast(s, self.compute_dtype) for s in tree_flatten(initial_state)]
        dp_mask = rec_mask = None
        if training and cell.dropout > 0:  # one mask per sequence, shared by all steps
            dp_mask = keras.random.dropout(
                ops.ones_like(sequences[:, 0, :]), cell.dropout, seed=cell.seed_generator
            )
            sequences = sequences * dp_mask[:, None, :]
        if training and cell.recurrent_dropout > 0:
            rec_mask = keras.random.dropout(
                ops.ones_like(initial_state[0]), cell.recurrent_dropout, seed=cell.seed_generator
            )
        # Read each variable once (cast to the compute dtype) rather than once per step.
        kernel = ops.cast(cell.kernel, self.compute_dtype)
        rk = ops.cast(cell.recurrent_kernel, self.compute_dtype)
        bias = None if cell.bias is None else ops.cast(cell.bias, self.compute_dtype)
        projected = cell.project_inputs(sequences, kernel=kernel, bias=bias)  # (B, T, G)
        projected = tf.transpose(projected, [1, 0, 2])  # time-major (T, B, G)
        step_kwargs = {"recurrent_kernel": rk}
        if isinstance(cell, GRUCell):
            step_kwargs["bias"] = bias
        if mask is not None:
            mask_tm = tf.transpose(tf.cast(mask, tf.bool), [1, 0])[:, :, None]  # (T, B, 1)
        else:
            mask_tm = None
        if self.go_backwards:
            projected = tf.reverse(projected, [0])
            mask_tm = None if mask_tm is None else tf.reverse(mask_tm, [0])
        steps = tf.shape(projected)[0]
        # TensorArrays, not `projected[t]`: the gradient of slicing a captured tensor inside the
        # loop is a dense (T, B, G) tensor per step, which makes the backward pass O(T^2).
        inputs_ta = tf.TensorArray(projected.dtype, size=steps).unstack(projected)
        masks_ta = None
        if mask_tm is not None:
            masks_ta = tf.TensorArray(tf.bool, size=steps).unstack(mask_tm)
        outputs_ta = tf.TensorArray(self.compute_dtype, size=steps)

        def body(t, states, outputs_ta):
            output, new_states = cell.recurrent_step(
                inputs_ta.read(t), states, rec_mask, **step_kwargs
            )
            if masks_ta is not None:
                m = masks_ta.read(t)
                new_states = [tf.where(m, n, s) for n, s in zip(new_states, states, strict=True)]
                output = tf.where(m, output, tf.zeros_like(output))
            return t + 1, new_states, outputs_ta.write(t, output)

        _, states, outputs_ta = tf.while_loop(
            lambda t, *_: t < steps,
            body,
            (tf.constant(0), initial_state, outputs_ta),
            maximum_iterations=steps,
        )
        if self.return_sequences:
            outputs = outputs_ta.stack()  # (T, B, U)
            if self.go_backwards:
                outputs = tf.reverse(outputs, [0])
            outputs = tf.transpose(outputs, [1, 0, 2])  # (B, T, U)
        else:
            outputs = states[0]
        if self.return_state:
            return [outputs, *states]
        return outputs

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        units = self.cell.units
        if self.return_sequences:
            out = (sequences_shape[0], sequences_shape[1], units)
        else:
            out = (sequences_shape[0], units)
        if self.return_state:
            return [out] + [(sequences_shape[0], s) for s in tree_flatten(self.cell.state_size)]
        return out

    def get_config(self):
        return {
            **super().get_config(),
            "cell": keras.saving.serialize_keras_object(self.cell),
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
        }
