"""Pictures: the attention heatmap of a translation (source subwords x target subwords)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
