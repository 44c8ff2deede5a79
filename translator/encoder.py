"""The encoder: stacked (bi)directional recurrent layers of translator cells, and the bridge."""

import keras
from keras import ops

from translator.layers import Recurrent, make_cell

BIDIRECTIONAL = ("all", "first", "none")


@keras.saving.register_keras_serializable(package="translator")
class Encoder(keras.layers.Layer):
    """Stacked recurrent encoder over embedded source tokens.

    Layer `i` is bidirectional when `bidirectional == "all"`, or `"first"` and `i == 0`; the
    forward and backward outputs are concatenated, so a bidirectional layer is `2 * units` wide.
    Dropout sits between layers, and a residual connection adds a layer's input to its output
    whenever the two have the same width (Wu et al. 2016). Padding is masked: a backward layer
    starts at each sentence's last real token, and padded positions output zeros.

    Args:
        units: Units per direction of every layer.
        num_layers: Number of stacked layers.
        cell_type: `"lstm"` or `"gru"`.
        bidirectional: `"all"`, `"first"` or `"none"`.
        dropout: Dropout rate between layers.
        residual: Whether to add residual connections between equal-width layers.

    Call arguments:
        embedded: `(batch, S, embedding_dim)`.
        mask: Boolean `(batch, S)`, True on real tokens.
        training: Whether dropout is active.

    Returns:
        `(memory, final_outputs)`: `memory` `(batch, S, width)` is the top layer's output; the
        list `final_outputs` holds, per layer, its final output `(batch, width_i)` (forward and
        backward concatenated), which the bridge turns into the decoder's initial state.

    Example:

    >>> import numpy as np, translator
    >>> encoder = translator.encoder.Encoder(units=8, num_layers=2)
    >>> memory, finals = encoder(np.ones((3, 5, 4), "float32"), np.ones((3, 5), bool))
    >>> tuple(memory.shape), [tuple(f.shape) for f in finals]
    ((3, 5, 16), [(3, 16), (3, 16)])
    """

    def __init__(
        self,
        units,
        num_layers=1,
        cell_type="lstm",
        bidirectional="all",
        dropout=0.0,
        residual=True,
        **kwargs,
    ):
        if bidirectional not in BIDIRECTIONAL:
            raise ValueError(
                f"bidirectional must be one of {BIDIRECTIONAL}, got {bidirectional!r}."
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        super().__init__(**kwargs)
        self.units = units
        self.num_layers = num_layers
        self.cell_type = cell_type
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.residual = residual
        self.forward_layers = []
        self.backward_layers = []
        for i in range(num_layers):
            self.forward_layers.append(
                Recurrent(make_cell(cell_type, units), return_state=True, name=f"forward_{i}")
            )
            if self.is_bidirectional(i):
                self.backward_layers.append(
                    Recurrent(
                        make_cell(cell_type, units),
                        return_state=True,
                        go_backwards=True,
                        name=f"backward_{i}",
                    )
                )
            else:
                self.backward_layers.append(None)
        self.dropout_layer = keras.layers.Dropout(dropout)

    def is_bidirectional(self, i):
        return self.bidirectional == "all" or (self.bidirectional == "first" and i == 0)

    def output_width(self, i=None):
        i = self.num_layers - 1 if i is None else i
        return self.units * (2 if self.is_bidirectional(i) else 1)

    def build(self, embedded_shape, mask_shape=None):
        width = embedded_shape[-1]
        for i in range(self.num_layers):
            shape = (embedded_shape[0], embedded_shape[1], width)
            self.forward_layers[i].build(shape)
            if self.backward_layers[i] is not None:
                self.backward_layers[i].build(shape)
            width = self.output_width(i)
        self.built = True

    def call(self, embedded, mask, training=False):
        x = embedded
        finals = []
        for i in range(self.num_layers):
            inputs = x
            if i > 0:
                inputs = self.dropout_layer(x, training=training)
            outputs, *states = self.forward_layers[i](inputs, mask=mask, training=training)
            final = states[0]
            if self.backward_layers[i] is not None:
                back, *back_states = self.backward_layers[i](inputs, mask=mask, training=training)
                outputs = ops.concatenate([outputs, back], axis=-1)  # (B, S, 2u)
                final = ops.concatenate([final, back_states[0]], axis=-1)  # (B, 2u)
            if self.residual and i > 0 and outputs.shape[-1] == x.shape[-1]:
                outputs = outputs + x
            finals.append(final)
            x = outputs
        return x, finals

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "num_layers": self.num_layers,
            "cell_type": self.cell_type,
            "bidirectional": self.bidirectional,
            "dropout": self.dropout,
            "residual": self.residual,
        }


@keras.saving.register_keras_serializable(package="translator")
class DenseBridge(keras.layers.Layer):
    """Maps the encoder's final outputs to the decoder's initial states.

    Decoder layer `i` starts from encoder layer `min(i, encoder_layers - 1)`: each of its state
    tensors (LSTM: h and c; GRU: h) is `tanh(W final_output + b)`, so any encoder width and cell
    type feeds any decoder.

    Args:
        units: Decoder units.
        num_layers: Decoder layers.
        states_per_layer: 2 for an LSTM decoder, 1 for a GRU decoder.
    """

    def __init__(self, units, num_layers, states_per_layer, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.num_layers = num_layers
        self.states_per_layer = states_per_layer
        self.projections = [
            [
                keras.layers.Dense(units, activation="tanh", name=f"layer_{i}_state_{j}")
                for j in range(states_per_layer)
            ]
            for i in range(num_layers)
        ]

    def build(self, finals_shapes):
        for i, layer_projections in enumerate(self.projections):
            shape = finals_shapes[min(i, len(finals_shapes) - 1)]
            for dense in layer_projections:
                dense.build(shape)
        self.built = True

    def call(self, finals):
        return [
            [dense(finals[min(i, len(finals) - 1)]) for dense in layer_projections]
            for i, layer_projections in enumerate(self.projections)
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "num_layers": self.num_layers,
            "states_per_layer": self.states_per_layer,
        }
