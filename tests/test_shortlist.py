"""Vocabulary shortlists: the lexical table, the call's vocabulary, and decoding over it."""

import shutil

import numpy as np
import pytest

from tests.tiny import WORDS, randomize_weights, sentencepieces

TEXTS = ["one red cat", "big house", "two small dogs and a green tree", "five blue cars"]


def test_ibm1_learns_which_target_word_translates_each_source_word():
    """Words 0-9 of the source translate to words 12-21 of the target (a permutation), in
    random order, and every target sentence holds two function words (10, 11) too: by
    co-occurrence alone every source word ties with its translation and with 10 and 11 (and
    the lowest id, a function word, would win the tie); IBM Model 1 must tell them apart."""
    from translator.shortlist import ibm1

    rng = np.random.default_rng(0)
    translation = 12 + rng.permutation(10)
    sources, targets = [], []
    for _ in range(400):
        words = rng.choice(10, size=rng.integers(2, 6), replace=False)
        sources.append(words.tolist())
        targets.append(rng.permutation([*translation[words], 10, 11]).tolist())
    rows, columns, values = ibm1(sources, targets, source_vocab=10, target_vocab=22, iterations=8)
    probs = np.zeros((11, 22))  # the last row: the NULL word
    probs[rows, columns] = values
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs[:10].argmax(1) == translation).all()
    best = probs[np.arange(10), translation]
    assert (best > 2 * probs[:10, 10]).all() and (best > 2 * probs[:10, 11]).all()
    assert set(probs[10].argsort()[-2:]) == {10, 11}  # NULL explains the function words
    # Co-occurrence alone (no EM step) does not: the ties the test is built on are there.
    rows, columns, values = ibm1(sources, targets, 10, 22, iterations=1)
    first = np.zeros((11, 22))
    first[rows, columns] = values
    assert not (first[np.arange(10), translation] > 2 * first[:10, 10]).all()


def test_select_gives_the_union_and_each_sentences_own_shortlist():
    import tensorflow as tf

    from translator.shortlist import MASKED, SPECIALS, Shortlist

    rng = np.random.default_rng(1)
    table = rng.integers(0, 50, size=(30, 3)).astype(np.int32)  # PAD's row too: padding
    shortlist = Shortlist(table=table, frequent=np.array([7, 40], np.int32), target_vocab=50)
    source_ids = np.array([[5, 9, 3, 0, 0], [12, 5, 29, 11, 3]], np.int32)
    always = set(SPECIALS) | {7, 40}
    own = [always | set(table[row[row != 0]].ravel().tolist()) for row in source_ids]
    vocabulary, mask = (t.numpy() for t in shortlist.select(tf.constant(source_ids)))
    assert vocabulary.tolist() == sorted(own[0] | own[1])
    assert vocabulary[: len(SPECIALS)].tolist() == list(SPECIALS)  # the specials keep their ids
    for row, pieces in enumerate(own):
        want = [0.0 if piece in pieces else MASKED for piece in vocabulary]
        np.testing.assert_array_equal(mask[row], want)
    assert (mask != 0).any()  # the two sentences' shortlists differ


@pytest.fixture(scope="module")
def random_model_translator(tiny_run_dir):
    """The tiny run with random weights: its outputs range over the whole vocabulary, so a
    shortlist changes them."""
    from translator.inference import load
    from translator.tokenizer import EOS_ID

    translator = load(tiny_run_dir)
    randomize_weights(translator.model, seed=3, scale=0.3)
    bias = _bias(translator.model)
    bias.assign(bias.numpy() - 10.0 * (np.arange(bias.shape[0]) == EOS_ID))  # no empty outputs
    return translator


def _bias(model):
    decoder = model.decoder
    return decoder.output_bias_tied if decoder.tie_embeddings else decoder.projection.bias


@pytest.mark.parametrize(("beam_size", "n_best", "coverage_penalty"), [(1, 1, 0.0), (3, 2, 0.2)])
def test_decoding_over_a_shortlist_equals_decoding_with_the_other_pieces_masked(
    random_model_translator, beam_size, n_best, coverage_penalty
):
    """The reference: each sentence alone over the whole vocabulary, every piece outside its
    own shortlist given a bias of -1e9, so it is never chosen and adds nothing to the softmax's
    normalizer. The shortlisted call decodes the four sentences together, over the union of
    their shortlists: each gets the reference's texts, n-best scores and alignments, so a
    sentence's answer does not depend on its neighbours. A random table of 2 pieces per
    source piece, none of them a piece the unrestricted model outputs."""
    import tensorflow as tf

    from translator.inference import Translator
    from translator.shortlist import Shortlist

    full = random_model_translator
    tok = full.target_tokenizer
    vocab = tok.vocabulary_size()
    unrestricted = full.translate_tensors(TEXTS, beam_size, n_best, 0.6, 0.0)["ids"].numpy()
    pool = np.setdiff1d(np.arange(4, vocab), unrestricted)
    rng = np.random.default_rng(7)
    shortlist = Shortlist(
        table=rng.choice(pool, size=(full.source_tokenizer.vocabulary_size(), 2)).astype(np.int32),
        frequent=pool[:2].astype(np.int32),
        target_vocab=vocab,
        digests=_digests(full),
    )
    short = Translator(
        full.model, full.source_tokenizer, tok, **{**full.options(), "shortlist": shortlist}
    )
    options = dict(
        beam_size=beam_size, n_best=n_best, length_penalty=0.6,
        coverage_penalty=coverage_penalty, segment=False, return_alignment=True,
    )  # fmt: skip
    got = short.translate(TEXTS, **options)
    ids = short.translate_tensors(TEXTS, beam_size, n_best, 0.6, coverage_penalty)["ids"].numpy()
    bias = _bias(full.model)
    saved = bias.numpy()
    for row, text in enumerate(TEXTS):
        source_ids, _ = full.encode_source(tf.constant([text]))
        own, _ = shortlist.select(source_ids)  # one sentence: the call's vocabulary is its own
        own = own.numpy()
        masked = np.full_like(saved, -1e9)
        masked[own] = saved[own]
        bias.assign(masked)
        try:
            [want] = full.translate([text], **options)
        finally:
            bias.assign(saved)
        assert got[row].text == want.text, row
        assert [t for t, _ in got[row].n_best] == [t for t, _ in want.n_best], row
        np.testing.assert_allclose(
            [s for _, s in got[row].n_best], [s for _, s in want.n_best], rtol=1e-5, atol=1e-6
        )
        assert got[row].target_tokens == want.target_tokens, row
        np.testing.assert_allclose(got[row].alignment, want.alignment, atol=1e-6)
        # Its ids are all in its own shortlist (padding is PAD_ID) ...
        assert set(ids[row].ravel().tolist()) <= set(own.tolist()), row
        # ... and none is a piece the unrestricted model chose: the shortlist mattered.
        chosen = set(ids[row].ravel().tolist()) - {0, 3}
        assert not chosen & set(unrestricted[row].ravel().tolist()), row
    assert any(set(ids[row].ravel().tolist()) - {0, 3} for row in range(len(TEXTS)))


def _digests(translator):
    from translator.shortlist import proto_digest

    return (
        proto_digest(translator.source_tokenizer.proto),
        proto_digest(translator.target_tokenizer.proto),
    )


def test_shortlist_cli_load_and_export(tiny_run_dir, tmp_path, capsys):
    """`translator shortlist` writes shortlist.npz from the run's own corpora; `load` uses it
    (`shortlist=None` and `--no-shortlist` do not); the export bakes it into the SavedModel,
    whose answers equal `load` of the export directory; `--no-shortlist` exports without it
    and removes the directory's previous one."""
    import tensorflow as tf

    from translator.cli import main
    from translator.export import export
    from translator.inference import load

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    assert main(["shortlist", "--model", str(run), "--top-k", "3", "--frequent", "5"]) == 0
    out = capsys.readouterr()
    assert "of the reference pieces are in their sentence's shortlist" in out.out
    assert "EM iteration 5/5" in out.err
    translator = load(run)
    assert translator.shortlist is not None and translator.shortlist.top_k == 3
    assert load(run, shortlist=None).shortlist is None
    # A word-for-word task: each English word's shortlist holds its French word's pieces.
    source_sp, target_sp = sentencepieces(run)
    for english, french in WORDS.items():
        ids, _ = translator.encode_source(tf.constant([english]))
        own, _ = translator.shortlist.select(ids)
        assert set(target_sp.encode(french)) <= set(own.numpy().tolist()), english

    version = export(run, tmp_path / "export")
    assert (tmp_path / "export" / "shortlist.npz").is_file()
    exported = load(tmp_path / "export")
    assert exported.shortlist is not None
    signature = tf.saved_model.load(str(version)).signatures["translate"]
    served = signature(
        text=tf.constant(TEXTS), beam_size=tf.constant(2), n_best=tf.constant(1),
        length_penalty=tf.constant(0.6),
    )  # fmt: skip
    want = exported.translate_tensors(tf.constant(TEXTS), 2, 1, 0.6, 0.0)
    np.testing.assert_array_equal(served["translations"].numpy(), want["translations"].numpy())
    np.testing.assert_allclose(served["scores"].numpy(), want["scores"].numpy(), rtol=1e-5)
    # The graph holds the shortlist's table (a constant of its shape); the next export, made
    # without it, does not.
    table_shape = list(exported.shortlist.table.shape)
    assert table_shape in _constant_shapes(signature)
    export(run, tmp_path / "export", shortlist=False)
    assert not (tmp_path / "export" / "shortlist.npz").exists()
    assert load(tmp_path / "export").shortlist is None
    whole = tf.saved_model.load(str(tmp_path / "export" / "2")).signatures["translate"]
    assert table_shape not in _constant_shapes(whole)
    # A shortlist learned for an export directory: its versions do not have it, and it says so.
    assert main(["shortlist", "--model", str(tmp_path / "export"), "--top-k", "3"]) == 0
    assert "version(s) 1, 2 in" in capsys.readouterr().err


def _constant_shapes(signature):
    graph = signature.graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    return [
        [d.size for d in n.attr["value"].tensor.tensor_shape.dim] for n in nodes if n.op == "Const"
    ]


def test_a_shortlist_of_other_tokenizers_or_a_broken_file_is_a_clear_error(tiny_run_dir, tmp_path):
    from translator.inference import load
    from translator.shortlist import Shortlist, ShortlistError, proto_digest

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    tok = load(run).target_tokenizer
    vocab = tok.vocabulary_size()
    digests = (proto_digest(tok.proto), proto_digest(tok.proto))
    good = Shortlist(np.full((vocab, 2), 3, np.int32), np.array([4], np.int32), vocab, digests)
    good.save(run / "shortlist.npz")
    assert load(run).shortlist.top_k == 2
    fix = "rebuild it with `translator shortlist --model <model directory>`, or pass --no-shortlist"
    for bad, message in (
        (Shortlist(good.table, good.frequent, vocab, ("0123", "4567")), "other SentencePiece"),
        (Shortlist(good.table, np.array([vocab], np.int32), vocab, digests), "does not fit"),
        (Shortlist(good.table[:-1], good.frequent, vocab, digests), "does not fit"),
    ):
        bad.save(run / "shortlist.npz")
        with pytest.raises(ValueError, match=message) as error:
            load(run)
        assert fix in str(error.value) and "shortlist.npz" in str(error.value)
    # Damaged files: not a zip, truncated, empty.
    good.save(run / "shortlist.npz")
    whole = (run / "shortlist.npz").read_bytes()
    for damaged in (b"not a zip", whole[: len(whole) // 2], b""):
        (run / "shortlist.npz").write_bytes(damaged)
        with pytest.raises(ShortlistError, match=r"cannot read the shortlist .*shortlist.npz"):
            load(run)
    assert load(run, shortlist=None).shortlist is None  # still usable without it
