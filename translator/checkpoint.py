"""Atomic, verified training checkpoints: weights, optimizer state and training progress.

A checkpoint is a directory `ckpt-<step>/` holding `model.weights.h5`, `optimizer.npz`,
`state.json` and, written last, `manifest.json` with the SHA-256 of each file. It is written under
a temporary name and renamed into place (`translator.files.atomic_path`), so a process killed
mid-write leaves at most a `*.tmp` directory that is ignored (and cleaned up) later, never a
half-written checkpoint. Pruning renames a checkpoint away before deleting it, so a reader
(`translator average` on a running training) never finds a half-deleted one under its name. A
checkpoint whose manifest is missing or whose files do not match it is reported and skipped in
favour of the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import numpy as np

from translator.files import atomic_path

log = logging.getLogger("translator.checkpoint")

_NAME = re.compile(r"^ckpt-(\d{8})$")
FILES = ("model.weights.h5", "optimizer.npz", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the problem."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Completed checkpoint directories, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(directory, step, model, optimizer, state, keep=2, protect=()):
    """Writes `ckpt-<step>` atomically and prunes old ones.

    Args:
        directory: Where checkpoints live.
        step: The optimizer step the checkpoint holds.
        model: A built Keras model.
        optimizer: Its optimizer (all variables, including `iterations`, are saved).
        state: JSON-serialisable training progress (step, epoch, best score, history...).
        keep: Number of most recent checkpoints to keep.
        protect: Checkpoint names never pruned (e.g. the best one).

    Returns:
        The checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}"
    with atomic_path(final, directory=True) as tmp:  # fsyncs every file, renames, fsyncs
        model.save_weights(tmp / "model.weights.h5")
        values = {f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
        # Write through a file object: np.savez would append ".npz" to a name without it.
        with open(tmp / "optimizer.npz", "wb") as f:
            np.savez(f, **values)
        (tmp / "state.json").write_text(json.dumps({**state, "step": int(step)}, indent=1))
        manifest = {name: _sha256(tmp / name) for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        if final.exists():  # the rename replaces only an empty directory
            _retire(final)
    for old in list_checkpoints(directory)[:-keep]:
        if old.name not in protect and old != final:
            try:
                _retire(old)
            except OSError as e:  # a checkpoint left behind must not stop the training
                log.warning("could not prune %s: %s", old, e)
    # Left by writers killed mid-write: `.ckpt-<step>.<random>.tmp` (and `ckpt-<step>.tmp`,
    # the name of earlier versions).
    for stale in [*directory.glob(".ckpt-*.tmp"), *directory.glob("ckpt-*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _retire(path: Path) -> None:
    """Deletes the checkpoint `path`: first renamed out of the `ckpt-<step>` names (one atomic
    step), then removed, so a reader never finds a half-deleted checkpoint under its name."""
    trash = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # swept like a stale write
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> dict:
    """Checks a checkpoint against its manifest; returns its state or raises CheckpointError."""
    path = Path(path)
    existed = path.is_dir()
    try:
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: manifest.json is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({e})") from None
        for name in FILES:
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
            if _sha256(file) != manifest.get(name):
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: {name} does not match its SHA-256 in "
                    "manifest.json"
                )
        return json.loads((path / "state.json").read_text())
    except (CheckpointError, OSError) as e:
        # Pruned by the run writing it (see `_retire`) while we read it.
        if existed and not path.exists():
            raise CheckpointError(
                f"checkpoint {path} was removed while it was being read (a running training "
                "prunes its older checkpoints: keep more with training.keep_checkpoints)"
            ) from None
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e


def restore_checkpoint(path, model, optimizer) -> dict:
    """Loads weights and optimizer state from a verified checkpoint; returns its state."""
    path = Path(path)
    state = verify_checkpoint(path)
    model.load_weights(path / "model.weights.h5")
    if optimizer is not None:
        with np.load(path / "optimizer.npz") as data:
            values = [data[k] for k in sorted(data.files)]
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables = optimizer.variables
        if len(values) != len(variables):
            raise CheckpointError(
                f"checkpoint {path}: optimizer has {len(variables)} variables but the checkpoint "
                f"holds {len(values)}; was it written by a different model or optimizer config?"
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
    return state


def restore_latest(directory, model, optimizer):
    """Restores the newest good checkpoint in `directory`, skipping broken ones with a warning.

    Returns:
        `(path, state)`, or `(None, None)` when there is no checkpoint at all.

    Raises:
        CheckpointError: when checkpoints exist but none of them is usable.
    """
    candidates = list_checkpoints(directory)
    errors = []
    for path in reversed(candidates):
        try:
            return path, restore_checkpoint(path, model, optimizer)
        except (CheckpointError, OSError, ValueError) as e:
            log.warning("skipping unusable checkpoint: %s; trying the previous one", e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(
            f"no usable checkpoint in {directory}:\n  "
            + "\n  ".join(errors)
            + "\nDelete the run directory (or use a new --run-dir) to start over."
        )
    return None, None
