"""Tests of translator.search against scripted, brute-force and greedy references."""

import doctest
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from translator import search

VOCAB_SIZE = 4
END_ID = 3  # tokens 0, 1, 2 and the end id 3
WORDS = (0, 1, 2)


def run(search, *args, **kwargs):
    """Runs a search in graph mode, as the product does."""
    return tf.function(lambda: search(*args, **kwargs))()


def lp(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


# Scripted step function (as in OpenNMT-tf tests/decoding_test.py): the most probable
# token at step t is script[row, t], so the expected ids are exact.


def scripted_step_fn(ids, state, constants):
    script = constants  # [N, T]
    t = tf.minimum(state, tf.shape(script)[1] - 1)
    next_ids = tf.gather(script, t, batch_dims=1)
    logits = tf.one_hot(next_ids, VOCAB_SIZE, on_value=0.0, off_value=-10.0)
    return logits, state + 1, None


SCRIPT = tf.constant([[2, 1, 2, 3, 0, 0], [1, 3, 0, 0, 0, 0], [0, 0, 1, 1, 2, 3]])


def scripted_args(max_length):
    return dict(
        step_fn=scripted_step_fn,
        start_ids=tf.zeros([3], tf.int32),
        end_id=END_ID,
        initial_state=tf.zeros([3], tf.int32),
        constants=SCRIPT,
        max_length=max_length,
    )


# Prefix trees: the distribution of the next token (and the attention) depends on the
# whole prefix, which the state tracks as a node of the tree of prefixes.


class PrefixTree:
    """All prefixes of at most `depth` words (default `max_length - 1`, the longest
    prefix a search can extend), with one table row per prefix; longer prefixes share
    one last row, the prefix `None`.

    Args:
        max_length: the maximum number of generated tokens.
        log_probs: list (one per sentence) of callables `prefix -> [VOCAB_SIZE]`.
        attention: optional list of callables `prefix -> [S]`.
        depth: optional maximum prefix length.
    """

    def __init__(self, max_length, log_probs, attention=None, depth=None):
        self.max_length = max_length
        depth = max_length - 1 if depth is None else depth
        self.prefixes = [p for n in range(depth + 1) for p in itertools.product(WORDS, repeat=n)]
        self.prefixes.append(None)
        self.index = {p: i for i, p in enumerate(self.prefixes)}
        # transitions[node, token] = node of prefix + (token,), else the last node.
        last = len(self.prefixes) - 1
        self.transitions = np.array(
            [
                [last if p is None else self.index.get(p + (w,), last) for w in range(VOCAB_SIZE)]
                for p in self.prefixes
            ],
            np.int32,
        )
        self.log_probs = np.array(
            [[fn(p) for p in self.prefixes] for fn in log_probs], np.float64
        )  # [B, nodes, V]
        self.log_probs -= np.logaddexp.reduce(self.log_probs, axis=-1, keepdims=True)
        self.attention = None
        if attention is not None:
            self.attention = np.array([[fn(p) for p in self.prefixes] for fn in attention])

    @property
    def batch_size(self):
        return len(self.log_probs)

    def args(self, max_length=None, rows=None):
        """Keyword arguments of a search over the sentences `rows` (all by default)."""
        rows = list(range(self.batch_size)) if rows is None else rows
        transitions = tf.constant(self.transitions)
        with_attention = self.attention is not None

        def step_fn(ids, state, constants):
            # [N, V] row of the current node, then the child reached with `ids`.
            children = tf.gather(tf.gather(transitions, state["node"]), ids, batch_dims=1)
            node = tf.where(tf.equal(state["t"], 0), 0, children)
            logits = tf.gather(constants["logits"], node, batch_dims=1)  # [N, nodes, V] -> [N, V]
            attention = None
            if with_attention:
                attention = tf.gather(constants["attention"], node, batch_dims=1)
            return logits, {"node": node, "t": state["t"] + 1}, attention

        constants = {"logits": tf.constant(self.log_probs[rows], tf.float32)}
        if with_attention:
            constants["attention"] = tf.constant(self.attention[rows], tf.float32)
        batch_size = len(rows)
        return dict(
            step_fn=step_fn,
            start_ids=tf.zeros([batch_size], tf.int32),
            end_id=END_ID,
            initial_state={
                "node": tf.zeros([batch_size], tf.int32),
                "t": tf.zeros([batch_size], tf.int32),
            },
            constants=constants,
            max_length=self.max_length if max_length is None else max_length,
        )

    def score(self, b, sequence, alpha=0.0, beta=0.0):
        """(score, log_prob) of a hypothesis of sentence b, computed in float64."""
        log_prob = sum(
            self.log_probs[b, self.index[tuple(sequence[:t])], token]
            for t, token in enumerate(sequence)
        )
        score = log_prob / lp(len(sequence), alpha)
        if beta:
            mass = sum(
                self.attention[b, self.index[tuple(sequence[:t])]] for t in range(len(sequence))
            )
            score += beta * sum(math.log(min(m, 1.0)) for m in mass if m > 0)
        return score, log_prob

    def brute_force(self, b, alpha=0.0, beta=0.0, max_length=None):
        """All hypotheses of sentence b, best first: word sequences ended by the end id,
        and word sequences cut at max_length."""
        max_length = self.max_length if max_length is None else max_length
        hypotheses = [
            p + (END_ID,) for n in range(max_length) for p in itertools.product(WORDS, repeat=n)
        ] + list(itertools.product(WORDS, repeat=max_length))
        scored = [(*self.score(b, h, alpha, beta), h) for h in hypotheses]
        return sorted(scored, key=lambda x: -x[0])


def random_tree(max_length, batch_size=1, seed=0, attention_size=None):
    rng = np.random.default_rng(seed)

    def table(shape, scale):
        values = {}
        return lambda p: values.setdefault(p, scale * rng.standard_normal(shape))

    log_probs = [table([VOCAB_SIZE], 1.5) for _ in range(batch_size)]
    attention = None
    if attention_size is not None:
        # Softmax over the real positions; the last source position is padding (0).
        def softmax_with_padding(make):
            def fn(p):
                x = np.exp(make(p))
                return np.append(x / x.sum(), 0.0)

            return fn

        attention = [
            softmax_with_padding(table([attention_size - 1], 1.0)) for _ in range(batch_size)
        ]
    return PrefixTree(max_length, log_probs, attention)


def hypotheses(result, b):
    """The hypotheses of sentence b of a result, as tuples of ids."""
    ids, lengths = result.ids.numpy()[b], result.lengths.numpy()[b]
    return [tuple(row[:n]) for row, n in zip(ids, lengths, strict=True)]


def assert_padded(result):
    ids, lengths = result.ids.numpy(), result.lengths.numpy()
    positions = np.arange(ids.shape[-1])
    assert (ids[positions >= lengths[..., None]] == 0).all()
    if result.alignments is not None:
        assert (result.alignments.numpy()[positions >= lengths[..., None]] == 0).all()


# tile_batch


def test_tile_batch_repeats_rows_contiguously():
    nested = {"a": tf.constant([[1, 2], [3, 4]]), "b": (tf.constant([5, 6]),)}
    tiled = search.tile_batch(nested, tf.constant(3))
    np.testing.assert_array_equal(tiled["a"], [[1, 2]] * 3 + [[3, 4]] * 3)
    np.testing.assert_array_equal(tiled["b"][0], [5, 5, 5, 6, 6, 6])


# Scripted step functions: exact ids and lengths.


def test_greedy_scripted_ids_and_lengths():
    result = run(search.greedy_search, **scripted_args(max_length=10))
    np.testing.assert_array_equal(
        result.ids[:, 0], [[2, 1, 2, 3, 0, 0], [1, 3, 0, 0, 0, 0], [0, 0, 1, 1, 2, 3]]
    )
    np.testing.assert_array_equal(result.lengths, [[4], [2], [6]])
    np.testing.assert_allclose(result.scores, result.log_probs)
    assert result.alignments is None


def test_beam_scripted_ids_and_lengths():
    result = run(search.beam_search, **scripted_args(max_length=10), beam_size=3, n_best=2)
    np.testing.assert_array_equal(
        result.ids[:, 0], [[2, 1, 2, 3, 0, 0], [1, 3, 0, 0, 0, 0], [0, 0, 1, 1, 2, 3]]
    )
    np.testing.assert_array_equal(result.lengths[:, 0], [4, 2, 6])
    assert (result.scores[:, 0] > result.scores[:, 1]).numpy().all()
    assert_padded(result)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_per_sentence_max_length_cuts_scripted_output(strategy):
    args = scripted_args(max_length=tf.constant([3, 10, 5]))
    if strategy == "greedy":
        result = run(search.greedy_search, **args)
    else:
        result = run(search.beam_search, **args, beam_size=2)
    # Sentences 0 and 2 are cut (no end id), sentence 1 ends before its maximum.
    np.testing.assert_array_equal(
        result.ids[:, 0], [[2, 1, 2, 0, 0], [1, 3, 0, 0, 0], [0, 0, 1, 1, 2]]
    )
    np.testing.assert_array_equal(result.lengths[:, 0], [3, 2, 5])


def test_zero_max_length_gives_empty_outputs():
    for result in (
        run(search.greedy_search, **scripted_args(max_length=0)),
        run(search.beam_search, **scripted_args(max_length=0), beam_size=2),
    ):
        assert result.ids.shape == (3, 1, 0)
        np.testing.assert_array_equal(result.lengths, [[0]] * 3)


def test_early_exit_when_every_sentence_is_done():
    # The longest scripted output has 6 tokens; max_length is 50.
    greedy = run(search.greedy_search, **scripted_args(max_length=50))
    assert int(greedy.steps) == 6
    for alpha in (0.0, 1.0):
        beam = run(
            search.beam_search, **scripted_args(max_length=50), beam_size=3, length_penalty=alpha
        )
        assert int(beam.steps) == 6
        assert beam.ids.shape[-1] == 6


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_finished_sentences_leave_the_step_functions_batch(strategy):
    # Batch compaction: the scripted sentences end after 4, 2 and 6 tokens, so the step
    # function sees 3, 3, 2, 2, 1, 1 sentences (each with its beams), not 3 at all 6 steps,
    # and its rows carry their own script (the constants follow the rows).
    rows = tf.Variable(0)
    calls = tf.Variable(0)

    def counting_step_fn(ids, state, constants):
        rows.assign_add(tf.shape(ids)[0])
        calls.assign_add(1)
        return scripted_step_fn(ids, state, constants)

    args = {**scripted_args(max_length=50), "step_fn": counting_step_fn}
    if strategy == "greedy":
        result, beam = run(search.greedy_search, **args), 1
    else:
        result, beam = run(search.beam_search, **args, beam_size=3), 3
    np.testing.assert_array_equal(
        result.ids[:, 0], [[2, 1, 2, 3, 0, 0], [1, 3, 0, 0, 0, 0], [0, 0, 1, 1, 2, 3]]
    )
    assert int(calls.numpy()) == int(result.steps) == 6
    assert int(rows.numpy()) == beam * (3 + 3 + 2 + 2 + 1 + 1)


def test_untiled_constants_reach_each_sentences_beams_through_compaction():
    # tile_constants=False: the step function gets one constants row per live sentence
    # against beam_size rows of ids each (checked at every step), and once sentences finish
    # the rows left are those of the sentences still running, in order.
    shapes = tf.Variable(0)

    def shared_step_fn(ids, state, constants):
        beams = tf.shape(ids)[0] // tf.shape(constants)[0]
        check = tf.debugging.assert_equal(
            tf.shape(ids)[0], beams * tf.shape(constants)[0], message="beams per sentence"
        )
        with tf.control_dependencies([check]):
            shapes.assign_add(tf.shape(constants)[0])
        return scripted_step_fn(ids, state, tf.repeat(constants, beams, axis=0))

    for beam_size in (3, tf.constant(3)):  # a Python int, and a tensor as in the export
        shapes.assign(0)
        tiled = run(search.beam_search, **scripted_args(max_length=50), beam_size=beam_size)
        args = {**scripted_args(max_length=50), "step_fn": shared_step_fn}
        shared = run(search.beam_search, **args, beam_size=beam_size, tile_constants=False)
        np.testing.assert_array_equal(shared.ids, tiled.ids)
        np.testing.assert_array_equal(shared.scores, tiled.scores)
        assert int(shapes.numpy()) == 3 + 3 + 2 + 2 + 1 + 1  # sentences, not rows


@pytest.mark.parametrize("width", [300, 8000, 8001])
@pytest.mark.parametrize("k", [1, 6, 65])
@pytest.mark.parametrize("static_width", [True, False])
def test_two_pass_top_k_equals_top_k_ties_included(width, k, static_width):
    # Integer logits: many ties, which top_k breaks by the lowest index; k = 65 with 300
    # columns is more than the 5 blocks of 64, where the plain top_k must take over. A width
    # unknown when tracing (a vocabulary shortlist's) takes the same decision in the graph.
    values = tf.round(tf.random.stateless_normal([7, width], seed=[width, k]) * 3.0)
    expected = tf.math.top_k(values, k=k)
    signature = [
        tf.TensorSpec([None, None if not static_width else width]),
        tf.TensorSpec([], tf.int32),
    ]
    got = tf.function(search._top_k, input_signature=signature)(values, tf.constant(k))
    np.testing.assert_array_equal(got[0], expected.values)
    np.testing.assert_array_equal(got[1], expected.indices)


# Beam search against greedy search.


def rnn_step_fn(vocab_size=12, units=16):
    """A small random RNN; its end-of-sentence logit is either dominant or negligible,
    so every early end candidate is worse than the greedy sequence and beam size 1
    (with its set of finished hypotheses) must return exactly the greedy output."""
    normal = lambda shape, seed: tf.random.stateless_normal(shape, seed=[seed, 0])  # noqa: E731
    embeddings = normal([vocab_size, units], 1)
    kernel = normal([units, units], 2) / units**0.5
    output = normal([units, vocab_size], 3)
    end_logit = tf.one_hot(END_ID, vocab_size, on_value=1.0, off_value=0.0)

    def step_fn(ids, state, constants):
        h = tf.tanh(tf.gather(embeddings, ids) + tf.matmul(state, kernel) + constants)
        logits = tf.matmul(h, output)
        end = tf.where(h[:, :1] > 0.8, 30.0, -30.0)  # [N, 1]
        logits = logits * (1.0 - end_logit) + end * end_logit
        return logits, h, None

    return step_fn


def rnn_args(batch_size=8, max_length=10):
    return dict(
        step_fn=rnn_step_fn(),
        start_ids=tf.range(batch_size) % 12,
        end_id=END_ID,
        initial_state=tf.zeros([batch_size, 16]),
        constants=tf.random.stateless_normal([batch_size, 16], seed=[4, 0]),
        max_length=max_length,
    )


def test_beam_size_1_equals_greedy():
    greedy = run(search.greedy_search, **rnn_args())
    beam = run(search.beam_search, **rnn_args(), beam_size=1)
    lengths = greedy.lengths.numpy()
    assert len(set(lengths.ravel())) > 4 and (lengths == 10).any()  # ended and cut
    np.testing.assert_array_equal(beam.ids, greedy.ids)
    np.testing.assert_array_equal(beam.lengths, lengths)
    # Same tokens; beam search normalizes with logsumexp, greedy with log_softmax: other rounding.
    np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-6)


def test_log_normalizer_from_the_row_maximum_equals_reduce_logsumexp():
    """Both searches normalize with `_logsumexp` given each row's maximum (found by their
    argmax or top-k): bit for bit `tf.reduce_logsumexp`, masked (-1e9, -inf) and all -inf
    rows included."""
    logits = tf.random.stateless_normal([6, 300], seed=[7, 0]) * 8.0
    logits = tf.tensor_scatter_nd_update(
        logits, [[1, 5], [2, 0], [3, 299]], [-1e9, float("-inf"), 1e4]
    )
    logits = tf.concat([logits, tf.fill([1, 300], float("-inf"))], 0)
    expected = tf.reduce_logsumexp(logits, axis=1)
    np.testing.assert_array_equal(search._logsumexp(logits, tf.reduce_max(logits, 1)), expected)
    top, _ = search._top_k(logits, 3)
    np.testing.assert_array_equal(search._logsumexp(logits, top[:, 0]), expected)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_scores_do_not_depend_on_a_constant_added_to_a_rows_logits(strategy):
    """The step's logits are normalized (log-softmax) before they score anything: adding a
    different constant to every row at every step changes no output."""
    step_fn = rnn_step_fn()

    def shifted_step_fn(ids, state, constants):
        logits, state, attention = step_fn(ids, state, constants)
        shift = 50.0 * tf.tanh(tf.reduce_sum(state, axis=1, keepdims=True))  # per row and step
        return logits + shift, state, attention

    def decode(fn):
        args = {**rnn_args(), "step_fn": fn}
        if strategy == "greedy":
            return run(search.greedy_search, **args)
        return run(search.beam_search, **args, beam_size=3, n_best=2, length_penalty=0.6)

    plain, shifted = decode(step_fn), decode(shifted_step_fn)
    np.testing.assert_array_equal(shifted.ids, plain.ids)
    np.testing.assert_allclose(shifted.log_probs, plain.log_probs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shifted.scores, plain.scores, rtol=1e-4, atol=1e-4)
    log_probs = plain.log_probs.numpy()
    assert np.all(log_probs <= 0) and np.any(log_probs < -1)  # log-probabilities


def test_beam_search_escapes_greedy_trap():
    probs = {
        (): {0: 0.5, 1: 0.4, 2: 0.09, END_ID: 0.01},
        (0,): {0: 0.3, 1: 0.25, 2: 0.25, END_ID: 0.2},
        (1,): {0: 0.05, 1: 0.03, 2: 0.02, END_ID: 0.9},
    }
    default = {0: 0.2, 1: 0.12, 2: 0.08, END_ID: 0.6}

    def log_probs(prefix):
        p = probs.get(prefix, default)
        return np.log([p[w] for w in range(VOCAB_SIZE)])

    tree = PrefixTree(3, [log_probs])
    greedy = run(search.greedy_search, **tree.args())
    assert hypotheses(greedy, 0) == [(0, 0, END_ID)]
    np.testing.assert_allclose(greedy.log_probs, [[math.log(0.5 * 0.3 * 0.6)]], rtol=1e-5)
    beam = run(search.beam_search, **tree.args(), beam_size=2)
    assert hypotheses(beam, 0) == [(1, END_ID)]
    np.testing.assert_allclose(beam.scores, [[math.log(0.4 * 0.9)]], rtol=1e-5)
    assert tree.brute_force(0)[0][2] == (1, END_ID)


# Beam search against brute force.


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_beam_search_matches_brute_force(alpha):
    tree = random_tree(max_length=4, batch_size=2, seed=1)
    # 27 beams keep every 3-word prefix, so the search is exact.
    exact = run(search.beam_search, **tree.args(), beam_size=27, n_best=6, length_penalty=alpha)
    # Beam size = vocabulary size: no guarantee, but these trees are easy enough.
    small = run(search.beam_search, **tree.args(), beam_size=VOCAB_SIZE, length_penalty=alpha)
    for b in range(tree.batch_size):
        expected = tree.brute_force(b, alpha)
        assert hypotheses(exact, b) == [h for _, _, h in expected[:6]]
        np.testing.assert_allclose(exact.scores[b], [s for s, _, _ in expected[:6]], atol=1e-5)
        np.testing.assert_allclose(exact.log_probs[b], [p for _, p, _ in expected[:6]], atol=1e-5)
        assert hypotheses(small, b) == [expected[0][2]]
        np.testing.assert_allclose(small.scores[b], [expected[0][0]], atol=1e-5)
    assert_padded(exact)


def test_beam_search_scores_are_exact_for_inexact_search():
    tree = random_tree(max_length=4, batch_size=3, seed=2)
    result = run(search.beam_search, **tree.args(), beam_size=2, n_best=2, length_penalty=0.6)
    for b in range(tree.batch_size):
        best = tree.brute_force(b, 0.6)[0][0]
        for hypothesis, score, log_prob in zip(
            hypotheses(result, b), result.scores[b], result.log_probs[b], strict=True
        ):
            expected_score, expected_log_prob = tree.score(b, hypothesis, 0.6)
            np.testing.assert_allclose(
                [score, log_prob], [expected_score, expected_log_prob], atol=1e-5
            )
            assert score <= best + 1e-5


def test_batch_equals_sentences_decoded_alone():
    tree = random_tree(max_length=4, batch_size=3, seed=3, attention_size=5)
    max_length = [4, 2, 3]
    options = dict(beam_size=3, n_best=2, length_penalty=0.6, coverage_penalty=0.3)
    batch = run(
        search.beam_search, **tree.args(tf.constant(max_length)), **options, return_alignment=True
    )
    greedy_batch = run(search.greedy_search, **tree.args(tf.constant(max_length)))
    for b in range(tree.batch_size):
        alone = run(
            search.beam_search, **tree.args(max_length[b], [b]), **options, return_alignment=True
        )
        steps = alone.ids.shape[-1]
        np.testing.assert_array_equal(batch.ids[b, :, :steps], alone.ids[0])
        np.testing.assert_array_equal(batch.lengths[b], alone.lengths[0])
        np.testing.assert_allclose(batch.scores[b], alone.scores[0], rtol=1e-6)
        np.testing.assert_allclose(batch.log_probs[b], alone.log_probs[0], rtol=1e-6)
        np.testing.assert_allclose(batch.alignments[b, :, :steps], alone.alignments[0])
        assert max(len(h) for h in hypotheses(batch, b)) <= max_length[b]
        greedy_alone = run(search.greedy_search, **tree.args(max_length[b], [b]))
        assert hypotheses(greedy_batch, b) == hypotheses(greedy_alone, 0)
        np.testing.assert_allclose(greedy_batch.log_probs[b], greedy_alone.log_probs[0])
    assert_padded(batch)


@pytest.mark.parametrize("early_stopping", search.EARLY_STOPPING)
def test_per_sentence_length_penalty_equals_each_sentence_with_its_own(early_stopping):
    # One search with a penalty per sentence = each sentence searched with its penalty alone
    # (what lets the server merge requests with different length_penalty into one call).
    tree = random_tree(max_length=5, batch_size=4, seed=11, attention_size=4)
    alphas = [0.0, 2.5, 0.6, 6.0]
    options = dict(beam_size=3, n_best=2, early_stopping=early_stopping)
    batch = run(search.beam_search, **tree.args(), **options, length_penalty=tf.constant(alphas))
    for b, alpha in enumerate(alphas):
        alone = run(search.beam_search, **tree.args(5, [b]), **options, length_penalty=alpha)
        assert hypotheses(batch, b) == hypotheses(alone, 0)
        np.testing.assert_allclose(batch.scores[b], alone.scores[0], rtol=1e-6)
        for (score, log_prob), h in zip(
            zip(batch.scores[b].numpy(), batch.log_probs[b].numpy(), strict=True),
            hypotheses(batch, b),
            strict=True,
        ):
            np.testing.assert_allclose(score, log_prob / lp(len(h), alpha), rtol=1e-5)
    # The penalties matter here: with one penalty for all, some sentence's best would differ.
    same = run(search.beam_search, **tree.args(), **options, length_penalty=0.0)
    assert any(hypotheses(same, b) != hypotheses(batch, b) for b in range(1, 4))


# Length penalty, frozen hypotheses, coverage penalty.


def two_hypotheses_tree(max_length=6):
    """A short hypothesis (0, END) of probability 0.6 and a long one (1, 2, 2, END) of
    probability 0.4; everything else has probability about 1e-9 per token."""
    forced = {(): {0: 0.6, 1: 0.4}, (0,): {END_ID: 1.0}, (1,): {2: 1.0}, (1, 2): {2: 1.0}}
    forced[(1, 2, 2)] = {END_ID: 1.0}  # other prefixes, and None, end at once

    def log_probs(prefix):
        p = forced.get(prefix, {END_ID: 1.0})
        return np.log([p.get(w, 1e-9) for w in range(VOCAB_SIZE)])

    return PrefixTree(max_length, [log_probs], depth=4)


def test_length_penalty_changes_ranking_as_its_formula_predicts():
    short, long = (0, END_ID), (1, 2, 2, END_ID)
    # log(0.6) / lp(2) = log(0.4) / lp(4)  <=>  (lp(4) / lp(2)) ** alpha = log(0.4) / log(0.6)
    threshold = math.log(math.log(0.4) / math.log(0.6)) / math.log(9 / 7)
    tree = two_hypotheses_tree()
    for alpha, expected in ((0.0, short), (threshold - 0.1, short), (threshold + 0.1, long)):
        result = run(search.beam_search, **tree.args(), beam_size=2, length_penalty=alpha)
        assert hypotheses(result, 0) == [expected]
        log_prob = math.log(0.6 if expected == short else 0.4)
        np.testing.assert_allclose(result.log_probs, [[log_prob]], rtol=1e-5)
        np.testing.assert_allclose(
            result.scores, [[log_prob / lp(len(expected), alpha)]], rtol=1e-5
        )


def test_finished_hypotheses_stay_frozen():
    tree = two_hypotheses_tree()
    alpha = 3.0
    result = run(search.beam_search, **tree.args(), beam_size=2, n_best=2, length_penalty=alpha)
    # The short hypothesis finished at step 1 while the search went on to step 3 and
    # beyond: its log-prob and score are those it had when it finished.
    assert int(result.steps) >= 4
    assert hypotheses(result, 0) == [(1, 2, 2, END_ID), (0, END_ID)]
    np.testing.assert_allclose(result.log_probs[0, 1], math.log(0.6), rtol=1e-6)
    np.testing.assert_allclose(result.scores[0, 1], math.log(0.6) / lp(2, alpha), rtol=1e-6)


def test_early_exit_with_length_penalty_bound():
    tree = two_hypotheses_tree(max_length=20)
    # alpha = 0: after step 1, (0, END) at log(0.6) beats every alive beam (<= log(0.4)).
    result = run(search.beam_search, **tree.args(), beam_size=2)
    assert int(result.steps) == 2
    # alpha = 3: an alive beam could still win at max_length, the long hypothesis does.
    result = run(search.beam_search, **tree.args(), beam_size=2, length_penalty=3.0)
    assert hypotheses(result, 0) == [(1, 2, 2, END_ID)]
    assert int(result.steps) < 20


def test_heuristic_early_stopping_trades_the_long_hypothesis_for_steps():
    tree = two_hypotheses_tree(max_length=20)
    options = dict(beam_size=2, length_penalty=3.0, early_stopping="heuristic")
    result = run(search.beam_search, **tree.args(), **options)
    # After step 2, (0, END) scores log(0.6) / lp(2) = -0.32; the best alive beam (1, 2) ending
    # at the next step would score log(0.4) / lp(3) = -0.39: the heuristic stops there, and
    # misses (1, 2, 2, END), which the exact bound finds (test above).
    assert int(result.steps) == 2
    assert hypotheses(result, 0) == [(0, END_ID)]
    np.testing.assert_allclose(result.scores, [[math.log(0.6) / lp(2, 3.0)]], rtol=1e-5)


def test_heuristic_early_stopping_is_exact_without_length_penalty():
    exact = run(search.beam_search, **rnn_args(), beam_size=3, n_best=2)
    heuristic = run(
        search.beam_search, **rnn_args(), beam_size=3, n_best=2, early_stopping="heuristic"
    )
    for name in ("ids", "lengths", "scores", "steps"):
        np.testing.assert_array_equal(getattr(heuristic, name), getattr(exact, name))


def test_unknown_early_stopping_is_an_error():
    with pytest.raises(ValueError, match="early_stopping must be one of exact, heuristic"):
        run(search.beam_search, **rnn_args(), beam_size=2, early_stopping="never")


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.5), (0.6, 0.2)])
def test_coverage_penalty_matches_formula(alpha, beta):
    tree = random_tree(max_length=4, batch_size=2, seed=4, attention_size=4)
    options = dict(beam_size=27, n_best=5, length_penalty=alpha, coverage_penalty=beta)
    result = run(search.beam_search, **tree.args(), **options)
    for b in range(tree.batch_size):
        expected = tree.brute_force(b, alpha, beta)[:5]
        assert hypotheses(result, b) == [h for _, _, h in expected]
        np.testing.assert_allclose(result.scores[b], [s for s, _, _ in expected], atol=1e-5)
    # The penalty changed the ranking, so it is really applied.
    assert [h for _, _, h in tree.brute_force(0, alpha)[:5]] != hypotheses(result, 0)


def test_missing_attention_is_a_trace_time_error():
    with pytest.raises(ValueError, match="coverage_penalty"):
        search.beam_search(**scripted_args(5), beam_size=2, coverage_penalty=0.2)
    with pytest.raises(ValueError, match="return_alignment"):
        search.greedy_search(**scripted_args(5), return_alignment=True)


def test_n_best_larger_than_beam_size_is_an_error():
    with pytest.raises(ValueError, match="n_best"):
        search.beam_search(**scripted_args(5), beam_size=2, n_best=3)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def decode(n_best):
        return search.beam_search(**scripted_args(5), beam_size=2, n_best=n_best)

    with pytest.raises(tf.errors.InvalidArgumentError, match="n_best"):
        decode(3)


# Alignments.


def test_alignments_follow_each_hypothesis_prefix():
    tree = random_tree(max_length=4, batch_size=2, seed=5, attention_size=6)
    results = [
        run(search.greedy_search, **tree.args(), return_alignment=True),
        run(search.sample, **tree.args(), seed=3, return_alignment=True),
        run(search.beam_search, **tree.args(), beam_size=4, n_best=3, return_alignment=True),
    ]
    for result in results:
        batch, n_best, steps = result.ids.shape
        assert result.alignments.shape == (batch, n_best, steps, 6)
        for b in range(batch):
            for n, hypothesis in enumerate(hypotheses(result, b)):
                expected = [
                    tree.attention[b, tree.index[hypothesis[:t]]] for t in range(len(hypothesis))
                ]
                expected += [np.zeros(6)] * (steps - len(hypothesis))
                np.testing.assert_allclose(result.alignments[b, n], expected, atol=1e-6)


# Sampling.


def test_sampling_limits_equal_greedy():
    tree = random_tree(max_length=6, batch_size=8, seed=6)
    greedy = run(search.greedy_search, **tree.args())
    for options in (dict(temperature=1e-4), dict(top_k=1)):
        sampled = run(search.sample, **tree.args(), seed=1, **options)
        np.testing.assert_array_equal(sampled.ids, greedy.ids)
        np.testing.assert_array_equal(sampled.lengths, greedy.lengths)
        np.testing.assert_allclose(sampled.log_probs, greedy.log_probs, rtol=1e-6)


def test_sampling_is_reproducible_and_respects_top_k():
    tree = random_tree(max_length=6, batch_size=8, seed=7)
    first = run(search.sample, **tree.args(), seed=11, top_k=2)
    again = run(search.sample, **tree.args(), seed=11, top_k=2)
    other = run(search.sample, **tree.args(), seed=12, top_k=2)
    np.testing.assert_array_equal(first.ids, again.ids)
    assert not np.array_equal(first.ids, other.ids)
    for b in range(tree.batch_size):
        (hypothesis,) = hypotheses(first, b)
        for t, token in enumerate(hypothesis):
            top2 = np.argsort(tree.log_probs[b, tree.index[hypothesis[:t]]])[-2:]
            assert token in top2
        np.testing.assert_allclose(first.log_probs[b, 0], tree.score(b, hypothesis)[1], rtol=1e-5)


# Runtime tensors and export.

SIGNATURE = [
    tf.TensorSpec([], tf.int32, name="max_length"),
    tf.TensorSpec([], tf.int32, name="beam_size"),
    tf.TensorSpec([], tf.int32, name="n_best"),
    tf.TensorSpec([], tf.float32, name="length_penalty"),
    tf.TensorSpec([], tf.float32, name="coverage_penalty"),
]


def test_one_trace_serves_any_beam_size_n_best_and_penalties():
    tree = random_tree(max_length=3, batch_size=2, seed=8, attention_size=4)
    args = tree.args()

    @tf.function(input_signature=SIGNATURE)
    def decode(max_length, beam_size, n_best, alpha, beta):
        return search.beam_search(
            **{**args, "max_length": max_length},
            beam_size=beam_size,
            n_best=n_best,
            length_penalty=alpha,
            coverage_penalty=beta,
            return_alignment=True,
        )

    for beam_size, n_best, alpha, beta in ((1, 1, 0.0, 0.0), (3, 2, 0.6, 0.0), (5, 3, 1.0, 0.4)):
        result = decode(3, beam_size, n_best, alpha, beta)
        expected = search.beam_search(
            **args,
            beam_size=beam_size,
            n_best=n_best,
            length_penalty=alpha,
            coverage_penalty=beta,
            return_alignment=True,
        )
        for name in ("ids", "lengths", "scores", "log_probs", "alignments"):
            np.testing.assert_allclose(getattr(result, name), getattr(expected, name), rtol=1e-6)
    # 9 beams keep every 2-word prefix: exact, against brute force.
    result = decode(3, 9, 4, 0.8, 0.3)
    for b in range(tree.batch_size):
        expected = tree.brute_force(b, 0.8, 0.3)[:4]
        assert hypotheses(result, b) == [h for _, _, h in expected]
        np.testing.assert_allclose(result.scores[b], [s for s, _, _ in expected], atol=1e-5)
    assert decode.experimental_get_tracing_count() == 1


def test_saved_model_round_trip(tmp_path):
    tree = random_tree(max_length=3, batch_size=2, seed=9, attention_size=4)
    args = tree.args()

    class Decoder(tf.Module):
        @tf.function(input_signature=SIGNATURE)
        def beam_search(self, max_length, beam_size, n_best, alpha, beta):
            result = search.beam_search(
                **{**args, "max_length": max_length},
                beam_size=beam_size,
                n_best=n_best,
                length_penalty=alpha,
                coverage_penalty=beta,
                return_alignment=True,
            )
            return result._asdict()

    decoder = Decoder()
    before = decoder.beam_search(3, 4, 2, 0.6, 0.2)
    tf.saved_model.save(decoder, str(tmp_path))
    after = tf.saved_model.load(str(tmp_path)).beam_search(3, 4, 2, 0.6, 0.2)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_docstring_examples():
    assert doctest.testmod(search, raise_on_error=True).attempted > 0
