"""Training and evaluation: loss, schedule, checkpoints, validation BLEU, `train()` and `evaluate()`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from translator import checkpoint as ckpt
from translator import data as data_lib
from translator.config import Config
from translator.inference import Translator, decoding_options
from translator.model import Seq2Seq
from translator.tokenizer import PAD_ID, SentencePieceTokenizer, train_sentencepiece

log = logging.getLogger("translator.training")


# -- loss, metrics, schedule ----------------------------------------------------------------


@keras.saving.register_keras_serializable(package="translator")
class MaskedCrossEntropy(keras.losses.Loss):
    """Label-smoothed cross-entropy averaged over real (non-PAD) target tokens.

    `loss = -(1 - eps) log p(y) - eps/V sum_v log p(v)`, computed in float32 from logits, summed
    over tokens whose label is not PAD and divided by their count (a per-token mean, so long and
    short batches weigh each token alike). Under a `tf.distribute` strategy with N replicas each
    replica's mean is also divided by N, as Keras' own reductions do: the gradients, summed over
    the replicas, are then those of the mean over replicas.
    """

    def __init__(self, label_smoothing=0.0, pad_id=PAD_ID, name="masked_cross_entropy", **kwargs):
        super().__init__(name=name, reduction=None, **kwargs)
        self.label_smoothing = label_smoothing
        self.pad_id = pad_id

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.int32)
        log_probs = tf.nn.log_softmax(tf.cast(y_pred, tf.float32), axis=-1)  # (B, T, V)
        nll = -tf.gather(log_probs, y_true, batch_dims=2)  # (B, T)
        if self.label_smoothing:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * tf.reduce_mean(
                log_probs, axis=-1
            )
        mask = tf.cast(tf.not_equal(y_true, self.pad_id), tf.float32)
        loss = tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # `reduction=None` skips Keras' scaling for distribution (which fit() undoes for the logs).
        return loss / replicas if replicas > 1 else loss

    def get_config(self):
        return {"label_smoothing": self.label_smoothing, "pad_id": self.pad_id, "name": self.name}


@keras.saving.register_keras_serializable(package="translator")
class TokenAccuracy(keras.metrics.Metric):
    """Accuracy of the argmax prediction over real (non-PAD) target tokens."""

    def __init__(self, pad_id=PAD_ID, name="token_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true, tf.int32)
        mask = tf.cast(tf.not_equal(y_true, self.pad_id), tf.float32)
        hit = tf.cast(tf.equal(tf.argmax(y_pred, -1, output_type=tf.int32), y_true), tf.float32)
        self.correct.assign_add(tf.reduce_sum(hit * mask))
        self.total.assign_add(tf.reduce_sum(mask))

    def result(self):
        return self.correct / tf.maximum(self.total, 1.0)

    def get_config(self):
        return {"pad_id": self.pad_id, "name": self.name}


@keras.saving.register_keras_serializable(package="translator")
class TargetTokens(keras.metrics.Metric):
    """Counts real target tokens since the last reset (for tokens/s)."""

    def __init__(self, pad_id=PAD_ID, name="target_tokens", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.count.assign_add(tf.reduce_sum(tf.cast(tf.not_equal(y_true, self.pad_id), tf.float32)))

    def result(self):
        return self.count

    def get_config(self):
        return {"pad_id": self.pad_id, "name": self.name}


@keras.saving.register_keras_serializable(package="translator")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then inverse-square-root, cosine or no decay.

    A function of the optimizer step alone, so a resumed run (whose optimizer `iterations` is
    restored) continues on exactly the same curve.
    """

    def __init__(self, peak, warmup_steps, decay="inverse_sqrt", total_steps=0, minimum=0.0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = int(total_steps)
        self.minimum = float(minimum)

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        warmup = float(max(self.warmup_steps, 1))
        rate = self.peak * tf.minimum(1.0, step / warmup)
        if self.decay == "inverse_sqrt":
            rate = rate * tf.minimum(1.0, tf.math.rsqrt(step / warmup))
        elif self.decay == "cosine" and self.total_steps > self.warmup_steps:
            progress = tf.clip_by_value(
                (step - warmup) / float(self.total_steps - self.warmup_steps), 0.0, 1.0
            )
            cosine = self.minimum + 0.5 * (self.peak - self.minimum) * (
                1.0 + tf.cos(math.pi * progress)
            )
            rate = tf.where(step < warmup, rate, cosine)
        return tf.maximum(rate, self.minimum)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "minimum": self.minimum,
        }


# -- building blocks ------------------------------------------------------------------------


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is missing)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str) -> str:
    """`training.precision` with `auto` resolved.

    `auto` is `mixed_bfloat16` where bfloat16 matmuls are fast: a CPU with AMX-BF16 or
    AVX512-BF16 (there the multi30k_lstm model trains 1.4x as fast as in float32, see
    bench/train.py) or a GPU of compute capability 8.0 or more; else `float32`.
    """
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
        fast = all(d.get("compute_capability", (0, 0)) >= (8, 0) for d in details)
        return "mixed_bfloat16" if fast else "float32"
    return "mixed_bfloat16" if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else "float32"


def resolve_jit_compile(jit_compile: bool | str, precision: str, distributed: bool) -> bool:
    """`training.jit_compile` with `auto` resolved for the (resolved) `precision`.

    `auto` is on in float32 and off under mixed_bfloat16, where XLA's step is slower than
    TensorFlow's own on CPU (bench/train.py: 2,026 against 1,408 target tokens/s for
    multi30k_lstm). XLA is always off under a distribution strategy: Keras compiles the whole
    step, all-reduce included, and XLA can neither place one program on several devices nor
    (yet) compile collectives on CPU.
    """
    if distributed:
        return False
    if jit_compile == "auto":
        return precision == "float32"
    return bool(jit_compile)


def set_precision(precision: str) -> str:
    """Sets the Keras dtype policy from `training.precision` (`auto` resolved); returns it."""
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def build_model(config: Config, source_vocab_size: int, target_vocab_size: int) -> Seq2Seq:
    m = config.model
    model = Seq2Seq(
        source_vocab_size,
        target_vocab_size,
        embedding_dim=m.embedding_dim,
        share_embeddings=m.share_embeddings,
        tie_embeddings=m.tie_embeddings,
        cell_type=m.cell_type,
        encoder_units=m.encoder_units,
        encoder_layers=m.encoder_layers,
        bidirectional=m.bidirectional,
        decoder_units=m.decoder_units,
        decoder_layers=m.decoder_layers,
        attention=m.attention,
        attention_score=m.attention_score,
        input_feeding=m.input_feeding,
        dropout=m.dropout,
        residual=m.residual,
    )
    model.build()
    return model


def peak_learning_rate(config: Config, replicas: int = 1) -> float:
    """`training.learning_rate` scaled for `replicas` by `training.learning_rate_scaling`.

    With N replicas a step averages the gradients of N batches, each of `data.batch_tokens`
    tokens, so the batch is N times larger: `sqrt` multiplies the peak rate by sqrt(N) (the
    square-root rule suited to Adam), `linear` by N (the rule for SGD), `none` keeps it.
    """
    t = config.training
    factor = {"none": 1.0, "sqrt": math.sqrt(replicas), "linear": float(replicas)}
    return t.learning_rate * factor[t.learning_rate_scaling]


def build_optimizer(config: Config, replicas: int = 1) -> keras.optimizers.Optimizer:
    t = config.training
    schedule = WarmupSchedule(
        peak_learning_rate(config, replicas),
        t.warmup_steps,
        t.decay,
        total_steps=t.max_steps,
        minimum=t.min_learning_rate,
    )
    return keras.optimizers.Adam(schedule, global_clipnorm=t.clip_norm)


def compile_model(model, config: Config, replicas: int = 1):
    """Compiles `model`; under a `tf.distribute` strategy call it inside `strategy.scope()`.

    `training.jit_compile: auto` is resolved for the global dtype policy (see
    `resolve_jit_compile`).
    """
    policy = keras.mixed_precision.global_policy().name
    precision = "mixed_bfloat16" if policy == "mixed_bfloat16" else "float32"
    model.compile(
        optimizer=build_optimizer(config, replicas),
        loss=MaskedCrossEntropy(config.training.label_smoothing),
        metrics=[TokenAccuracy(), TargetTokens()],
        jit_compile=resolve_jit_compile(
            config.training.jit_compile, precision, tf.distribute.has_strategy()
        ),
    )
    return model


def check_run_dir(run_dir: Path, needed_bytes: int = 200 << 20) -> None:
    """Fails before training if the run directory cannot be written or the disk is nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"run directory {run_dir} is not writable ({e.strerror or e}); choose another with "
            "--run-dir"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise OSError(
            f"only {free >> 20} MiB free under {run_dir}; checkpoints need about "
            f"{needed_bytes >> 20} MiB. Free some space or choose another --run-dir."
        )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_tokenizers(config: Config, train_pairs, run_dir: Path, train_missing: bool = True):
    """Trains (or reuses, when the run already has them) the SentencePiece model(s).

    With `train_missing=False` (a multi-worker run's other workers, which read the chief's), a
    missing model is an error instead.
    """
    t = config.tokenizer
    kwargs = dict(
        vocab_size=t.vocab_size,
        model_type=t.model_type,
        character_coverage=t.character_coverage,
        input_sentence_size=t.input_sentence_size,
        seed=config.training.seed,
    )
    sources = [s for s, _ in train_pairs]
    targets = [f for _, f in train_pairs]
    if t.joint:
        path = run_dir / "spm.model"
        if not path.exists():
            _check_shared(path, train_missing)
            log.info("training a joint SentencePiece model (%d pieces)", t.vocab_size)
            train_sentencepiece(sources + targets, path, **kwargs)
        tokenizer = SentencePieceTokenizer(model_path=str(path))
        return tokenizer, tokenizer
    tokenizers = []
    for side, texts in (("source", sources), ("target", targets)):
        path = run_dir / f"spm.{side}.model"
        if not path.exists():
            _check_shared(path, train_missing)
            log.info("training the %s SentencePiece model (%d pieces)", side, t.vocab_size)
            train_sentencepiece(texts, path, **kwargs)
        tokenizers.append(SentencePieceTokenizer(model_path=str(path)))
    return tuple(tokenizers)


def _check_shared(path: Path, train_missing: bool) -> None:
    if not train_missing:
        raise FileNotFoundError(
            f"{path} is missing: in a multi-worker run every worker reads the chief's run "
            "directory, so --run-dir must be on storage all workers share (NFS, a shared volume)"
        )


class InitFromError(ValueError):
    """`training.init_from` names a model this run cannot start from; the message says why."""


def load_init_model(config: Config, run_dir: Path):
    """The model named by `training.init_from`, checked against `config` (for fine-tuning).

    Reads only: the SentencePiece model(s) the run must use are returned, for
    `write_init_vocabulary` to put into the run directory once everything is checked.

    Returns:
        `(translator, {file name: SentencePiece model bytes})`.

    Raises:
        InitFromError: the path cannot be loaded, its architecture differs from the config's
            model section (dropout aside), or the run directory holds another vocabulary.
    """
    from translator.inference import load

    source = Path(config.training.init_from)
    try:
        init = load(source)
    except (FileNotFoundError, ValueError) as e:
        raise InitFromError(f"training.init_from: {e}") from e
    theirs = init.model.get_config()  # the whole architecture, whatever the path named
    ours = config.model.model_dump(exclude={"dropout"})
    different = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    joint = init.source_tokenizer is init.target_tokenizer or (
        init.source_tokenizer.proto == init.target_tokenizer.proto
    )
    if joint != config.tokenizer.joint:
        different["tokenizer.joint"] = (joint, config.tokenizer.joint)
    if different:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in different.items())
        raise InitFromError(
            f"training.init_from={source} was trained with another architecture ({listed}); "
            "copy its model section into your config (only dropout may differ)"
        )
    if joint:
        wanted = {"spm.model": init.source_tokenizer.proto}
    else:
        wanted = {
            "spm.source.model": init.source_tokenizer.proto,
            "spm.target.model": init.target_tokenizer.proto,
        }
    for name, proto in wanted.items():
        path = run_dir / name
        if path.exists() and path.read_bytes() != proto:
            raise InitFromError(
                f"{path} is another SentencePiece model than the one of training.init_from="
                f"{source}: use a new --run-dir"
            )
    return init, wanted


def write_init_vocabulary(run_dir: Path, wanted: dict) -> None:
    """Writes the SentencePiece model(s) of `load_init_model` that the run directory lacks."""
    for name, proto in wanted.items():
        path = run_dir / name
        if not path.exists():
            tmp = path.with_name(name + ".tmp")
            tmp.write_bytes(proto)
            os.replace(tmp, path)


def _weight_name(variable) -> str:
    # Keras numbers layer names per process (gru_cell, gru_cell_2, ...): compare without that.
    return "/".join(re.sub(r"_\d+$", "", part) for part in variable.path.split("/"))


def init_weights_from(model, init, source) -> None:
    """Copies the weights of `init.model` into `model`, variable by variable, checking shapes."""
    ours, theirs = model.weights, init.model.weights
    if len(ours) != len(theirs):
        raise InitFromError(
            f"training.init_from={source}: its model has {len(theirs)} weights, this config's "
            f"{len(ours)}; the model sections differ"
        )
    for a, b in zip(ours, theirs, strict=True):
        if _weight_name(a) != _weight_name(b) or tuple(a.shape) != tuple(b.shape):
            raise InitFromError(
                f"training.init_from={source}: weight {b.path} {tuple(b.shape)} would go into "
                f"{a.path} {tuple(a.shape)}; the model sections or vocabularies differ"
            )
    model.set_weights(init.model.get_weights())


def load_training_pairs(config: Config):
    d = config.data
    corpora = [(c.name, c.weight) for c in d.corpora]
    return data_lib.load_mixture(corpora, "train", data_dir=d.data_dir, seed=config.training.seed)


def make_translator(model, source_tokenizer, target_tokenizer, config: Config) -> Translator:
    return Translator(model, source_tokenizer, target_tokenizer, **decoding_options(config))


def bleu_chrf(hypotheses, references):
    """Cased sacreBLEU BLEU and chrF; `references` is a list of reference lists per sentence."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, streams)
    c = chrf.corpus_score(hypotheses, streams)
    return b, c, bleu.get_signature(), chrf.get_signature()


# -- distribution ---------------------------------------------------------------------------


def _tf_config_tasks() -> int:
    """Number of training tasks (chief and workers) in `$TF_CONFIG`; 0 when it is not set."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError) as e:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' ({e})") from None
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _local_devices() -> list[str]:
    """This machine's GPUs, else its (logical) CPU devices."""
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def resolve_strategy(name: str) -> str:
    """`training.strategy` with `auto` resolved.

    `auto` is `multi_worker` when `TF_CONFIG` names several tasks, else `mirrored` when this
    machine has several GPUs (or logical CPU devices), else `default`.
    """
    if name != "auto":
        return name
    if _tf_config_tasks() > 1:
        return "multi_worker"
    return "mirrored" if len(_local_devices()) > 1 else "default"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy named by `training.strategy`.

    `default` is TensorFlow's default (one device, no distribution); `mirrored` is a
    `MirroredStrategy` over this machine's GPUs, or over its logical CPU devices when it has no
    GPU; `multi_worker` is a `MultiWorkerMirroredStrategy` over the cluster in the standard
    `TF_CONFIG` environment variable (each worker's own devices are mirrored too); `auto` is
    resolved by `resolve_strategy`.

    Call it before TensorFlow runs anything: `MultiWorkerMirroredStrategy` configures the
    runtime's collective ops, which must happen at program start-up.
    """
    name = resolve_strategy(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = _local_devices()
        if len(devices) == 1:
            log.warning(
                "strategy mirrored on one device (%s): one replica, no speed-up, and XLA is off "
                "under distribution; use `default`, or declare logical CPUs with "
                "tf.config.set_logical_device_configuration before training",
                devices[0],
            )
        return tf.distribute.MirroredStrategy(devices)
    if name != "multi_worker":
        raise ValueError(f"unknown strategy {name!r}: auto, default, mirrored or multi_worker")
    if _tf_config_tasks() == 0:
        log.warning("strategy multi_worker without TF_CONFIG: training on this machine alone")
    implementation = tf.distribute.experimental.CommunicationImplementation.AUTO  # RING on CPU
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation
        )
    )


def _chief_decision(strategy: tf.distribute.Strategy):
    """`decide(flag)`: the chief's `flag`, sent to every worker by an all-reduce.

    In a multi-worker run only the chief validates and keeps the training progress, so it alone
    decides when to stop; the others follow, so that all keep running the same collective ops.
    Every worker must call `decide` at the same point (it is also a barrier).
    """
    chief = strategy.extended.should_checkpoint

    @tf.function
    def total(value):
        local = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, local, axis=None)

    def decide(flag: bool) -> bool:
        return float(total(tf.constant(1.0 if flag and chief else 0.0))) > 0.0

    return decide


def weights_digest(model) -> str:
    """SHA-256 of the model's weights (workers of a run must agree on it)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


class _WorkerBackup(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for a multi-worker run on a shared run directory.

    Every worker writes its backup (weights with the optimizer state, and the epoch) at the end
    of every chunk, as the Keras callback does, into `write_dir`: the chief's is the run's
    `backup/`, the other workers' go to their scratch directories, so all run the same code and
    only the chief writes into the run directory. The backup is deleted when training ends; one
    that exists at start-up marks an interrupted run, which every worker resumes from the
    chief's backup in `read_dir`.

    `train` restores it before building the data pipeline (where the data resumes depends on
    the restored step), so `on_train_begin` does nothing. The step is read from the optimizer
    state inside the weights file, so it matches the weights even if a worker died between
    writing them and the epoch file; with `double_checkpoint`, a torn weights file falls back
    to the previous backup.
    """

    def __init__(self, read_dir: Path, write_dir: Path):
        super().__init__(str(write_dir), double_checkpoint=True)
        self.read_dir = Path(read_dir)
        self.write_dir = Path(write_dir)

    def exists(self) -> bool:
        return any((self.read_dir / name).is_file() for name in self._names())

    @staticmethod
    def _names():
        return ("latest.weights.h5", "latest.weights.h5.bkp")

    def restore(self, model) -> int:
        """Loads the newest readable backup into `model`; returns its optimizer step."""
        errors = []
        for name in self._names():
            path = self.read_dir / name
            if not path.is_file():
                continue
            if not name.endswith(".weights.h5"):  # Keras loads only files named *.weights.h5
                self.write_dir.mkdir(parents=True, exist_ok=True)
                path = Path(shutil.copy(path, self.write_dir / "previous.weights.h5"))
            try:
                model.load_weights(path)
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable backup %s (%s)", self.read_dir / name, e)
                errors.append(f"{name}: {e}")
                continue
            return int(model.optimizer.iterations.numpy())
        raise ckpt.CheckpointError(
            f"no usable backup in {self.read_dir}:\n  "
            + "\n  ".join(errors)
            + "\nDelete it, then pass --resume to continue from the last checkpoint instead."
        )

    def on_train_begin(self, logs=None):
        pass  # restored by `train` before the data pipeline was built


# -- the training loop ----------------------------------------------------------------------


class _Trainer(keras.callbacks.Callback):
    """Checkpoints, validation BLEU, early stopping, TensorBoard scalars and time limits.

    In a multi-worker run, `agree` sends the chief's decision to stop to every worker; the other
    workers have no `translator` (only the chief validates) and write into scratch directories.
    """

    def __init__(self, run_dir, config, translator, validation, state, writer, agree=None):
        super().__init__()
        self.run_dir = run_dir
        self.config = config
        self.translator = translator
        self.validation = validation
        self.state = state
        self.writer = writer
        self.agree = agree
        self.chunk_start = time.time()
        self.train_start = time.time() - state.get("train_seconds", 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self.chunk_start = time.time()
        self.chunk_start_step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        # The time limit holds to the step, not to the next checkpoint (which may be minutes
        # away): the chunk ends here and on_epoch_end checkpoints and validates this step. A
        # multi-worker run stops at checkpoints only, where the workers agree.
        limit = self.config.training.time_limit_minutes
        if limit and self.agree is None and time.time() - self.train_start >= limit * 60:
            self.model.stop_training = True
        # max_steps holds to the step too, whether or not it is a multiple of
        # steps_per_checkpoint (every worker of a multi-worker run reaches it at the same step).
        max_steps = self.config.training.max_steps
        if max_steps and int(self.model.optimizer.iterations.numpy()) >= max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        t = self.config.training
        logs = logs or {}
        seconds = time.time() - self.chunk_start
        step = int(self.model.optimizer.iterations.numpy())
        chunk_steps = step - getattr(self, "chunk_start_step", step - t.steps_per_checkpoint)
        tokens = float(logs.get("target_tokens", 0.0))  # of all replicas
        lr = float(self.model.optimizer.learning_rate.numpy())
        record = {
            "step": step,
            "loss": float(logs.get("loss", float("nan"))),
            "token_accuracy": float(logs.get("token_accuracy", float("nan"))),
            "learning_rate": lr,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "steps_per_second": chunk_steps / max(seconds, 1e-9),
        }
        self.state["chunks"] = epoch + 1
        self.state["train_seconds"] = time.time() - self.train_start
        # The last step is always validated, so the best checkpoint can be the last one.
        last = (t.max_steps and step >= t.max_steps) or (
            t.time_limit_minutes and self.state["train_seconds"] >= t.time_limit_minutes * 60
        )
        if ((epoch + 1) % t.validate_every == 0 or last) and self.translator is not None:
            bleu = self.validate()
            record["val_bleu"] = bleu
            if bleu > self.state.get("best_bleu", -1.0):
                self.state["best_bleu"] = bleu
                self.state["best_step"] = step
                self.state["stale"] = 0
            else:
                self.state["stale"] = self.state.get("stale", 0) + 1
        self.state.setdefault("history", []).append(record)
        with self.writer.as_default(step=step):
            for key, value in record.items():
                if key != "step":
                    tf.summary.scalar(key, value)
            self.writer.flush()
        best = f"ckpt-{self.state['best_step']:08d}" if "best_step" in self.state else None
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            step,
            self.model,
            self.model.optimizer,
            self.state,
            keep=t.keep_checkpoints,
            protect=(best,) if best else (),
        )
        log.info(
            "step %d: loss %.4f, token accuracy %.3f, %.0f target tokens/s%s -> %s",
            step,
            record["loss"],
            record["token_accuracy"],
            record["tokens_per_second"],
            f", validation BLEU {record['val_bleu']:.2f}" if "val_bleu" in record else "",
            path.name,
        )
        stop = False
        chief = self.translator is not None  # the other workers follow the chief's decision
        stale = self.state.get("stale", 0)
        if chief and t.early_stopping_patience and stale >= t.early_stopping_patience:
            log.info("early stopping: no validation BLEU gain in %d validations", stale)
            stop = True
        seconds = self.state["train_seconds"]
        if chief and t.time_limit_minutes and seconds >= t.time_limit_minutes * 60:
            log.info("time limit of %.1f minutes reached", t.time_limit_minutes)
            stop = True
        if self.agree is not None:
            stop = self.agree(stop)
        if stop:
            self.model.stop_training = True

    def validate(self) -> float:
        sources, references = self.validation
        hypotheses = [r.text for r in self.translator.translate(sources)]
        bleu, _, _, _ = bleu_chrf(hypotheses, references)
        return float(bleu.score)


def train(config: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Trains a translator; returns a summary (steps, time, best validation BLEU, paths).

    The run directory receives `config.yaml` (resolved), the SentencePiece model(s),
    `checkpoints/`, TensorBoard logs in `logs/`, and at the end `model.keras` holding the best
    checkpoint's weights.

    Under a `tf.distribute` strategy (`training.strategy`, see `make_strategy`) each replica
    trains on batches of `data.batch_tokens` and each worker reads its own share of the pairs.
    In a multi-worker run only the chief writes into the run directory (the other workers write
    the same files into a scratch directory deleted at the end), every worker reads the chief's
    tokenizer, checkpoints and backup from it, so it must be on shared storage, and a run whose
    workers were killed resumes from its backup when they are restarted with the same
    `TF_CONFIG`.
    """
    # First of all: MultiWorkerMirroredStrategy sets up the runtime before anything runs.
    strategy = make_strategy(config.training.strategy)
    run_dir = Path(run_dir)
    if strategy.extended.should_checkpoint:
        return _train(config, strategy, run_dir, run_dir, resume)
    resolver = strategy.cluster_resolver
    scratch = Path(tempfile.mkdtemp(prefix=f"translator-{resolver.task_type}{resolver.task_id}-"))
    try:
        return _train(config, strategy, run_dir, scratch, resume)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(config, strategy, run_dir: Path, out_dir: Path, resume: bool) -> dict:
    """`train` with `strategy`: reads the run from `run_dir`, writes it to `out_dir`."""
    chief = out_dir == run_dir
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    distributed = multi_worker or isinstance(strategy, tf.distribute.MirroredStrategy)
    replicas = strategy.num_replicas_in_sync
    checkpoints = run_dir / "checkpoints"
    backup = _WorkerBackup(run_dir / "backup", out_dir / "backup") if multi_worker else None
    interrupted = backup is not None and backup.exists()
    if ckpt.list_checkpoints(checkpoints) and not (resume or interrupted):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
            "a new --run-dir"
        )
    fresh = not (interrupted or ckpt.list_checkpoints(checkpoints))
    init = None
    if config.training.init_from and fresh:
        # Every worker checks (and so refuses with the same message) before anything is written.
        init, init_vocabulary = load_init_model(config, run_dir)
    elif config.training.init_from:
        log.info("training.init_from ignored: the run resumes from its own checkpoints")
    check_run_dir(out_dir)
    if init is not None and chief:
        write_init_vocabulary(run_dir, init_vocabulary)
    if distributed and config.training.jit_compile is True:
        log.info("XLA is off under a distribution strategy (training.jit_compile ignored)")
    _atomic_write_text(out_dir / "config.yaml", config.to_yaml())
    keras.utils.set_random_seed(config.training.seed)
    precision = set_precision(config.training.precision)
    # The run trains with `auto` resolved (the written config.yaml keeps what was asked for,
    # so a resumed run resolves it again for the machine it runs on).
    config = config.model_copy(deep=True)
    config.training.jit_compile = resolve_jit_compile(
        config.training.jit_compile, precision, distributed
    )
    t = config.training
    log.info("precision %s, XLA %s", precision, "on" if t.jit_compile else "off")
    if distributed:
        log.info(
            "%s: %d replicas%s; a step takes %d batches of %d tokens; peak learning rate %g",
            "MultiWorkerMirroredStrategy" if multi_worker else "MirroredStrategy",
            replicas,
            f" (this worker is {'the chief' if chief else 'not the chief'})"
            if multi_worker
            else "",
            replicas,
            config.data.batch_tokens,
            peak_learning_rate(config, replicas),
        )

    chief_decides = _chief_decision(strategy) if multi_worker else None
    train_pairs = load_training_pairs(config)
    if chief:
        source_tok, target_tok = prepare_tokenizers(config, train_pairs, run_dir)
    if multi_worker:
        chief_decides(False)  # a barrier: the chief's tokenizer is written
    if not chief:
        source_tok, target_tok = prepare_tokenizers(
            config, train_pairs, run_dir, train_missing=False
        )

    def training_batches(pairs):
        return data_lib.make_dataset(
            pairs,
            source_tok,
            target_tok,
            batch_tokens=config.data.batch_tokens,
            max_length=config.data.max_length,
            shuffle=True,
            seed=t.seed,
            repeat=True,
            pad_to_bucket=t.jit_compile,  # one XLA program per bucket, not per batch shape
        ).map(lambda inputs, target_out, _: (inputs, target_out))  # the loss masks PAD itself

    if not distributed:
        dataset = training_batches(train_pairs)
    validation = None
    if chief:
        validation = data_lib.load_references(
            config.data.validation_corpus,
            config.data.validation_split,
            data_dir=config.data.data_dir,
        )
        if config.data.validation_size:
            validation = validation[: config.data.validation_size]
        validation = ([s for s, _ in validation], [r for _, r in validation])

    with strategy.scope():  # model, optimizer and metrics variables are created distributed
        model = build_model(config, source_tok.vocabulary_size(), target_tok.vocabulary_size())
        compile_model(model, config, replicas)
        model.optimizer.build(model.trainable_variables)
        if distributed:
            _prepare_distributed_fit(model, multi_worker)
    state: dict = {}
    if interrupted:
        step = backup.restore(model)
        newest = ckpt.list_checkpoints(checkpoints)
        newest_step = int(newest[-1].name.split("-")[1]) if newest else -1
        if newest_step > step:
            # The run went on after the backup was written (e.g. `--resume` with another
            # strategy): the newer checkpoint wins, and the stale backup is not used again.
            log.warning(
                "ignoring the backup of step %d: checkpoint %s is newer", step, newest[-1].name
            )
            interrupted, resume = False, True
        else:
            state = _progress_at(checkpoints, step, t.steps_per_checkpoint)
            log.info("resumed the interrupted run from its backup (step %d)", step)
    if init is not None:
        init_weights_from(model, init, t.init_from)
        log.info("weights initialized from %s (the optimizer starts at step 0)", t.init_from)
        del init
    if resume and not interrupted:
        path, restored = ckpt.restore_latest(checkpoints, model, model.optimizer)
        if path is not None:
            state = restored
            log.info("resumed from %s (step %d)", path, state["step"])
    step = int(model.optimizer.iterations.numpy())
    log.info("model: %s parameters", f"{model.count_params():,}")

    chunk = t.steps_per_checkpoint
    # Chunks (Keras "epochs") of `chunk` steps until max_steps, early stopping or the time limit
    # stops the run (_Trainer.on_train_batch_end): a chunk cut short by a time limit does not
    # shift where a resumed run ends.
    done_chunks = state.get("chunks", 0)
    if t.max_steps:
        total_chunks = done_chunks + math.ceil(max(t.max_steps - step, 0) / chunk)
    else:
        total_chunks = 10**9
    # The data order is a pure function of the seed: skipping the batches already consumed
    # continues a resumed run on exactly the batches it would have seen.
    if distributed:
        stream = _distributed_batches(strategy, training_batches, train_pairs, step)
    else:
        stream = dataset.skip(step).prefetch(tf.data.AUTOTUNE)
    writer = tf.summary.create_file_writer(str(out_dir / "logs"))
    trainer = _Trainer(
        out_dir,
        config,
        make_translator(model, source_tok, target_tok, config) if chief else None,
        validation,
        state,
        writer,
        agree=chief_decides,
    )
    start = time.time()
    if done_chunks < total_chunks:
        model.fit(
            stream,
            epochs=total_chunks,
            initial_epoch=done_chunks,
            steps_per_epoch=chunk,
            callbacks=[trainer, backup] if backup else [trainer],
            verbose=1 if os.environ.get("TRANSLATOR_QUIET") != "1" else 0,
        )
    elapsed = time.time() - start
    steps = int(model.optimizer.iterations.numpy())
    if multi_worker:
        log.info("trained to step %d; weights sha256 %s", steps, weights_digest(model))

    best_step = state.get("best_step")
    summary = {
        "steps": steps,
        "train_seconds": state.get("train_seconds", elapsed),
        "best_val_bleu": state.get("best_bleu"),
        "best_step": best_step,
        "parameters": int(model.count_params()),
        "precision": precision,
        "run_dir": str(run_dir),
        "chief": chief,
    }
    if not chief:
        return summary
    if best_step is not None:
        ckpt.restore_checkpoint(checkpoints / f"ckpt-{best_step:08d}", model, None)
    save_model(model, run_dir / "model.keras")
    _atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _prepare_distributed_fit(model, multi_worker: bool) -> None:
    """Works around two Keras 3 bugs of `fit()` under a `tf.distribute` strategy.

    1. `fit()` pulls a batch and all-reduces it to build the compiled loss and metrics
       symbolically; that fails for dict inputs (keras-team/keras#20329) and for replicas whose
       batches differ in shape, as token-bucketed ones do. The model is built already, so its
       input signature is all the build needs: it is done here and `fit()`'s is skipped.
    2. Under `MultiWorkerMirroredStrategy` the per-step logs are averaged with
       `reduce("MEAN", axis=0)`, which fails on scalars (tensorflow/tensorflow#72388): each
       replica's are given a length-1 axis. (The epoch's logs, which the checkpoints record,
       come from the metrics themselves, summed over all replicas.)
    """
    ids = tf.TensorSpec([None, None], tf.int32)
    model._symbolic_build(data_batch=({"source_ids": ids, "target_in_ids": ids}, ids))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if multi_worker:
        train_step = model.train_step

        def train_step_with_axis(data):
            return tf.nest.map_structure(lambda v: tf.reshape(v, [1]), train_step(data))

        model.train_step = train_step_with_axis


def _distributed_batches(strategy, training_batches, pairs, step: int):
    """The training stream of a distributed run, resumed after `step` optimizer steps.

    One input pipeline per worker reads its own share of `pairs` (every n-th pair, so no pair
    is read twice in an epoch) and hands one batch of `data.batch_tokens` to each local
    replica in turn; a step therefore takes as many batches from it as there are local
    replicas.
    """

    def dataset_fn(context: tf.distribute.InputContext):
        share = pairs[context.input_pipeline_id :: context.num_input_pipelines]
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return training_batches(share).skip(step * local_replicas).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _progress_at(checkpoints: Path, step: int, chunk: int) -> dict:
    """The training progress (history, best BLEU...) of the chief's checkpoint at `step`."""
    try:
        return ckpt.verify_checkpoint(checkpoints / f"ckpt-{step:08d}")
    except ckpt.CheckpointError as e:
        log.warning("%s; resuming at step %d without the earlier history", e, step)
        return {"step": step, "chunks": step // chunk}


def save_model(model: Seq2Seq, path: Path) -> None:
    """Saves an uncompiled float32 copy of `model` to a `.keras` file, atomically."""
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        clean = Seq2Seq.from_config(model.get_config())
        clean.build()
    finally:
        keras.mixed_precision.set_global_policy(policy)
    clean.set_weights([np.asarray(w) for w in model.get_weights()])
    tmp = path.with_name(path.stem + ".tmp.keras")
    clean.save(tmp)
    os.replace(tmp, path)


def average_checkpoints(run_dir, last: int, out_dir=None) -> Path:
    """Averages the weights of a run's `last` newest checkpoints into a model directory.

    Averaging the checkpoints of the end of training is a cheap ensemble (Junczys-Dowmunt et
    al., 2016; OpenNMT's `average_checkpoints`): it smooths out the noise of the last updates and
    usually gains some BLEU. The output directory holds `model.keras`, the run's `config.yaml`
    and SentencePiece model(s), and `average.json` (which checkpoints, their validation BLEU), so
    `translator evaluate`, `translate` and `export` take it like a run directory.

    Args:
        run_dir: A training run directory (with `checkpoints/` and `model.keras`).
        last: How many of the newest checkpoints to average (>= 1).
        out_dir: Output directory (default: `<run_dir>/averaged-<last>`).

    Returns:
        The output directory.

    Raises:
        ValueError: `last` < 1, or the run has fewer good checkpoints than `last`.
        FileNotFoundError: `run_dir` is not a finished training run.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / f"averaged-{last}"
    if last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    if not (run_dir / "model.keras").is_file() or not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run: it needs model.keras and checkpoints/ "
            "(see `translator train`)"
        )
    good, skipped = [], []
    for path in reversed(ckpt.list_checkpoints(run_dir / "checkpoints")):
        try:
            good.append((path, ckpt.verify_checkpoint(path)))
        except ckpt.CheckpointError as e:
            skipped.append(str(e))
            log.warning("skipping unusable checkpoint: %s", e)
        if len(good) == last:
            break
    if len(good) < last:
        raise ValueError(
            f"{run_dir} has {len(good)} usable checkpoint(s), fewer than --last {last}"
            + (f" ({len(skipped)} skipped as unusable)" if skipped else "")
            + ": average fewer, or keep more with training.keep_checkpoints"
        )
    good.reverse()  # oldest first, for the record
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    sums = None
    for path, _ in good:
        model.load_weights(path / "model.weights.h5")
        weights = [np.asarray(w, np.float64) for w in model.get_weights()]
        sums = weights if sums is None else [s + w for s, w in zip(sums, weights, strict=True)]
    last_weights = model.get_weights()  # non-float variables (none today) keep the newest value
    model.set_weights(
        [
            (s / len(good)).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
            for s, w in zip(sums, last_weights, strict=True)
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir / "model.keras")
    for name in ("config.yaml", "spm.model", "spm.source.model", "spm.target.model"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / (name + ".tmp"))
            os.replace(out_dir / (name + ".tmp"), out_dir / name)
    record = {
        "run_dir": str(run_dir),
        "checkpoints": [
            {"name": p.name, "step": s.get("step"), "val_bleu": _val_bleu(s)} for p, s in good
        ],
    }
    _atomic_write_text(out_dir / "average.json", json.dumps(record, indent=1))
    log.info("averaged %s into %s", ", ".join(p.name for p, _ in good), out_dir / "model.keras")
    return out_dir


def _val_bleu(state: dict) -> float | None:
    """The validation BLEU a checkpoint's state recorded at its own step, if any."""
    history = state.get("history") or [{}]
    return history[-1].get("val_bleu") if history[-1].get("step") == state.get("step") else None
