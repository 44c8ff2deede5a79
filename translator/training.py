"""Training and evaluation: loss, schedule, checkpoints, validation BLEU, `train()` and `evaluate()`."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
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
    short batches weigh each token alike).
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
        return tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)

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


def set_precision(precision: str) -> str:
    """Sets the Keras dtype policy; `auto` picks mixed_bfloat16 only where it is known to pay."""
    if precision == "auto":
        precision = "float32"  # bfloat16 needs XLA-free paths to pay on CPU; measured in bench/
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


def build_optimizer(config: Config) -> keras.optimizers.Optimizer:
    t = config.training
    schedule = WarmupSchedule(
        t.learning_rate,
        t.warmup_steps,
        t.decay,
        total_steps=t.max_steps,
        minimum=t.min_learning_rate,
    )
    return keras.optimizers.Adam(schedule, global_clipnorm=t.clip_norm)


def compile_model(model, config: Config):
    model.compile(
        optimizer=build_optimizer(config),
        loss=MaskedCrossEntropy(config.training.label_smoothing),
        metrics=[TokenAccuracy(), TargetTokens()],
        jit_compile=config.training.jit_compile,
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


def prepare_tokenizers(config: Config, train_pairs, run_dir: Path):
    """Trains (or reuses, when the run already has them) the SentencePiece model(s)."""
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
            log.info("training a joint SentencePiece model (%d pieces)", t.vocab_size)
            train_sentencepiece(sources + targets, path, **kwargs)
        tokenizer = SentencePieceTokenizer(model_path=str(path))
        return tokenizer, tokenizer
    tokenizers = []
    for side, texts in (("source", sources), ("target", targets)):
        path = run_dir / f"spm.{side}.model"
        if not path.exists():
            log.info("training the %s SentencePiece model (%d pieces)", side, t.vocab_size)
            train_sentencepiece(texts, path, **kwargs)
        tokenizers.append(SentencePieceTokenizer(model_path=str(path)))
    return tuple(tokenizers)


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


# -- the training loop ----------------------------------------------------------------------


class _Trainer(keras.callbacks.Callback):
    """Checkpoints, validation BLEU, early stopping, TensorBoard scalars and time limits."""

    def __init__(self, run_dir, config, translator, validation, state, writer):
        super().__init__()
        self.run_dir = run_dir
        self.config = config
        self.translator = translator
        self.validation = validation
        self.state = state
        self.writer = writer
        self.chunk_start = time.time()
        self.train_start = time.time() - state.get("train_seconds", 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self.chunk_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        t = self.config.training
        logs = logs or {}
        seconds = time.time() - self.chunk_start
        step = int(self.model.optimizer.iterations.numpy())
        tokens = float(logs.get("target_tokens", 0.0))
        lr = float(self.model.optimizer.learning_rate.numpy())
        record = {
            "step": step,
            "loss": float(logs.get("loss", float("nan"))),
            "token_accuracy": float(logs.get("token_accuracy", float("nan"))),
            "learning_rate": lr,
            "tokens_per_second": tokens / max(seconds, 1e-9),
        }
        self.state["chunks"] = epoch + 1
        self.state["train_seconds"] = time.time() - self.train_start
        if (epoch + 1) % t.validate_every == 0:
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
        if t.early_stopping_patience and self.state.get("stale", 0) >= t.early_stopping_patience:
            log.info(
                "early stopping: no validation BLEU gain in %d validations", self.state["stale"]
            )
            self.model.stop_training = True
        if t.time_limit_minutes and self.state["train_seconds"] >= t.time_limit_minutes * 60:
            log.info("time limit of %.1f minutes reached", t.time_limit_minutes)
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
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    checkpoints = run_dir / "checkpoints"
    if ckpt.list_checkpoints(checkpoints) and not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
            "a new --run-dir"
        )
    _atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    t = config.training
    keras.utils.set_random_seed(t.seed)
    precision = set_precision(t.precision)
    log.info("precision %s, XLA %s", precision, t.jit_compile)

    train_pairs = load_training_pairs(config)
    source_tok, target_tok = prepare_tokenizers(config, train_pairs, run_dir)
    dataset = data_lib.make_dataset(
        train_pairs,
        source_tok,
        target_tok,
        batch_tokens=config.data.batch_tokens,
        max_length=config.data.max_length,
        shuffle=True,
        seed=t.seed,
        repeat=True,
        pad_to_bucket=t.jit_compile,  # one XLA program per bucket, not per batch shape
    ).map(lambda inputs, target_out, _: (inputs, target_out))  # the loss masks PAD itself
    validation = data_lib.load_references(
        config.data.validation_corpus, config.data.validation_split, data_dir=config.data.data_dir
    )
    if config.data.validation_size:
        validation = validation[: config.data.validation_size]
    validation = ([s for s, _ in validation], [r for _, r in validation])

    model = build_model(config, source_tok.vocabulary_size(), target_tok.vocabulary_size())
    compile_model(model, config)
    model.optimizer.build(model.trainable_variables)
    state: dict = {}
    if resume:
        path, restored = ckpt.restore_latest(checkpoints, model, model.optimizer)
        if path is not None:
            state = restored
            log.info("resumed from %s (step %d)", path, state["step"])
    step = int(model.optimizer.iterations.numpy())
    log.info("model: %s parameters", f"{model.count_params():,}")

    chunk = t.steps_per_checkpoint
    if t.max_steps:
        total_chunks = math.ceil(t.max_steps / chunk)
    else:
        total_chunks = 10**9  # until early stopping or the time limit
    done_chunks = state.get("chunks", 0)
    # The data order is a pure function of the seed: skipping the batches already consumed
    # continues a resumed run on exactly the batches it would have seen.
    stream = dataset.skip(step).prefetch(tf.data.AUTOTUNE)
    writer = tf.summary.create_file_writer(str(run_dir / "logs"))
    trainer = _Trainer(
        run_dir,
        config,
        make_translator(model, source_tok, target_tok, config),
        validation,
        state,
        writer,
    )
    start = time.time()
    if done_chunks < total_chunks:
        model.fit(
            stream,
            epochs=total_chunks,
            initial_epoch=done_chunks,
            steps_per_epoch=chunk,
            callbacks=[trainer],
            verbose=1 if os.environ.get("TRANSLATOR_QUIET") != "1" else 0,
        )
    elapsed = time.time() - start
    steps = int(model.optimizer.iterations.numpy())

    best_step = state.get("best_step")
    if best_step is not None:
        ckpt.restore_checkpoint(checkpoints / f"ckpt-{best_step:08d}", model, None)
    save_model(model, run_dir / "model.keras")
    summary = {
        "steps": steps,
        "train_seconds": state.get("train_seconds", elapsed),
        "best_val_bleu": state.get("best_bleu"),
        "best_step": best_step,
        "parameters": int(model.count_params()),
        "precision": precision,
        "run_dir": str(run_dir),
    }
    _atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


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
