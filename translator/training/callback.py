"""The callback that runs a training's chunks: checkpoints, validation BLEU, stopping, logs."""

from __future__ import annotations

import logging
import time

import keras
import tensorflow as tf

from translator import checkpoint as ckpt
from translator.scoring import bleu_chrf

log = logging.getLogger(__name__)


class TrainingMonitor(keras.callbacks.Callback):
    """Checkpoints, validation BLEU, early stopping, TensorBoard scalars and time limits.

    `fit()` runs a training as "epochs" of `training.steps_per_checkpoint` steps (chunks); at
    the end of each this callback records the chunk's figures in `state["history"]`, validates
    (every `training.validate_every` chunks, and at the last step), writes them to TensorBoard
    and saves a checkpoint holding `state`.

    Args:
        run_dir: Where `checkpoints/` is written.
        config: The run's config (with `auto` settings resolved).
        translator: A `Translator` of the model being trained, for validation; `None` on the
            workers of a multi-worker run that are not the chief (only the chief validates).
        validation: `[(name, sources, reference lists)]`, the validation sets (see
            `load_validation`), or `None` without a translator. With several, the validation
            BLEU that picks the best checkpoint and drives early stopping is their mean.
        state: The training progress (history, best BLEU...), updated in place; `{}` for a
            new run, the restored checkpoint's for a resumed one.
        writer: A `tf.summary` writer for the TensorBoard scalars.
        agree: In a multi-worker run, `chief_decision`'s `decide`: sends the chief's decision
            to stop to every worker.
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
        if validation is not None:
            self._check_validation_sets([name for name, _, _ in validation])

    def _check_validation_sets(self, names: list[str]) -> None:
        """A resumed run whose validation sets changed starts its best BLEU afresh: a mean of
        other sets is not comparable with the best recorded before (a state written before
        several sets existed had one set, taken to be the first one now)."""
        before = self.state.get("val_sets", names[:1])
        if "best_bleu" in self.state and before != names:
            log.warning(
                "the validation sets changed since step %s's best (%s, now %s): the best "
                "checkpoint and early stopping start afresh from this run's next validation",
                self.state.get("best_step"),
                ", ".join(before),
                ", ".join(names),
            )
            for key in ("best_bleu", "best_step", "stale"):
                self.state.pop(key, None)
        self.state["val_sets"] = names

    def optimizer_step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.chunk_start = time.time()
        self.chunk_start_step = self.optimizer_step()

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
        if max_steps and self.optimizer_step() >= max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        t = self.config.training
        step = self.optimizer_step()
        record = self.chunk_record(step, logs or {})
        self.state["chunks"] = epoch + 1
        self.state["train_seconds"] = time.time() - self.train_start
        # The last step is always validated, so the best checkpoint can be the last one.
        last = (t.max_steps and step >= t.max_steps) or self.out_of_time()
        if ((epoch + 1) % t.validate_every == 0 or last) and self.translator is not None:
            scores = self.validate()
            record["val_bleu"] = sum(scores.values()) / len(scores)
            if len(scores) > 1:
                record["val_bleu_sets"] = scores
            self.track_best(record["val_bleu"], step)
        self.state.setdefault("history", []).append(record)
        self.write_scalars(record, step)
        path = self.save_checkpoint(step)
        log.info(
            "step %d: loss %.4f, token accuracy %.3f, %.0f target tokens/s%s -> %s",
            step,
            record["loss"],
            record["token_accuracy"],
            record["tokens_per_second"],
            _validation_text(record),
            path.name,
        )
        if self.should_stop():
            self.model.stop_training = True

    def chunk_record(self, step: int, logs: dict) -> dict:
        """The history entry of the chunk that ends at `step`, from `fit()`'s epoch `logs`."""
        seconds = time.time() - self.chunk_start
        start = getattr(self, "chunk_start_step", step - self.config.training.steps_per_checkpoint)
        tokens = float(logs.get("target_tokens", 0.0))  # of all replicas
        return {
            "step": step,
            "loss": float(logs.get("loss", float("nan"))),
            "token_accuracy": float(logs.get("token_accuracy", float("nan"))),
            "learning_rate": float(self.model.optimizer.learning_rate.numpy()),
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "steps_per_second": (step - start) / max(seconds, 1e-9),
        }

    def out_of_time(self) -> bool:
        """Whether the recorded training time has reached `training.time_limit_minutes`."""
        limit = self.config.training.time_limit_minutes
        return bool(limit and self.state["train_seconds"] >= limit * 60)

    def track_best(self, bleu: float, step: int) -> None:
        """Records `bleu` as the best so far, or one more validation without a gain."""
        if bleu > self.state.get("best_bleu", -1.0):
            self.state["best_bleu"] = bleu
            self.state["best_step"] = step
            self.state["stale"] = 0
        else:
            self.state["stale"] = self.state.get("stale", 0) + 1

    def write_scalars(self, record: dict, step: int) -> None:
        with self.writer.as_default(step=step):
            for key, value in record.items():
                if key == "val_bleu_sets":
                    for name, bleu in value.items():
                        tf.summary.scalar(f"val_bleu/{name}", bleu)
                elif key != "step":
                    tf.summary.scalar(key, value)
            self.writer.flush()

    def save_checkpoint(self, step: int):
        """Saves `ckpt-<step>` with `state`, keeping the best checkpoint from pruning."""
        t = self.config.training
        best = f"ckpt-{self.state['best_step']:08d}" if "best_step" in self.state else None
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            step,
            self.model,
            self.model.optimizer,
            self.state,
            keep=t.keep_checkpoints,
            protect=(best,) if best else (),
        )

    def should_stop(self) -> bool:
        """Early stopping or the time limit, as the chief decides (the other workers follow)."""
        t = self.config.training
        stop = False
        chief = self.translator is not None
        stale = self.state.get("stale", 0)
        if chief and t.early_stopping_patience and stale >= t.early_stopping_patience:
            log.info("early stopping: no validation BLEU gain in %d validations", stale)
            stop = True
        if chief and self.out_of_time():
            log.info("time limit of %.1f minutes reached", t.time_limit_minutes)
            stop = True
        if self.agree is not None:
            stop = self.agree(stop)
        return stop

    def validate(self) -> dict[str, float]:
        """Cased BLEU of the model's translations of each validation set, by set name."""
        return {name: self.score(sources, refs) for name, sources, refs in self.validation}

    def score(self, sources: list[str], references: list[list[str]]) -> float:
        """Cased BLEU of the model's translations of `sources` against `references`."""
        hypotheses = [r.text for r in self.translator.translate(sources)]
        bleu, _, _, _ = bleu_chrf(hypotheses, references)
        return float(bleu.score)


def _validation_text(record: dict) -> str:
    """`, validation BLEU 30.12 (mean of a 20.00, b 40.24)` for the log line of a chunk."""
    if "val_bleu" not in record:
        return ""
    sets = record.get("val_bleu_sets")
    detail = ", ".join(f"{name} {bleu:.2f}" for name, bleu in sets.items()) if sets else ""
    return f", validation BLEU {record['val_bleu']:.2f}" + (
        f" (mean of {detail})" if detail else ""
    )
