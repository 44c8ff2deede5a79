"""translator: English->French neural machine translation on Keras 3.

Importing the package registers every custom Keras object, so `keras.saving.load_model` can
rebuild saved translator models.
"""

from translator.startup import native_stderr_filter

with native_stderr_filter():  # TensorFlow's CUDA-probe lines on CPU-only machines; see startup.py
    import tensorflow  # noqa: F401
    import tensorflow_text  # noqa: F401

from translator import layers
from translator.decoder import AttentionDecoder
from translator.encoder import DenseBridge, Encoder
from translator.inference import Translator, load
from translator.model import Seq2Seq
from translator.tokenizer import SentencePieceTokenizer

__version__ = "0.1.0"
__all__ = [
    "AttentionDecoder",
    "DenseBridge",
    "Encoder",
    "Seq2Seq",
    "SentencePieceTokenizer",
    "Translator",
    "layers",
    "load",
]
