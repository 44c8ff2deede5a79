"""`Seq2Seq`: the attention encoder-decoder that turns source token ids into target logits."""

import inspect

import keras
from keras import ops

from translator.decoder import AttentionDecoder
from translator.encoder import DenseBridge, Encoder
from translator.tokenizer import PAD_ID


@keras.saving.register_keras_serializable(package="translator")
class Seq2Seq(keras.Model):
    """Bidirectional recurrent encoder, attention decoder, vocabulary projection.

    The architecture of Luong et al. (2015) and GNMT (Wu et al. 2016) on translator's own cells:
    embeddings -> `Encoder` (stacked, (bi)directional, residual) -> `DenseBridge` (final encoder
    outputs -> decoder initial states) -> `AttentionDecoder` (input feeding, Bahdanau or Luong
    attention) -> float32 logits. Every argument is a plain value and `get_config()` returns them
    all, so the config alone rebuilds the architecture.

    Args:
        source_vocab_size: Source (English) vocabulary size.
        target_vocab_size: Target (French) vocabulary size.
        embedding_dim: Width of both embeddings.
        share_embeddings: One embedding matrix for source and target (joint vocabulary; needs
            equal vocabulary sizes).
        tie_embeddings: Output projection = transposed target embedding (needs
            `embedding_dim == decoder_units`).
        cell_type: `"lstm"` or `"gru"`, for encoder and decoder.
        encoder_units: Units per direction of each encoder layer.
        encoder_layers: Number of encoder layers.
        bidirectional: `"all"`, `"first"` or `"none"`: which encoder layers are bidirectional.
        decoder_units: Units of each decoder layer.
        decoder_layers: Number of decoder layers.
        attention: `"luong"` or `"bahdanau"`.
        attention_score: `"general"` or `"dot"` (Luong only).
        input_feeding: Feed the previous attentional vector to the decoder's first layer.
        dropout: Dropout rate (embeddings, between layers, before the projection).
        residual: Residual connections between equal-width layers.
        pad_id: Padding id of both vocabularies (masked everywhere).
        source_tokenizer, target_tokenizer: Optional `translator.tokenizer.SentencePieceTokenizer`
            layers (the same object for a joint vocabulary). They carry no weights; a model that
            holds them saves their SentencePiece models as assets of its `.keras` file, so
            `translator.Translator.from_model(keras.saving.load_model(path))` needs nothing else.

    Call arguments:
        inputs: dict with `source_ids` int `(batch, S)` and `target_in_ids` int `(batch, T)`.
        training: Whether dropout is active.

    Returns:
        float32 logits `(batch, T, target_vocab_size)`.

    Example:

    >>> import numpy as np, translator
    >>> model = translator.Seq2Seq(50, 60, embedding_dim=8, encoder_units=8, decoder_units=16)
    >>> logits = model({"source_ids": np.array([[5, 6, 3, 0]]), "target_in_ids": np.array([[2, 7]])})
    >>> tuple(logits.shape)
    (1, 2, 60)

    References:
        Bahdanau et al. 2015, arXiv:1409.0473; Luong et al. 2015, arXiv:1508.04025;
        Wu et al. 2016 (GNMT), arXiv:1609.08144.
    """

    def __init__(
        self,
        source_vocab_size,
        target_vocab_size,
        embedding_dim=256,
        share_embeddings=False,
        tie_embeddings=False,
        cell_type="lstm",
        encoder_units=256,
        encoder_layers=1,
        bidirectional="all",
        decoder_units=512,
        decoder_layers=1,
        attention="luong",
        attention_score="general",
        input_feeding=True,
        dropout=0.0,
        residual=True,
        pad_id=PAD_ID,
        source_tokenizer=None,
        target_tokenizer=None,
        **kwargs,
    ):
        if share_embeddings and source_vocab_size != target_vocab_size:
            raise ValueError(
                "share_embeddings needs one joint vocabulary, got source_vocab_size="
                f"{source_vocab_size} and target_vocab_size={target_vocab_size}."
            )
        super().__init__(**kwargs)
        self.source_vocab_size = source_vocab_size
        self.target_vocab_size = target_vocab_size
        self.embedding_dim = embedding_dim
        self.share_embeddings = share_embeddings
        self.tie_embeddings = tie_embeddings
        self.cell_type = cell_type
        self.encoder_units = encoder_units
        self.encoder_layers = encoder_layers
        self.bidirectional = bidirectional
        self.decoder_units = decoder_units
        self.decoder_layers = decoder_layers
        self.attention = attention
        self.attention_score = attention_score
        self.input_feeding = input_feeding
        self.dropout = dropout
        self.residual = residual
        self.pad_id = pad_id
        self.source_tokenizer = _deserialize_layer(source_tokenizer)
        if isinstance(target_tokenizer, str) and target_tokenizer == "source_tokenizer":
            target_tokenizer = self.source_tokenizer  # joint vocabulary: one layer, one asset
        self.target_tokenizer = _deserialize_layer(target_tokenizer)

        self.source_embedding = keras.layers.Embedding(
            source_vocab_size, embedding_dim, name="source_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(dropout)
        self.encoder = Encoder(
            encoder_units,
            num_layers=encoder_layers,
            cell_type=cell_type,
            bidirectional=bidirectional,
            dropout=dropout,
            residual=residual,
            name="encoder",
        )
        self.decoder = AttentionDecoder(
            target_vocab_size,
            embedding_dim,
            decoder_units,
            num_layers=decoder_layers,
            cell_type=cell_type,
            attention=attention,
            attention_score=attention_score,
            input_feeding=input_feeding,
            dropout=dropout,
            residual=residual,
            tie_embeddings=tie_embeddings,
            embedding=self.source_embedding if share_embeddings else None,
            name="decoder",
        )
        self.bridge = DenseBridge(
            decoder_units, decoder_layers, self.decoder.states_per_layer, name="bridge"
        )

    def build(self, input_shape=None):
        batch = None
        self.source_embedding.build((batch, None))
        self.encoder.build((batch, None, self.embedding_dim))
        widths = [self.encoder.output_width(i) for i in range(self.encoder_layers)]
        self.bridge.build([(batch, w) for w in widths])
        self.decoder.build((batch, None, widths[-1]))
        self.built = True

    def encode(self, source_ids, training=False):
        """Runs the encoder once per sentence.

        Args:
            source_ids: int `(batch, S)`, padded with `pad_id`.

        Returns:
            `(constants, state)`: the per-sentence tensors every decoding step reads
            (`memory` `(batch, S, width)`, attention `keys`, boolean `memory_mask` `(batch, S)`)
            and the decoder's initial state.
        """
        source_ids = ops.convert_to_tensor(source_ids, "int32")
        mask = ops.not_equal(source_ids, self.pad_id)
        embedded = self.embedding_dropout(self.source_embedding(source_ids), training=training)
        memory, finals = self.encoder(embedded, mask, training=training)
        constants = self.decoder.prepare_constants(memory, mask)
        state = self.decoder.initial_state(self.bridge(finals), ops.shape(source_ids)[0])
        return constants, state

    def decode_step(self, ids, state, constants):
        """One inference step: `(ids (N,), state, constants) -> (logits (N, V), state, attention (N, S))`.

        This is the step-function contract of `translator.search`, so
        `beam_search(model.decode_step, ...)` decodes the model.
        """
        return self.decoder.decode_step(ops.convert_to_tensor(ids, "int32"), state, constants)

    def copy(self, dtype=None, source_tokenizer=None, target_tokenizer=None):
        """A new model with this architecture and a copy of this model's weights.

        Args:
            dtype: `"float32"` or `"bfloat16"`: the copy is built under the `float32` or
                `mixed_bfloat16` dtype policy (float32 variables either way). Default: this
                model's compute dtype.
            source_tokenizer, target_tokenizer: The copy's tokenizers (default: this model's,
                shared, not copied).
        """
        policies = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
        dtype = dtype or self.decoder.compute_dtype
        if dtype not in policies:
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        if not self.built:
            self.build()
        config = self.get_config()
        if source_tokenizer is None:
            source_tokenizer = self.source_tokenizer
        if target_tokenizer is None:
            target_tokenizer = self.target_tokenizer
        config["source_tokenizer"] = source_tokenizer
        config["target_tokenizer"] = target_tokenizer
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policies[dtype])
        try:
            clone = type(self).from_config(config)
            clone.build()
        finally:
            keras.config.set_dtype_policy(previous)
        clone.set_weights(self.get_weights())
        return clone

    def with_compute_dtype(self, dtype):
        """This model (if it computes in `dtype` already) or a `copy` that computes in `dtype`.

        `dtype` is `"float32"` or `"bfloat16"`. A model trained in float32 decodes in bfloat16
        this way: every step matmul runs on bfloat16 matrix units (AMX) while the cells keep
        their gate equations in float32, 1.6x as fast per beam-search step for the shipped
        model (see `Translator`'s `compute_dtype`).
        """
        if self.compute_dtype == dtype and self.decoder.compute_dtype == dtype:
            return self
        return self.copy(dtype)

    def step_function(self, projection_dtype=None, shared_constants=False, vocabulary=None):
        """`decode_step` with its weights read once, here, instead of at every step.

        Call it where the decoding loop is built, outside the loop:
        `beam_search(model.step_function(), ...)`. Same results as `decode_step`, faster.
        `projection_dtype="bfloat16"` runs the output projection in bfloat16 (see
        `AttentionDecoder.inference_weights`). `shared_constants=True` makes a step function for
        `beam_search(..., tile_constants=False)`: the constants keep one row per sentence,
        shared by its beams, and the attention reads each sentence's memory once per step.

        `vocabulary`, sorted int32 target ids `(K,)` (a `translator.shortlist.Shortlist`'s
        `select`), restricts the step to those pieces: the output projection is gathered to
        their `K` columns once, here, the step's ids and logits index `vocabulary` (position
        `i` is target id `vocabulary[i]`), and the caller maps the chosen positions back with
        `tf.gather(vocabulary, ids)`. The special ids keep their values when `vocabulary`
        starts with them, as `select`'s does.
        """
        weights = self.decoder.inference_weights(projection_dtype)
        if vocabulary is not None:
            vocabulary = ops.convert_to_tensor(vocabulary, "int32")
            weights["output_kernel"] = ops.take(weights["output_kernel"], vocabulary, axis=1)
            weights["output_bias"] = ops.take(weights["output_bias"], vocabulary, axis=0)

        def step_fn(ids, state, constants):
            ids = ops.convert_to_tensor(ids, "int32")
            if vocabulary is not None:
                ids = ops.take(vocabulary, ids, axis=0)
            return self.decoder.decode_step(
                ids, state, constants, weights=weights, grouped=shared_constants
            )

        return step_fn

    def call(self, inputs, training=False, return_attention=False):
        constants, state = self.encode(inputs["source_ids"], training=training)
        target_in_ids = ops.convert_to_tensor(inputs["target_in_ids"], "int32")
        logits, attention = self.decoder(target_in_ids, constants, state, training=training)
        if return_attention:
            return logits, attention
        return logits

    def get_config(self):
        # Not merged with super(): keras.Model's config carries only name/trainable/dtype here,
        # and the architecture below is the whole story.
        config = {"name": self.name}
        config.update({name: getattr(self, name) for name in _ARCHITECTURE})
        if self.source_tokenizer is not None:
            config["source_tokenizer"] = keras.saving.serialize_keras_object(self.source_tokenizer)
        if self.target_tokenizer is not None:
            config["target_tokenizer"] = (
                "source_tokenizer"
                if self.target_tokenizer is self.source_tokenizer
                else keras.saving.serialize_keras_object(self.target_tokenizer)
            )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# The constructor arguments that define the architecture (every one is kept as an attribute
# of the same name): `get_config()` lists them from the signature, so a new argument cannot be
# forgotten there.
_ARCHITECTURE = tuple(
    name
    for name, parameter in inspect.signature(Seq2Seq.__init__).parameters.items()
    if name not in ("self", "source_tokenizer", "target_tokenizer")
    and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
)


def _deserialize_layer(layer):
    if layer is None or isinstance(layer, keras.layers.Layer):
        return layer
    return keras.saving.deserialize_keras_object(layer)
