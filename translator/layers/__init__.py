"""Public layers: the recurrent cells, the sequence layer that runs them, and attention."""

from translator.layers.attention import BahdanauAttention, LuongAttention, masked_softmax
from translator.layers.cells import GRUCell, LSTMCell, make_cell
from translator.layers.dense import dense
from translator.layers.recurrent import Recurrent

__all__ = [
    "BahdanauAttention",
    "GRUCell",
    "LSTMCell",
    "LuongAttention",
    "Recurrent",
    "dense",
    "make_cell",
    "masked_softmax",
]
