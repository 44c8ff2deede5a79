"""The tf.data training pipeline: tokenize, filter, bucket, pad and shift sentence pairs."""

import logging

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from translator.corpora import DataError
from translator.tokenizer import PAD_ID, add_specials

logger = logging.getLogger("translator.data")

# Examples tokenized per call of the sampling tokenizer under `make_dataset(subword_alpha=...)`.
SAMPLE_CHUNK = 256


def default_buckets(max_length):
    """Returns length-bucket boundaries for sequences of up to `max_length + 1` tokens.

    Args:
        max_length: int, the longest sentence kept, in tokens (without BOS/EOS).

    Returns:
        list of increasing ints, the exclusive upper bounds of all buckets but the last.

    Example:

    >>> default_buckets(30)
    [8, 12, 16, 20, 24, 28]
    """
    candidates = [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128]
    candidates += list(range(160, max_length + 2, 32))
    return [bound for bound in candidates if bound <= max_length + 1]


def make_dataset(
    pairs,
    source_tokenizer,
    target_tokenizer,
    batch_tokens=4096,
    max_length=100,
    shuffle=True,
    seed=0,
    buckets=None,
    cache=True,
    repeat=False,
    drop_remainder=False,
    pad_to_bucket=False,
    subword_alpha=0.0,
):
    """Builds the training `tf.data.Dataset` of padded, length-bucketed, shifted batches.

    Each pair is tokenized in the graph; the source gets `EOS_ID` appended (so the encoder
    sees where the sentence ends, as in the decoder's input), the target gives
    `target_in = [BOS] + ids` and `target_out = ids + [EOS]`, so `target_in[1:] ==
    target_out[:-1]`. Pairs with a side longer than `max_length` tokens (without BOS/EOS)
    or with an empty side are dropped, counted once in Python and logged in one line.

    Batches are grouped by length (`tf.data.Dataset.bucket_by_sequence_length`): an example's
    length is `max(len(source_ids), len(target_in_ids))`, and a bucket whose longest
    example has `L` tokens gets batches of `batch_tokens // L` examples, so every batch
    has `B * max(S, T) <= batch_tokens` (at least one example per batch). Source and target
    are padded with `PAD_ID` separately, to the longest in the batch.

    With `shuffle`, the order is shuffled with `seed` before bucketing and reshuffled every
    epoch (iteration), deterministically: two datasets built with the same arguments yield
    identical batches.

    Args:
        pairs: list of `(english, french)` strings.
        source_tokenizer: `SentencePieceTokenizer` for English.
        target_tokenizer: `SentencePieceTokenizer` for French (may be the same object).
        batch_tokens: int, the token budget of a batch, `B * max(S, T)`.
        max_length: int, the longest sentence kept, in tokens (without BOS/EOS).
        shuffle: bool, shuffle the examples (seeded).
        seed: int, the shuffle seed.
        buckets: increasing ints, bucket boundaries in tokens (exclusive upper bounds of
            all buckets but the last); default `default_buckets(max_length)`.
        cache: bool, keep the tokenized examples in memory (filled by the length count
            and the first epoch), so later epochs only shuffle, bucket and pad.
        repeat: bool, repeat forever (reshuffling each time); before bucketing, so epochs
            blend at their boundary instead of ending in small batches.
        drop_remainder: bool, drop the last partial batch of every bucket.
        pad_to_bucket: bool, pad source and target of a batch to its bucket's upper bound, so
            batches come in one shape per bucket (with `repeat` or `drop_remainder`): an
            XLA-compiled training step then compiles once per bucket, not once per shape.
        subword_alpha: float in [0, 1], SentencePiece subword regularization (Kudo, 2018):
            when > 0, every kept pair is tokenized again each epoch (each pass of `repeat`)
            by sampling a segmentation of both sides (`nbest_size=-1`, smoothing `alpha`;
            a smaller alpha gives more varied segmentations; for a BPE model SentencePiece
            reads alpha as the BPE-dropout probability instead). Which pairs are kept (and
            counted) is still decided by the best segmentation, and a side whose sampled
            segmentation is longer than `max_length` falls back to its best segmentation
            (never dropped or cut). 0 (the default) keeps the best segmentation, with the
            pipeline exactly as without this option. Only for training data: validation,
            evaluation and inference never sample. The samples are not reproducible:
            `tensorflow_text.SentencepieceTokenizer` takes no seed (SentencePiece draws from
            its own per-thread generator), so only the order (`seed`) is deterministic, and
            the bucketing (by sampled lengths) makes the batches differ from run to run.

    Returns:
        `tf.data.Dataset` of `({"source_ids": int32 [B, S], "target_in_ids": int32 [B, T]},
        target_out_ids int32 [B, T], sample_weight float32 [B, T])`, where `sample_weight`
        is 1.0 on real tokens (EOS included) and 0.0 on padding.

    Example:

    >>> dataset = make_dataset(pairs, tokenizer, tokenizer, batch_tokens=2048)  # doctest: +SKIP
    >>> inputs, target_out_ids, sample_weight = next(iter(dataset))  # doctest: +SKIP

    References:
        - [Kudo, 2018](https://arxiv.org/abs/1804.10959), subword regularization.
    """
    if not 0 <= subword_alpha <= 1:
        raise ValueError(f"`subword_alpha` must be in [0, 1]. Received: {subword_alpha}")
    if not pairs:
        raise DataError("make_dataset: no sentence pairs were given.")
    boundaries = sorted(default_buckets(max_length) if buckets is None else buckets)
    boundaries = [bound for bound in boundaries if bound <= max_length + 1]
    if any(bound < 2 for bound in boundaries) or len(set(boundaries)) != len(boundaries):
        raise ValueError(f"`buckets` must be distinct ints >= 2. Received: {buckets}")
    # The longest example of bucket i has boundaries[i] - 1 tokens; the last bucket holds
    # up to max_length + 1 (the sentence plus EOS/BOS).
    upper_bounds = [bound - 1 for bound in boundaries] + [max_length + 1]
    batch_sizes = [max(1, batch_tokens // upper) for upper in upper_bounds]
    sources = tf.constant([source for source, _ in pairs], tf.string)
    targets = tf.constant([target for _, target in pairs], tf.string)

    def tokenize(source, target):  # [chunk] strings -> [chunk, (tokens)] ids
        return source_tokenizer.tokenize(source), target_tokenizer.tokenize(target)

    def tokenize_keeping_text(source, target):  # the ids, then the strings to sample from
        return (*tokenize(source, target), source, target)

    # Tokenize, filter and add BOS/EOS a chunk of sentences at a time: one op call per
    # chunk instead of per-example work in every epoch.
    chunks = (
        tf.data.Dataset.from_tensor_slices((sources, targets))
        .batch(1024)
        .map(
            tokenize_keeping_text if subword_alpha else tokenize,
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    )
    if cache:
        # The counting pass below fills this cache, so the pipeline never tokenizes twice.
        chunks = chunks.cache()
    kept = _count_kept(chunks, len(pairs), max_length)

    def keep_mask(source, target):  # ragged [chunk, (tokens)] each -> bool [chunk]
        source_lengths, target_lengths = source.row_lengths(), target.row_lengths()
        return (
            (source_lengths > 0)
            & (target_lengths > 0)
            & (source_lengths <= max_length)
            & (target_lengths <= max_length)
        )

    def select(source, target):  # ragged [chunk, (tokens)] each
        keep = keep_mask(source, target)
        source = tf.ragged.boolean_mask(source, keep)
        target = tf.ragged.boolean_mask(target, keep)
        return with_specials(source, target)

    def with_specials(source, target):
        return (
            add_specials(source, add_eos=True),  # source_ids
            add_specials(target, add_bos=True),  # target_in_ids
            add_specials(target, add_eos=True),  # target_out_ids
        )

    def select_keeping_text(source, target, source_text, target_text):
        # The kept pairs' strings (to sample from) and best ids (the fallback), no BOS/EOS.
        keep = keep_mask(source, target)
        return (
            tf.boolean_mask(source_text, keep),
            tf.boolean_mask(target_text, keep),
            tf.ragged.boolean_mask(source, keep),
            tf.ragged.boolean_mask(target, keep),
        )

    # Rows of an unbatched ragged tensor keep a ragged spec, which `padded_batch` refuses;
    # inside a map they are plain tensors.
    dataset = chunks.map(select_keeping_text if subword_alpha else select)
    dataset = dataset.unbatch().map(lambda *example: example)
    if cache:
        dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(min(kept, 1_000_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if subword_alpha:
        dataset = _sample_segmentations(
            dataset, source_tokenizer, target_tokenizer, subword_alpha, max_length, with_specials
        )

    pad = tf.constant(PAD_ID, tf.int32)
    dataset = dataset.bucket_by_sequence_length(
        element_length_func=lambda source, target_in, _: tf.maximum(
            tf.size(source), tf.size(target_in)
        ),
        bucket_boundaries=boundaries,
        bucket_batch_sizes=batch_sizes,
        padded_shapes=([None], [None], [None]),
        padding_values=(pad, pad, pad),
        drop_remainder=drop_remainder,
    )

    if pad_to_bucket:
        bounds = tf.constant(upper_bounds, tf.int32)

        def pad_fixed(source_ids, target_in_ids, target_out_ids):
            longest = tf.maximum(tf.shape(source_ids)[1], tf.shape(target_in_ids)[1])
            length = bounds[tf.argmax(tf.cast(bounds >= longest, tf.int32))]  # first bound >= it

            def pad(ids):
                return tf.pad(ids, [[0, 0], [0, length - tf.shape(ids)[1]]])

            return pad(source_ids), pad(target_in_ids), pad(target_out_ids)

        dataset = dataset.map(pad_fixed)

    def to_keras(source_ids, target_in_ids, target_out_ids):
        sample_weight = tf.cast(tf.not_equal(target_out_ids, PAD_ID), tf.float32)
        inputs = {"source_ids": source_ids, "target_in_ids": target_in_ids}
        return inputs, target_out_ids, sample_weight

    return dataset.map(to_keras).prefetch(tf.data.AUTOTUNE)


def _sample_segmentations(dataset, source_tokenizer, target_tokenizer, alpha, max_length, finish):
    """Tokenizes `(source_text, target_text, source_ids, target_ids)` examples again by
    sampling a segmentation of each side, `SAMPLE_CHUNK` examples per op call; a side whose
    sample is over `max_length` tokens keeps its `*_ids` (the best segmentation). `finish`
    turns the ragged `(source, target)` ids of a chunk into the examples' tensors."""

    def sampler(tokenizer):
        return tf_text.SentencepieceTokenizer(
            model=tokenizer.proto, out_type=tf.int32, nbest_size=-1, alpha=alpha
        )

    source_sampler = sampler(source_tokenizer)
    target_sampler = (
        source_sampler
        if target_tokenizer.proto == source_tokenizer.proto
        else sampler(target_tokenizer)
    )

    def sample(text, best, tokenizer):  # [chunk] strings, ragged [chunk, (tokens)] ids
        sampled = tokenizer.tokenize(text)
        rows = tf.range(tf.shape(text, out_type=tf.int64)[0])
        too_long = sampled.row_lengths() > max_length
        # Row i of [sampled; best] is sampled[i], row n + i is best[i].
        rows = tf.where(too_long, rows + tf.shape(text, out_type=tf.int64)[0], rows)
        return tf.gather(tf.concat([sampled, best], axis=0), rows)

    def resample(source_text, target_text, source, target):
        return finish(
            sample(source_text, source, source_sampler),
            sample(target_text, target, target_sampler),
        )

    # `ragged_batch`: the best ids have a length of their own per example.
    return (
        dataset.ragged_batch(SAMPLE_CHUNK)
        .map(resample, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .map(lambda *example: example)  # plain tensors, not ragged rows (see make_dataset)
    )


def _count_kept(chunks, total, max_length):
    """Counts the pairs `make_dataset` keeps, logs the dropped ones, fails if none is left."""
    source_lengths, target_lengths = [], []
    for source, target, *_ in chunks:
        source_lengths.append(source.row_lengths().numpy())
        target_lengths.append(target.row_lengths().numpy())
    source_lengths = np.concatenate(source_lengths)
    target_lengths = np.concatenate(target_lengths)
    too_long = (source_lengths > max_length) | (target_lengths > max_length)
    empty = ((source_lengths == 0) | (target_lengths == 0)) & ~too_long
    kept = total - int(np.sum(too_long | empty))
    if kept < total:
        logger.info(
            "make_dataset: dropped %d of %d pairs (%d with a side over max_length=%d tokens, "
            "%d with a side of no tokens).",
            total - kept,
            total,
            int(np.sum(too_long)),
            max_length,
            int(np.sum(empty)),
        )
    if kept == 0:
        raise DataError(
            f"make_dataset: none of the {total} pairs has both sides between 1 and "
            f"max_length={max_length} tokens."
        )
    return kept


def make_eval_batches(sources, tokenizer, batch_size=64):
    """Batches sentences for translation, longest first, with the order to restore.

    Sorting by length keeps padding (and decoding of finished rows) small; the longest
    batch comes first, so running out of memory happens at once, not at the end.

    Args:
        sources: list of English strings.
        tokenizer: the source `SentencePieceTokenizer`.
        batch_size: int, sentences per batch.

    Returns:
        `(dataset, order)`: `dataset` yields `source_ids` int32 `[B, S]` (ids + EOS,
        padded with `PAD_ID`), `order` is an int array such that the i-th sentence of the
        concatenated batches is `sources[order[i]]`; `restore_order` undoes it.

    Example:

    >>> dataset, order = make_eval_batches(sentences, tokenizer)  # doctest: +SKIP
    >>> outputs = [text for batch in dataset for text in translate(batch)]  # doctest: +SKIP
    >>> translations = restore_order(outputs, order)  # doctest: +SKIP
    """
    if len(sources) == 0:
        raise DataError("make_eval_batches: no sentences were given.")
    lengths = tokenizer.tokenize(list(sources)).row_lengths().numpy()
    order = np.argsort(-lengths, kind="stable")
    sorted_sources = tf.constant([sources[i] for i in order], tf.string)
    dataset = (
        tf.data.Dataset.from_tensor_slices(sorted_sources)
        .batch(batch_size)
        .map(lambda text: tokenizer.tokenize(text, add_eos=True).to_tensor(PAD_ID))
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset, order


def restore_order(items, order):
    """Puts outputs of `make_eval_batches` batches back in the order of the input sentences.

    Args:
        items: sequence, one output per sentence, in batch order.
        order: the `order` returned by `make_eval_batches`.

    Returns:
        list, `items` in the original sentence order.

    Example:

    >>> restore_order(["b", "c", "a"], [1, 2, 0])
    ['a', 'b', 'c']
    """
    if len(items) != len(order):
        raise ValueError(f"Got {len(items)} items for {len(order)} sentences.")
    restored = [None] * len(order)
    for item, index in zip(items, order, strict=True):
        restored[index] = item
    return restored
