"""Pictures: the attention heatmap of a translation (source subwords x target subwords) and the
training curves of a run (loss and validation BLEU by step)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from translator.files import atomic_path


def _label(piece: str) -> str:
    # SentencePiece marks a word start with U+2581; show it as a thin space-like bar so word
    # boundaries stay visible without looking like an underscore in the text.
    return piece.replace("\u2581", "\u2002") if piece != "\u2581" else "\u2423"


def plot_attention(translation, path, title=None, dpi=150):
    """Draws `translation.alignment` as a heatmap and writes it to `path` (PNG, SVG or PDF).

    Args:
        translation: A `translator.inference.Translation` with `source_tokens`,
            `target_tokens` and `alignment` (from `translate(..., return_alignment=True)`).
        path: Output file; the format follows the extension.
        title: Optional title (default: the translation's text).
        dpi: Resolution of raster formats.

    Returns:
        The `Path` written.

    Example:

    >>> result = translator.translate("A dog runs.", return_alignment=True)  # doctest: +SKIP
    >>> plot_attention(result, "attention.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if translation.alignment is None:
        raise ValueError("this translation has no alignment: translate with return_alignment=True")
    weights = np.asarray(translation.alignment, dtype=np.float32)  # (target_len, source_len)
    sources = [_label(t) for t in translation.source_tokens]
    targets = [_label(t) for t in translation.target_tokens]
    if weights.shape != (len(targets), len(sources)):
        raise ValueError(
            f"alignment shape {weights.shape} does not match {len(targets)} target and "
            f"{len(sources)} source tokens"
        )
    cell = 0.42  # inches per token: 20 tokens stay readable at 9 pt
    width = max(4.0, 1.6 + cell * len(sources))
    height = max(3.0, 1.4 + cell * len(targets))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
    ax.set_xticks(range(len(sources)), sources, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(targets)), targets)
    ax.tick_params(labelsize=9)
    ax.set_xlabel("English (source subwords)")
    ax.set_ylabel("French (target subwords)")
    ax.set_title(title if title is not None else translation.text, fontsize=10, wrap=True)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="attention weight")
    _save_figure(fig, path, dpi)
    return Path(path)


def training_history(run_dir) -> list[dict]:
    """The per-checkpoint history of a training run (from its newest checkpoint's state).

    Raises:
        FileNotFoundError: the directory has no checkpoint (naming it).
    """
    from translator import checkpoint as ckpt

    paths = ckpt.list_checkpoints(Path(run_dir) / "checkpoints")
    if not paths:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoints/ckpt-*: is it a training run directory?"
        )
    state = paths[-1] / "state.json"
    try:
        history = json.loads(state.read_text())["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{state} holds no training history ({type(e).__name__}: {e}): is the checkpoint "
            "complete, and written by translator?"
        ) from None
    if not isinstance(history, list):
        raise ValueError(f"{state}: its history is not a list of records")
    return history


def plot_training(history, path, title=None, step_offset=0, baseline=None, dpi=120):
    """Draws the training loss and the validation BLEU of a run by optimizer step.

    Args:
        history: A run directory, or its list of per-checkpoint records (`step`, `loss`, and
            `val_bleu` when validation ran, and `val_bleu_sets` with several validation sets:
            each is drawn too, the mean in bold).
        path: Output file; the format follows the extension.
        title: Figure title (default: the run directory's name, or none).
        step_offset: Added to every step: a run started with `--init-from` from a model trained
            for N steps is drawn as steps N+1, N+2, ...
        baseline: Optional `(label, bleu)` drawn as a horizontal line on the BLEU panel, e.g.
            the validation BLEU of the model a fine-tuning started from.
        dpi: Resolution of raster formats.

    Returns:
        The `Path` written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(history, str | os.PathLike):
        if title is None:
            title = Path(history).name
        history = training_history(history)
    if not history:
        raise ValueError("the history is empty: nothing to plot")
    steps = [h["step"] + step_offset for h in history]
    validated = [(h["step"] + step_offset, h["val_bleu"]) for h in history if "val_bleu" in h]
    fig, (loss_ax, bleu_ax) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    loss_ax.plot(steps, [h["loss"] for h in history], "o-", color="tab:blue")
    loss_ax.set(title="loss", xlabel="optimizer step", ylabel="training loss (label-smoothed CE)")
    bleu_ax.set(title="validation BLEU", xlabel="optimizer step", ylabel="BLEU")
    if validated:
        x, y = zip(*validated, strict=True)
        several = any("val_bleu_sets" in h for h in history)
        bleu_ax.plot(
            x, y, "o-", color="tab:green", label="mean of the sets" if several else "this run"
        )
        names = dict.fromkeys(n for h in history for n in h.get("val_bleu_sets", {}))
        for name in names:  # each set of data.extra_validation's runs, thin and dashed
            points = [
                (h["step"] + step_offset, h["val_bleu_sets"][name])
                for h in history
                if name in h.get("val_bleu_sets", {})
            ]
            bleu_ax.plot(*zip(*points, strict=True), ".--", linewidth=1, alpha=0.8, label=name)
        best = max(range(len(y)), key=y.__getitem__)
        bleu_ax.annotate(
            f"best {y[best]:.2f} (step {x[best]})",
            (x[best], y[best]),
            xytext=(-40, -45),
            textcoords="offset points",
            ha="right",
            arrowprops={"arrowstyle": "->"},
        )
    if baseline is not None:
        label, value = baseline
        bleu_ax.axhline(value, color="tab:gray", linestyle="--", label=f"{label}: {value:.2f}")
    if validated or baseline is not None:
        bleu_ax.legend(loc="lower right")
    for ax in (loss_ax, bleu_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save_figure(fig, path, dpi)
    return Path(path)


def _save_figure(fig, path, dpi) -> None:
    """Saves and closes `fig`; the file appears whole or not at all."""
    import matplotlib.pyplot as plt

    formats = fig.canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        plt.close(fig)
        raise ValueError(
            f"cannot tell the image format of {path}: end the file name with one of "
            + ", ".join(f".{f}" for f in ("png", "svg", "pdf") if f in formats)
            + " (or another matplotlib format)"
        )
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
