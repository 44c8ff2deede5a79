"""`train()`: one training run, from its config and run directory to `model.keras`."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from translator import checkpoint as ckpt
from translator.config import Config, decoding_options
from translator.files import atomic_write
from translator.hardware import resolve_precision
from translator.inference import Translator
from translator.startup import native_stderr_filter
from translator.training.building import (
    build_model,
    compile_model,
    dtype_policy,
    peak_learning_rate,
    resolve_jit_compile,
    save_model,
)
from translator.training.callback import TrainingMonitor
from translator.training.distribution import (
    Topology,
    WorkerBackup,
    chief_decision,
    distributed_batches,
    make_strategy,
    patch_distributed_fit,
    weights_digest,
)
from translator.training.init_from import init_weights_from, load_init_model, write_init_vocabulary
from translator.training.inputs import (
    RunDirLock,
    batch_maker,
    check_run_dir,
    load_training_pairs,
    load_validation,
    prepare_tokenizers,
)

log = logging.getLogger(__name__)


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

    The process that writes the run directory holds its lock (`RunDirLock`, `<run_dir>/.lock`)
    from before it reads the directory (or, for a new one, from when it is created) to the
    end: a second training on the same directory fails at once, naming the first one's PID.
    `resume` with a model section other than the run's config.yaml (dropout aside) is refused
    before anything is written.

    Keras' global dtype policy is `training.precision` while the run trains, and is what it was
    before when `train` returns.
    """
    # First of all: MultiWorkerMirroredStrategy sets up the runtime before anything runs.
    with native_stderr_filter():  # device start-up: the CUDA probe on CPU-only hosts
        strategy = make_strategy(config.training.strategy)
        tf.config.list_logical_devices()  # after the strategy: it may configure them first
    run_dir = Path(run_dir)
    if strategy.extended.should_checkpoint:
        with RunDirLock(run_dir) as lock:
            if run_dir.is_dir():
                lock.acquire()  # before reading what the run directory holds
            return _train(config, strategy, run_dir, run_dir, resume, lock)
    resolver = strategy.cluster_resolver
    scratch = Path(tempfile.mkdtemp(prefix=f"translator-{resolver.task_type}{resolver.task_id}-"))
    try:
        return _train(config, strategy, run_dir, scratch, resume, lock=None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _Run:
    """One process's part of a training run.

    It reads the run (tokenizers, checkpoints, backup) from `run_dir` and writes to `out_dir`:
    the run directory itself for the chief, a scratch directory for the other workers.
    """

    config: Config
    strategy: tf.distribute.Strategy
    topology: Topology
    run_dir: Path
    out_dir: Path
    resume: bool
    backup: WorkerBackup | None  # multi-worker runs only
    interrupted: bool  # a multi-worker run's backup is there to resume from
    lock: RunDirLock | None = None  # the run directory's, held by the process that writes it
    init: Translator | None = None  # the training.init_from model, dropped once copied

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def _train(config, strategy, run_dir: Path, out_dir: Path, resume: bool, lock) -> dict:
    """`train` with `strategy`: reads the run from `run_dir`, writes it to `out_dir`."""
    topology = Topology.of(strategy, chief=out_dir == run_dir)
    backup = WorkerBackup(run_dir / "backup", out_dir / "backup") if topology.multi_worker else None
    interrupted = backup is not None and backup.exists()
    run = _Run(config, strategy, topology, run_dir, out_dir, resume, backup, interrupted, lock)
    _start(run)
    keras.utils.set_random_seed(config.training.seed)
    precision = resolve_precision(config.training.precision)
    with dtype_policy(precision):
        return _train_in_precision(run, precision)


def _start(run: _Run) -> None:
    """Checks the run can start, loads its init_from model and writes its `config.yaml`.

    Every check (an existing run without --resume, a resumed run with another architecture, a
    bad `training.init_from`, an unwritable run directory, another training in it) fails
    before anything is written.
    """
    config, chief = run.config, run.topology.chief
    if ckpt.list_checkpoints(run.checkpoints) and not (run.resume or run.interrupted):
        raise FileExistsError(
            f"{run.run_dir} already holds checkpoints: pass --resume to continue that run, or "
            "choose a new --run-dir"
        )
    if run.resume or run.interrupted:
        _check_same_architecture(config, run.run_dir)
    fresh = not (run.interrupted or ckpt.list_checkpoints(run.checkpoints))
    if config.training.init_from and fresh:
        # Every worker checks (and so refuses with the same message) before anything is written.
        run.init, init_vocabulary = load_init_model(config, run.run_dir)
    elif config.training.init_from:
        log.info("training.init_from ignored: the run resumes from its own checkpoints")
    check_run_dir(run.out_dir)
    if run.lock is not None:
        run.lock.acquire()  # a new run directory: from its creation on (a no-op if held)
    if run.init is not None and chief:
        write_init_vocabulary(run.run_dir, init_vocabulary)
    if run.topology.distributed and config.training.jit_compile is True:
        log.info("XLA is off under a distribution strategy (training.jit_compile ignored)")
    atomic_write(run.out_dir / "config.yaml", config.to_yaml())


class ResumeError(ValueError):
    """A run that cannot be resumed with this config; the message lists what differs."""


def _check_same_architecture(config: Config, run_dir: Path) -> None:
    """Refuses a model section other than the one in the run's `config.yaml` (dropout aside:
    it changes no weight, as for `training.init_from`)."""
    import yaml

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        section = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model") or {}
        theirs = type(config.model).model_validate(section).model_dump(exclude={"dropout"})
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
        raise ResumeError(f"--resume: cannot read the model section of {saved}: {e}") from None
    ours = config.model.model_dump(exclude={"dropout"})
    different = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if different:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in different.items())
        raise ResumeError(
            f"--resume: {run_dir} was trained with another model section ({listed}), and a "
            f"run's architecture cannot change (only model.dropout may). Resume with the run's "
            f"own config (--config {saved}), or train this one in a new --run-dir"
        )


def _train_in_precision(run: _Run, precision: str) -> dict:
    """The run, from its data to `model.keras`, under the dtype policy `precision`."""
    topology = run.topology
    # The run trains with `auto` resolved (the written config.yaml keeps what was asked for,
    # so a resumed run resolves it again for the machine it runs on).
    config = run.config.model_copy(deep=True)
    config.training.jit_compile = resolve_jit_compile(
        config.training.jit_compile, precision, topology.distributed
    )
    log.info("precision %s, XLA %s", precision, "on" if config.training.jit_compile else "off")
    if topology.distributed:
        log.info(
            "%s; a step takes %d batches of %d tokens; peak learning rate %g",
            topology.describe(),
            topology.replicas,
            config.data.batch_tokens,
            peak_learning_rate(config, topology.replicas),
        )

    chief_decides = chief_decision(run.strategy) if topology.multi_worker else None
    # The validation sets first: a misnamed one fails before the corpora and tokenizers load.
    validation = load_validation(config) if topology.chief else None
    train_pairs = load_training_pairs(config)
    source_tok, target_tok = _tokenizers(run, config, train_pairs, chief_decides)
    training_batches = batch_maker(config, source_tok, target_tok)
    dataset = None if topology.distributed else training_batches(train_pairs)

    model = _build(run, config, source_tok.vocabulary_size(), target_tok.vocabulary_size())
    state = _restore_progress(run, model)
    step = int(model.optimizer.iterations.numpy())
    log.info("model: %s parameters", f"{model.count_params():,}")

    if topology.distributed:
        stream = distributed_batches(run.strategy, training_batches, train_pairs, step)
    else:
        # Skipping the batches consumed already continues a resumed run on the same batches.
        stream = dataset.skip(step).prefetch(tf.data.AUTOTUNE)
    translator = None
    if topology.chief:
        # Validation decodes the model being trained, in its own dtype: another compute_dtype
        # would decode a copy of it (`Seq2Seq.with_compute_dtype`), frozen at its first weights.
        options = {**decoding_options(config.decoding), "compute_dtype": None}
        translator = Translator(model, source_tok, target_tok, **options)
    writer = tf.summary.create_file_writer(str(run.out_dir / "logs"))
    monitor = TrainingMonitor(
        run.out_dir, config, translator, validation, state, writer, agree=chief_decides
    )
    start = time.time()
    _fit(run, config, model, stream, monitor, state, step)
    return _finish(run, model, state, precision, time.time() - start)


def _tokenizers(run: _Run, config: Config, train_pairs, chief_decides):
    """The run's SentencePiece models: the chief trains them, the other workers read them."""
    if run.topology.chief:
        tokenizers = prepare_tokenizers(config, train_pairs, run.run_dir)
    if chief_decides is not None:
        chief_decides(False)  # a barrier: the chief's tokenizer is written
    if not run.topology.chief:
        tokenizers = prepare_tokenizers(config, train_pairs, run.run_dir, train_missing=False)
    return tokenizers


def _build(run: _Run, config: Config, source_vocab_size: int, target_vocab_size: int):
    """The compiled model, its optimizer built; its variables are created distributed."""
    with run.strategy.scope():
        model = build_model(config, source_vocab_size, target_vocab_size)
        compile_model(model, config, run.topology.replicas)
        model.optimizer.build(model.trainable_variables)
        if run.topology.distributed:
            patch_distributed_fit(model, run.topology.multi_worker)
    return model


def _restore_progress(run: _Run, model) -> dict:
    """Restores the weights and optimizer a run goes on from; returns its training progress.

    An interrupted multi-worker run goes on from its backup, a resumed run from its newest good
    checkpoint; a new run starts from its init_from model if it has one (which is then
    dropped, to free its memory before training), else from scratch (an empty progress).
    """
    t = run.config.training
    resume = run.resume
    if run.interrupted:
        step = run.backup.restore(model)
        newest = ckpt.list_checkpoints(run.checkpoints)
        newest_step = int(newest[-1].name.split("-")[1]) if newest else -1
        if newest_step <= step:
            state = _progress_at(run.checkpoints, step, t.steps_per_checkpoint)
            log.info("resumed the interrupted run from its backup (step %d)", step)
            return state
        # The run went on after the backup was written (e.g. `--resume` with another
        # strategy): the newer checkpoint wins, and the stale backup is not used again.
        log.warning("ignoring the backup of step %d: checkpoint %s is newer", step, newest[-1].name)
        resume = True
    if run.init is not None:
        init_weights_from(model, run.init, t.init_from)
        run.init = None
        log.info("weights initialized from %s (the optimizer starts at step 0)", t.init_from)
    if resume:
        path, restored = ckpt.restore_latest(run.checkpoints, model, model.optimizer)
        if path is not None:
            log.info("resumed from %s (step %d)", path, restored["step"])
            return restored
    return {}


def _progress_at(checkpoints: Path, step: int, chunk: int) -> dict:
    """The training progress (history, best BLEU...) of the chief's checkpoint at `step`."""
    try:
        return ckpt.verify_checkpoint(checkpoints / f"ckpt-{step:08d}")
    except ckpt.CheckpointError as e:
        log.warning("%s; resuming at step %d without the earlier history", e, step)
        return {"step": step, "chunks": step // chunk}


def _fit(run: _Run, config: Config, model, stream, monitor, state: dict, step: int) -> None:
    """`model.fit` in chunks (Keras "epochs") of `training.steps_per_checkpoint` steps.

    Chunks run until max_steps, early stopping or the time limit stops the run
    (`TrainingMonitor.on_train_batch_end`): a chunk cut short by a time limit does not shift
    where a resumed run ends.
    """
    t = config.training
    chunk = t.steps_per_checkpoint
    done_chunks = state.get("chunks", 0)
    if t.max_steps:
        total_chunks = done_chunks + math.ceil(max(t.max_steps - step, 0) / chunk)
    else:
        total_chunks = 10**9
    if done_chunks >= total_chunks:
        return
    model.fit(
        stream,
        epochs=total_chunks,
        initial_epoch=done_chunks,
        steps_per_epoch=chunk,
        shuffle=False,  # the tf.data pipeline shuffles; Keras warns that it would ignore True
        callbacks=[monitor, run.backup] if run.backup else [monitor],
        verbose=1 if os.environ.get("TRANSLATOR_QUIET") != "1" else 0,
    )


def _finish(run: _Run, model, state: dict, precision: str, elapsed: float) -> dict:
    """The run's summary; the chief also writes `model.keras` (best checkpoint) and it."""
    steps = int(model.optimizer.iterations.numpy())
    if run.topology.multi_worker:
        log.info("trained to step %d; weights sha256 %s", steps, weights_digest(model))
    best_step = state.get("best_step")
    summary = {
        "steps": steps,
        "train_seconds": state.get("train_seconds", elapsed),
        "best_val_bleu": state.get("best_bleu"),
        "best_step": best_step,
        "parameters": int(model.count_params()),
        "precision": precision,
        "run_dir": str(run.run_dir),
        "chief": run.topology.chief,
    }
    best = [h for h in state.get("history", []) if h.get("step") == best_step and "val_bleu" in h]
    if best and "val_bleu_sets" in best[-1]:
        summary["best_val_bleu_sets"] = best[-1]["val_bleu_sets"]
    if not run.topology.chief:
        return summary
    if best_step is not None:
        ckpt.restore_checkpoint(run.checkpoints / f"ckpt-{best_step:08d}", model, None)
    save_model(model, run.run_dir / "model.keras")
    atomic_write(run.run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
