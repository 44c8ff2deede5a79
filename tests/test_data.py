"""Tests for translator.data: corpus loaders, bad-data errors, and the tf.data pipeline."""

import collections
import gzip
import logging
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from translator import corpora, data
from translator.corpora import DataError, load_pairs, load_references, tatoeba_split
from translator.data import make_dataset
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SentencePieceTokenizer, train_sentencepiece

SUBJECTS = [
    ("A man", "Un homme"),
    ("A woman", "Une femme"),
    ("Two children", "Deux enfants"),
    ("An old dog", "Un vieux chien"),
    ("The young girl in a red coat", "La jeune fille au manteau rouge"),
]
VERBS = [
    ("is walking", "marche"),
    ("is sleeping", "dort"),
    ("is eating an apple", "mange une pomme"),
    ("is playing with a ball", "joue avec un ballon"),
]
PLACES = [
    ("in the park.", "dans le parc."),
    ("near the church.", "près de l'église."),
    ("on the beach.", "sur la plage."),
    ("under a tree, next to the lake.", "sous un arbre, à côté du lac."),
]
PAIRS = [
    (f"{se} {ve} {pe}", f"{sf} {vf} {pf}")
    for se, sf in SUBJECTS
    for ve, vf in VERBS
    for pe, pf in PLACES
]  # 80 pairs
MULTI30K_SIZES = {"train": 60, "val": 12, "test_2016_flickr": 8}


def _write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in lines))


def _write_multi30k(folder):
    start = 0
    for split, size in MULTI30K_SIZES.items():
        pairs = PAIRS[start : start + size]
        start += size
        _write_gz(folder / "multi30k" / f"{split}.en.gz", [en for en, _ in pairs])
        _write_gz(folder / "multi30k" / f"{split}.fr.gz", [fr for _, fr in pairs])


def _duplicated_english():
    # An English sentence that lands in "test", so its two translations are checked there.
    return next(
        english
        for english in (f"Go away, number {i}!" for i in range(1000))
        if tatoeba_split(english) == "test"
    )


def _tatoeba_lines():
    lines = []
    for i in range(600):
        english, french = f"I have {i} books.", f"J'ai {i} livres."
        # Two- and three-column lines, as in the two published formats.
        lines.append(f"{english}\t{french}" if i % 2 else f"{english}\t{french}\tCC-BY 2.0 #{i}")
    duplicated = _duplicated_english()
    lines.insert(10, f"{duplicated}\tVa-t'en, numéro un\u202f!\tCC-BY 2.0 (France)")
    lines.insert(300, f"{duplicated}\tAllez-vous-en, numéro un !")
    return lines


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    _write_multi30k(folder)
    (folder / "tatoeba").mkdir()
    (folder / "tatoeba" / "fra-eng.tsv").write_text("\n".join(_tatoeba_lines()) + "\n", "utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [sentence for pair in PAIRS for sentence in pair]
    path = tmp_path_factory.mktemp("spm") / "joint.model"
    # BPE gives this tiny corpus a larger vocabulary (shorter sequences) than unigram would.
    path = train_sentencepiece(texts, path, vocab_size=200, model_type="bpe")
    return SentencePieceTokenizer(model_path=path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Points every download at a missing local file, so no test can reach the network."""
    monkeypatch.setattr(corpora, "MULTI30K_URL", "file:///nonexistent/translator-tests/multi30k")
    monkeypatch.setattr(corpora, "TATOEBA_URL", "file:///nonexistent/translator-tests/fra-eng.zip")


def _log_lines(caplog, logger="translator.data"):
    return [record for record in caplog.records if record.name == logger]


# --------------------------------------------------------------------------------------------
# Multi30k.


@pytest.mark.parametrize(
    "split, size",
    [
        ("train", 60),
        ("val", 12),
        ("validation", 12),
        ("test_2016_flickr", 8),
        ("test", 8),
    ],
)
def test_multi30k_split_sizes(data_dir, split, size):
    pairs = load_pairs("multi30k", split, data_dir=data_dir)
    assert len(pairs) == size
    assert all(isinstance(en, str) and isinstance(fr, str) for en, fr in pairs)


def test_multi30k_pairs_stay_aligned(data_dir):
    assert load_pairs("multi30k", "train", data_dir=data_dir) == PAIRS[:60]
    references = load_references("multi30k", "test", data_dir=data_dir)
    assert references == [(en, [fr]) for en, fr in PAIRS[72:]]


def test_data_dir_defaults_to_environment_variable(data_dir, monkeypatch):
    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(data_dir))
    assert len(load_pairs("multi30k", "val")) == 12


def test_multi30k_downloads_from_url(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    _write_multi30k(remote)
    monkeypatch.setattr(corpora, "MULTI30K_URL", (remote / "multi30k").as_uri())
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    cache = tmp_path / "keras-cache"
    pairs = load_pairs("multi30k", "test", data_dir=tmp_path / "empty", cache_dir=str(cache))
    assert pairs == PAIRS[72:]
    assert (cache / "datasets" / "multi30k" / "test_2016_flickr.fr.gz").is_file()


def test_missing_corpus_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError) as error:
        load_pairs("multi30k", "train", data_dir=tmp_path / "mine", cache_dir=str(tmp_path))
    message = str(error.value)
    assert os.path.join(str(tmp_path / "mine"), "multi30k") in message
    assert "train.en.gz" in message and "train.fr.gz" in message
    assert "TRANSLATOR_DATA_DIR" in message and "data_dir" in message
    assert "download" in message and corpora.MULTI30K_URL in message
    assert error.value.__suppress_context__  # the message, not a urllib traceback

    with pytest.raises(DataError, match="TRANSLATOR_DATA_DIR is not set") as error:
        load_pairs("tatoeba", "train", cache_dir=str(tmp_path))
    assert "fra-eng.tsv" in str(error.value)


# --------------------------------------------------------------------------------------------
# Tatoeba.


def test_tatoeba_reads_two_and_three_columns(data_dir):
    pairs = [
        pair
        for split in ("train", "validation", "test")
        for pair in load_pairs("tatoeba", split, data_dir)
    ]
    assert len(pairs) == 602
    assert ("I have 0 books.", "J'ai 0 livres.") in pairs  # 3 columns
    assert ("I have 1 books.", "J'ai 1 livres.") in pairs  # 2 columns
    assert not any("CC-BY" in fr for _, fr in pairs)


def test_tatoeba_splits_are_disjoint_by_english_sentence(data_dir):
    splits = {
        split: load_pairs("tatoeba", split, data_dir) for split in ("train", "validation", "test")
    }
    english = {split: {en for en, _ in pairs} for split, pairs in splits.items()}
    assert not english["train"] & english["validation"]
    assert not english["train"] & english["test"]
    assert not english["validation"] & english["test"]
    # 601 English sentences, ~2% each held out; "test" has both translations of one.
    sizes = {split: len(pairs) for split, pairs in splits.items()}
    assert sizes == {"train": 584, "validation": 6, "test": 12}
    expected = collections.Counter(tatoeba_split(line.split("\t")[0]) for line in _tatoeba_lines())
    assert sizes == dict(expected)
    assert load_pairs("tatoeba", "val", data_dir) == splits["validation"]


def test_tatoeba_translations_of_one_sentence_share_a_split(data_dir):
    duplicated = _duplicated_english()
    test = load_pairs("tatoeba", "test", data_dir)
    assert [fr for en, fr in test if en == duplicated] == [
        "Va-t'en, numéro un\u202f!",
        "Allez-vous-en, numéro un !",
    ]
    references = dict(load_references("tatoeba", "test", data_dir))
    assert references[duplicated] == ["Va-t'en, numéro un\u202f!", "Allez-vous-en, numéro un !"]
    assert len(references) == len(test) - 1


def test_tatoeba_split_ignores_case_and_spacing():
    assert tatoeba_split("Go away.") == tatoeba_split("  go  AWAY. ")
    assert {tatoeba_split(f"Sentence {i}.") for i in range(500)} == {"train", "validation", "test"}


def test_tatoeba_downloads_zip(tmp_path, monkeypatch):
    archive = tmp_path / "fra-eng.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("_about.txt", "about")
        zf.writestr("fra.txt", "\n".join(_tatoeba_lines()) + "\n")
    monkeypatch.setattr(corpora, "TATOEBA_URL", archive.as_uri())
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    pairs = load_pairs("tatoeba", "train", cache_dir=str(tmp_path / "cache"))
    assert len(pairs) > 500


def test_tsv_line_without_tab_is_an_error(tmp_path):
    (tmp_path / "tatoeba").mkdir()
    (tmp_path / "tatoeba" / "fra-eng.tsv").write_text("Hi.\tSalut.\nno tab here\n", "utf-8")
    with pytest.raises(DataError, match=r"fra-eng.tsv, line 2: expected English<TAB>French"):
        load_pairs("tatoeba", "train", tmp_path)


# --------------------------------------------------------------------------------------------
# Other corpora and names.


def test_unknown_corpus_lists_choices():
    with pytest.raises(DataError, match="Unknown corpus 'multi30'. Did you mean 'multi30k'"):
        load_pairs("multi30", "train")
    with pytest.raises(DataError) as error:
        load_pairs("europarl", "train")
    for choice in ("multi30k", "tatoeba", "tfds:", "files:", "folder:"):
        assert choice in str(error.value)


def test_unknown_split_lists_choices(data_dir):
    with pytest.raises(DataError, match="Unknown split 'dev'.*train, val, validation"):
        load_pairs("multi30k", "dev", data_dir)
    with pytest.raises(DataError, match="Unknown split 'test_2017'.*validation"):
        load_pairs("tatoeba", "test_2017", data_dir)


def test_files_corpus_replaces_split(data_dir):
    corpus = f"files:{data_dir}/multi30k/{{split}}.en.gz,{data_dir}/multi30k/{{split}}.fr.gz"
    assert load_pairs(corpus, "val") == PAIRS[60:72]
    with pytest.raises(DataError, match="two paths"):
        load_pairs("files:only-one.txt", "train")


def test_load_mixture_repeats_by_weight(data_dir):
    mixture = corpora.load_mixture(
        [("multi30k", 2.0), ("files:" + _plain_files(data_dir), 0.5)], "train", data_dir
    )
    assert len(mixture) == 2 * 60 + 6
    assert mixture[:120] == PAIRS[:60] * 2
    again = corpora.load_mixture(
        [("multi30k", 2.0), ("files:" + _plain_files(data_dir), 0.5)], "train", data_dir
    )
    assert again == mixture
    with pytest.raises(DataError, match="weights must be > 0"):
        corpora.load_mixture([("multi30k", 0)], "train", data_dir)


def _plain_files(data_dir):
    folder = data_dir / "plain"
    if not folder.exists():
        folder.mkdir()
        (folder / "a.en").write_text("".join(f"Line {i}.\n" for i in range(12)), "utf-8")
        (folder / "a.fr").write_text("".join(f"Ligne {i}.\n" for i in range(12)), "utf-8")
    return f"{folder}/a.en,{folder}/a.fr"


def test_tfds_corpus_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        pairs = load_pairs("tfds:wmt14_translate/fr-en", "train", data_dir=str(tmp_path))
    assert 0 < len(pairs) <= 7
    assert all(isinstance(en, str) and isinstance(fr, str) and en and fr for en, fr in pairs)


def test_tfds_unknown_name_lists_close_matches(tmp_path):
    with pytest.raises(DataError, match="Unknown TFDS dataset.*Close matches: wmt14_translate"):
        load_pairs("tfds:wmt14_translat/fr-en", "train", data_dir=str(tmp_path))


def test_tfds_without_english_and_french_lists_features(tmp_path):
    with pytest.raises(DataError, match=r"has features \['image', 'label'\]; .* needs 'en' and"):
        load_pairs("tfds:mnist", "train", data_dir=str(tmp_path))


def test_translate_folder_corpus(tmp_path):
    (tmp_path / "en.train.txt").write_text("A dog.\nA cat.\n", "utf-8")
    (tmp_path / "fr.train.txt").write_text("Un chien.\nUn chat.\n", "utf-8")
    pairs = load_pairs(f"folder:{tmp_path}", "train")
    assert sorted(pairs) == [("A cat.", "Un chat."), ("A dog.", "Un chien.")]


# --------------------------------------------------------------------------------------------
# Bad data.


def test_different_line_counts_name_both_files_and_counts(tmp_path):
    _write_gz(tmp_path / "multi30k" / "val.en.gz", ["One.", "Two.", "Three."])
    _write_gz(tmp_path / "multi30k" / "val.fr.gz", ["Un.", "Deux."])
    with pytest.raises(DataError) as error:
        load_pairs("multi30k", "val", tmp_path)
    message = str(error.value)
    assert "val.en.gz has 3 lines" in message and "val.fr.gz has 2 lines" in message


def test_empty_lines_are_dropped_with_one_log_line(tmp_path, caplog):
    _write_gz(tmp_path / "multi30k" / "val.en.gz", ["One.", "", "Three.", "  \t", "Five."])
    _write_gz(tmp_path / "multi30k" / "val.fr.gz", ["Un.", "Deux.", " ", "Quatre.", "Cinq."])
    caplog.set_level(logging.INFO, logger="translator.corpora")
    assert load_pairs("multi30k", "val", tmp_path) == [("One.", "Un."), ("Five.", "Cinq.")]
    records = _log_lines(caplog, "translator.corpora")
    assert len(records) == 1
    assert "dropped 3 of 5 pairs with an empty or whitespace-only side" in records[0].getMessage()


def test_corpus_with_nothing_left_is_an_error(tmp_path):
    _write_gz(tmp_path / "multi30k" / "val.en.gz", ["", " "])
    _write_gz(tmp_path / "multi30k" / "val.fr.gz", ["Un.", ""])
    with pytest.raises(DataError, match="no usable sentence pairs"):
        load_pairs("multi30k", "val", tmp_path)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    (tmp_path / "multi30k").mkdir()
    with gzip.open(tmp_path / "multi30k" / "val.fr.gz", "wb") as file:
        file.write(b"Un.\nDeux.\n" + "Trois garçons.\n".encode("latin-1"))
    _write_gz(tmp_path / "multi30k" / "val.en.gz", ["One.", "Two.", "Three boys."])
    with pytest.raises(DataError, match=r"val\.fr\.gz, line 3: not valid UTF-8"):
        load_pairs("multi30k", "val", tmp_path)


def test_carriage_returns_and_byte_order_mark_are_removed(tmp_path):
    (tmp_path / "a.en").write_bytes("\ufeffOne.\r\nTwo.\r\n".encode())
    (tmp_path / "a.fr").write_bytes(b"Un.\r\nDeux.\r\n")
    assert corpora.load_parallel_files(tmp_path / "a.en", tmp_path / "a.fr") == [
        ("One.", "Un."),
        ("Two.", "Deux."),
    ]


def test_unicode_line_separators_do_not_split_lines(tmp_path):
    # str.splitlines() would split at U+2028 and U+0085 and misalign the two sides.
    (tmp_path / "a.en").write_text("One\u2028still one.\nTwo\x85 still two.\n", "utf-8")
    (tmp_path / "a.fr").write_text("Un.\nDeux.\n", "utf-8")
    assert len(corpora.load_parallel_files(tmp_path / "a.en", tmp_path / "a.fr")) == 2


# --------------------------------------------------------------------------------------------
# Pipeline.


def _batches(dataset):
    return [
        (inputs["source_ids"].numpy(), inputs["target_in_ids"].numpy(), out.numpy(), weight.numpy())
        for inputs, out, weight in dataset
    ]


def test_batches_are_shifted_by_one_and_cover_every_pair(tokenizer):
    dataset = make_dataset(PAIRS, tokenizer, tokenizer, batch_tokens=256, max_length=40)
    spec_inputs, spec_out, spec_weight = dataset.element_spec
    assert spec_inputs["source_ids"].dtype == tf.int32 and spec_inputs["source_ids"].shape.rank == 2
    assert spec_out.dtype == tf.int32 and spec_weight.dtype == tf.float32
    seen = []
    for source, target_in, target_out, weight in _batches(dataset):
        assert target_in.shape == target_out.shape == weight.shape
        np.testing.assert_array_equal(weight, (target_out != PAD_ID).astype(np.float32))
        for src_row, in_row, out_row in zip(source, target_in, target_out, strict=True):
            n = int(np.sum(out_row != PAD_ID))
            assert in_row[0] == BOS_ID and out_row[n - 1] == EOS_ID
            np.testing.assert_array_equal(in_row[1:n], out_row[: n - 1])
            assert np.all(in_row[n:] == PAD_ID) and np.all(out_row[n:] == PAD_ID)
            m = int(np.sum(src_row != PAD_ID))
            assert src_row[m - 1] == EOS_ID and np.all(src_row[m:] == PAD_ID)
        english = tokenizer.detokenize(source).numpy().tolist()
        french = tokenizer.detokenize(target_out).numpy().tolist()
        seen += [(en.decode(), fr.decode()) for en, fr in zip(english, french, strict=True)]
    assert sorted(seen) == sorted(PAIRS)


def test_bucketing_respects_batch_tokens(tokenizer):
    dataset = make_dataset(PAIRS, tokenizer, tokenizer, batch_tokens=64, max_length=40)
    sizes = []
    for source, target_in, _, _ in _batches(dataset):
        sizes.append(len(source))
        assert len(source) * max(source.shape[1], target_in.shape[1]) <= 64
    assert sum(sizes) == len(PAIRS)
    assert max(sizes) > 1


def test_bucket_batch_sizes_with_drop_remainder(tokenizer):
    # Bucket 0 holds lengths < 16 (B = 120 // 15 = 8); bucket 1 up to 41 (B = 120 // 41 = 2).
    dataset = make_dataset(
        PAIRS,
        tokenizer,
        tokenizer,
        batch_tokens=120,
        max_length=40,
        buckets=[16],
        drop_remainder=True,
    )
    batches = _batches(dataset)
    for source, target_in, _, _ in batches:
        length = max(source.shape[1], target_in.shape[1])
        assert len(source) == (8 if length < 16 else 2)
    assert {len(source) for source, *_ in batches} == {8, 2}


def test_same_seed_gives_same_batches(tokenizer):
    def epochs(seed):
        dataset = make_dataset(
            PAIRS, tokenizer, tokenizer, batch_tokens=128, max_length=40, seed=seed
        )
        return _batches(dataset), _batches(dataset)

    first, second = epochs(3), epochs(3)
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    # Each epoch is reshuffled, and another seed gives another order.
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(*first, strict=False))
    other = epochs(4)[0]
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first[0], other, strict=False))


def test_over_length_pairs_are_dropped_with_one_log_line(tokenizer, caplog):
    long_pair = (" ".join(["A man is walking in the park."] * 5), "Un homme marche.")
    caplog.set_level(logging.INFO, logger="translator.data")
    dataset = make_dataset(PAIRS + [long_pair], tokenizer, tokenizer, max_length=30, shuffle=False)
    assert sum(len(source) for source, *_ in _batches(dataset)) == len(PAIRS)
    records = _log_lines(caplog)
    assert len(records) == 1
    assert "dropped 1 of 81 pairs (1 with a side over max_length=30" in records[0].getMessage()


def test_nothing_within_max_length_is_an_error(tokenizer):
    with pytest.raises(DataError, match="none of the 80 pairs.*max_length=2"):
        make_dataset(PAIRS, tokenizer, tokenizer, max_length=2)
    with pytest.raises(DataError, match="no sentence pairs"):
        make_dataset([], tokenizer, tokenizer)


def test_repeat_runs_past_one_epoch(tokenizer):
    dataset = make_dataset(
        PAIRS, tokenizer, tokenizer, batch_tokens=256, max_length=40, repeat=True
    )
    total = sum(len(inputs["source_ids"]) for inputs, _, _ in dataset.take(40))
    assert total > 2 * len(PAIRS)


@pytest.fixture(scope="module")
def unigram_tokenizer(tmp_path_factory):
    texts = [sentence for pair in PAIRS for sentence in pair]
    path = tmp_path_factory.mktemp("spm") / "unigram.model"
    return SentencePieceTokenizer(
        model_path=train_sentencepiece(texts, path, vocab_size=100, model_type="unigram")
    )


def _rows(ids):  # a padded [B, T] batch -> the rows without PAD, BOS and EOS
    return [tuple(int(i) for i in row if i not in (PAD_ID, BOS_ID, EOS_ID)) for row in ids]


def test_subword_alpha_samples_segmentations_every_epoch(unigram_tokenizer):
    tokenizer = unigram_tokenizer
    pairs = PAIRS[:8]
    best = {
        text: tuple(ids)
        for pair in pairs
        for text, ids in zip(pair, tokenizer.tokenize(list(pair)).to_list(), strict=True)
    }
    # The longest best segmentation: every pair is kept, and longer samples fall back.
    max_length = max(len(ids) for ids in best.values())
    dataset = make_dataset(
        pairs,
        tokenizer,
        tokenizer,
        batch_tokens=256,
        max_length=max_length,
        repeat=True,
        subword_alpha=0.5,
    )
    segmentations = collections.defaultdict(set)
    for inputs, target_out, _ in dataset.take(30):
        source, target_in = inputs["source_ids"].numpy(), inputs["target_in_ids"].numpy()
        target_out = target_out.numpy()
        for src_row, in_row, out_row in zip(source, target_in, target_out, strict=True):
            m, n = int(np.sum(src_row != PAD_ID)), int(np.sum(out_row != PAD_ID))
            assert src_row[m - 1] == EOS_ID and in_row[0] == BOS_ID and out_row[n - 1] == EOS_ID
            np.testing.assert_array_equal(in_row[1:n], out_row[: n - 1])
            assert m <= max_length + 1 and n <= max_length + 1  # over-long samples fell back
        for ids, text in (
            *zip(_rows(source), tokenizer.detokenize(source).numpy(), strict=True),
            *zip(_rows(target_out), tokenizer.detokenize(target_out).numpy(), strict=True),
        ):
            segmentations[text.decode()].add(ids)
    assert set(segmentations) == set(best)  # every sampled sequence detokenizes to its sentence
    # Dozens of epochs: every sentence with room for longer samples was segmented in at least
    # two ways (the longest ones mostly fall back to their best segmentation).
    roomy = [text for text, ids in best.items() if len(ids) < max_length - 2]
    assert len(roomy) >= len(best) // 2
    counts = {text: len(segmentations[text]) for text in roomy}
    assert all(count >= 2 for count in counts.values()), counts


def test_subword_alpha_zero_is_the_best_segmentation(tokenizer):
    def batches(**kwargs):
        return _batches(
            make_dataset(
                PAIRS, tokenizer, tokenizer, batch_tokens=256, max_length=40, seed=5, **kwargs
            )
        )

    best = {
        text: tuple(ids)
        for pair in PAIRS
        for text, ids in zip(pair, tokenizer.tokenize(list(pair)).to_list(), strict=True)
    }
    default, off = batches(), batches(subword_alpha=0.0)
    assert len(default) == len(off)
    for a, b in zip(default, off, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for source, _, target_out, _ in off:
        english = [t.decode() for t in tokenizer.detokenize(source).numpy()]
        french = [t.decode() for t in tokenizer.detokenize(target_out).numpy()]
        assert [best[t] for t in english] == _rows(source)
        assert [best[t] for t in french] == _rows(target_out)


def test_config_subword_alpha_range():
    from translator.config import ConfigError, DataConfig, load_config

    assert DataConfig().subword_alpha == 0.0
    assert load_config(None, ["data.subword_alpha=0.3"]).data.subword_alpha == 0.3
    for value in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="data.subword_alpha"):
            load_config(None, [f"data.subword_alpha={value}"])


def test_eval_batches_restore_the_input_order(tokenizer):
    sentences = [en for en, _ in PAIRS[:13]] + ["A dog."]
    dataset, order = data.make_eval_batches(sentences, tokenizer, batch_size=4)
    batches = list(dataset)
    lengths = [int(np.sum(row != PAD_ID)) for batch in batches for row in batch.numpy()]
    assert lengths == sorted(lengths, reverse=True)
    texts = [t.decode() for batch in batches for t in tokenizer.detokenize(batch).numpy()]
    assert data.restore_order(texts, order) == sentences


# --------------------------------------------------------------------------------------------
# The real corpora (in CI: ../shared/data).


def _write_documents(folder, corpus, documents):
    """`documents`: {name: number of lines}; writes train.{en,fr,ids}.gz of a document corpus."""
    rows = [(name, i) for name, count in documents.items() for i in range(count)]
    _write_gz(folder / corpus / "train.en.gz", [f"{name} sentence {i}." for name, i in rows])
    _write_gz(folder / corpus / "train.fr.gz", [f"{name} phrase {i}." for name, i in rows])
    _write_gz(folder / corpus / "train.ids.gz", [f"{name}\ttext\tSection:{i}" for name, i in rows])


@pytest.mark.parametrize("corpus", ["justice-canada", "python-docs-fr"])
def test_document_corpora_hold_out_whole_documents(tmp_path, corpus):
    documents = {f"doc-{i}.po": 3 for i in range(400)}
    _write_documents(tmp_path, corpus, documents)
    splits = {
        split: load_pairs(corpus, split, data_dir=str(tmp_path))
        for split in ("train", "validation", "test")
    }
    seen = {split: {en.split(" ")[0] for en, _ in pairs} for split, pairs in splits.items()}
    # Every line of a document lands in its document's split, and the splits cover the corpus.
    for split, names in seen.items():
        assert names == {
            name for name in documents if corpora.document_split(corpus, name) == split
        }
        assert len(splits[split]) == 3 * len(names)
    assert sum(len(names) for names in seen.values()) == len(documents)
    assert seen["test"] and seen["validation"]  # 400 documents: some land in each held-out set
    assert len(load_pairs(corpus, "val", data_dir=str(tmp_path))) == len(splits["validation"])
    en, fr = splits["train"][0]
    assert en.replace("sentence", "phrase") == fr  # aligned


def test_document_corpus_with_a_short_ids_file_is_an_error(tmp_path):
    _write_documents(tmp_path, "python-docs-fr", {"a.po": 4})
    _write_gz(tmp_path / "python-docs-fr" / "train.ids.gz", ["a.po"] * 3)
    with pytest.raises(DataError, match=r"train.ids.gz has 3 lines"):
        load_pairs("python-docs-fr", "train", data_dir=str(tmp_path))


def test_missing_document_corpus_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as error:
        load_pairs("justice-canada", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "train.en.gz, train.fr.gz, train.ids.gz" in message
    assert str(tmp_path / "justice-canada") in message and "README" in message


def test_news_splits_are_the_wmt_sets(tmp_path):
    for i, name in enumerate((*corpora.NEWS_TRAIN_SETS, corpora.NEWS_DEV_SET)):
        _write_gz(tmp_path / "news" / f"{name}.en.gz", [f"{name} en {j}" for j in range(i + 1)])
        _write_gz(tmp_path / "news" / f"{name}.fr.gz", [f"{name} fr {j}" for j in range(i + 1)])
    train = load_pairs("news", "train", data_dir=str(tmp_path))
    assert len(train) == sum(range(1, len(corpora.NEWS_TRAIN_SETS) + 1))
    assert {en.split(" ")[0] for en, _ in train} == set(corpora.NEWS_TRAIN_SETS)
    dev = load_pairs("news", "newstest2013", data_dir=str(tmp_path))
    assert dev == load_pairs("news", "val", data_dir=str(tmp_path))
    assert dev[0] == ("newstest2013 en 0", "newstest2013 fr 0") and len(dev) == 7
    assert len(load_pairs("news", "newstest2010", data_dir=str(tmp_path))) == 4
    with pytest.raises(DataError, match="Valid choices: train, val"):
        load_pairs("news", "newstest2014", data_dir=str(tmp_path))


def test_missing_news_names_the_files_and_sacrebleu(tmp_path, monkeypatch):
    import sacrebleu.utils

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(sacrebleu.utils, "get_source_file", offline)
    with pytest.raises(DataError) as error:
        load_pairs("news", "newstest2013", data_dir=str(tmp_path))
    message = str(error.value)
    assert "newstest2013.en.gz" in message and "sacrebleu -t wmt13 -l en-fr" in message


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TRANSLATOR_DATA_DIR"), reason="TRANSLATOR_DATA_DIR not set")
def test_real_corpora_split_sizes():
    sizes = {split: len(load_pairs("multi30k", split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 29_000, "val": 1_014, "test": 1_000}
    tatoeba = {split: load_pairs("tatoeba", split) for split in ("train", "validation", "test")}
    assert sum(len(pairs) for pairs in tatoeba.values()) == 73_727
    assert {split: len(pairs) for split, pairs in tatoeba.items()} == {
        "train": 70_770,
        "validation": 1_476,
        "test": 1_481,
    }
    english = {split: {en for en, _ in pairs} for split, pairs in tatoeba.items()}
    assert not english["train"] & (english["validation"] | english["test"])
    assert not english["validation"] & english["test"]
    news = {split: len(load_pairs("news", split)) for split in ("train", "newstest2013")}
    assert news == {"train": 13_573, "newstest2013": 3_000}
    for corpus, total in (("justice-canada", 544_670), ("python-docs-fr", 30_752)):
        sizes = [len(load_pairs(corpus, split)) for split in ("train", "validation", "test")]
        assert sum(sizes) <= total and min(sizes) > 1_000  # held-out sets of whole documents


def test_pad_to_bucket_gives_one_shape_per_bucket(tmp_path):
    from translator import data
    from translator.tokenizer import SentencePieceTokenizer, train_sentencepiece

    rng = np.random.default_rng(1)
    words = ["a", "bb", "ccc", "dd", "e"]
    pairs = [
        (" ".join(rng.choice(words, n)), " ".join(rng.choice(words, m)))
        for n, m in rng.integers(1, 20, size=(300, 2))
    ]
    path = train_sentencepiece([s for p in pairs for s in p], tmp_path / "spm.model", vocab_size=20)
    tokenizer = SentencePieceTokenizer(model_path=str(path))
    dataset = data.make_dataset(
        pairs,
        tokenizer,
        tokenizer,
        batch_tokens=128,
        max_length=30,
        repeat=True,
        pad_to_bucket=True,
    )
    bounds = [b - 1 for b in data.default_buckets(30)] + [31]
    shapes = set()
    for inputs, target_out, weights in dataset.take(60):
        source, target_in = inputs["source_ids"].numpy(), inputs["target_in_ids"].numpy()
        assert source.shape[1] == target_in.shape[1] == target_out.shape[1] in bounds
        assert target_in.shape[0] == max(1, 128 // source.shape[1])
        # padding is PAD only, and the shift-by-one still holds on real tokens
        real = weights.numpy() > 0
        shifted = real[:, 1:]  # target_in[t + 1] == target_out[t] wherever t + 1 is real
        np.testing.assert_array_equal(
            target_in[:, 1:][shifted], target_out.numpy()[:, :-1][shifted]
        )
        shapes.add(source.shape)
    assert len(shapes) <= len(bounds)
