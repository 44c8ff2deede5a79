"""Checkpoint averaging: the mean of a run's last checkpoints, as a model directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import keras
import numpy as np

from translator import checkpoint as ckpt
from translator.files import atomic_path, atomic_write, keras_load_error
from translator.training.building import save_model

log = logging.getLogger(__name__)

# The files of a run directory that `translator evaluate`, `translate` and `export` read besides
# model.keras: an averaged model directory gets a copy of each the run has.
RUN_FILES = ("config.yaml", "spm.model", "spm.source.model", "spm.target.model")


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
        ValueError: `last` < 1, the run has fewer good checkpoints than `last`, or its
            model.keras cannot be loaded.
        FileNotFoundError: `run_dir` is not a finished training run.
        FileExistsError: `out_dir` is the run directory or holds a model.keras already.
        translator.checkpoint.CheckpointError: a chosen checkpoint vanished (pruned by a training
            still running there) or its weights cannot be read; nothing is written then.
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
    is_run_dir = out_dir.resolve() == run_dir.resolve()
    if is_run_dir or (out_dir / "model.keras").exists():
        raise FileExistsError(
            f"--out {out_dir} already holds a model.keras"
            + (" (it is the run directory itself)" if is_run_dir else "")
            + ": averaging never replaces a model; choose a new directory, or remove it first"
        )
    good = _newest_good_checkpoints(run_dir, last)
    try:
        model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"cannot load {run_dir / 'model.keras'} ({keras_load_error(run_dir / 'model.keras', e)}"
            "): averaging needs it for the model's architecture"
        ) from e
    model.set_weights(_mean_weights(model, [path for path, _ in good]))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir / "model.keras")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(run_dir / name, tmp)
    record = {
        "run_dir": str(run_dir),
        "checkpoints": [
            {"name": p.name, "step": s.get("step"), "val_bleu": recorded_val_bleu(s)}
            for p, s in good
        ],
    }
    atomic_write(out_dir / "average.json", json.dumps(record, indent=1))
    log.info("averaged %s into %s", ", ".join(p.name for p, _ in good), out_dir / "model.keras")
    return out_dir


def _newest_good_checkpoints(run_dir: Path, last: int) -> list[tuple[Path, dict]]:
    """The `last` newest checkpoints that pass verification, oldest first, with their states."""
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
    return good


def _mean_weights(model, paths: list[Path]) -> list[np.ndarray]:
    """The mean (in float64, cast back) of the weights of `model` loaded from each of `paths`.

    `model` is left holding the weights of the last path; non-float variables (none today) keep
    that value. Averaging takes no lock on the run directory, so a training still running there
    may prune a checkpoint between its verification and this read: that is a `CheckpointError`
    naming it, not a raw Keras error.
    """
    sums = None
    for path in paths:
        try:
            model.load_weights(path / "model.weights.h5")
        except (OSError, ValueError, KeyError) as e:
            if not path.is_dir():
                raise ckpt.CheckpointError(
                    f"{path} was removed while it was being averaged: a training still running "
                    "in this run directory prunes its old checkpoints (average when it has "
                    "ended, or keep more with training.keep_checkpoints)"
                ) from e
            raise ckpt.CheckpointError(f"{path}: its weights cannot be loaded ({e})") from e
        weights = [np.asarray(w, np.float64) for w in model.get_weights()]
        sums = weights if sums is None else [s + w for s, w in zip(sums, weights, strict=True)]
    last_weights = model.get_weights()
    return [
        (s / len(paths)).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
        for s, w in zip(sums, last_weights, strict=True)
    ]


def recorded_val_bleu(state: dict) -> float | None:
    """The validation BLEU a checkpoint's state recorded at its own step, if any."""
    history = state.get("history") or [{}]
    return history[-1].get("val_bleu") if history[-1].get("step") == state.get("step") else None
