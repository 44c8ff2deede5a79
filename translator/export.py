"""`translator export`: a TF Serving SavedModel (raw English in, raw French out) and a `.keras` model.

An export directory is what TF Serving watches, plus what Python users load:

    saved_models/en-fr/
      1/                  SavedModel, version 1: signatures `serving_default` and `translate`
      2/                  ... each `translator export` adds the next version
      model.keras         the Keras model, with its SentencePiece model(s) inside as assets
      config.yaml         the resolved training config (decoding defaults come from it)
      spm.model           the SentencePiece model (also inside both of the above)
      shortlist.npz       the vocabulary shortlist built into the versions, when the model has
                          one (see `translator shortlist`)

Everything in a version's graph is TensorFlow or TF Text: SentencePiece tokenization, the encoder,
the batched beam search (`tf.while_loop`) and detokenization, so stock `tensorflow_model_server`
serves it without Python. Beam size, n-best and length penalty are inputs of the `translate`
signature, not constants of the trace; the length penalty is one value or one per text (an input
of unknown rank), so requests with different penalties can share a call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from translator.config import WARMUP_CHOICES, WEIGHT_DTYPES
from translator.files import (
    atomic_path,
    fsync_tree,
    locked_directory,
    publish,
    staging_dir,
    version_dirs,
)
from translator.inference import Translator
from translator.shortlist import FILENAME as SHORTLIST

log = logging.getLogger("translator.export")

SIGNATURES = ("serving_default", "translate")
# The adaptive threshold that turns the bfloat16 path off (no call has that many rows).
NO_BFLOAT16_ROWS = 2**31 - 1
# The largest input table a loaded export keeps (see `ServingModule._working_weights`); a
# bigger model (vocabulary x gates x units) projects its embeddings per step instead.
INPUT_TABLE_MAX_BYTES = 256 * 2**20


class ExportError(ValueError):
    """An export that cannot be written or loaded; the message names the path and the problem."""


class ServingModule(tf.Module):
    """The `tf.Module` written as a SavedModel: a `Translator`'s graph behind two signatures.

    Args:
        translator: The `translator.inference.Translator` to export.
        weights_dtype: How the weights are stored (in the module's own variables, never the
            Keras model's, which TF1's and TF Serving's loaders leave uninitialized):
            `"float32"`, or `"float16"`/`"bfloat16"` to halve the SavedModel. The first call
            casts those back to float32 and keeps them (see `_working_weights`), so the
            computation stays float32 (except the output projection when the translator's
            `projection_dtype` is `"bfloat16"`, and the calls an adaptive graph runs in
            bfloat16, which cast the kept weights per call).
        auto: The export was asked for `compute_dtype: auto` (resolved to the translator's
            adaptive graph here): recorded, so that `load_saved_model` can turn the bfloat16
            path off on a CPU without bfloat16 instructions.
    """

    def __init__(self, translator: Translator, weights_dtype: str = "float32", auto: bool = False):
        super().__init__(name="translator")
        if weights_dtype not in WEIGHT_DTYPES:
            raise ExportError(
                f"weights_dtype must be one of {WEIGHT_DTYPES}, got {weights_dtype!r}"
            )
        self._translator = translator
        # The TF Text resources (the SentencePiece models travel as attributes of their ops).
        self.tokenizers = [
            translator.source_tokenizer.sentencepiece,
            translator.target_tokenizer.sentencepiece,
        ]
        # Every model variable is written as a plain `tf.Variable` of this module (the float
        # ones in `weights_dtype`), and every read of the model's variables in the graph is
        # mapped to it. Keras 3 variables saved as they are restore in TF2's loader only: in
        # TF1's Session loader, the one TF Serving's C++ server uses, the variables the graph
        # reads stay uninitialized and every call fails ("Could not find variable ...",
        # keras-team/keras#20095), which broke every float32-storage export under TF Serving.
        dtype = tf.as_dtype(weights_dtype)
        self.stored_weights = []  # the float weights, in `weights_dtype`
        # The others (the seed generators' int states): copies too, not the model's own.
        self.model_variables = []
        mapped = []
        for v in translator.model.variables:
            floating = _is_float(v)
            stored = tf.Variable(
                tf.cast(v.value, dtype) if floating else v.value,
                trainable=False,
                name=v.path.replace("/", "__"),
            )
            (self.stored_weights if floating else self.model_variables).append(stored)
            # Stored in another dtype than its variable's (float16, bfloat16): read cast back.
            mapped.append((v, stored, stored.dtype != tf.as_dtype(v.dtype)))
        # Not an attribute tf.Module would track (it tracks lists): the model's own variables
        # must stay out of the SavedModel.
        self._mapped = _Untracked(mapped)
        # What decoding reads, kept in memory from the first call on (see `_working_weights`):
        # each weight stored in another dtype (float16, bfloat16) cast back to its variable's
        # (float32-stored ones are read as they are), the tied output kernel (the
        # transposed embedding matrix) and the input table. Saved empty, so the SavedModel
        # stays its size.
        decoder = translator.model.decoder
        self._embedding = _Untracked(
            decoder.embedding.embeddings if decoder.tie_embeddings else None
        )
        table_shape = (decoder.vocab_size, decoder.cells[0].kernel.shape[1])
        table_dtype = tf.as_dtype(decoder.compute_dtype)
        fits = math.prod(table_shape) * table_dtype.size <= INPUT_TABLE_MAX_BYTES
        # `(shape, dtype)` of the input table, or None: the model keeps none.
        self._table_spec = (table_shape, table_dtype) if fits else None
        self.working_weights = [
            tf.Variable(
                tf.zeros([0], dtype),
                shape=tf.TensorShape(None),
                trainable=False,
                name=f"working_{i}",
            )
            for i, (_, dtype) in enumerate(self._working_specs())
        ]
        if translator.adaptive:
            # The rows from which a call decodes in bfloat16, a variable so that the process
            # loading the SavedModel can raise it out of reach: `load_saved_model` does where
            # the export was built for `auto` and this CPU has no bfloat16 instructions (the
            # bfloat16 path, emulated there, is slower and decodes unlike `translator.load`).
            self.bfloat16_rows = tf.Variable(
                translator.bfloat16_rows, dtype=tf.int32, trainable=False, name="bfloat16_rows"
            )
            self.bfloat16_auto = tf.Variable(bool(auto), trainable=False, name="bfloat16_auto")
        self.beam_size = int(translator.beam_size)
        self.length_penalty = float(translator.length_penalty)
        self.coverage_penalty = float(translator.coverage_penalty)
        self.serving_default = tf.function(
            self._serving_default,
            input_signature=[tf.TensorSpec([None], tf.string, name="text")],
        )
        self.translate = tf.function(
            self._translate,
            input_signature=[
                tf.TensorSpec([None], tf.string, name="text"),
                tf.TensorSpec([], tf.int32, name="beam_size"),
                tf.TensorSpec([], tf.int32, name="n_best"),
                # A scalar, or one value per text (any rank in the signature; the graph checks
                # rank <= 1 and the count): texts with different penalties share one call.
                tf.TensorSpec(None, tf.float32, name="length_penalty"),
            ],
        )

    def _run(self, text, beam_size, n_best, length_penalty):
        translator = self._translator
        values = self._working_weights()
        table = values.pop() if self._table_spec else None
        kernel = values.pop() if self._embedding.value is not None else None
        # Every read of a model variable inside this scope returns its stored weight (cast back
        # to the variable's dtype where it is stored in another), so the model's own variables
        # are never captured (nor saved).
        scope = keras.StatelessScope(state_mapping=self._mapping(values))
        threshold = self.bfloat16_rows.read_value() if translator.adaptive else None
        with (
            scope,
            translator.output_kernel(kernel),
            translator.input_table(table),
            translator.bfloat16_threshold(threshold),
        ):
            return translator.translate_tensors(
                text, beam_size, n_best, length_penalty, tf.constant(self.coverage_penalty)
            )

    def _cast_weights(self):
        """The `(variable, stored)` pairs stored in another dtype than their variable's (float16
        or bfloat16 storage): decoding reads them cast back, kept (see `_working_weights`)."""
        return [(v, s) for v, s, cast in self._mapped.value if cast]

    def _mapping(self, cast_values):
        """`(variable, value)` for every model variable: its weight cast back (`cast_values`, in
        `_cast_weights`' order) where it is stored in another dtype, else its stored weight."""
        values = iter(cast_values)
        mapping = [
            (v, next(values) if cast else s.read_value()) for v, s, cast in self._mapped.value
        ]
        if next(values, None) is not None:
            raise AssertionError("more cast weights than weights stored in another dtype")
        return mapping

    def _working_specs(self):
        """`(shape, dtype)` of each working weight: the cast weights' (`_cast_weights`), the
        tied output kernel's, then the input table's (`AttentionDecoder.input_projection_table`)."""
        specs = [(tuple(v.shape), v.dtype) for v, _ in self._cast_weights()]
        embedding = self._embedding.value
        if embedding is not None:
            specs.append((tuple(reversed(embedding.shape)), embedding.dtype))
        if self._table_spec:
            specs.append(self._table_spec)
        return specs

    def _working_weights(self):
        """The float32 weights decoding reads (the weights stored in float16 or bfloat16 cast
        back, the tied output kernel, the input table), computed by the first call and read from
        memory by every later one.

        Recomputed per call, the first two cost a one-sentence beam-5 call 31 of its 80 ms on
        the 2-core EPYC without AVX-512: about 11 ms to cast every float16 weight to float32,
        and about 20 ms to transpose the (8000, 512) embedding matrix, whose `transpose_b`
        product grappler folds into the step before the loop (README, Benchmarks). The input
        table (`AttentionDecoder.input_projection_table`, the embedding half of the first
        cell's input projection for every target piece) spares every step a `(rows, 512) x
        (512, 1536)` product for a gather: one sentence at beam 5 about 11% faster, beam 5 at
        batch 64 about 7% (same machine), at 47 MB of memory; it would cost a call about 12
        GFLOP to build. A model whose table would exceed `INPUT_TABLE_MAX_BYTES` keeps none.

        The variables start empty (saved that way) and the first call fills them; calls running
        at the same time as the first may fill them too, with the same values, and a call reads
        them only once they are all filled.
        """
        caches, shapes = self.working_weights, [shape for shape, _ in self._working_specs()]
        if not caches:
            return []

        def compute():
            values = [tf.cast(stored, v.dtype) for v, stored in self._cast_weights()]
            mapping = self._mapping(values)
            embedding = self._embedding.value
            if embedding is not None:
                by_variable = {id(v): value for v, value in mapping}
                values.append(tf.transpose(by_variable[id(embedding)]))
            if self._table_spec:
                with keras.StatelessScope(state_mapping=mapping):
                    values.append(self._translator.model.decoder.input_projection_table())
            return values

        def fill():
            values = compute()
            assigns = [c.assign(v, read_value=False) for c, v in zip(caches, values, strict=True)]
            with tf.control_dependencies(assigns):
                return [tf.identity(v) for v in values]

        # The sizes from the variables' shapes, not from reads of their values. With
        # `tf.size(c.read_value()) > 0` as the predicate, a first call inside a `tf.function`
        # (TF 2.21) returned the empty values: its predicate's read already saw the values the
        # `fill` branch assigns, and the other branch ran, reading the empty ones. Reads of a
        # variable in the predicate and assignments to it in a branch are not ordered.
        sizes = [tf.reduce_prod(tf.raw_ops.VariableShape(input=c.handle)) for c in caches]
        filled = tf.reduce_all(tf.stack(sizes) > 0)
        values = tf.cond(filled, lambda: [c.read_value() for c in caches], fill)
        return [tf.ensure_shape(v, shape) for v, shape in zip(values, shapes, strict=True)]

    def _serving_default(self, text):
        out = self._run(
            text, tf.constant(self.beam_size), tf.constant(1), tf.constant(self.length_penalty)
        )
        return {"translation": out["translations"][:, 0], "score": out["scores"][:, 0]}

    def _translate(self, text, beam_size, n_best, length_penalty):
        out = self._run(text, beam_size, n_best, length_penalty)
        translator = self._translator
        source_lengths = out["source_lengths"]  # (B,), EOS included
        target_lengths = out["lengths"]  # (B, N), EOS included when produced
        source_tokens = translator.source_tokenizer.id_to_token(out["source_ids"])  # (B, S)
        source_tokens = tf.where(
            tf.sequence_mask(source_lengths, tf.shape(source_tokens)[1]), source_tokens, ""
        )
        target_tokens = translator.target_tokenizer.id_to_token(out["ids"])  # (B, N, T)
        target_tokens = tf.where(
            tf.sequence_mask(target_lengths, tf.shape(target_tokens)[2]), target_tokens, ""
        )
        return {
            "translations": out["translations"],  # (B, N) string
            "scores": out["scores"],  # (B, N) float32
            "alignments": out["alignments"],  # (B, N, T, S) float32
            "source_tokens": source_tokens,  # (B, S) string, "" on padding
            "target_tokens": target_tokens,  # (B, N, T) string, "" on padding
            "source_lengths": source_lengths,  # (B,) int32
            "target_lengths": target_lengths,  # (B, N) int32
        }


class _Untracked:
    def __init__(self, value):
        self.value = value


def _is_float(variable) -> bool:
    return tf.as_dtype(variable.dtype).is_floating


def next_version(out_dir: Path) -> int:
    """1 + the largest integer subdirectory of `out_dir` (TF Serving's version folders), or 1."""
    return max((version for version, _ in version_dirs(out_dir)), default=0) + 1


def round_weights(model, dtype: str) -> None:
    """Rounds every float weight of `model` to `dtype` precision (the values stay float32).

    After this, storing the weights in `dtype` loses nothing, so a float16 SavedModel and the
    float32 `.keras` model compute exactly the same translations.
    """
    for v in model.variables:
        if _is_float(v) and dtype != "float32":
            v.assign(tf.cast(tf.cast(v.value, dtype), v.dtype))


def with_tokenizers(translator: Translator) -> Translator:
    """A copy of `translator` whose model carries the tokenizers (for a self-contained `.keras`)."""
    model = translator.model
    if model.source_tokenizer is not None and model.target_tokenizer is not None:
        return translator
    clone = model.copy(
        source_tokenizer=translator.source_tokenizer, target_tokenizer=translator.target_tokenizer
    )
    return Translator.from_model(clone, **translator.options())


def export_saved_model(
    translator: Translator,
    out_dir,
    version: int | None = None,
    weights_dtype: str = "float32",
    warmup: str = "all",
) -> Path:
    """Writes `translator` as SavedModel version `version` of `out_dir` and returns its path.

    The SavedModel is written to a temporary directory inside `out_dir` and renamed to
    `out_dir/<version>` only when complete, so TF Serving (which watches `out_dir` for integer
    directories) never sees a half-written version.

    Args:
        translator: A `translator.inference.Translator`.
        out_dir: The model's base directory (`model_base_path` for TF Serving).
        version: Integer version; default: one more than the largest existing.
        weights_dtype: `"float32"`, `"float16"` or `"bfloat16"`: the stored weights' type.
        warmup: The signatures TF Serving's warm-up file calls (`WARMUP_CHOICES`).

    Raises:
        ExportError: the version exists already, or `out_dir` is not writable.
    """
    _check_warmup(warmup)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(out_dir) if version is None else int(version)
    _check_new_version(out_dir, version)
    final = out_dir / str(version)
    with atomic_path(final, directory=True) as tmp:
        _write_saved_model(translator, tmp, weights_dtype, warmup=warmup)
    log.info("wrote SavedModel %s (signatures: %s)", final, ", ".join(SIGNATURES))
    return final


def _write_saved_model(
    translator: Translator, path: Path, weights_dtype: str, auto: bool = False, warmup="all"
) -> None:
    module = ServingModule(translator, weights_dtype, auto)
    tf.saved_model.save(
        module,
        str(path),
        signatures={"serving_default": module.serving_default, "translate": module.translate},
    )
    if WARMUP_CHOICES[warmup]:
        write_warmup_requests(path, translator, WARMUP_CHOICES[warmup])


def _check_warmup(warmup: str) -> None:
    if warmup not in WARMUP_CHOICES:
        raise ExportError(
            f"warmup must be one of {', '.join(WARMUP_CHOICES)}, got {warmup!r} (serving_default "
            "for TF Serving with --enable_batching, which refuses translate's scalar inputs)"
        )


# TF Serving replays this file's requests when it loads a version, before serving it.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
WARMUP_TEXTS = ("A man is riding a bicycle.", "Two dogs play in the snow.")


def write_warmup_requests(
    saved_model_dir: Path, translator: Translator, signatures=SIGNATURES
) -> Path:
    """Writes `assets.extra/tf_serving_warmup_requests`: one Predict request per signature of
    `signatures` (`serving_default` and/or `translate`).

    TF Serving runs them when it loads the version, before the version serves (its "SavedModel
    warmup"), so no client pays what a signature's first call costs: graph set-up, and the
    working weights the first call computes (see `ServingModule._working_weights`): 2.2 s for
    each signature of the shipped model on the 2-core EPYC without AVX-512, against 25 ms for
    the next call. The file is a TFRecord of `PredictionLog` protos (tensorflow-serving-api),
    written under a temporary name and renamed, so a server polling the version never reads
    half of it.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    def request(signature, inputs):
        message = predict_pb2.PredictRequest()
        message.model_spec.signature_name = signature
        for name, value in inputs.items():
            message.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=message)
        )
        return log.SerializeToString()

    if unknown := set(signatures) - set(SIGNATURES):
        raise ExportError(f"no such signature(s) {sorted(unknown)}: choose from {SIGNATURES}")
    texts = list(WARMUP_TEXTS)
    inputs = {
        "serving_default": {"text": texts},
        "translate": {
            "text": texts,
            "beam_size": tf.constant(int(translator.beam_size), tf.int32),
            "n_best": tf.constant(1, tf.int32),
            "length_penalty": tf.constant(float(translator.length_penalty), tf.float32),
        },
    }
    path = Path(saved_model_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
        for signature in SIGNATURES:
            if signature in signatures:
                writer.write(request(signature, inputs[signature]))
    return path


def export(
    model_path,
    out_dir,
    version: int | None = None,
    weights_dtype: str = "float32",
    projection_dtype: str | None = None,
    compute_dtype: str | None = None,
    bfloat16_rows: int | None = None,
    shortlist: bool = True,
    warmup: str = "all",
) -> Path:
    """`translator export`: a run or model directory -> an export directory (see module docs).

    Writes `model.keras` carrying its tokenizers, `config.yaml`, the SentencePiece model(s)
    and SavedModel version `version` into `out_dir`, as one change: a reader sees the old set
    or the new set, never a mix, and an error (a full disk, an I/O error) changes nothing
    visible. Everything is first written into a uniquely named staging directory inside
    `out_dir` (so concurrent exports never share a temporary name, and every rename out of it
    is atomic) and fsynced. Then, holding a lock on `out_dir` (concurrent exports publish one
    after the other, each its own version number), the files beside the versions are renamed
    into place, and the version directory last, in one rename: the commit point.

    Why the version last: TF Serving loads the highest numeric directory as soon as it
    appears, so it must appear complete, and `model.keras` and `config.yaml` must already be
    the ones it goes with, never an older model's. Until the commit, `model.keras` may be the
    new model beside the old newest version (for the few renames in between); an error in
    that window puts the previous files back (`translator.files.publish`). A process killed
    in it (no code runs to undo anything) can leave new files beside the old newest version,
    and its `.export-*.tmp` staging directory, which the next export into `out_dir` on the same
    host deletes (`translator.files.staging_dir`). With
    `weights_dtype="float16"`, weights are first rounded to float16 so that the `.keras` model
    (float32 values) and the SavedModel (float16 storage) translate identically.
    `projection_dtype` (`"float32"` or `"bfloat16"`) replaces the config's
    `decoding.projection_dtype`: the SavedModel's decoder is built with it and the exported
    `config.yaml` records it. `compute_dtype` (`"float32"`, `"bfloat16"`, `"adaptive"` or
    `"auto"`) likewise replaces
    `decoding.compute_dtype`: with `"bfloat16"` every matmul of the SavedModel's graph runs in
    bfloat16 (fast on CPUs with AMX, emulated and slow on CPUs without bfloat16 instructions);
    with `"adaptive"` the graph chooses per call, bfloat16 from `bfloat16_rows` rows (batch x
    beam size; replaces `decoding.bfloat16_rows`) and float32 below, the weights stored once;
    `"auto"` is `"adaptive"` on a machine with bfloat16 matmuls, `"float32"` elsewhere: the
    SavedModel is built with it resolved on the exporting machine, while `config.yaml` keeps
    `auto` (and `bfloat16_rows`), so `translator.load` of the export resolves it where it runs.
    A vocabulary shortlist beside the model (`shortlist.npz`, see `translator.shortlist`) is
    built into the SavedModel's graph and copied beside the versions, so `translator.load` of
    the export decodes as the SavedModel does; `shortlist=False` leaves it out (and removes
    the export directory's previous one). The version carries TF Serving's warm-up file
    (`assets.extra/tf_serving_warmup_requests`, see `write_warmup_requests`) calling the
    signatures `warmup` names: `"all"`, `"serving_default"` (for TF Serving with batching on,
    which refuses `translate`'s scalar inputs, in warm-up too, and then fails to load the
    version) or `"none"`.

    Returns:
        The SavedModel version directory.
    """
    from translator.inference import COMPUTE_DTYPES

    model_path, out_dir = Path(model_path), Path(out_dir)
    if weights_dtype not in WEIGHT_DTYPES:
        raise ExportError(f"weights_dtype must be one of {WEIGHT_DTYPES}, got {weights_dtype!r}")
    if projection_dtype not in (None, "float32", "bfloat16"):
        raise ExportError(
            f"projection_dtype must be float32 or bfloat16 (or None), got {projection_dtype!r}"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise ExportError(
            "compute_dtype must be float32, bfloat16, adaptive or auto (or None), got "
            f"{compute_dtype!r}"
        )
    if bfloat16_rows is not None and int(bfloat16_rows) < 1:
        raise ExportError(f"bfloat16_rows must be at least 1, got {bfloat16_rows}")
    _check_warmup(warmup)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-")
        probe.close()
    except OSError as e:
        raise ExportError(f"cannot write to {out_dir}: {e}") from e
    with _removed_if_left_empty(out_dir if created else None):
        return _export_into(
            out_dir, model_path, version, weights_dtype, projection_dtype, compute_dtype,
            bfloat16_rows, shortlist, warmup,
        )  # fmt: skip


@contextlib.contextmanager
def _removed_if_left_empty(path: Path | None):
    """Removes the directory `path` (one this export created) if the export fails with nothing
    written into it: a failed export leaves no empty folder behind."""
    try:
        yield
    except BaseException:
        if path is not None:
            with contextlib.suppress(OSError):
                path.rmdir()  # fails, and keeps it, if anything is in it
        raise


def _export_into(
    out_dir, model_path, version, weights_dtype, projection_dtype, compute_dtype, bfloat16_rows,
    shortlist, warmup,
) -> Path:  # fmt: skip
    """`export` once its arguments are checked and `out_dir` is known to be writable."""
    from translator.inference import load, resolve_compute_dtype

    # Refuse an existing version before any work (and again when publishing, under the lock).
    requested = None if version is None else int(version)
    _check_new_version(out_dir, next_version(out_dir) if requested is None else requested)
    source_dir = model_path.parent if model_path.suffix == ".keras" else model_path
    # What config.yaml records: `auto` stays `auto`, so that `translator.load` of the export
    # resolves it on its own machine (float32 where bfloat16 is emulated); the SavedModel's
    # graph is fixed, built with `auto` resolved here.
    overrides = {
        name: value
        for name, value in (
            ("projection_dtype", projection_dtype),
            ("compute_dtype", compute_dtype),
            ("bfloat16_rows", bfloat16_rows),
        )
        if value is not None
    }
    resolved = dict(overrides)
    if "compute_dtype" in resolved:
        resolved["compute_dtype"] = resolve_compute_dtype(compute_dtype)
    translator = with_tokenizers(
        load(model_path, **resolved, **({} if shortlist else {"shortlist": None}))
    )
    auto = "auto" in (compute_dtype, translator.compute_dtype)  # the threshold is for elsewhere too
    if bfloat16_rows is not None and not translator.adaptive and not auto:
        raise ExportError(
            f"bfloat16_rows={bfloat16_rows} applies to compute_dtype adaptive or auto only; "
            "this export would decode in "
            f"{resolve_compute_dtype(translator.compute_dtype) or 'the model dtype'} alone: add "
            "compute_dtype adaptive (--compute-dtype adaptive), or leave bfloat16_rows out"
        )
    round_weights(translator.model, weights_dtype)
    with staging_dir(out_dir, prefix=".export-") as staging:
        for name in _SIDE_FILES:
            if (source_dir / name).is_file() and not (name == "config.yaml" and overrides):
                shutil.copyfile(source_dir / name, staging / name)
        if translator.shortlist is not None:  # the one built into the SavedModel
            translator.shortlist.save(staging / SHORTLIST)
        if overrides:
            # The decoding the SavedModel is built with, so that `translator.load` of the
            # export directory decodes as the SavedModel does.
            (staging / "config.yaml").write_text(_with_decoding(source_dir, overrides))
        translator.model.save(staging / "model.keras")
        # Published in this order, the version last.
        names = [n for n in (*_SIDE_FILES, SHORTLIST, "model.keras") if (staging / n).is_file()]
        _write_saved_model(translator, staging / "saved_model", weights_dtype, auto, warmup)
        fsync_tree(staging)
        with locked_directory(out_dir):
            # Chosen (or checked) again under the lock: another export may have published.
            version = next_version(out_dir) if requested is None else requested
            _check_new_version(out_dir, version)
            final = out_dir / str(version)
            moves = [(staging / name, out_dir / name) for name in names]
            # An earlier export's shortlist goes (kept in the staging directory until the
            # version is in place, put back if publishing fails): `load` of the directory must
            # decode as the new version, over the whole vocabulary.
            stale, kept = out_dir / SHORTLIST, staging / f".stale-{SHORTLIST}"
            if translator.shortlist is None and stale.is_file():
                os.replace(stale, kept)
            try:
                publish([*moves, (staging / "saved_model", final)], staging / ".previous")
            except BaseException:
                if kept.is_file():
                    os.replace(kept, stale)
                raise
            if kept.is_file():
                log.info("removed %s (this version decodes over the whole vocabulary)", stale)
    log.info("wrote SavedModel %s (signatures: %s)", final, ", ".join(SIGNATURES))
    return final


# The files beside the versions that an export copies from the model it exports.
_SIDE_FILES = ("spm.model", "spm.source.model", "spm.target.model", "config.yaml")


def _check_new_version(out_dir: Path, version: int) -> None:
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    if (out_dir / str(version)).exists():
        raise ExportError(
            f"{out_dir / str(version)} exists already: TF Serving versions are immutable. Omit "
            f"--version to write version {next_version(out_dir)}, or remove it first."
        )


def _with_decoding(source_dir: Path, options: dict) -> str:
    """The source's config.yaml with `decoding.<name>` set for each of `options` (only the
    decoding section if the source has no config: the rest would be invented)."""
    import yaml

    from translator.config import load_config

    config_file = source_dir / "config.yaml"
    overrides = [f"decoding.{name}={value}" for name, value in options.items()]
    if config_file.is_file():
        return load_config(config_file, overrides).to_yaml()
    decoding = load_config(None, overrides).decoding.model_dump(mode="json")
    return yaml.safe_dump({"decoding": decoding}, sort_keys=False)


def load_saved_model(path):
    """Loads an exported SavedModel (a version directory, or a base directory: latest version).

    Only TensorFlow and TF Text are needed, as in TF Serving.

    Returns:
        `(loaded, version_dir)`; `loaded.signatures["translate"]` and `["serving_default"]`.

    Raises:
        ExportError: naming the directory and what is missing or wrong.
    """
    import tensorflow_text  # noqa: F401 - registers the SentencePiece ops

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} does not exist or is not a directory (expected an export)")
    if not (path / "saved_model.pb").is_file():
        versions = version_dirs(path)
        if not versions:
            raise ExportError(
                f"{path} holds no saved_model.pb and no version directory (1/, 2/, ...): "
                "write one with `translator export --model RUN --out DIR`"
            )
        path = versions[-1][1]
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ExportError(f"cannot load the SavedModel in {path}: {type(e).__name__}: {e}") from e
    missing = [name for name in SIGNATURES if name not in loaded.signatures]
    if missing:
        raise ExportError(
            f"the SavedModel in {path} lacks the signature(s) {missing} (it has "
            f"{sorted(loaded.signatures)}): is it a translator export?"
        )
    _resolve_auto(loaded, path)
    return loaded, path


def _resolve_auto(loaded, path: Path) -> None:
    """An export built with `compute_dtype: auto` decodes big calls in bfloat16 as built; on
    a CPU without bfloat16 instructions this turns that path off, as `translator.load`
    resolves `auto` to float32 there (exports from before 2026-12-07 have no such switch)."""
    from translator.inference import resolve_compute_dtype

    auto = getattr(loaded, "bfloat16_auto", None)
    if auto is None or not bool(auto.numpy()) or resolve_compute_dtype("auto") == "adaptive":
        return
    rows = int(loaded.bfloat16_rows.numpy())
    loaded.bfloat16_rows.assign(NO_BFLOAT16_ROWS)
    log.info(
        "%s: this CPU has no bfloat16 instructions, so every call decodes in float32 (the "
        "export, compute_dtype auto, was built to decode calls of %d rows or more in bfloat16)",
        path,
        rows,
    )
