"""`Translator`: strings in, strings out: tokenize, encode, search and detokenize in one graph."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from translator import search, segmentation
from translator.config import DecodingConfig, decoding_options, field_bounds, field_choices
from translator.files import keras_load_error
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, add_specials

# The range the config (and the REST API) takes for each penalty: `translate` checks the same.
_PENALTY_BOUNDS = {
    name: field_bounds(DecodingConfig, name) for name in ("length_penalty", "coverage_penalty")
}
# The largest beam the config takes: a larger one (a serving client's beam_size 100000) would
# ask for (sentences x beam, vocabulary) logits per step, enough to exhaust the process.
MAX_BEAM_SIZE = int(field_bounds(DecodingConfig, "beam_size")[1])


@dataclass
class Translation:
    """One text's result: the best text and score, and on request more.

    A text is translated sentence by sentence (see `translator.segmentation`); `sentences` holds
    each sentence's own result (same fields, `sentences` empty) and the text's fields combine
    them: `text` is the sentences' translations with the text's own spacing and line breaks;
    `score` is the mean of their scores weighted by their target lengths (so a one-sentence
    text has its sentence's score); the k-th of `n_best` joins every sentence's k-th
    hypothesis; `source_tokens` and `target_tokens` are the sentences' subwords end to end and
    `alignment` is block-diagonal (each sentence's attention in its own block, zeros
    elsewhere). The tokens and alignments are those of what the model saw, placeholders
    (number words) included.

    Attributes:
        text: The translation.
        score: Length-normalized log-probability (higher is better).
        n_best: `(text, score)` of the best `n_best` hypotheses, best first.
        source_tokens, target_tokens: Subwords (with `return_alignment`).
        alignment: `(target_len, source_len)` attention weights (with `return_alignment`).
        source: The source text (for a sentence: its text in the source, without placeholders).
        sentences: One `Translation` per sentence (or piece of an over-long sentence).
    """

    text: str
    score: float
    n_best: list[tuple[str, float]] = field(default_factory=list)
    source_tokens: list[str] | None = None
    target_tokens: list[str] | None = None
    alignment: np.ndarray | None = None  # (target_len, source_len)
    source: str | None = None
    sentences: list[Translation] = field(default_factory=list)


PROJECTION_DTYPES = (None, *field_choices(DecodingConfig, "projection_dtype"))
COMPUTE_DTYPES = (None, *field_choices(DecodingConfig, "compute_dtype"))
# The constructor's decoding defaults are the config's: one definition (translator.config).
_DEFAULTS = DecodingConfig()


def resolve_compute_dtype(compute_dtype):
    """`compute_dtype` with `"auto"` resolved: `"adaptive"` (bfloat16 for calls of many rows,
    float32 for few) where bfloat16 matmuls are fast (a CPU with AMX-BF16 or AVX512-BF16, or a
    GPU of compute capability 8.0 or more, as for `training.precision: auto`), else `"float32"`
    (bfloat16 is emulated, and slower at every size). `None` and the others pass through."""
    if compute_dtype != "auto":
        return compute_dtype
    from translator.hardware import resolve_precision

    return "adaptive" if resolve_precision("auto") == "mixed_bfloat16" else "float32"


class Translator:
    """Translates lists of English strings with a trained `Seq2Seq` and its tokenizers.

    The whole path (SentencePiece tokenization, encoder, batched beam search, detokenization) is
    one `tf.function` with a fixed input signature, so beam size, n-best and length penalty are
    runtime inputs and the same graph is what `translator export` writes for TF Serving.

    Args:
        model: A `translator.Seq2Seq`.
        source_tokenizer, target_tokenizer: `translator.tokenizer.SentencePieceTokenizer` layers.
        beam_size, length_penalty, coverage_penalty: Decoding defaults.
        early_stopping: `"heuristic"` or `"exact"`, see `translator.search.beam_search`.
        max_length_ratio, max_length_offset: Output limit = ratio * source length + offset.
        batch_size: Sentences per graph call when translating long lists.
        max_source_length: Most source subwords per sentence, EOS included. `translate` cuts
            longer sentences at clause boundaries; the graph (`translate_tensors`, and so the
            export's signatures) refuses them with an `InvalidArgumentError`.
        split_length: Source subwords (EOS not counted) above which `translate` also cuts a
            sentence at clause boundaries when it segments: `load` sets the training config's
            `data.max_length`, the longest source the model was trained on (it drops the end
            of longer ones). `None`: only `max_source_length` cuts.
        projection_dtype: `None` (the model's compute dtype), `"float32"` or `"bfloat16"`: the
            dtype of the output projection, a decoding step's largest matmul. bfloat16 is faster
            on CPUs with bfloat16 matrix units such as AMX (the README's Benchmarks give its
            speed and BLEU).
        compute_dtype: `None` (the model's own), `"float32"`, `"bfloat16"` or `"auto"`: the
            dtype every decoding matmul runs in. `"bfloat16"` decodes with a copy of the model
            built under the `mixed_bfloat16` policy (`Seq2Seq.with_compute_dtype`; the cells keep
            their gate equations in float32), so `.model` is that copy; its output projection
            is bfloat16 too unless `projection_dtype="float32"`. On a CPU with AMX it makes
            beam 5 at batch 64 1.4-1.5x as fast for the shipped model at the same BLEU, and
            single sentences slower (README, Benchmarks). `"adaptive"` chooses per call, in the
            graph: bfloat16 when the call decodes at least `bfloat16_rows` rows (sentences x
            beam size), float32 below, with one set of weights. `"auto"` is `"adaptive"` where
            the hardware has bfloat16 matmuls and `"float32"` elsewhere (bfloat16 is emulated,
            and slower at every size).
        bfloat16_rows: The rows from which `"adaptive"` decodes in bfloat16.
        shortlist: A `translator.shortlist.Shortlist` (`load` reads the model directory's
            `shortlist.npz`): each sentence decodes over the target pieces its source makes
            likely instead of the whole vocabulary, and a call's output projection shrinks to
            the union of its sentences' pieces (a sentence's translation does not depend on
            the others in its call). `None`: the whole vocabulary.
    """

    def __init__(
        self,
        model,
        source_tokenizer,
        target_tokenizer,
        beam_size=_DEFAULTS.beam_size,
        length_penalty=_DEFAULTS.length_penalty,
        coverage_penalty=_DEFAULTS.coverage_penalty,
        early_stopping=_DEFAULTS.early_stopping,
        max_length_ratio=_DEFAULTS.max_length_ratio,
        max_length_offset=_DEFAULTS.max_length_offset,
        batch_size=_DEFAULTS.batch_size,
        max_source_length=256,
        split_length=None,
        projection_dtype=_DEFAULTS.projection_dtype,
        compute_dtype=_DEFAULTS.compute_dtype,
        bfloat16_rows=_DEFAULTS.bfloat16_rows,
        shortlist=None,
    ):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                "compute_dtype must be one of "
                f"{', '.join(map(str, COMPUTE_DTYPES))}, got {compute_dtype!r}"
            )
        if int(bfloat16_rows) < 1:
            raise ValueError(f"bfloat16_rows must be at least 1, got {bfloat16_rows}")
        # Checked here too: an export writes the default into `serving_default` and its
        # warm-up request, which would then fail every call, and TF Serving's load.
        if not 1 <= int(beam_size) <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {beam_size}")
        self.compute_dtype = compute_dtype
        self.bfloat16_rows = int(bfloat16_rows)
        self._bfloat16_rows_tensor = None  # see `bfloat16_threshold`
        resolved = resolve_compute_dtype(compute_dtype)
        # `adaptive`: `.model` decodes in float32, and a bfloat16 copy of it, whose variables
        # are never read (each read is mapped to `.model`'s, see `_decode_in_bfloat16`), in
        # calls of many rows: the weights are read from one set of variables, so an export
        # stores them once (in this process the copy's own variables hold a second, unused copy).
        self._bfloat16_model = None
        if resolved == "adaptive":
            model = model.with_compute_dtype("float32")
            self._bfloat16_model = model.copy("bfloat16")
        elif resolved is not None:
            model = model.with_compute_dtype(resolved)
        self.model = model
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.coverage_penalty = coverage_penalty
        if early_stopping not in search.EARLY_STOPPING:
            raise ValueError(
                f"early_stopping must be one of {', '.join(search.EARLY_STOPPING)}, "
                f"got {early_stopping!r}"
            )
        self.early_stopping = early_stopping
        if projection_dtype not in PROJECTION_DTYPES:
            raise ValueError(
                "projection_dtype must be one of "
                f"{', '.join(map(str, PROJECTION_DTYPES))}, got {projection_dtype!r}"
            )
        self.projection_dtype = projection_dtype
        self.max_length_ratio = max_length_ratio
        self.max_length_offset = max_length_offset
        self.batch_size = batch_size
        self.max_source_length = max_source_length
        self.split_length = split_length
        if shortlist is not None:
            shortlist.check(
                source_tokenizer.proto,
                target_tokenizer.proto,
                source_tokenizer.vocabulary_size(),
                target_tokenizer.vocabulary_size(),
            )
        self.shortlist = shortlist
        self.translate_graph = tf.function(
            self.translate_tensors,
            input_signature=[
                tf.TensorSpec([None], tf.string, name="text"),
                tf.TensorSpec([], tf.int32, name="beam_size"),
                tf.TensorSpec([], tf.int32, name="n_best"),
                tf.TensorSpec(None, tf.float32, name="length_penalty"),  # one, or one per text
                tf.TensorSpec([], tf.float32, name="coverage_penalty"),
            ],
        )

    @property
    def adaptive(self) -> bool:
        """Whether each call picks float32 or bfloat16 by its rows (`compute_dtype` adaptive)."""
        return self._bfloat16_model is not None

    @classmethod
    def from_model(cls, model, **kwargs):
        """A `Translator` for a `Seq2Seq` that carries its tokenizers (as exported models do).

        Only the model is known here, not its training config: decoding options and
        `split_length` are the constructor's defaults unless given (`load` reads them from the
        directory's config.yaml).

        Example:

        >>> model = keras.saving.load_model("saved_models/en-fr/model.keras")  # doctest: +SKIP
        >>> Translator.from_model(model).translate("Hello!").text  # doctest: +SKIP
        'Bonjour !'
        """
        if getattr(model, "source_tokenizer", None) is None:
            raise ValueError(
                "This model carries no tokenizers: build it with `source_tokenizer=` and "
                "`target_tokenizer=`, or use `translator.load(directory)` with its spm.model."
            )
        return cls(model, model.source_tokenizer, model.target_tokenizer, **kwargs)

    # -- the graph -----------------------------------------------------------------------------

    def encode_source(self, text):
        """Raw strings `(batch,)` -> padded ids `(batch, S)` with EOS appended, and lengths.

        A text of more than `max_source_length - 1` subwords is an error (an
        `InvalidArgumentError` naming its index, its length and the limit), never cut: the
        caller splits it (`translate` does, at clause boundaries)."""
        ids = self.source_tokenizer(text)  # ragged (batch, None)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        limit = self.max_source_length - 1
        # The first text over the limit (0 when none; the appended 0 makes an empty batch safe).
        first = tf.argmax(
            tf.concat([tf.cast(lengths > limit, tf.int32), [0]], 0), output_type=tf.int32
        )
        check = tf.debugging.Assert(
            tf.reduce_all(lengths <= limit),
            [
                tf.strings.format(
                    "text {} has {} subwords, over the limit of {} subwords per text: split it "
                    "into sentences or clauses before translating it",
                    (first, tf.concat([lengths, [0]], 0)[first], limit),
                )
            ],
            name="source_length_check",
        )
        with tf.control_dependencies([check]):
            ids = add_specials(ids, add_eos=True)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        return tf.cast(ids.to_tensor(PAD_ID), tf.int32), lengths

    def count_source_tokens(self, text: str) -> int:
        """Subwords of `text` under the source tokenizer (EOS not counted): what
        `max_source_length - 1` limits."""
        counter = getattr(self, "_counter", None)
        if counter is None:
            counter = self._counter = segmentation.sentencepiece_counter(
                self.source_tokenizer.proto
            )
        return counter(text)

    def options(self) -> dict:
        """The constructor's keyword arguments (decoding options) of this translator."""
        names = (*_DEFAULTS.model_dump(), "max_source_length", "split_length", "shortlist")
        return {name: getattr(self, name) for name in names}

    def translate_tensors(self, text, beam_size, n_best, length_penalty, coverage_penalty):
        """The translation as TF ops, for tracing into a `tf.function` (see `translate_graph`
        and the export's signatures): `text` `(batch,)` strings and scalar options in (the
        length penalty a scalar or one per text, `(batch,)`: texts decoded with different
        penalties share one search), a dict of `translations` `(batch, n_best)`, `scores`,
        `ids`, `lengths`, `alignments`, `source_ids` and `source_lengths` out."""
        text = tf.convert_to_tensor(text, tf.string)
        length_penalty = tf.convert_to_tensor(length_penalty, tf.float32)
        alphas = tf.size(length_penalty)
        checks = [
            tf.debugging.assert_greater_equal(beam_size, 1, message="beam_size must be at least 1"),
            tf.debugging.assert_less_equal(
                beam_size, MAX_BEAM_SIZE, message=f"beam_size must be at most {MAX_BEAM_SIZE}"
            ),
            tf.debugging.assert_greater_equal(n_best, 1, message="n_best must be at least 1"),
            tf.debugging.assert_less_equal(
                n_best, beam_size, message="n_best must not be larger than beam_size"
            ),
            tf.debugging.Assert(
                (tf.rank(length_penalty) <= 1)
                & ((alphas == 1) | (alphas == tf.size(text)) | (tf.rank(length_penalty) == 0)),
                [
                    tf.strings.format(
                        "length_penalty has shape {} for {} texts: give one value, or one per text",
                        (tf.shape(length_penalty), tf.size(text)),
                    )
                ],
                name="length_penalty_check",
            ),
        ]
        # The ranges `translate` and the config take (a NaN fails both comparisons): a serving
        # client calling the signature directly gets the same refusal, not a garbled ranking.
        for name, value in (
            ("length_penalty", length_penalty),
            ("coverage_penalty", coverage_penalty),
        ):
            low, high = _PENALTY_BOUNDS[name]
            value = tf.cast(value, tf.float32)
            checks.append(
                tf.debugging.Assert(
                    tf.reduce_all((value >= low) & (value <= high)),
                    [
                        tf.strings.format(
                            f"{name} must be between {low} and {high}, got {{}}", value
                        )
                    ],
                    name=f"{name}_range_check",
                )
            )
        with tf.control_dependencies(checks):
            source_ids, source_lengths = self.encode_source(text)
        batch = tf.shape(source_ids)[0]
        alpha = tf.broadcast_to(tf.reshape(length_penalty, [-1]), [batch])  # (batch,)
        # The call's target vocabulary and each sentence's mask over it (None: the whole
        # vocabulary), chosen once for both compute paths.
        shortlist = None if self.shortlist is None else self.shortlist.select(source_ids)
        args = (source_ids, source_lengths, beam_size, n_best, alpha, coverage_penalty, shortlist)
        if self._bfloat16_model is None:
            ids, lengths, scores, alignments = self._decode(self.model, *args)
        else:
            # One graph for both ends: bfloat16 where it is faster (many rows), float32 else.
            threshold = self._bfloat16_rows_tensor
            threshold = self.bfloat16_rows if threshold is None else threshold
            ids, lengths, scores, alignments = tf.cond(
                batch * beam_size >= threshold,
                lambda: self._decode_in_bfloat16(*args),
                lambda: self._decode(self.model, *args),
            )
        result = search.DecodingResult(ids, lengths, scores, scores, alignments, tf.constant(0))
        ids = result.ids  # (batch, n_best, T)
        shape = tf.shape(ids)
        flat = tf.reshape(ids, [-1, shape[2]])
        texts = tf.reshape(self.target_tokenizer.detokenize(flat), [shape[0], shape[1]])
        return {
            "translations": texts,
            "scores": result.scores,
            "ids": ids,
            "lengths": result.lengths,
            "alignments": result.alignments,
            "source_ids": source_ids,
            "source_lengths": source_lengths,
        }

    def _decode(
        self, model, source_ids, source_lengths, beam_size, n_best, alpha, beta, shortlist=None
    ):
        """Encoder and search with `model`: `(ids, lengths, scores, alignments)`, each
        `(batch, n_best, ...)`; greedy search when `beam_size` is 1. With `shortlist`, the
        `(vocabulary, mask)` of `Shortlist.select`, the search runs over the `vocabulary` ids
        only, each sentence over its own shortlist (the others' pieces masked)."""
        constants, state = model.encode(source_ids)
        vocabulary = mask = None
        if shortlist is not None:
            vocabulary, mask = shortlist
            # The mask travels with the constants: one row per sentence, gathered with them
            # when finished sentences leave the batch.
            constants = (constants, mask)

        def step_function(**kwargs):
            step_fn = model.step_function(self.projection_dtype, vocabulary=vocabulary, **kwargs)
            if mask is None:
                return step_fn

            def masked_step_fn(ids, state, constants):
                constants, sentence_mask = constants  # the live sentences' rows
                logits, state, attention = step_fn(ids, state, constants)
                # A sentence's rows (its beams) are consecutive: broadcast its mask over them.
                shape = tf.shape(logits)
                by_sentence = tf.reshape(logits, [tf.shape(sentence_mask)[0], -1, shape[1]])
                logits = tf.reshape(by_sentence + sentence_mask[:, tf.newaxis], shape)
                return logits, state, attention

            return masked_step_fn

        batch = tf.shape(source_ids)[0]
        max_length = (
            tf.cast(
                tf.math.ceil(self.max_length_ratio * tf.cast(source_lengths, tf.float32)), tf.int32
            )
            + self.max_length_offset
        )
        # Each branch reads the weights once, outside its decoding loop.
        search_args = dict(
            start_ids=tf.fill([batch], BOS_ID),
            end_id=EOS_ID,
            initial_state=state,
            constants=constants,
            max_length=max_length,
            return_alignment=True,
        )

        def greedy():
            # Beam size 1 is greedy search by definition (and cheaper); its score gets the same
            # length normalization as beam search's so scores compare across beam sizes.
            r = search.greedy_search(step_function(), **search_args)
            scores = r.log_probs / search.gnmt_length_penalty(r.lengths, alpha[:, tf.newaxis])
            return r.ids, r.lengths, scores, r.alignments

        def beam():
            r = search.beam_search(
                # The beams of a sentence share its encoder memory: read once per step.
                step_function(shared_constants=True),
                tile_constants=False,
                beam_size=beam_size,
                n_best=n_best,
                length_penalty=alpha,
                coverage_penalty=beta,
                early_stopping=self.early_stopping,
                **search_args,
            )
            return r.ids, r.lengths, r.scores, r.alignments

        ids, lengths, scores, alignments = tf.cond(tf.equal(beam_size, 1), greedy, beam)
        if vocabulary is not None:  # positions in the shortlist -> target ids
            ids = tf.gather(vocabulary, ids)
        return ids, lengths, scores, alignments

    @contextlib.contextmanager
    def output_kernel(self, kernel):
        """Traces `translate_tensors` with the tied output kernel given, `(units, vocab)`, for
        every compute path (see `AttentionDecoder.output_kernel`): for a caller that keeps the
        transposed embedding matrix across calls, as the SavedModel does."""
        with contextlib.ExitStack() as stack:
            for model in (self.model, self._bfloat16_model):
                if model is not None:
                    stack.enter_context(model.decoder.output_kernel(kernel))
            yield

    @contextlib.contextmanager
    def input_table(self, table):
        """Traces `translate_tensors` with `.model`'s `input_projection_table()` given (see
        `AttentionDecoder.input_table`), for a caller that keeps it across calls, as the
        SavedModel does. The bfloat16 copy of an adaptive translator still projects its
        embeddings per step: a bfloat16 table would be a second copy, cast per call."""
        with self.model.decoder.input_table(table):
            yield

    @contextlib.contextmanager
    def bfloat16_threshold(self, rows):
        """Traces `translate_tensors` with the adaptive threshold `rows` (an int32 scalar
        tensor) in place of `bfloat16_rows`: the SavedModel reads it from a variable, so the
        process that loads it can turn the bfloat16 path off (see `translator.export`)."""
        previous, self._bfloat16_rows_tensor = self._bfloat16_rows_tensor, rows
        try:
            yield
        finally:
            self._bfloat16_rows_tensor = previous

    def _decode_in_bfloat16(self, *args):
        """`_decode` with the bfloat16 copy, every read of its variables mapped to the value of
        `.model`'s (so an export stores the weights once, and float16 storage applies)."""
        import keras

        copy, model = self._bfloat16_model, self.model
        mapping = [(c, m.value) for c, m in zip(copy.variables, model.variables, strict=True)]
        with keras.StatelessScope(state_mapping=mapping):
            ids, lengths, scores, alignments = self._decode(copy, *args)
        return ids, lengths, scores, tf.cast(alignments, tf.float32)

    # -- the Python API ------------------------------------------------------------------------

    def translate(
        self,
        texts,
        beam_size=None,
        n_best=1,
        length_penalty=None,
        coverage_penalty=None,
        return_alignment=False,
        segment=True,
        protect=True,
    ):
        """Translates a list of texts: each is cut into sentences, all sentences of all texts
        are translated together (batched by length) and each text's translations are joined
        back with its own spacing and line breaks (see `translator.segmentation`).

        Args:
            texts: list of English strings (or one string): sentences, paragraphs, lines.
            beam_size: Beam width (1 = greedy); default from the constructor.
            n_best: Hypotheses returned per text and per sentence (<= beam_size).
            length_penalty: GNMT alpha; default from the constructor.
            coverage_penalty: GNMT beta; default from the constructor.
            return_alignment: Also return subword tokens and attention alignments.
            segment: Cut texts into sentences, and sentences over `split_length` at clause
                boundaries. `False` translates each text, as it is, as one sentence (for
                callers who segment themselves; what the export's signatures do); a text over
                `max_source_length` is still cut at clause boundaries, never truncated.
            protect: Copy numbers, URLs, e-mail addresses and code-like tokens verbatim
                (placeholders, see `translator.segmentation`).

        Returns:
            A list of `Translation`, one per input text, in order (one `Translation` for a
            string). With `segment`, a text with no sentence (empty or whitespace only)
            translates to itself, with score 0.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        beam_size = self.beam_size if beam_size is None else int(beam_size)
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {beam_size}")
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
        alpha = self.length_penalty if length_penalty is None else float(length_penalty)
        beta = self.coverage_penalty if coverage_penalty is None else float(coverage_penalty)
        for name, value in (("length_penalty", alpha), ("coverage_penalty", beta)):
            low, high = _PENALTY_BOUNDS[name]
            if not low <= value <= high:  # NaN included: it would rank every hypothesis alike
                raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        max_tokens = self.max_source_length - 1
        if segment and self.split_length is not None:
            max_tokens = min(max_tokens, self.split_length)
        segmented = [
            segmentation.segment(
                text,
                split_sentences=segment,
                protect=protect,
                max_tokens=max_tokens,
                count_tokens=self.count_source_tokens,
            )
            for text in texts
        ]
        units = [sentence for seg in segmented for sentence in seg.sentences]
        translated = self._translate_sentences(
            units, beam_size, n_best, alpha, beta, return_alignment
        )
        results, position = [], 0
        for seg in segmented:
            count = len(seg.units)
            results.append(
                combine_sentences(
                    seg, translated[position : position + count], n_best, return_alignment
                )
            )
            position += count
        return results[0] if single else results

    def _translate_sentences(self, sentences, beam_size, n_best, alpha, beta, return_alignment):
        """`(Translation, target lengths (n_best,))` of each sentence, placeholders unrestored."""
        results = [None] * len(sentences)
        # Sort by length so each batch pads little; restore the order at the end.
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            out = self.translate_graph(
                tf.constant([sentences[i] for i in index]),
                tf.constant(beam_size),
                tf.constant(n_best),
                tf.constant(alpha, tf.float32),
                tf.constant(beta, tf.float32),
            )
            # One copy to NumPy per batch: slicing the eager tensors row by row cost ~20 ms
            # per batch of 64, a tenth of greedy decoding's time.
            keys = ("translations", "scores", "lengths")
            if return_alignment:
                keys += ("source_lengths", "source_ids", "ids", "alignments")
            arrays = {key: out[key].numpy() for key in keys}
            for row, i in enumerate(index):
                results[i] = (self._unpack(arrays, row, return_alignment), arrays["lengths"][row])
        return results

    def _unpack(self, out, row, return_alignment):
        texts = [t.decode("utf-8") for t in out["translations"][row]]
        scores = [float(s) for s in out["scores"][row]]
        result = Translation(
            text=texts[0], score=scores[0], n_best=list(zip(texts, scores, strict=True))
        )
        if return_alignment:
            source_length = int(out["source_lengths"][row])
            length = int(out["lengths"][row, 0])
            source_ids = out["source_ids"][row, :source_length]
            target_ids = out["ids"][row, 0, :length]
            result.source_tokens = _pieces(self.source_tokenizer, source_ids)
            result.target_tokens = _pieces(self.target_tokenizer, target_ids)
            result.alignment = out["alignments"][row, 0, :length, :source_length].copy()
        return result


def combine_sentences(seg, translated, n_best, return_alignment) -> Translation:
    """A text's `Translation` from its sentences' raw results (see `Translation`).

    Args:
        seg: The text's `translator.segmentation.Segmented`.
        translated: One `(Translation, target lengths (n_best,))` per unit of `seg`, in order:
            the model's raw output (placeholders not restored; changed in place).
        n_best: Hypotheses per sentence to join (each sentence has at least this many).
        return_alignment: Whether the sentences carry tokens and alignments to join.
    """
    sentences = []
    for i, (raw, _) in enumerate(translated):
        raw.n_best = [(seg.restore(i, text), score) for text, score in raw.n_best]
        raw.text = seg.restore(i, raw.text)
        raw.source = seg.units[i].source
        sentences.append(raw)
    hypotheses = []
    for k in range(n_best):
        texts = [raw.n_best[k][0] for raw in sentences]
        scores = [raw.n_best[k][1] for raw in sentences]
        lengths = [int(lengths[k]) for _, lengths in translated]
        # The sentences are restored already: join them with the text's own spacing.
        hypotheses.append(
            (seg.join(texts, restore=False), segmentation.combine_scores(scores, lengths))
        )
    result = Translation(
        text=hypotheses[0][0],
        score=hypotheses[0][1],
        n_best=hypotheses,
        source=seg.text,
        sentences=sentences,
    )
    if return_alignment:
        result.source_tokens = [t for s in sentences for t in s.source_tokens]
        result.target_tokens = [t for s in sentences for t in s.target_tokens]
        alignment = np.zeros((len(result.target_tokens), len(result.source_tokens)), np.float32)
        row = column = 0
        for s in sentences:
            rows, columns = s.alignment.shape
            alignment[row : row + rows, column : column + columns] = s.alignment
            row, column = row + rows, column + columns
        result.alignment = alignment
    return result


def _pieces(tokenizer, ids):
    return [p.decode("utf-8") for p in tokenizer.id_to_token(ids).numpy()]


def load(path, **overrides) -> Translator:
    """Loads a trained translator from a run directory or a shipped model directory.

    The directory holds `model.keras` and `config.yaml` (decoding defaults, and
    `data.max_length` as `split_length`), and optionally `shortlist.npz` (a vocabulary
    shortlist, see `translator.shortlist`, used when present). The SentencePiece model(s) come
    from the `.keras` file when it carries them (every exported model does), else from
    `spm.model` (or `spm.source.model` and `spm.target.model`) beside it.

    Args:
        path: The directory (or a `.keras` file).
        **overrides: `Translator` arguments that replace the config's decoding defaults
            (`shortlist=None` ignores the directory's `shortlist.npz`).

    Raises:
        FileNotFoundError: naming the directory and the file that is missing.
        ValueError: naming the file that cannot be loaded and why.

    Example:

    >>> translator = load("saved_models/en-fr")  # doctest: +SKIP
    >>> translator.translate(["A man rides a bike."])[0].text  # doctest: +SKIP
    'Un homme fait du vélo.'
    """
    import keras

    from translator import model as _registers_custom_objects  # noqa: F401 - Seq2Seq & layers
    from translator.config import ConfigError, load_config
    from translator.shortlist import FILENAME as shortlist_file
    from translator.shortlist import Shortlist, ShortlistError
    from translator.tokenizer import load_tokenizers

    path = Path(path)
    model_file = path
    if path.suffix == ".keras":
        path = path.parent
    else:
        model_file = path / "model.keras"
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (expected a training run directory or a "
            "shipped model such as saved_models/en-fr)"
        )
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{path} has no model.keras: is it a finished training run (see `translator train`) "
            "or an export (see `translator export`)?"
        )
    try:
        model = keras.saving.load_model(model_file)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"cannot load {model_file}: {keras_load_error(model_file, e)}. Copy it again, or "
            "export it again from its training run directory with `translator export`"
        ) from e
    source_tokenizer = getattr(model, "source_tokenizer", None)
    target_tokenizer = getattr(model, "target_tokenizer", None)
    if source_tokenizer is None or target_tokenizer is None:
        tokenizers = load_tokenizers(path)
        if tokenizers is None:
            raise FileNotFoundError(
                f"{model_file} carries no tokenizer and {path} has no SentencePiece model "
                "(spm.model, or spm.source.model and spm.target.model)"
            )
        source_tokenizer, target_tokenizer = tokenizers
    kwargs = {}
    if (path / "config.yaml").is_file():
        try:
            config = load_config(path / "config.yaml")
            kwargs = decoding_options(config.decoding)
            # The model never saw a longer source: translate cuts longer sentences.
            kwargs["split_length"] = config.data.max_length
        except ConfigError as e:
            raise ValueError(f"{path / 'config.yaml'} is not a valid translator config: {e}") from e
    if (path / shortlist_file).is_file() and "shortlist" not in overrides:
        kwargs["shortlist"] = Shortlist.load(path / shortlist_file)
    kwargs.update(overrides)
    try:
        return Translator(model, source_tokenizer, target_tokenizer, **kwargs)
    except ShortlistError as e:  # `Translator` checks it against the tokenizers
        if "shortlist" in overrides:
            raise
        raise ShortlistError(f"{path / shortlist_file}: {e}") from None
