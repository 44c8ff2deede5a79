"""Tests for translator.tokenizer: training, the in-graph layer, and its saving paths."""

import os

import keras
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from translator.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceTokenizer,
    train_sentencepiece,
)

FRENCH = [
    "Un garçon à l’école lit « Le Petit Prince ».",
    "L'élève écrit une lettre à sa sœur.",
    "Le cœur de l’œuvre est très émouvant, dit-il.",
    "Ça, c'est la fenêtre près de l'église où l’on prie.",
    "Noël approche : les enfants décorent le sapin.",
    "Où est le maître ? Il s’est arrêté là-bas.",
]
ENGLISH = [
    "A boy at school reads « The Little Prince ».",
    "The student writes a letter to his sister.",
    "The heart of the work is very moving, he says.",
    "That's the window near the church where people pray.",
    "Christmas is coming: the children decorate the tree.",
    "Where is the teacher? He stopped over there.",
]
TEXTS = (FRENCH + ENGLISH) * 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "joint.model"
    return train_sentencepiece(TEXTS, path, vocab_size=150)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return SentencePieceTokenizer(model_path=model_path)


def _decode(strings):
    return [s.decode("utf-8") for s in np.asarray(strings).tolist()]


def test_round_trip_accented_french(tokenizer):
    ids = tokenizer(tf.constant(FRENCH))
    assert isinstance(ids, tf.RaggedTensor)
    assert ids.dtype == tf.int32
    assert _decode(tokenizer.detokenize(ids)) == FRENCH


def test_round_trip_keeps_french_punctuation_and_ligatures(tokenizer):
    text = "« L’œuvre d'un élève » : ça va ?"
    assert all(character in text for character in "«»’'œçéè")
    assert _decode(tokenizer.detokenize(tokenizer.tokenize([text])))[0] == text


def test_nfkc_turns_no_break_spaces_into_spaces(tokenizer):
    # Tatoeba writes "Cours !" with a narrow no-break space (U+202F) before "!".
    ids = tokenizer.tokenize(["Où est-il\u202f? Là\u00a0: près de l'église."])
    assert _decode(tokenizer.detokenize(ids)) == ["Où est-il ? Là : près de l'église."]


def test_ids_equal_sentencepiece_processor(tokenizer, model_path):
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    expected = processor.encode(FRENCH + ENGLISH)
    assert tokenizer.tokenize(FRENCH + ENGLISH).to_list() == expected
    assert tokenizer.vocabulary_size() == processor.vocab_size()


def test_special_ids_are_reserved(tokenizer):
    vocabulary = tokenizer.get_vocabulary()
    assert vocabulary[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_unseen_characters_map_to_unk(tokenizer):
    ids = tokenizer.tokenize(["Жё", "école 水"]).to_list()
    assert UNK_ID in ids[0]
    assert UNK_ID in ids[1]
    assert UNK_ID not in tokenizer.tokenize(FRENCH).flat_values.numpy()


def test_tokenize_adds_bos_and_eos(tokenizer):
    plain = tokenizer.tokenize(FRENCH[:2]).to_list()
    both = tokenizer.tokenize(FRENCH[:2], add_bos=True, add_eos=True).to_list()
    assert both == [[BOS_ID] + row + [EOS_ID] for row in plain]
    scalar = tokenizer.tokenize(FRENCH[0], add_eos=True)
    assert scalar.numpy().tolist() == plain[0] + [EOS_ID]


def test_detokenize_cuts_at_eos_and_ignores_padding(tokenizer):
    a, b = tokenizer.tokenize(FRENCH[:2]).to_list()
    garbage = b[:3]
    width = 2 + max(len(a), len(b)) + len(garbage) + 2
    rows = [
        [BOS_ID] + a + [EOS_ID] + garbage,  # decoding went on after EOS
        [BOS_ID] + b + [EOS_ID],
        [BOS_ID] + b,  # no EOS at all
    ]
    dense = np.array([row + [PAD_ID] * (width - len(row)) for row in rows], np.int32)
    expected = [FRENCH[0], FRENCH[1], FRENCH[1]]
    assert _decode(tokenizer.detokenize(dense)) == expected
    assert _decode(tokenizer.detokenize(tf.ragged.constant(rows))) == expected
    single = tokenizer.detokenize(tf.constant(dense[0]))
    assert single.shape == () and single.numpy().decode() == FRENCH[0]
    beams = tokenizer.detokenize(np.stack([dense, dense[::-1]], axis=1))  # [3, 2, T]
    assert beams.shape == (3, 2)
    assert [_decode(row) for row in beams.numpy()] == [
        [FRENCH[0], FRENCH[1]],
        [FRENCH[1], FRENCH[1]],
        [FRENCH[1], FRENCH[0]],
    ]


def test_id_to_token_gives_pieces(tokenizer, model_path):
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = tokenizer.tokenize(FRENCH[:2])
    pieces = tokenizer.id_to_token(ids).to_list()
    assert [[p.decode() for p in row] for row in pieces] == processor.encode(
        FRENCH[:2], out_type=str
    )
    assert tokenizer.id_to_token([EOS_ID, PAD_ID]).numpy().tolist() == [b"</s>", b"<pad>"]


def test_works_in_tf_data_and_tf_function(tokenizer):
    expected = tokenizer.tokenize(FRENCH).to_list()
    dataset = tf.data.Dataset.from_tensor_slices(FRENCH).map(tokenizer)
    assert [row.tolist() for row in dataset.as_numpy_iterator()] == expected

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def round_trip(strings):
        return tokenizer.detokenize(tokenizer.tokenize(strings, add_bos=True, add_eos=True))

    assert _decode(round_trip(tf.constant(FRENCH))) == FRENCH


def test_keras_save_and_load_keeps_tokenizer(tokenizer, model_path, tmp_path):
    # Built from bytes, so nothing but the .keras file can carry the model to the reload.
    proto = tokenizer.proto
    strings = keras.Input(shape=(), dtype="string")
    model = keras.Model(strings, SentencePieceTokenizer(proto=proto, name="tokenizer")(strings))
    expected = model(tf.constant(FRENCH)).to_list()
    assert "proto" not in model.get_layer("tokenizer").get_config()

    path = tmp_path / "tokenizer.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    layer = restored.get_layer("tokenizer")
    assert isinstance(layer, SentencePieceTokenizer)
    assert layer.proto == proto
    assert restored(tf.constant(FRENCH)).to_list() == expected


def test_saved_model_reloads_with_only_tensorflow_text(model_path, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(open(model_path, "rb").read())

    class RoundTrip(tf.Module):
        def __init__(self, tokenizer):
            super().__init__()
            self.tokenizer = tokenizer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, strings):
            ids = self.tokenizer.tokenize(strings, add_eos=True).to_tensor(PAD_ID)
            return {"ids": ids, "text": self.tokenizer.detokenize(ids)}

    module = RoundTrip(SentencePieceTokenizer(model_path=copy))
    expected = module(tf.constant(FRENCH))
    tf.saved_model.save(module, str(tmp_path / "saved"))
    # Nothing of the original remains: the proto must be inside the SavedModel graph.
    del module
    os.remove(copy)

    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    got = reloaded(tf.constant(FRENCH))
    np.testing.assert_array_equal(got["ids"], expected["ids"])
    assert _decode(got["text"]) == FRENCH


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic(model_type, tmp_path):
    first = train_sentencepiece(TEXTS, tmp_path / "a.model", vocab_size=120, model_type=model_type)
    second = train_sentencepiece(
        list(reversed(TEXTS)), tmp_path / "b.model", vocab_size=120, model_type=model_type
    )
    assert open(first, "rb").read() == open(second, "rb").read()
    # Only the two models: no temporary file left behind.
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]


def test_training_samples_with_the_seed(tmp_path):
    kwargs = dict(vocab_size=100, input_sentence_size=20)
    a = train_sentencepiece(TEXTS, tmp_path / "a.model", seed=1, **kwargs)
    b = train_sentencepiece(TEXTS, tmp_path / "b.model", seed=1, **kwargs)
    assert open(a, "rb").read() == open(b, "rb").read()
    # Another seed samples other sentences: another model (so the seed is really used).
    c = train_sentencepiece(TEXTS, tmp_path / "c.model", seed=2, **kwargs)
    assert open(a, "rb").read() != open(c, "rb").read()


def test_training_overwrites_atomically(tmp_path):
    path = tmp_path / "sp.model"
    path.write_bytes(b"old")
    train_sentencepiece(TEXTS, path, vocab_size=100)
    assert SentencePieceTokenizer(model_path=path).vocabulary_size() <= 100
    assert os.listdir(tmp_path) == ["sp.model"]


def test_training_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_sentencepiece(TEXTS, tmp_path / "sp.model", vocab_size=10)
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["", "  "], tmp_path / "sp.model")
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(TEXTS, tmp_path / "sp.model", model_type="char")
    assert not os.listdir(tmp_path)


def test_rejects_model_with_other_special_ids(tmp_path):
    # SentencePiece's defaults: no <pad>, <unk>=0, <s>=1, </s>=2.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_prefix=str(tmp_path / "default"),
        vocab_size=100,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="pad_id=0, unk_id=1, bos_id=2, eos_id=3"):
        SentencePieceTokenizer(model_path=tmp_path / "default.model")


def test_without_model_raises_clear_error():
    layer = SentencePieceTokenizer()
    with pytest.raises(ValueError, match="no model yet"):
        layer.tokenize(["bonjour"])


def _archive_naming_a_path(tokenizer, tmp_path, named):
    """A `.keras` file of a model holding `tokenizer`, its config edited to name `named` as
    the tokenizer's `model_path` (what a crafted archive can do)."""
    import json
    import zipfile

    strings = keras.Input(shape=(), dtype="string")
    layer = SentencePieceTokenizer(proto=tokenizer.proto, name="tokenizer")
    honest = tmp_path / "honest.keras"
    keras.Model(strings, layer(strings)).save(honest)
    crafted = tmp_path / "crafted.keras"
    edited = 0
    with zipfile.ZipFile(honest) as source, zipfile.ZipFile(crafted, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                for entry in config["config"]["layers"]:
                    if entry["class_name"] == "SentencePieceTokenizer":
                        entry["config"]["model_path"] = str(named)
                        edited += 1
                data = json.dumps(config).encode()
            target.writestr(item, data)
    assert edited == 1
    return crafted


def test_keras_archive_never_reads_a_model_path_from_its_config(tokenizer, tmp_path):
    # A regular file outside the archive, which is no SentencePiece model: reading it, the
    # loader would fail to parse it (or, were it one, tokenize with another vocabulary).
    marker = tmp_path / "outside.model"
    marker.write_bytes(b"MARKER: a file outside the archive, never to be read")
    crafted = _archive_naming_a_path(tokenizer, tmp_path, marker)

    with pytest.raises(ValueError, match=r"model_path.*outside\.model.*safe_mode"):
        keras.saving.load_model(crafted)  # safe mode, Keras' default
    # Trusted (safe_mode=False): the path is ignored, the archive's own asset is the model.
    restored = keras.saving.load_model(crafted, safe_mode=False)
    assert restored.get_layer("tokenizer").proto == tokenizer.proto


def test_keras_archive_naming_a_fifo_does_not_hang(tokenizer, tmp_path):
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    crafted = _archive_naming_a_path(tokenizer, tmp_path, fifo)
    outcome = {}

    def load():
        try:
            outcome["model"] = keras.saving.load_model(crafted)
        except Exception as e:  # noqa: BLE001 - the outcome is checked below
            outcome["error"] = e

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        # Opened by the loader for reading: a writer that closes at once gives it EOF, so the
        # thread ends instead of hanging the test session.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=60)
        pytest.fail("loading the archive opened the FIFO its config names")
    assert isinstance(outcome.get("error"), ValueError), outcome
    assert "model_path" in str(outcome["error"])
