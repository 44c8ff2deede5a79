"""SentencePiece subwords: the special ids, deterministic training, and an in-graph Keras layer."""

import hashlib
import io
import os
import random
import warnings

import keras
import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

from translator.files import atomic_write

# The model side (embeddings, loss masking, decoding) relies on these four ids; every
# SentencePiece model we train reserves them, and `SentencePieceTokenizer` refuses a model
# that does not.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
PAD_PIECE = "<pad>"
UNK_PIECE = "<unk>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"

# File name of the SentencePiece model inside a `.keras` archive's assets.
PROTO_FILENAME = "sentencepiece.model"


def sentencepiece_files(directory):
    """The SentencePiece model files beside a model in `directory`: `(source, target)` paths,
    the same file twice for a joint `spm.model`, or `None` when there are none. The one lookup
    of a run or export directory's tokenizer files (`translator.load`, the server's costs)."""
    from pathlib import Path

    directory = Path(directory)
    if (directory / "spm.model").is_file():
        return directory / "spm.model", directory / "spm.model"
    source, target = directory / "spm.source.model", directory / "spm.target.model"
    if source.is_file() and target.is_file():
        return source, target
    return None


def train_sentencepiece(
    texts,
    model_path,
    vocab_size=8000,
    model_type="unigram",
    character_coverage=1.0,
    input_sentence_size=1_000_000,
    seed=0,
    num_threads=2,
):
    """Trains a SentencePiece model on `texts` and writes it to `model_path`.

    Training is deterministic: the sentences are sorted, then sampled (when there are more
    than `input_sentence_size`) and shuffled in Python with a seeded RNG, SentencePiece's own
    sampling and shuffling are turned off and its RNG is seeded, so the same texts and
    arguments give byte-identical models. The file is written atomically (a temporary file
    in the same folder, then a rename), so a reader never sees half a model.

    For a joint vocabulary pass both languages' sentences; for separate vocabularies call
    this once per language.

    The model reserves `PAD_ID=0` (`<pad>`), `UNK_ID=1` (`<unk>`), `BOS_ID=2` (`<s>`) and
    `EOS_ID=3` (`</s>`). Text is NFKC-normalized (French « » ’ œ are kept as they are; a
    no-break space U+00A0/U+202F becomes a plain space). With `character_coverage=1.0`
    every character of the training text gets a piece; characters never seen map to
    `UNK_ID`.

    `vocab_size` is a soft limit (`hard_vocab_limit=False`): a corpus too small to fill the
    vocabulary gives a smaller one, so read the real size from
    `SentencePieceTokenizer.vocabulary_size()`. It must still exceed the number of
    distinct characters plus the four special pieces.

    Args:
        texts: iterable of sentences (str). Empty and whitespace-only ones are skipped.
        model_path: where to write the `.model` file; parent folders are created.
        vocab_size: int, the target vocabulary size including the special pieces.
        model_type: `"unigram"` (Kudo, 2018) or `"bpe"` (Sennrich et al., 2016).
        character_coverage: float, fraction of characters covered by the vocabulary;
            the rarest characters beyond it map to `UNK_ID`.
        input_sentence_size: int, the most sentences to train on; a seeded random
            sample of that size is taken from larger inputs.
        seed: int, seeds the sample, the shuffle and SentencePiece's RNG.
        num_threads: int, SentencePiece trainer threads. It is recorded in the model's
            trainer spec, so keep it fixed for byte-identical models across machines.

    Returns:
        `model_path`, as a string.

    Example:

    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = train_sentencepiece(
    ...     ["A man rides a bike.", "Un homme fait du vélo."] * 10,
    ...     os.path.join(folder.name, "sp.model"),
    ...     vocab_size=60,
    ... )
    >>> SentencePieceTokenizer(model_path=path).vocabulary_size() <= 60
    True
    >>> folder.cleanup()

    References:
        - [Kudo and Richardson, 2018](https://arxiv.org/abs/1808.06226)
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"`model_type` must be 'unigram' or 'bpe'. Received: {model_type!r}")
    sentences = [text for text in texts if text and not text.isspace()]
    if not sentences:
        raise ValueError("Cannot train a SentencePiece model on no text: `texts` is empty.")
    # Sorting first makes the model a function of the set of sentences, not of their order.
    sentences.sort()
    rng = random.Random(seed)
    if len(sentences) > input_sentence_size:
        sentences = rng.sample(sentences, input_sentence_size)
    else:
        rng.shuffle(sentences)

    model_path = os.fspath(model_path)
    buffer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            hard_vocab_limit=False,
            # We sampled and shuffled above, with our seed.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=PAD_PIECE,
            unk_piece=UNK_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            byte_fallback=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size} on "
            f"{len(sentences)} sentences: {error}"
        ) from error

    atomic_write(model_path, buffer.getvalue())
    return model_path


def add_specials(ids, add_bos=False, add_eos=False):
    """Puts `BOS_ID` before and/or `EOS_ID` after every row of ragged ids `[batch, (tokens)]`.

    The one place where the special ids are attached: the tokenizer, the training pipeline
    (source + EOS, BOS + target, target + EOS) and the translation graph all call it.

    Example:

    >>> ids = tf.ragged.constant([[7, 8], [9]], dtype=tf.int32)
    >>> add_specials(ids, add_eos=True).to_list()
    [[7, 8, 3], [9, 3]]
    """
    if not (add_bos or add_eos):
        return ids
    column = tf.fill(tf.stack([ids.nrows(), 1]), tf.constant(0, ids.dtype))
    pieces = [ids]
    if add_bos:
        pieces.insert(0, tf.RaggedTensor.from_tensor(column + BOS_ID))
    if add_eos:
        pieces.append(tf.RaggedTensor.from_tensor(column + EOS_ID))
    return tf.concat(pieces, axis=1)


def _read_proto(model_path):
    with open(model_path, "rb") as file:
        return file.read()


@keras.saving.register_keras_serializable(package="translator")
class SentencePieceTokenizer(keras.layers.Layer):
    """A SentencePiece tokenizer that runs inside the TensorFlow graph.

    Wraps `tensorflow_text.SentencepieceTokenizer` built from the serialized model bytes,
    so the model is embedded in every `tf.function`, `tf.data` pipeline and SavedModel
    that uses the layer: a reloaded SavedModel needs only `import tensorflow_text`. In a
    `.keras` file the model travels as an asset (`save_assets` / `load_assets`), not in
    `get_config()`.

    The model must reserve `PAD_ID`, `UNK_ID`, `BOS_ID` and `EOS_ID` (as every model from
    `train_sentencepiece` does); any other layout is rejected.

    Args:
        proto: bytes, a serialized SentencePiece model (the content of a `.model` file).
        model_path: str, path of a `.model` file; give this or `proto`. Both may be left
            out only when the model comes later from `load_assets` (`.keras` loading).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, ...).

    Call arguments:
        strings: tf.string tensor of shape `[batch]` (or a scalar).

    Returns:
        `tf.RaggedTensor` of int32 ids, shape `[batch, (tokens)]` (or `[tokens]` for a
        scalar), without BOS or EOS.

    Example:

    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = train_sentencepiece(
    ...     ["A man rides a bike.", "Un homme fait du vélo."] * 10,
    ...     os.path.join(folder.name, "sp.model"),
    ...     vocab_size=60,
    ... )
    >>> tokenizer = SentencePieceTokenizer(model_path=path)
    >>> folder.cleanup()
    >>> ids = tokenizer.tokenize(["Un homme fait du vélo."], add_eos=True)
    >>> int(ids[0, -1]) == EOS_ID
    True
    >>> tokenizer.detokenize(ids).numpy()[0].decode()
    'Un homme fait du vélo.'

    References:
        - [Kudo and Richardson, 2018](https://arxiv.org/abs/1808.06226)
    """

    def __init__(self, proto=None, model_path=None, **kwargs):
        super().__init__(trainable=kwargs.pop("trainable", False), **kwargs)
        if proto is not None and model_path is not None:
            raise ValueError("Pass either `proto` or `model_path`, not both.")
        if model_path is not None:
            proto = _read_proto(model_path)
        self._proto = None
        self._sentencepiece = None
        self._vocabulary = None
        if proto is not None:
            self._set_proto(proto)
        # No weights to create.
        self.built = True

    def _set_proto(self, proto):
        if not isinstance(proto, bytes):
            raise TypeError(
                f"`proto` must be the bytes of a SentencePiece model. Received: {type(proto)}"
            )
        # The Python processor answers metadata questions (sizes, pieces) without running
        # TF ops, so they work in any context (eager, graph, tf.data).
        processor = spm.SentencePieceProcessor(model_proto=proto)
        special = {
            "pad_id": (processor.pad_id(), PAD_ID),
            "unk_id": (processor.unk_id(), UNK_ID),
            "bos_id": (processor.bos_id(), BOS_ID),
            "eos_id": (processor.eos_id(), EOS_ID),
        }
        wrong = {name: got for name, (got, want) in special.items() if got != want}
        if wrong:
            raise ValueError(
                f"This SentencePiece model has {wrong}; translator needs pad_id={PAD_ID}, "
                f"unk_id={UNK_ID}, bos_id={BOS_ID}, eos_id={EOS_ID}. "
                "Train it with `translator.tokenizer.train_sentencepiece`."
            )
        self._proto = proto
        self._vocabulary = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
        # Built from the bytes (not a path): the model becomes an attribute of the op that
        # creates the TF resource, hence part of every exported graph. The op's resource is
        # shared by node name, and a reloaded SavedModel creates every tokenizer's under the
        # same default name: without a name of its own per model, the source and target
        # tokenizers of separate vocabularies became one (the first created) after export.
        name = f"sentencepiece_{hashlib.sha256(proto).hexdigest()[:16]}"
        self._sentencepiece = tf_text.SentencepieceTokenizer(
            model=proto, out_type=tf.int32, name=name
        )

    def _check_proto(self):
        if self._proto is None:
            raise ValueError(
                "This SentencePieceTokenizer has no model yet: pass `proto` or `model_path`."
            )

    @property
    def proto(self):
        """The serialized SentencePiece model (bytes)."""
        return self._proto

    @property
    def sentencepiece(self):
        """The `tensorflow_text.SentencepieceTokenizer` behind the layer (its TF resource is
        what a SavedModel must track to carry the model)."""
        self._check_proto()
        return self._sentencepiece

    def vocabulary_size(self):
        """Returns the number of pieces, special ones included (a Python int)."""
        self._check_proto()
        return len(self._vocabulary)

    def get_vocabulary(self):
        """Returns the list of pieces, indexed by id."""
        self._check_proto()
        return list(self._vocabulary)

    def call(self, strings):
        return self.tokenize(strings)

    def tokenize(self, strings, add_bos=False, add_eos=False):
        """Converts strings to ids.

        Args:
            strings: tf.string tensor `[batch]`, a scalar, or Python strings.
            add_bos: bool, prepend `BOS_ID` to every sequence.
            add_eos: bool, append `EOS_ID` to every sequence.

        Returns:
            int32 `tf.RaggedTensor` `[batch, (tokens)]`, or a dense `[tokens]` vector for a
            scalar input.
        """
        self._check_proto()
        strings = tf.convert_to_tensor(strings, dtype=tf.string)
        scalar = strings.shape.rank == 0
        if scalar:
            strings = strings[tf.newaxis]
        ids = add_specials(self._sentencepiece.tokenize(strings), add_bos, add_eos)  # [B, (T)]
        if scalar:
            return ids[0]
        return ids

    def detokenize(self, ids):
        """Converts ids back to text.

        Everything from the first `EOS_ID` on is cut, and `PAD_ID` and `BOS_ID` are
        dropped, so decoder outputs (padded, or running past EOS) can be passed as they are.
        Unknown pieces come back as " ⁇ ".

        Args:
            ids: integer ids, dense `[batch, T]` (padded with `PAD_ID`), ragged
                `[batch, (T)]`, a single sequence `[T]`, or dense `[..., T]` (e.g.
                `[batch, beam, T]`).

        Returns:
            tf.string tensor of the leading shape: `[batch]`, a scalar for a single
            sequence, `[batch, beam]` for `[batch, beam, T]`.
        """
        self._check_proto()
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
        ids = tf.cast(ids, tf.int32)
        if not isinstance(ids, tf.RaggedTensor) and ids.shape.rank > 2:
            # e.g. beam search output [batch, beam, T] -> [batch * beam, T] -> [batch, beam].
            flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
            return tf.reshape(self.detokenize(flat), tf.shape(ids)[:-1])
        single = ids.shape.rank == 1
        if single:
            ids = ids[tf.newaxis]
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        # Positions at or after the first EOS of each row have a non-zero running count.
        after_eos = tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), axis=1) > 0
        keep = tf.logical_not(after_eos) & tf.not_equal(ids, PAD_ID) & tf.not_equal(ids, BOS_ID)
        text = self._sentencepiece.detokenize(tf.ragged.boolean_mask(ids, keep))
        if single:
            return text[0]
        return text

    def id_to_token(self, ids):
        """Maps ids to their subword pieces (for labelling attention plots).

        Args:
            ids: integer tensor of any shape, dense or ragged.

        Returns:
            tf.string tensor of the same shape, e.g. `"▁homme"`.
        """
        self._check_proto()
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
        return self._sentencepiece.id_to_string(tf.cast(ids, tf.int32))

    def compute_output_spec(self, strings):
        shape = tuple(strings.shape) + (None,)
        return keras.KerasTensor(shape, dtype="int32", ragged=True)

    def get_config(self):
        # Deliberately without `proto` / `model_path`: the model travels as an asset of the
        # `.keras` file (`save_assets`), and a path in the config would make loading read a
        # file outside the archive.
        return super().get_config()

    @classmethod
    def from_config(cls, config):
        """The layer of a config, without its model: that comes from the `.keras` file's asset.

        `get_config()` never writes `proto` or `model_path`, so a config that holds one was
        made by hand: a `.keras` archive must not make its loader read a path of the
        loading machine (a FIFO hangs the load, `/dev/zero` exhausts memory). In Keras' safe
        mode (`keras.saving.load_model`'s default) such a config is refused; with
        `safe_mode=False` the entries are ignored, with a warning, and the model is the
        archive's own asset all the same.
        """
        from keras.src.saving.serialization_lib import in_safe_mode

        config = dict(config)
        named = {key: config.pop(key) for key in ("model_path", "proto") if key in config}
        if named:
            shown = ", ".join(
                f"{key}={value!r}" if key == "model_path" else f"{key}=<{type(value).__name__}>"
                for key, value in named.items()
            )
            if in_safe_mode() is not False:
                raise ValueError(
                    f"SentencePieceTokenizer config {config.get('name')!r} names its model "
                    f"({shown}): a .keras file carries the SentencePiece model as an asset, and "
                    "its config may not point at a file. Refused in safe_mode; the file may "
                    "have been crafted (load it with safe_mode=False only if you trust it: the "
                    "entry is then ignored)."
                )
            warnings.warn(
                f"SentencePieceTokenizer config {config.get('name')!r}: ignoring {shown}; the "
                "model is read from the .keras file's asset",
                stacklevel=2,
            )
        return cls(**config)

    def save_assets(self, dir_path):
        self._check_proto()
        with open(os.path.join(dir_path, PROTO_FILENAME), "wb") as file:
            file.write(self._proto)

    def load_assets(self, dir_path):
        self._set_proto(_read_proto(os.path.join(dir_path, PROTO_FILENAME)))


def load_tokenizers(directory):
    """`(source, target)` `SentencePieceTokenizer`s of the model files in `directory` (one
    object twice for a joint `spm.model`; see `sentencepiece_files`), or `None` when there are
    none."""
    files = sentencepiece_files(directory)
    if files is None:
        return None
    source = SentencePieceTokenizer(model_path=str(files[0]))
    target = source if files[0] == files[1] else SentencePieceTokenizer(model_path=str(files[1]))
    return source, target
