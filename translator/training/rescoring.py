"""Rescoring a run's checkpoints on its validation sets, after training, and keeping the best.

A run validates while it trains, on the sets its config names then. Rescoring scores its kept
checkpoints again, on those sets or on others (`--set data.extra_validation=...`), with the
config's decoding or another, and can make the best of them by the mean BLEU the run's
`model.keras`: how a run trained with one validation set is chosen on several domains.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from translator import checkpoint as ckpt
from translator.config import decoding_options, load_config
from translator.files import atomic_write
from translator.training.averaging import recorded_val_bleu
from translator.training.building import save_model
from translator.training.inputs import RunDirLock, load_validation

log = logging.getLogger(__name__)

# Written into the run directory by `rescore_checkpoints(..., keep_best=True)`.
RECORD_FILE = "rescore.json"


def rescore_checkpoints(run_dir, overrides=(), last=None, keep_best=False, out=sys.stderr) -> dict:
    """Scores a run's kept checkpoints on its validation sets; optionally keeps the best.

    The run may still be training, or have stopped before writing its model.keras: the model
    is then built from its config.yaml (read-only; `keep_best` waits for the training to end).

    Args:
        run_dir: A training run directory (`config.yaml`, `model.keras`, `checkpoints/`).
        overrides: `section.key=value` strings applied over the run's config.yaml, e.g.
            `data.extra_validation=[{corpus: tatoeba, split: validation}]` (which replaces the
            config's list of extra sets) or `decoding.length_penalty=1.0`.
        last: Score only the `last` newest checkpoints (default: every kept one).
        keep_best: Write the best checkpoint by the mean BLEU of the sets as the run's
            `model.keras` (atomically, under the run directory's lock, so never while a
            training writes there), the table as `rescore.json`, and the choice into
            `summary.json`. A later `train --resume` of the run picks its best again by its
            own validation.
        out: Where a line per checkpoint is printed as it is scored (None: nowhere).

    Returns:
        `{"sets": [names], "rows": [{"checkpoint", "step", "bleu": {set: BLEU}, "mean",
        "recorded"}], "best": row, "kept": bool}`; `recorded` is the validation BLEU the
        training logged for that step (None when it did not validate there).

    Raises:
        FileNotFoundError: `run_dir` is not a training run.
        ValueError: `last` < 1, the run has no checkpoint, or none could be read.
        OSError: `keep_best` while a training holds the run directory.
        translator.config.ConfigError: an override does not validate.
    """
    from translator.inference import Translator

    run_dir = Path(run_dir)
    for name in ("config.yaml", "checkpoints"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(
                f"{run_dir} is not a training run: it has no {name} (see `translator train`)"
            )
    if last is not None and last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    paths = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not paths:
        raise ValueError(f"{run_dir} has no checkpoint yet (see training.steps_per_checkpoint)")
    if last is not None:
        paths = paths[-last:]
    lock = RunDirLock(run_dir)
    if keep_best:
        lock.acquire()  # before any work: fails at once while a training runs there
    try:
        config = load_config(run_dir / "config.yaml", list(overrides))
        sets = load_validation(config)  # the sets first: a missing corpus fails before the model
        model, source_tokenizer, target_tokenizer = _run_model(run_dir, config)
        translator = Translator(
            model, source_tokenizer, target_tokenizer, **decoding_options(config.decoding)
        )
        rows, best, best_weights = [], None, None
        for path in paths:
            row = _score(translator, path, sets, out)
            if row is None:
                continue
            rows.append(row)
            # As training picks its best: a strictly higher mean, so a tie keeps the older one.
            if best is None or row["exact_mean"] > best["exact_mean"]:
                best, best_weights = row, translator.model.get_weights()
        if not rows:
            raise ValueError(f"{run_dir}: none of its checkpoints could be read (see the log)")
        for row in rows:
            del row["exact_mean"]
        result = {"sets": [name for name, _, _ in sets], "rows": rows, "best": best}
        result["kept"] = bool(keep_best)
        if keep_best:
            _keep(run_dir, translator.model, best_weights, result, list(overrides))
        return result
    finally:
        lock.release()


def _run_model(run_dir: Path, config):
    """`(model, source tokenizer, target tokenizer)` of a run: its model.keras, or a model
    built from its config.yaml (a run still training, or stopped before its end, has none)."""
    from translator.inference import load
    from translator.tokenizer import load_tokenizers
    from translator.training.building import build_model

    if (run_dir / "model.keras").is_file():
        base = load(run_dir, shortlist=None, compute_dtype="float32")
        return base.model, base.source_tokenizer, base.target_tokenizer
    tokenizers = load_tokenizers(run_dir)
    if tokenizers is None:
        raise FileNotFoundError(
            f"{run_dir} has neither model.keras nor its SentencePiece model (spm.model, or "
            "spm.source.model and spm.target.model): is it a training run?"
        )
    source, target = tokenizers
    model = build_model(config, source.vocabulary_size(), target.vocabulary_size())
    return model, source, target


def _keep(run_dir: Path, model, weights, result: dict, overrides: list[str]) -> None:
    """Writes the best weights as the run's model.keras, the table as rescore.json, and the
    choice into summary.json (so the three agree)."""
    model.set_weights(weights)
    save_model(model, run_dir / "model.keras")
    best = result["best"]
    record = {**result, "config_overrides": overrides, "date": time.strftime("%F")}
    atomic_write(run_dir / RECORD_FILE, json.dumps(record, indent=1))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(
        best_step=best["step"],
        best_val_bleu=best["mean"],
        best_val_bleu_sets=best["bleu"],
        selected_by=f"translator rescore ({RECORD_FILE})",
    )
    atomic_write(summary_path, json.dumps(summary, indent=1))
    log.info("%s: model.keras is now %s", run_dir, best["checkpoint"])


def _score(translator, path: Path, sets, out) -> dict | None:
    """One checkpoint's row (None, with a warning, when its weights cannot be read)."""
    from translator.scoring import bleu_chrf

    try:
        state = ckpt.verify_checkpoint(path)
        translator.model.load_weights(path / "model.weights.h5")
    except (ckpt.CheckpointError, OSError, ValueError, KeyError) as e:
        log.warning("skipping %s: %s", path.name, e)
        return None
    scores = {}
    for name, sources, references in sets:
        hypotheses = [r.text for r in translator.translate(sources)]
        bleu, _, _, _ = bleu_chrf(hypotheses, references)
        scores[name] = float(bleu.score)
    recorded = recorded_val_bleu(state)
    mean = sum(scores.values()) / len(scores)
    row = {
        "checkpoint": path.name,
        "step": state.get("step"),
        "bleu": {name: round(bleu, 2) for name, bleu in scores.items()},
        "mean": round(mean, 2),
        "exact_mean": mean,  # what the best is chosen by (removed from the result)
        "recorded": None if recorded is None else round(float(recorded), 2),
    }
    if out is not None:
        detail = ", ".join(f"{name} {bleu:.2f}" for name, bleu in scores.items())
        print(f"{path.name}: mean {row['mean']:.2f} ({detail})", file=out, flush=True)
    return row
