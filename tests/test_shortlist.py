"""Vocabulary shortlists: the lexical table, the call's vocabulary, and decoding over it."""

import shutil

import numpy as np
import pytest

from tests.tiny import randomize_weights

TEXTS = ["one red cat", "big house", "two small dogs and a green tree", "five blue cars"]


def test_ibm1_learns_which_target_word_translates_each_source_word():
    """Words 0-9 of the source translate to words 10-19 of the target (a permutation), in
    random order, and every target sentence holds two function words (20, 21) too:
    co-occurrence alone ties every word with 20 and 21, IBM Model 1 must not."""
    from translator.shortlist import ibm1

    rng = np.random.default_rng(0)
    translation = 10 + rng.permutation(10)
    sources, targets = [], []
    for _ in range(400):
        words = rng.choice(10, size=rng.integers(2, 6), replace=False)
        sources.append(words.tolist())
        targets.append(rng.permutation([*translation[words], 20, 21]).tolist())
    probs = ibm1(sources, targets, source_vocab=10, target_vocab=22, iterations=8)
    assert probs.shape == (11, 22)  # the last row: the NULL word
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs[:10].argmax(1) == translation).all()
    assert set(probs[10].argsort()[-2:]) == {20, 21}  # NULL explains the function words


def test_select_is_the_specials_the_frequent_and_the_table_rows_of_the_sources():
    import tensorflow as tf

    from translator.shortlist import SPECIALS, Shortlist

    rng = np.random.default_rng(1)
    table = rng.integers(0, 50, size=(30, 3)).astype(np.int32)
    table[0] = 3  # PAD's row adds nothing (EOS, a special)
    shortlist = Shortlist(table=table, frequent=np.array([7, 40], np.int32), target_vocab=50)
    source_ids = np.array([[5, 9, 3, 0, 0], [12, 5, 29, 11, 3]], np.int32)
    want = set(SPECIALS) | {7, 40} | set(table[source_ids.ravel()].ravel().tolist())
    got = shortlist.select(tf.constant(source_ids)).numpy()
    assert got.tolist() == sorted(want)
    assert got[: len(SPECIALS)].tolist() == list(SPECIALS)  # the specials keep their ids


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


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_over_a_shortlist_equals_decoding_with_the_other_pieces_masked(
    random_model_translator, beam_size
):
    """The reference: the whole vocabulary, with every piece outside the call's shortlist given
    a bias of -1e9, so it is never chosen and adds nothing to the softmax's normalizer. A random
    table of 2 pieces per source piece: same texts, scores and alignments."""
    import tensorflow as tf

    from translator.inference import Translator
    from translator.shortlist import Shortlist

    full = random_model_translator
    tok = full.target_tokenizer
    vocab = tok.vocabulary_size()
    # Pieces the unrestricted model does not output: the shortlist must change its answers.
    unrestricted = full.translate_tensors(TEXTS, beam_size, 1, 0.6, 0.0)["ids"].numpy()
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
    options = dict(beam_size=beam_size, n_best=1, length_penalty=0.6, segment=False)
    got = short.translate(TEXTS, return_alignment=True, **options)
    source_ids, _ = full.encode_source(tf.constant(TEXTS))
    allowed = shortlist.select(source_ids).numpy()
    bias = _bias(full.model)
    saved = bias.numpy()
    masked = np.full_like(saved, -1e9)
    masked[allowed] = saved[allowed]
    bias.assign(masked)
    try:
        want = full.translate(TEXTS, return_alignment=True, **options)
    finally:
        bias.assign(saved)
    assert [r.text for r in got] == [r.text for r in want]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.target_tokens == w.target_tokens
        np.testing.assert_allclose(g.alignment, w.alignment, atol=1e-6)
    # Every id of the graph's output is one of the call's shortlist (padding is PAD_ID).
    ids = short.translate_tensors(TEXTS, beam_size, 1, 0.6, 0.0)["ids"].numpy()
    assert set(ids.ravel().tolist()) <= set(allowed.tolist())
    # The shortlist mattered: the pieces chosen are none of the unrestricted model's.
    chosen = [set(ids[row].ravel().tolist()) - {0, 3} for row in range(len(TEXTS))]
    assert any(chosen)
    for row, pieces in enumerate(chosen):
        assert not pieces & set(unrestricted[row].ravel().tolist()), row


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
    # A word-for-word task: the table holds each word's translation, so sentences of the
    # corpus's words translate as without the shortlist (the softmax's normalizer differs, the
    # choices do not).
    full = load(run, shortlist=None)
    options = dict(beam_size=2, length_penalty=0.6, segment=False)
    known = ["one red cat", "big house", "two small dog", "five blue car green tree"]
    assert [r.text for r in translator.translate(known, **options)] == [
        r.text for r in full.translate(known, **options)
    ]

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
    # ... and differ from the same export without it (the shortlist's normalizer).
    whole = load(tmp_path / "export", shortlist=None).translate_tensors(
        tf.constant(TEXTS), 2, 1, 0.6, 0.0
    )
    assert not np.allclose(whole["scores"].numpy(), want["scores"].numpy(), rtol=1e-5)
    # The graph holds the shortlist: a table lookup of the run's size is in it.
    graph = signature.graph.as_graph_def()
    assert "UnsortedSegmentMax" in {n.op for f in graph.library.function for n in f.node_def}

    export(run, tmp_path / "export", shortlist=False)
    assert not (tmp_path / "export" / "shortlist.npz").exists()
    assert load(tmp_path / "export").shortlist is None


def test_a_shortlist_of_other_tokenizers_or_a_broken_file_is_a_clear_error(tiny_run_dir, tmp_path):
    from translator.inference import load
    from translator.shortlist import Shortlist, ShortlistError

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    vocab = load(run).target_tokenizer.vocabulary_size()
    Shortlist(
        table=np.full((vocab, 2), 3, np.int32), frequent=np.array([4], np.int32),
        target_vocab=vocab, digests=("0123", "4567"),
    ).save(run / "shortlist.npz")  # fmt: skip
    with pytest.raises(ValueError, match="built for other SentencePiece models.*rebuild it"):
        load(run)
    (run / "shortlist.npz").write_bytes(b"not a zip")
    with pytest.raises(ShortlistError, match=r"cannot read the shortlist .*shortlist.npz"):
        load(run)
    assert load(run, shortlist=None).shortlist is None  # still usable without it
