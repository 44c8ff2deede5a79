"""Greedy search, sampling and beam search over a step function, in pure TensorFlow."""

from typing import NamedTuple

import tensorflow as tf

from translator.config import DecodingConfig, field_choices

_NEG_INF = float("-inf")
# When beam search stops a sentence; the values are defined once, by the config.
EARLY_STOPPING = tuple(sorted(field_choices(DecodingConfig, "early_stopping")))


class DecodingResult(NamedTuple):
    """The hypotheses returned by `greedy_search`, `sample` and `beam_search`.

    A `NamedTuple`, so it passes through `tf.function` and `tf.nest` as is.

    Args:
        ids: int32 `[batch, n_best, T]`, the generated ids, best hypothesis first.
            `T` is the longest output in the batch. The end id is included when it
            was produced; positions after the end are padded with 0.
        lengths: int32 `[batch, n_best]`, number of generated tokens, end id
            included when it was produced.
        scores: float32 `[batch, n_best]`, the score used to rank the hypotheses:
            for beam search the normalized score `log_prob / lp + cp`, for greedy
            search and sampling the sum of the token log-probabilities.
        log_probs: float32 `[batch, n_best]`, the sum of the token log-probabilities.
        alignments: float32 `[batch, n_best, T, S]`, the attention of each generated
            token (zeros on padding), or `None` when not requested.
        steps: int32 scalar, how many times the step function was called (the
            decoding loop stops early once every hypothesis is settled).
    """

    ids: tf.Tensor
    lengths: tf.Tensor
    scores: tf.Tensor
    log_probs: tf.Tensor
    alignments: tf.Tensor | None
    steps: tf.Tensor


def tile_batch(nested, multiplier):
    """Repeats each batch row `multiplier` times, keeping the copies contiguous.

    Args:
        nested: a tensor or nested structure of tensors of shape `[batch, ...]`.
        multiplier: int or int32 scalar tensor.

    Returns:
        The same structure with tensors of shape `[batch * multiplier, ...]`,
        where row `b * multiplier + k` is row `b` of the input.
    """
    return tf.nest.map_structure(lambda t: tf.repeat(t, multiplier, axis=0), nested)


def greedy_search(
    step_fn,
    start_ids,
    end_id,
    initial_state,
    constants,
    max_length,
    return_alignment=False,
):
    """Decodes by taking the most probable token at each step.

    Args:
        step_fn: callable `(ids, state, constants) -> (logits, new_state, attention)`
            with `ids` int32 `[N]`, `state` a nested structure of `[N, ...]` tensors,
            `constants` a read-only nested structure of `[N, ...]` tensors,
            `logits` float32 `[N, V]` (log-softmax is applied to them, so
            log-probabilities work too) and `attention` float32 `[N, S]` or `None`.
            Here `N = batch` at the first step; afterwards the rows of finished sentences
            are left out (their ids, state and constants alike), so `step_fn` must treat
            rows independently and take its per-row inputs from `state` and `constants`.
        start_ids: int32 `[batch]`, the first input of the step function.
        end_id: int scalar, the end-of-sentence id.
        initial_state: nested structure of `[batch, ...]` tensors.
        constants: nested structure of `[batch, ...]` tensors (e.g. encoder memory).
        max_length: int32 scalar or `[batch]`, maximum number of generated tokens,
            end id included; a sentence that reaches it stops there.
        return_alignment: if `True`, also return the attention of every token.

    Returns:
        A `DecodingResult` with `n_best = 1`; `scores` equals `log_probs`.
    """
    return _decode_one_best(
        step_fn,
        start_ids,
        end_id,
        initial_state,
        constants,
        max_length,
        summarize=_greedy_choice,
        compact=True,
        return_alignment=return_alignment,
    )


def _greedy_choice(logits, step=None):
    """The most probable token of each row `[N, V]` and its log-probability."""
    ids = tf.argmax(logits, axis=-1, output_type=tf.int32)
    best = tf.gather(logits, ids, batch_dims=1)
    return {"ids": ids, "token_log_probs": best - _logsumexp(logits, best)}


def _logsumexp(logits, row_max):
    """`tf.reduce_logsumexp(logits, axis=1)` `[N, V] -> [N]` given each row's maximum, which
    the caller has already found (the argmax's or the top-k's first value): the same
    arithmetic, one pass over the logits fewer."""
    shift = tf.stop_gradient(tf.where(tf.math.is_finite(row_max), row_max, 0.0))
    return tf.math.log(tf.reduce_sum(tf.exp(logits - shift[:, tf.newaxis]), axis=1)) + shift


def sample(
    step_fn,
    start_ids,
    end_id,
    initial_state,
    constants,
    max_length,
    temperature=1.0,
    top_k=0,
    seed=None,
    return_alignment=False,
):
    """Decodes by sampling each token from the (tempered, truncated) distribution.

    Sampling uses stateless random ops: the same `seed` gives the same output.

    Args:
        step_fn: the step function, see `greedy_search`.
        start_ids: int32 `[batch]`, the first input of the step function.
        end_id: int scalar, the end-of-sentence id.
        initial_state: nested structure of `[batch, ...]` tensors.
        constants: nested structure of `[batch, ...]` tensors.
        max_length: int32 scalar or `[batch]`, maximum number of generated tokens.
        temperature: float scalar > 0; the log-probabilities are divided by it
            before sampling (towards 0: greedy, above 1: flatter).
        top_k: int scalar; sample among the `top_k` most probable tokens only,
            0 for the full distribution.
        seed: int scalar or int `[2]`; `None` draws a random one.
        return_alignment: if `True`, also return the attention of every token.

    Returns:
        A `DecodingResult` with `n_best = 1`; `scores` and `log_probs` are the sum
        of the model's log-probabilities (before temperature and truncation) of
        the sampled tokens.
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.constant(0, tf.int64)])
    temperature = tf.cast(temperature, tf.float32)
    top_k = tf.cast(top_k, tf.int32)

    def choose(logits, step):
        log_probs = tf.nn.log_softmax(logits)
        truncated = _keep_top_k(log_probs / temperature, top_k)
        step_seed = tf.random.experimental.stateless_fold_in(seed, step)
        ids = tf.random.stateless_categorical(truncated, 1, seed=step_seed, dtype=tf.int32)[:, 0]
        return {"ids": ids, "token_log_probs": tf.gather(log_probs, ids, batch_dims=1)}

    return _decode_one_best(
        step_fn,
        start_ids,
        end_id,
        initial_state,
        constants,
        max_length,
        summarize=choose,
        compact=False,  # each row draws from its own random stream: keep the rows in place
        return_alignment=return_alignment,
    )


def beam_search(
    step_fn,
    start_ids,
    end_id,
    initial_state,
    constants,
    max_length,
    beam_size,
    n_best=1,
    length_penalty=0.0,
    coverage_penalty=0.0,
    return_alignment=False,
    early_stopping="exact",
    tile_constants=True,
):
    """Beam search with GNMT length and coverage penalties.

    The search keeps two sets per sentence, as in tensor2tensor: `beam_size` alive
    beams, ranked by log-probability, and `n_best` finished hypotheses, ranked by
    their final score `log_prob / lp(length) + cp`. At each step the candidates are
    the `top_k` over `beam_size * vocab` extensions of the alive beams: a
    candidate ending with the end id moves to the finished set (and never changes
    again), the best other candidates become the new alive beams. A sentence that
    reaches its `max_length` finishes its best alive beams as they stand. The loop
    stops as soon as, for every sentence, the finished set is full and no alive
    beam can still beat its worst member, or `max_length` is reached. (So with
    `beam_size=1` the result differs from `greedy_search` when an end candidate
    met on the way scores better than the greedy sequence.) A stopped sentence's
    beams leave the step function's batch: the steps that remain cost what the
    sentences still running need (batch compaction, see `_run_decode_loop`).

    "Can still beat" has two readings, chosen by `early_stopping`:

    - `"exact"`: an alive beam's log-prob only falls, but with `length_penalty > 0`
      its normalized score can still rise as it grows, up to `log_prob / lp(max_length)`.
      The search stops only when that bound cannot win, so it returns the best
      hypothesis the beam can reach. With a positive length penalty this bound is
      loose and the search usually runs to `max_length`.
    - `"heuristic"`: the best alive beam is scored as if it ended at the next step,
      `log_prob / lp(length + 1)`, the rule of Hugging Face's default beam search. It
      stops as soon as the finished hypotheses beat that, typically a few steps after
      the best hypothesis ends; in return it may miss a longer hypothesis that the
      length penalty would have ranked first.

    Each step ranks the `beam_size + 1` best tokens of each beam only (one of them may
    be the end id): the `beam_size` best non-end extensions of a sentence are always
    among them, so nothing is lost, and no `[batch, beam_size * vocab]` tensor is built.

    `beam_size`, `n_best`, `length_penalty`, `coverage_penalty` and `max_length`
    may be runtime tensors: one traced graph serves any value.

    Args:
        step_fn: the step function, see `greedy_search`. Here `N = batch * beam_size`
            and the beams of sentence `b` are rows `b * beam_size + k` at the first step;
            afterwards the beams of finished sentences are left out.
        start_ids: int32 `[batch]`, the first input of the step function.
        end_id: int scalar, the end-of-sentence id.
        initial_state: nested structure of `[batch, ...]` tensors; tiled to
            `[batch * beam_size, ...]` here and reordered by parent beam at each step.
        constants: nested structure of `[batch, ...]` tensors; tiled once here and
            never reordered (the beams of a sentence share them), unless `tile_constants`
            is `False`.
        max_length: int32 scalar or `[batch]`, maximum number of generated tokens,
            end id included.
        beam_size: int scalar >= 1.
        n_best: int scalar, `1 <= n_best <= beam_size`, hypotheses returned per
            sentence.
        length_penalty: float scalar or `[batch]`, the GNMT `alpha` (one per sentence:
            sentences with different penalties share one search); 0 ranks by log-probability.
        coverage_penalty: float scalar, the GNMT `beta`; needs a step function
            that returns attention.
        return_alignment: if `True`, also return the attention of every token.
        early_stopping: `"exact"` or `"heuristic"`, when a sentence stops (see above).
        tile_constants: if `False`, the step function gets the constants untiled, one row
            per (live) sentence, against `N` rows of ids and state whose consecutive groups
            of `N / rows` are the beams of one sentence; it must handle that, as
            `Seq2Seq.step_function(shared_constants=True)` does (its attention then reads
            each sentence's memory once per step for all its beams).

    Returns:
        A `DecodingResult` with the `n_best` hypotheses of each sentence, best first.

    Raises:
        ValueError: if `n_best > beam_size` (when both are known when tracing), if
            `early_stopping` is not one of `EARLY_STOPPING`, or
            if the step function returns no attention although alignments or a
            coverage penalty are asked for.

    Example:

    >>> import tensorflow as tf
    >>> def step_fn(ids, state, constants):
    ...     # Always predicts token `state + 1` (vocab of 4, end id 3).
    ...     logits = tf.one_hot(state + 1, 4, on_value=0.0, off_value=-10.0)
    ...     return logits, state + 1, None
    >>> result = beam_search(step_fn, start_ids=tf.constant([1]), end_id=3,
    ...     initial_state=tf.constant([0]), constants=(), max_length=10, beam_size=2)
    >>> result.ids.numpy().tolist(), result.lengths.numpy().tolist()
    ([[[1, 2, 3]]], [[3]])

    References:
        - [Wu et al., 2016](https://arxiv.org/abs/1609.08144) (length and coverage
          penalties)
        - [Vaswani et al., 2018](https://arxiv.org/abs/1803.07416) (tensor2tensor,
          alive and finished sets)
    """
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(
            f"early_stopping must be one of {', '.join(EARLY_STOPPING)}, got {early_stopping!r}"
        )
    beta = tf.cast(coverage_penalty, tf.float32)
    static_beta = tf.get_static_value(beta)
    static_beam, static_n_best = tf.get_static_value(beam_size), tf.get_static_value(n_best)
    if static_beam is not None and static_beam < 1:
        raise ValueError(f"beam_size must be >= 1, got {static_beam}")
    if static_n_best is not None and static_n_best < 1:
        raise ValueError(f"n_best must be >= 1, got {static_n_best}")
    if static_beam is not None and static_n_best is not None and static_n_best > static_beam:
        raise ValueError(f"n_best ({static_n_best}) must be <= beam_size ({static_beam})")
    beam_size = tf.cast(beam_size, tf.int32)
    n_best = tf.cast(n_best, tf.int32)
    checks = [
        tf.debugging.assert_positive(n_best, message="n_best must be >= 1"),
        tf.debugging.assert_less_equal(n_best, beam_size, message="n_best must be <= beam_size"),
    ]
    with tf.control_dependencies(checks):
        beam_size = tf.identity(beam_size)

    start_ids = tf.convert_to_tensor(start_ids, tf.int32)
    end_id = tf.cast(end_id, tf.int32)
    batch_size = tf.shape(start_ids)[0]
    max_length = tf.broadcast_to(tf.cast(max_length, tf.int32), [batch_size])
    alpha = tf.broadcast_to(tf.cast(length_penalty, tf.float32), [batch_size])  # [B]
    # Best final score an alive beam can reach is bounded through lp at max_length.
    max_length_penalty = gnmt_length_penalty(max_length, alpha)  # [B]
    batch_offsets = tf.range(batch_size)[:, tf.newaxis] * beam_size  # [B, 1]
    beam_ids = tf.broadcast_to(tf.range(beam_size), [batch_size, beam_size])  # [B, K]

    constants = () if constants is None else constants
    # Constants are tiled once and shared by the beams of a sentence: never reordered (only
    # compacted when sentences finish, see _run_decode_loop).
    constants_flat = tile_batch(constants, beam_size) if tile_constants else constants
    state_flat = tile_batch(initial_state, beam_size)
    ids_flat = tile_batch(start_ids, beam_size)  # [B*K]

    logits, state_flat, attention = _call_step_fn(step_fn, ids_flat, state_flat, constants_flat)
    k = tf.minimum(beam_size + 1, tf.shape(logits)[1])  # tokens ranked per beam
    if return_alignment and attention is None:
        raise ValueError("return_alignment=True needs a step_fn that returns attention")
    track_coverage = static_beta is None or static_beta != 0.0
    if track_coverage and attention is None:
        if static_beta is not None:
            raise ValueError(
                "coverage_penalty != 0 needs a step_fn that returns attention, got None"
            )
        track_coverage = False
        checks = [tf.debugging.assert_equal(beta, 0.0, message="coverage_penalty needs attention")]
        with tf.control_dependencies(checks):
            beta = tf.identity(beta)

    # Only beam 0 is live at step 0, so the first top_k picks distinct tokens.
    initial_log_probs = tf.where(tf.equal(beam_ids, 0), 0.0, _NEG_INF)  # [B, K]
    carry = {
        "alive_log_probs": initial_log_probs,
        "done": max_length <= 0,  # [B]
        # The finished set, sorted best first; empty slots score -inf and have length 0.
        "finished_scores": tf.fill([batch_size, n_best], _NEG_INF),
        "finished_log_probs": tf.fill([batch_size, n_best], _NEG_INF),
        "finished_lengths": tf.zeros([batch_size, n_best], tf.int32),
        # Alive beam (of the step that emitted the last token) and last token of each
        # finished hypothesis: the rest is found by backtracking through the arrays.
        "finished_parents": tf.zeros([batch_size, n_best], tf.int32),
        "finished_tokens": tf.zeros([batch_size, n_best], tf.int32),
        "parents": tf.TensorArray(tf.int32, size=0, dynamic_size=True),
        "tokens": tf.TensorArray(tf.int32, size=0, dynamic_size=True),
    }
    if return_alignment:
        carry["attention"] = tf.TensorArray(tf.float32, size=0, dynamic_size=True)
    if track_coverage:
        carry["coverage"] = tf.zeros_like(attention)  # [B*K, S]

    def summarize(logits, step):
        # log p(token) = logit - logsumexp(logits) + the beam's log-prob: adding a per-row
        # constant keeps each row's order, so only the end token and each row's top
        # K + 1 logits are normalized, never the whole [B*K, V] matrix. The K best non-end
        # extensions of a sentence are among the K + 1 best tokens of its beams.
        top_logits, top_tokens = _top_k(logits, k)  # [n, k]
        return {
            "log_normalizer": _logsumexp(logits, top_logits[:, 0]),  # [n]
            "end_logits": logits[:, end_id],  # [n]
            "top_logits": top_logits,
            "top_tokens": top_tokens,
        }

    # A finished sentence's rows are not computed: their alive beams fall to -inf.
    fill = {"log_normalizer": 0.0, "end_logits": _NEG_INF, "top_logits": _NEG_INF, "top_tokens": 0}

    def live_rows(carry):
        sentences = tf.cast(tf.where(~carry["done"])[:, 0], tf.int32)  # [A]
        return tf.reshape(sentences[:, tf.newaxis] * beam_size + tf.range(beam_size), [-1])

    def advance(step, summary, state_flat, attention, carry):
        length = step + 1  # every candidate of this step has this many tokens
        penalty = gnmt_length_penalty(length, alpha)[:, tf.newaxis]  # [B, 1]
        offset = carry["alive_log_probs"] - tf.reshape(
            summary["log_normalizer"], [batch_size, beam_size]
        )  # [B, K]
        eos_log_probs = tf.reshape(summary["end_logits"], [batch_size, beam_size]) + offset
        row_logits, row_tokens = summary["top_logits"], summary["top_tokens"]  # [B*K, k]
        row_logits = tf.where(tf.equal(row_tokens, end_id), _NEG_INF, row_logits)
        candidates = tf.reshape(row_logits, [batch_size, beam_size, k]) + offset[..., tf.newaxis]
        top_log_probs, top_indices = tf.math.top_k(
            tf.reshape(candidates, [batch_size, -1]), k=beam_size
        )  # [B, K], over the K * k candidates of each sentence
        parents = top_indices // k  # [B, K], parent beam within the sentence
        tokens = tf.gather(
            tf.reshape(row_tokens, [batch_size, -1]), top_indices, batch_dims=1
        )  # [B, K]

        # Finished candidates: EOS extensions, plus the alive candidates at max_length.
        live = tf.logical_not(carry["done"])[:, tf.newaxis]  # [B, 1]
        at_max = tf.equal(length, max_length)[:, tf.newaxis]
        eos_scores = eos_log_probs / penalty
        forced_scores = top_log_probs / penalty
        if track_coverage:
            coverage = carry["coverage"] + attention  # [B*K, S], this step's token included
            # The penalty depends on the beam only, not on the token: [B*K] -> [B, K]
            beam_coverage = tf.reshape(_coverage_penalty(coverage, beta), [batch_size, -1])
            eos_scores += beam_coverage
            forced_scores += tf.gather(beam_coverage, parents, batch_dims=1)
        eos_scores = tf.where(live, eos_scores, _NEG_INF)  # live implies length <= max_length
        forced_scores = tf.where(live & at_max, forced_scores, _NEG_INF)
        # The finished set comes first so that it wins ties: a hypothesis never leaves
        # it for an equally good one, and entries of a done sentence never change.
        scores = tf.concat([carry["finished_scores"], eos_scores, forced_scores], 1)
        new_lengths = tf.fill([batch_size, beam_size], length)
        candidates = {
            "finished_log_probs": [eos_log_probs, top_log_probs],
            "finished_lengths": [new_lengths, new_lengths],
            "finished_parents": [beam_ids, parents],
            "finished_tokens": [tf.fill([batch_size, beam_size], end_id), tokens],
        }
        finished_scores, order = tf.math.top_k(scores, k=n_best)  # [B, n_best]
        new_carry = {"finished_scores": finished_scores}
        for name, (eos_value, forced_value) in candidates.items():
            values = tf.concat([carry[name], eos_value, forced_value], 1)  # [B, n_best+2K]
            new_carry[name] = tf.gather(values, order, batch_dims=1)  # [B, n_best]

        # Reorder the alive beams by parent: row b*K + k of the flat layout.
        rows = tf.reshape(batch_offsets + parents, [-1])  # [B*K]
        state_flat = tf.nest.map_structure(lambda s: tf.gather(s, rows), state_flat)
        if track_coverage:
            new_carry["coverage"] = tf.gather(coverage, rows)  # [B*K, S]
        new_carry["alive_log_probs"] = top_log_probs
        new_carry["parents"] = carry["parents"].write(step, parents)
        new_carry["tokens"] = carry["tokens"].write(step, tokens)
        if return_alignment:
            # Indexed by the beam that ran this step (the parent), [B*K, S] -> [B, K, S].
            attention = tf.reshape(attention, [batch_size, beam_size, -1])
            new_carry["attention"] = carry["attention"].write(step, attention)

        # Stop a sentence once no alive beam can beat its worst finished hypothesis.
        # Log-probs only decrease, so an alive beam's best final score is its current
        # log-prob over lp at the next length or at max_length (lp is monotonic), plus
        # cp <= 0 (beta >= 0; no early stop otherwise). The heuristic drops max_length.
        best_alive = top_log_probs[:, 0]  # [B]
        bound = best_alive / gnmt_length_penalty(length + 1, alpha)
        if early_stopping == "exact":
            bound = tf.maximum(bound, best_alive / max_length_penalty)
        bound = tf.where(beta < 0.0, float("inf"), bound)
        worst_finished = finished_scores[:, -1]  # [B]
        settled = (worst_finished > _NEG_INF) & (worst_finished >= bound)
        new_carry["done"] = carry["done"] | (length >= max_length) | settled
        return tf.reshape(tokens, [-1]), state_flat, new_carry

    steps, _, _, carry = _run_decode_loop(
        step_fn,
        logits,
        state_flat,
        attention,
        constants_flat,
        carry,
        advance,
        cond=lambda carry: tf.logical_not(tf.reduce_all(carry["done"])),
        summarize=summarize,
        compaction=(fill, live_rows)
        if tile_constants
        # The live rows are the consecutive beams of the live sentences: the first row of
        # each group of beam_size, divided by beam_size, lists those sentences.
        else (fill, live_rows, lambda rows: tf.reshape(rows, [-1, beam_size])[:, 0] // beam_size),
    )

    lengths = carry["finished_lengths"]  # [B, n_best]
    ids, alignments = _backtrack(
        lengths,
        carry["finished_parents"],
        carry["finished_tokens"],
        carry["parents"],
        carry["tokens"],
        carry.get("attention"),
    )
    return DecodingResult(
        ids=ids,
        lengths=lengths,
        scores=carry["finished_scores"],
        log_probs=carry["finished_log_probs"],
        alignments=alignments,
        steps=steps,
    )


def gnmt_length_penalty(length, alpha):
    """GNMT length penalty `lp(length) = ((5 + length) / 6) ** alpha`.

    Args:
        length: int or float tensor, hypothesis length (end id included).
        alpha: float scalar, or a tensor that broadcasts against `length`; 0 disables the
            penalty (`lp = 1`).

    Returns:
        A float32 tensor of the broadcast shape of `length` and `alpha`.

    References:
        - [Wu et al., 2016](https://arxiv.org/abs/1609.08144)
    """
    length = tf.cast(length, tf.float32)
    return tf.pow((5.0 + length) / 6.0, tf.cast(alpha, tf.float32))


def _coverage_penalty(attention_mass, beta):
    """GNMT coverage penalty `beta * sum_j log(min(sum_i attention_ij, 1))`.

    Source positions that received no attention at all (padding) are left out,
    which also keeps `log(0)` out of the sum.

    Args:
        attention_mass: float32 `[..., S]`, attention accumulated over the
            generated tokens, `sum_i attention_ij`.
        beta: float scalar; 0 disables the penalty.

    Returns:
        A float32 tensor of shape `[...]`, at most 0 when `beta >= 0`.

    References:
        - [Wu et al., 2016](https://arxiv.org/abs/1609.08144)
    """
    log_mass = tf.math.log(tf.minimum(attention_mass, 1.0))
    log_mass = tf.where(attention_mass > 0.0, log_mass, 0.0)
    return tf.cast(beta, tf.float32) * tf.reduce_sum(log_mass, axis=-1)


def _call_step_fn(step_fn, ids, state, constants):
    """Calls `step_fn` and casts its outputs to float32."""
    logits, state, attention = step_fn(ids, state, constants)
    logits = tf.cast(logits, tf.float32)
    if attention is not None:
        attention = tf.cast(attention, tf.float32)
    return logits, state, attention


def _run_decode_loop(
    step_fn,
    logits,
    state,
    attention,
    constants,
    carry,
    advance,
    cond,
    summarize,
    compaction=None,
):
    """Runs the decoding `tf.while_loop`, the outputs of step 0 being given.

    Step 0 is called before the loop (by the caller): its attention tells whether
    alignment and coverage can be tracked and gives their shapes, and Keras layers
    called by `step_fn` are built outside the loop.

    `advance` never sees the logits: `summarize` first reduces them to the few per-row
    values it needs (the chosen tokens, or the top tokens and the log-normalizer).

    Batch compaction: sentences finish at different steps, and a loop that keeps
    computing their rows until the slowest sentence of the batch is done spends most
    of its time on rows whose results are thrown away. With `compaction`, each step
    calls `step_fn` on the rows of unfinished sentences only: their ids and state are
    gathered, the constants are gathered again only when the set of rows shrinks, and
    the summaries, state and attention are scattered back to full-batch tensors.

    Args:
        step_fn: the step function.
        logits: the logits of step 0.
        state: the state returned by step 0.
        attention: the attention of step 0 or `None`.
        constants: the constants passed to every step.
        carry: dict of loop tensors and TensorArrays, owned by `advance`.
        advance: `(step, summary, state, attention, carry) -> (next_ids, state, carry)`.
        cond: `carry -> bool scalar`, whether to run one more step.
        summarize: `(logits [n, V], step) -> dict of [n, ...] tensors`, row by row.
        compaction: `None`, or `(fill, live_rows)` or `(fill, live_rows, constant_rows)`:
            `fill` gives each summary the value of the rows not computed (a Python scalar),
            `live_rows(carry)` returns the sorted int32 indices of the rows to compute at the
            next step (the rows of a finished sentence must not matter to `advance` any more),
            and `constant_rows(rows)` the rows of `constants` they read (default: the same
            rows; beam search with untiled constants: the rows' sentences).

    Returns:
        `(steps, ids, state, carry)` after the last step, `steps` being the number
        of calls to `step_fn`.
    """
    step0 = tf.constant(0)
    ids, state, carry = advance(step0, summarize(logits, step0), state, attention, carry)
    num_rows = tf.shape(ids)[0]

    def compacted_step(step, ids, state, carry, rows, live_constants):
        fill, live_rows, *rest = compaction
        constant_rows = rest[0] if rest else (lambda rows: rows)
        new_rows = live_rows(carry)  # a subset of `rows`: equal sizes mean equal sets
        live_constants = tf.cond(
            tf.size(new_rows) < tf.size(rows),
            lambda: tf.nest.map_structure(
                lambda c: tf.gather(c, constant_rows(new_rows)), constants
            ),
            lambda: live_constants,
        )
        gather = lambda t: tf.gather(t, new_rows)  # noqa: E731
        logits, live_state, live_attention = _call_step_fn(
            step_fn, gather(ids), tf.nest.map_structure(gather, state), live_constants
        )
        indices = new_rows[:, tf.newaxis]
        summary = {
            name: tf.tensor_scatter_nd_update(
                tf.fill(
                    tf.concat([[num_rows], tf.shape(value)[1:]], 0),
                    tf.cast(fill[name], value.dtype),
                ),
                indices,
                value,
            )
            for name, value in summarize(logits, step).items()
        }
        state = tf.nest.map_structure(
            lambda full, live: tf.tensor_scatter_nd_update(full, indices, live), state, live_state
        )
        attention = None
        if live_attention is not None:
            attention = tf.scatter_nd(
                indices, live_attention, [num_rows, tf.shape(live_attention)[1]]
            )
        return summary, state, attention, new_rows, live_constants

    def body(step, ids, state, carry, rows, live_constants):
        if compaction is None:
            logits, state, attention = _call_step_fn(step_fn, ids, state, constants)
            summary = summarize(logits, step)
        else:
            summary, state, attention, rows, live_constants = compacted_step(
                step, ids, state, carry, rows, live_constants
            )
        ids, state, carry = advance(step, summary, state, attention, carry)
        return step + 1, ids, state, carry, rows, live_constants

    # Step 0 sees more static shape information (e.g. a Python beam size) than the
    # loop body, where captured values and gathered rows have unknown sizes: relax the
    # leading dimension of the ids, the state, the rows and the live constants, and every
    # dimension of the carry.
    loop_vars = (tf.constant(1), ids, state, carry, tf.range(num_rows), constants)
    shape_invariants = (
        tf.TensorShape([]),
        tf.TensorShape([None]),
        tf.nest.map_structure(lambda t: _relaxed_shape(t, 1), state),
        tf.nest.map_structure(lambda t: _relaxed_shape(t, None), carry),
        tf.TensorShape([None]),
        tf.nest.map_structure(lambda t: _relaxed_shape(t, 1), constants),
    )
    step, ids, state, carry, _, _ = tf.while_loop(
        lambda step, ids, state, carry, rows, live_constants: cond(carry),
        body,
        loop_vars,
        shape_invariants=shape_invariants,
    )
    return step, ids, state, carry


def _relaxed_shape(value, num_relaxed):
    """Shape invariant of a loop variable with its first `num_relaxed` dimensions
    unknown (all if `None`); `None` for a TensorArray (its element shape applies)."""
    if isinstance(value, tf.TensorArray):
        return None
    shape = value.shape
    if shape.rank is None:
        return shape
    num_relaxed = shape.rank if num_relaxed is None else min(num_relaxed, shape.rank)
    return tf.TensorShape([None] * num_relaxed).concatenate(shape[num_relaxed:])


def _decode_one_best(
    step_fn,
    start_ids,
    end_id,
    initial_state,
    constants,
    max_length,
    summarize,
    compact,
    return_alignment,
):
    """Greedy search and sampling: one hypothesis per sentence.

    `summarize(logits [N, V], step)` picks the tokens: a dict of `ids` `[N]` and their
    `token_log_probs` `[N]`. With `compact`, finished sentences are left out of the step
    function's batch (see `_run_decode_loop`).
    """
    start_ids = tf.convert_to_tensor(start_ids, tf.int32)
    end_id = tf.cast(end_id, tf.int32)
    batch_size = tf.shape(start_ids)[0]
    max_length = tf.broadcast_to(tf.cast(max_length, tf.int32), [batch_size])
    constants = () if constants is None else constants

    logits, state, attention = _call_step_fn(step_fn, start_ids, initial_state, constants)
    if return_alignment and attention is None:
        raise ValueError("return_alignment=True needs a step_fn that returns attention")
    carry = {
        "finished": max_length <= 0,  # [B]
        "lengths": tf.zeros([batch_size], tf.int32),
        "log_probs": tf.zeros([batch_size], tf.float32),
        "ids": tf.TensorArray(tf.int32, size=0, dynamic_size=True),
    }
    if return_alignment:
        carry["attention"] = tf.TensorArray(tf.float32, size=0, dynamic_size=True)

    def advance(step, summary, state, attention, carry):
        ids, token_log_probs = summary["ids"], summary["token_log_probs"]  # [B], [B]
        finished = carry["finished"]
        # Finished sentences emit padding and keep their log-prob and length.
        ids = tf.where(finished, 0, ids)
        lengths = carry["lengths"] + tf.cast(tf.logical_not(finished), tf.int32)
        new_carry = {
            "finished": finished | tf.equal(ids, end_id) | (lengths >= max_length),
            "lengths": lengths,
            "log_probs": carry["log_probs"] + tf.where(finished, 0.0, token_log_probs),
            "ids": carry["ids"].write(step, ids),
        }
        if return_alignment:
            attention = tf.where(finished[:, tf.newaxis], 0.0, attention)  # [B, S]
            new_carry["attention"] = carry["attention"].write(step, attention)
        return ids, state, new_carry

    steps, _, _, carry = _run_decode_loop(
        step_fn,
        logits,
        state,
        attention,
        constants,
        carry,
        advance,
        cond=lambda carry: tf.logical_not(tf.reduce_all(carry["finished"])),
        summarize=summarize,
        compaction=(
            (
                {"ids": 0, "token_log_probs": 0.0},
                lambda carry: tf.cast(tf.where(~carry["finished"])[:, 0], tf.int32),
            )
            if compact
            else None
        ),
    )
    lengths = carry["lengths"]
    # At least one step always runs; trim to the longest output (0 if max_length <= 0).
    max_time = tf.reduce_max(lengths)
    ids = tf.transpose(carry["ids"].stack())[:, tf.newaxis, :max_time]  # [T, B] -> [B, 1, T]
    alignments = None
    if return_alignment:
        alignments = tf.transpose(carry["attention"].stack(), [1, 0, 2])  # [B, T, S]
        alignments = alignments[:, tf.newaxis, :max_time]  # [B, 1, T, S]
    log_probs = carry["log_probs"][:, tf.newaxis]
    return DecodingResult(
        ids=ids,
        lengths=lengths[:, tf.newaxis],
        scores=log_probs,
        log_probs=log_probs,
        alignments=alignments,
        steps=steps,
    )


def _top_k(values, k, block=64):
    """`tf.math.top_k(values, k)` of a `[N, V]` matrix, in two passes when V is large.

    The largest `k` values of a row lie in the `k` blocks (of `block` columns) with the
    largest maxima, so one `top_k` over the block maxima and one over those `k` blocks give
    the same values and indices, ties included (the blocks are kept in column order), at a
    third of the cost of `tf.math.top_k` on an (N, 8000) matrix on this CPU.

    Args:
        values: float32 `[N, V]`.
        k: int32 scalar, `1 <= k <= V`.
        block: columns per block.

    Returns:
        `(values [N, k], indices [N, k])`, as `tf.math.top_k`.
    """
    width = values.shape[-1]
    if width is not None and width < 4 * block:
        return tuple(tf.math.top_k(values, k=k))

    def two_pass():
        rows, width = tf.shape(values)[0], tf.shape(values)[1]
        blocks = -(-width // block)
        padded = tf.pad(values, [[0, 0], [0, blocks * block - width]], constant_values=_NEG_INF)
        padded = tf.reshape(padded, [rows, blocks, block])
        _, best = tf.math.top_k(tf.reduce_max(padded, axis=2), k=k)  # [N, k]
        best = tf.sort(best, axis=1)  # column order, so that ties go to the lowest index
        candidates = tf.reshape(tf.gather(padded, best, batch_dims=1), [rows, -1])
        top_values, positions = tf.math.top_k(candidates, k=k)  # [N, k] of [N, k * block]
        top_indices = tf.gather(best, positions // block, batch_dims=1) * block
        return top_values, top_indices + positions % block

    enough_blocks = -(-tf.shape(values)[1] // block) >= k
    return tf.cond(enough_blocks, two_pass, lambda: tuple(tf.math.top_k(values, k=k)))


def _keep_top_k(logits, k):
    """Sets all but the `k` largest logits of each row to -inf; `k <= 0` keeps all.

    Args:
        logits: float32 `[N, V]`.
        k: int32 scalar tensor.

    Returns:
        float32 `[N, V]`.
    """

    def truncate():
        kth_best = tf.math.top_k(logits, k=tf.minimum(k, tf.shape(logits)[-1])).values[:, -1:]
        return tf.where(logits < kth_best, _NEG_INF, logits)

    static_k = tf.get_static_value(k)
    if static_k is not None:
        return truncate() if static_k > 0 else logits
    return tf.cond(k > 0, truncate, lambda: logits)


def _backtrack(lengths, last_parents, last_tokens, parents, tokens, attention):
    """Rebuilds the finished hypotheses from the per-step beam search arrays.

    Storing one `[B, K]` parent and token array per step and backtracking once at
    the end costs O(T) gathers of `[B, n_best]` in total, against O(T) gathers of
    the whole `[B*K, t]` history (and `[B*K, t, S]` attention) per step if the
    histories were reordered inside the search loop.

    Args:
        lengths: int32 `[B, n]`, hypothesis lengths (0 for an empty slot).
        last_parents: int32 `[B, n]`, the beam that emitted each hypothesis's last
            token, in the alive set of step `length - 1`.
        last_tokens: int32 `[B, n]`, each hypothesis's last token.
        parents: TensorArray of int32 `[B, K]`, entry `t` giving the parent beam of
            each alive beam after step `t`.
        tokens: TensorArray of int32 `[B, K]`, entry `t` giving the last token of
            each alive beam after step `t`.
        attention: TensorArray of float32 `[B, K, S]` (entry `t` indexed by the beam
            that ran step `t`) or `None`.

    Returns:
        `(ids, alignments)`: int32 `[B, n, T]` and float32 `[B, n, T, S]` (or `None`),
        with `T = max(lengths)`, padded with zeros.
    """
    last_steps = lengths - 1  # [B, n]
    max_time = tf.reduce_max(lengths)
    # Run at least once so the output arrays are never empty (their element shape
    # is not fully known); the extra column is all padding and sliced off.
    num_steps = tf.maximum(max_time, 1)
    ids_ta = tf.TensorArray(tf.int32, size=num_steps)
    attention_ta = tf.TensorArray(tf.float32, size=num_steps)

    def body(t, beams, ids_ta, attention_ta):
        # beams: [B, n], each hypothesis's beam in the alive set after step t.
        at_end = tf.equal(t, last_steps)
        valid = t <= last_steps
        step_tokens = tf.gather(tokens.read(t), beams, batch_dims=1)  # [B, K] -> [B, n]
        step_parents = tf.gather(parents.read(t), beams, batch_dims=1)
        ids = tf.where(valid, tf.where(at_end, last_tokens, step_tokens), 0)
        parent_beams = tf.where(at_end, last_parents, step_parents)  # beam that ran step t
        ids_ta = ids_ta.write(t, ids)
        if attention is not None:
            step_attention = tf.gather(attention.read(t), parent_beams, batch_dims=1)  # [B, n, S]
            attention_ta = attention_ta.write(
                t, tf.where(valid[..., tf.newaxis], step_attention, 0.0)
            )
        return t - 1, parent_beams, ids_ta, attention_ta

    _, _, ids_ta, attention_ta = tf.while_loop(
        lambda t, *_: t >= 0,
        body,
        (num_steps - 1, tf.zeros_like(lengths), ids_ta, attention_ta),
    )
    ids = tf.transpose(ids_ta.stack(), [1, 2, 0])[:, :, :max_time]  # [T, B, n] -> [B, n, T]
    alignments = None
    if attention is not None:
        alignments = tf.transpose(attention_ta.stack(), [1, 2, 0, 3])  # [T,B,n,S] -> [B,n,T,S]
        alignments = alignments[:, :, :max_time]
    return ids, alignments
