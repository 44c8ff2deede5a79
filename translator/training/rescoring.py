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

    Args:
        run_dir: A training run directory (`config.yaml`, `model.keras`, `checkpoints/`).
        overrides: `section.key=value` strings applied over the run's config.yaml, e.g.
            `data.extra_validation=[{corpus: tatoeba, split: validation}]` to add a set, or
            `decoding.length_penalty=1.0`.
        last: Score only the `last` newest checkpoints (default: every kept one).
        keep_best: Write the best checkpoint by the mean BLEU of the sets as the run's
            `model.keras` (atomically, under the run directory's lock, so never while a
            training writes there) and the table as `rescore.json`.
        out: Where a line per checkpoint is printed as it is scored (None: nowhere).

    Returns:
        `{"sets": [names], "rows": [{"checkpoint", "step", "bleu": {set: BLEU}, "mean",
        "recorded"}], "best": row, "kept": bool}`; `recorded` is the validation BLEU the
        training logged for that step (None when it did not validate there).

    Raises:
        FileNotFoundError: `run_dir` is not a training run.
        ValueError: `last` < 1, or no checkpoint could be read.
        OSError: `keep_best` while a training holds the run directory.
        translator.config.ConfigError: an override does not validate.
    """
    from translator.inference import Translator, load

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.keras", "checkpoints"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(
                f"{run_dir} is not a training run: it has no {name} (see `translator train`)"
            )
    if last is not None and last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    lock = RunDirLock(run_dir)
    if keep_best:
        lock.acquire()  # before any work: fails at once while a training runs there
    try:
        config = load_config(run_dir / "config.yaml", list(overrides))
        sets = load_validation(config)  # the sets first: a missing corpus fails before the model
        # float32 here: the Translator below decodes as the (overridden) config says.
        base = load(run_dir, shortlist=None, compute_dtype="float32")
        translator = Translator(
            base.model,
            base.source_tokenizer,
            base.target_tokenizer,
            **decoding_options(config.decoding),
        )
        paths = ckpt.list_checkpoints(run_dir / "checkpoints")
        if last is not None:
            paths = paths[-last:]
        rows, best_weights = [], None
        for path in paths:
            row = _score(translator, path, sets, out)
            if row is None:
                continue
            rows.append(row)
            if row["mean"] >= max(r["mean"] for r in rows):  # ties: the newer checkpoint
                best_weights = translator.model.get_weights()
        if not rows:
            raise ValueError(f"{run_dir}: none of its checkpoints could be read (see the log)")
        best = max(reversed(rows), key=lambda r: r["mean"])
        result = {"sets": [name for name, _, _ in sets], "rows": rows, "best": best}
        result["kept"] = bool(keep_best)
        if keep_best:
            translator.model.set_weights(best_weights)
            save_model(translator.model, run_dir / "model.keras")
            record = {**result, "config_overrides": list(overrides), "date": time.strftime("%F")}
            atomic_write(run_dir / RECORD_FILE, json.dumps(record, indent=1))
            log.info("%s: model.keras is now %s", run_dir, best["checkpoint"])
        return result
    finally:
        lock.release()


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
        scores[name] = round(float(bleu.score), 2)
    recorded = recorded_val_bleu(state)
    row = {
        "checkpoint": path.name,
        "step": state.get("step"),
        "bleu": scores,
        "mean": round(sum(scores.values()) / len(scores), 2),
        "recorded": None if recorded is None else round(float(recorded), 2),
    }
    if out is not None:
        detail = ", ".join(f"{name} {bleu:.2f}" for name, bleu in scores.items())
        print(f"{path.name}: mean {row['mean']:.2f} ({detail})", file=out, flush=True)
    return row
