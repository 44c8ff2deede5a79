"""LSTM and GRU cells written from their gate equations (Keras weight layouts and cell contract)."""

import keras
import tensorflow as tf
from keras import ops

from translator.layers.dense import dense


def _dropout_mixin():
    """The mixin `keras.layers.RNN` recognises (by `isinstance`) to draw one dropout mask per
    sequence and reset it after each call. Keras exports no name for it, so it is taken from
    the public `keras.layers.LSTMCell`, which inherits it, rather than from `keras.src`."""
    for base in keras.layers.LSTMCell.__mro__:
        if base.__name__ == "DropoutRNNCell" and hasattr(base, "get_recurrent_dropout_mask"):
            return base
    raise ImportError(  # pragma: no cover - fails at import, never silently per call
        f"keras {keras.__version__}: keras.layers.LSTMCell no longer inherits DropoutRNNCell; "
        "translator's cells need the per-sequence dropout masks it provides (see cells.py)."
    )


DropoutRNNCell = _dropout_mixin()


class _GatedCell(keras.layers.Layer, DropoutRNNCell):
    """Shared plumbing of `LSTMCell` and `GRUCell`.

    A gated cell splits its work in two so that sequence layers can hoist the input half out of
    the time loop: `project_inputs(x)` computes `x @ kernel (+ input bias)` for any number of
    leading dimensions (one large matmul over all time steps), and
    `recurrent_step(projected, states)` adds the recurrent half and applies the gate equations.
    `call()` (the Keras RNN cell contract) is simply the two in sequence.
    """

    gates = None  # number of gate blocks in `kernel` (LSTM: 4, GRU: 3)

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        **kwargs,
    ):
        if not isinstance(units, int) or units <= 0:
            raise ValueError(f"`units` must be a positive integer, got units={units!r}.")
        for name, rate in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {name}={rate!r}.")
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.dropout = float(dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)

    @property
    def output_size(self):
        return self.units

    def _add_kernels(self, input_dim):
        width = self.gates * self.units
        self.kernel = self.add_weight(
            shape=(input_dim, width),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, width),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
        )

    def _masks(self, inputs, h_tm1, training):
        """Per-sequence dropout masks (cached by Keras' RNN layer for all steps), or None."""
        dp = rec = None
        if training and self.dropout > 0:
            dp = self.get_dropout_mask(inputs)
        if training and self.recurrent_dropout > 0:
            rec = self.get_recurrent_dropout_mask(h_tm1)
        return dp, rec

    def call(self, inputs, states, training=False):
        nested = tree_is_nested(states)
        h_tm1 = states[0] if nested else states
        dp_mask, rec_mask = self._masks(inputs, h_tm1, training)
        if dp_mask is not None:
            inputs = inputs * dp_mask
        output, new_states = self.recurrent_step(
            self.project_inputs(inputs), states if nested else [states], rec_mask
        )
        return output, (new_states if nested else new_states[0])

    def get_initial_state(self, batch_size=None):
        return [
            ops.zeros((batch_size, size), dtype=self.compute_dtype)
            for size in tree_flatten(self.state_size)
        ]

    def get_config(self):
        config = {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": keras.initializers.serialize(self.recurrent_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "recurrent_regularizer": keras.regularizers.serialize(self.recurrent_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}


def _gate_precision(*tensors):
    """The tensors in float32, where gate activations are computed.

    Under `mixed_bfloat16` the matmuls run in bfloat16, but sigmoid and tanh on bfloat16 are
    2-3x slower than on float32 on CPU (each element is converted on the fly), forward and
    backward: an LSTM step's gate equations take 473 us in bfloat16 against 195 us with casts to
    float32 and back (batch 64, 512 units). They are also more precise in float32. The states
    stay in the compute dtype, so the cell contract (and Keras' RNN layer) sees no difference.
    """
    return [t if t.dtype == tf.float32 else ops.cast(t, "float32") for t in tensors]


def tree_is_nested(x):
    return isinstance(x, list | tuple)


def tree_flatten(x):
    return list(x) if tree_is_nested(x) else [x]


@keras.saving.register_keras_serializable(package="translator")
class LSTMCell(_GatedCell):
    """Long short-term memory cell (Hochreiter & Schmidhuber 1997), from the gate equations.

    For input `x_t`, previous output `h_{t-1}` and cell state `c_{t-1}`:

    ```
    i_t = sigmoid(x_t W_i + h_{t-1} U_i + b_i)        input gate
    f_t = sigmoid(x_t W_f + h_{t-1} U_f + b_f)        forget gate
    g_t = tanh(x_t W_c + h_{t-1} U_c + b_c)           candidate cell state
    o_t = sigmoid(x_t W_o + h_{t-1} U_o + b_o)        output gate
    c_t = f_t * c_{t-1} + i_t * g_t                   cell state update
    h_t = o_t * tanh(c_t)
    ```

    Weights use Keras' names and layout, so `cell.set_weights(keras_cell.get_weights())` copies a
    `keras.layers.LSTMCell` exactly: `kernel` (input_dim, 4*units) and `recurrent_kernel`
    (units, 4*units) with gate blocks in the order i, f, c, o; `bias` (4*units,).

    Args:
        units: Positive integer, dimensionality of the output and of both states.
        activation: Activation of the candidate and of the cell output. Default `tanh`.
        recurrent_activation: Activation of the gates. Default `sigmoid`.
        use_bias: Whether the cell has a bias vector.
        kernel_initializer, recurrent_initializer, bias_initializer: Initializers.
        unit_forget_bias: If True (default) add 1 to the forget-gate bias at initialization
            (Jozefowicz et al. 2015) and use zeros for the other gates.
        kernel_regularizer, recurrent_regularizer, bias_regularizer: Regularizers.
        dropout: Fraction of the input units to drop, one mask per sequence (as in Keras).
        recurrent_dropout: Fraction of `h_{t-1}` to drop in the recurrent transformation.
        seed: Random seed for dropout.

    Call arguments:
        inputs: A tensor of shape `(batch, input_dim)`.
        states: A list `[h, c]` of two tensors of shape `(batch, units)`.
        training: Whether dropout is active.

    Returns:
        `(h, [h, c])`, each of shape `(batch, units)`.

    Example:

    >>> import numpy as np, keras, translator
    >>> cell = translator.layers.LSTMCell(2, kernel_initializer="ones",
    ...     recurrent_initializer="ones", bias_initializer="ones", unit_forget_bias=False)
    >>> h, (h2, c) = cell(np.ones((1, 3), "float32"), [np.zeros((1, 2), "float32")] * 2)
    >>> [round(float(v), 4) for v in np.asarray(h)[0]]
    [0.7401, 0.7401]
    >>> tuple(keras.layers.RNN(translator.layers.LSTMCell(4))(np.ones((2, 5, 3), "float32")).shape)
    (2, 4)
    """

    gates = 4

    def __init__(self, units, unit_forget_bias=True, **kwargs):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = unit_forget_bias

    @property
    def state_size(self):
        return [self.units, self.units]

    def build(self, input_shape):
        self._add_kernels(input_shape[-1])
        if self.use_bias:
            if self.unit_forget_bias:

                def bias_initializer(_, *args, **kwargs):
                    u = self.units
                    return ops.concatenate(
                        [
                            self.bias_initializer((u,), *args, **kwargs),
                            keras.initializers.get("ones")((u,), *args, **kwargs),
                            self.bias_initializer((u * 2,), *args, **kwargs),
                        ]
                    )

            else:
                bias_initializer = self.bias_initializer
            self.bias = self.add_weight(
                shape=(4 * self.units,),
                name="bias",
                initializer=bias_initializer,
                regularizer=self.bias_regularizer,
            )
        else:
            self.bias = None
        self.built = True

    def project_inputs(self, inputs, kernel=None, bias=None):
        """`inputs @ kernel + bias` for inputs of shape `(..., input_dim)` -> `(..., 4*units)`."""
        kernel = self.kernel if kernel is None else kernel
        return dense(
            inputs, kernel, (self.bias if bias is None else bias) if self.use_bias else None
        )

    def recurrent_step(self, projected, states, recurrent_dropout_mask=None, recurrent_kernel=None):
        """One step from already projected inputs.

        Args:
            projected: `project_inputs(x_t)`, shape `(batch, 4*units)`.
            states: `[h, c]`.
            recurrent_dropout_mask: Optional mask multiplied into `h` before `recurrent_kernel`.
            recurrent_kernel: Optional pre-cast kernel (sequence layers read it once per call).

        Returns:
            `(h, [h, c])`.
        """
        h_tm1, c_tm1 = states[0], states[1]
        rk = self.recurrent_kernel if recurrent_kernel is None else recurrent_kernel
        h_in = h_tm1 if recurrent_dropout_mask is None else h_tm1 * recurrent_dropout_mask
        z = projected + dense(h_in, rk)
        dtype = z.dtype
        z, c_tm1 = _gate_precision(z, c_tm1)
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        c = f * c_tm1 + i * self.activation(z_c)
        o = self.recurrent_activation(z_o)
        h = o * self.activation(c)
        h, c = ops.cast(h, dtype), ops.cast(c, dtype)
        return h, [h, c]

    def get_config(self):
        return {**super().get_config(), "unit_forget_bias": self.unit_forget_bias}


@keras.saving.register_keras_serializable(package="translator")
class GRUCell(_GatedCell):
    """Gated recurrent unit cell (Cho et al. 2014, arXiv:1406.1078), from the gate equations.

    For input `x_t` and previous state `h_{t-1}`, with `reset_after=True` (the default, the
    variant cuDNN and Keras use):

    ```
    z_t = sigmoid(x_t W_z + b_z + h_{t-1} U_z + b'_z)            update gate
    r_t = sigmoid(x_t W_r + b_r + h_{t-1} U_r + b'_r)            reset gate
    n_t = tanh(x_t W_h + b_h + r_t * (h_{t-1} U_h + b'_h))       candidate
    h_t = z_t * h_{t-1} + (1 - z_t) * n_t                        interpolation
    ```

    With `reset_after=False` (the original paper) the candidate is
    `tanh(x_t W_h + b_h + (r_t * h_{t-1}) U_h)` and there is one bias vector.

    Weights use Keras' names and layout (`kernel` (input_dim, 3*units) and `recurrent_kernel`
    (units, 3*units) with gate blocks z, r, h; `bias` of shape (2, 3*units) with the input bias in
    row 0 and the recurrent bias in row 1 when `reset_after=True`, else (3*units,)), so
    `cell.set_weights(keras.layers.GRUCell(...).get_weights())` gives identical numbers.

    Args:
        units: Positive integer, dimensionality of the output and the state.
        reset_after: Apply the reset gate after the recurrent matmul (True) or before (False).
        Other arguments as for `LSTMCell`.

    Call arguments:
        inputs: A tensor of shape `(batch, input_dim)`.
        states: A tensor `h` of shape `(batch, units)` or a list `[h]`.
        training: Whether dropout is active.

    Returns:
        `(h, [h])` (or `(h, h)` when `states` is not a list), each of shape `(batch, units)`.

    Example:

    >>> import numpy as np, translator
    >>> cell = translator.layers.GRUCell(2, kernel_initializer="ones",
    ...     recurrent_initializer="ones", bias_initializer="zeros")
    >>> h, _ = cell(np.ones((1, 3), "float32"), [np.zeros((1, 2), "float32")])
    >>> [round(float(v), 4) for v in np.asarray(h)[0]]
    [0.0472, 0.0472]
    """

    gates = 3

    def __init__(self, units, reset_after=True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = reset_after

    @property
    def state_size(self):
        return self.units

    def build(self, input_shape):
        self._add_kernels(input_shape[-1])
        if self.use_bias:
            shape = (2, 3 * self.units) if self.reset_after else (3 * self.units,)
            self.bias = self.add_weight(
                shape=shape,
                name="bias",
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
        else:
            self.bias = None
        self.built = True

    def _split_bias(self, bias):
        if not self.use_bias:
            return None, None
        if self.reset_after:
            return bias[0], bias[1]
        return bias, None

    def project_inputs(self, inputs, kernel=None, bias=None):
        """`inputs @ kernel + input bias` for inputs `(..., input_dim)` -> `(..., 3*units)`."""
        kernel = self.kernel if kernel is None else kernel
        input_bias, _ = self._split_bias(self.bias if bias is None else bias)
        return dense(inputs, kernel, input_bias)

    def recurrent_step(
        self, projected, states, recurrent_dropout_mask=None, recurrent_kernel=None, bias=None
    ):
        """One step from already projected inputs: `(projected (batch, 3*units), [h]) -> (h, [h])`."""
        h_tm1 = states[0]
        rk = self.recurrent_kernel if recurrent_kernel is None else recurrent_kernel
        h_in = h_tm1 if recurrent_dropout_mask is None else h_tm1 * recurrent_dropout_mask
        dtype = projected.dtype
        u = self.units
        if self.reset_after:
            _, recurrent_bias = self._split_bias(self.bias if bias is None else bias)
            inner = dense(h_in, rk, recurrent_bias)
            projected, inner, h_prev = _gate_precision(projected, inner, h_tm1)
            x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
            r_z, r_r, r_h = ops.split(inner, 3, axis=-1)
            z = self.recurrent_activation(x_z + r_z)
            r = self.recurrent_activation(x_r + r_r)
            candidate = self.activation(x_h + r * r_h)
        else:
            inner = dense(h_in, rk[:, : 2 * u])
            projected, inner, h_prev, h_in = _gate_precision(projected, inner, h_tm1, h_in)
            x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
            r_z, r_r = ops.split(inner, 2, axis=-1)
            z = self.recurrent_activation(x_z + r_z)
            r = self.recurrent_activation(x_r + r_r)
            reset = dense(ops.cast(r * h_in, dtype), rk[:, 2 * u :])
            candidate = self.activation(x_h + ops.cast(reset, "float32"))
        h = ops.cast(z * h_prev + (1.0 - z) * candidate, dtype)
        return h, [h]

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}


CELLS = {"lstm": LSTMCell, "gru": GRUCell}


def make_cell(cell_type, units, **kwargs):
    """A translator cell by name (`"lstm"` or `"gru"`), e.g. `make_cell("gru", 256)`."""
    if cell_type not in CELLS:
        raise ValueError(f"cell_type must be one of {sorted(CELLS)}, got {cell_type!r}.")
    return CELLS[cell_type](units, **kwargs)
