"""A tiny generated parallel corpus and tiny-model settings shared by the tests."""

from pathlib import Path

import numpy as np

WORDS = {
    "one": "un", "two": "deux", "three": "trois", "four": "quatre", "five": "cinq",
    "red": "rouge", "green": "vert", "blue": "bleu", "cat": "chat", "dog": "chien",
    "big": "grand", "small": "petit", "house": "maison", "car": "voiture", "tree": "arbre",
}  # fmt: skip


def write_corpus(folder: Path, seed=0):
    """A word-for-word 'translation' task, split into train/val files as `files:` corpora."""
    rng = np.random.default_rng(seed)
    english = list(WORDS)
    for split, n in (("train", 400), ("val", 24)):
        src, tgt = [], []
        for _ in range(n):
            words = [english[i] for i in rng.integers(0, len(english), rng.integers(2, 6))]
            src.append(" ".join(words))
            tgt.append(" ".join(WORDS[w] for w in words))
        (folder / f"{split}.en").write_text("\n".join(src) + "\n")
        (folder / f"{split}.fr").write_text("\n".join(tgt) + "\n")
    return f"files:{folder}/{{split}}.en,{folder}/{{split}}.fr"


def tiny_overrides(corpus, **extra):
    settings = {
        "data.corpora": f"[{{name: '{corpus}'}}]",
        "data.validation_corpus": f"'{corpus}'",
        "data.validation_split": "val",
        "data.batch_tokens": "256",
        "data.max_length": "16",
        "tokenizer.vocab_size": "60",
        "model.embedding_dim": "16",
        "model.encoder_units": "16",
        "model.decoder_units": "32",
        "model.dropout": "0.0",
        "training.max_steps": "40",
        "training.steps_per_checkpoint": "10",
        "training.warmup_steps": "5",
        "training.learning_rate": "0.01",
        "training.decay": "constant",
        "training.jit_compile": "false",
        "decoding.beam_size": "2",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]
