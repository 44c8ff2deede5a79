"""A tiny generated parallel corpus and tiny-model settings shared by the tests."""

import math
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


# A run with one vocabulary per language: the English and French pieces differ, and so do the
# two vocabulary sizes (SentencePiece's limit is soft, and the two sides have different
# characters), so a source/target tokenizer swap shows in the tokens and ids.
SEPARATE_VOCABULARIES = {"tokenizer.joint": "false", "model.share_embeddings": "false"}


def randomize_weights(model, seed=0, scale=0.5):
    """Gives every float weight of `model` random normal values (mean 0, std `scale`).

    An untrained model has zero biases (cells, output projection, tied output bias, Bahdanau
    attention) and unit gains: a step that forgets a `+ bias` gives the same numbers as one
    that adds it. Random weights make every term count.
    """
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if np.issubdtype(np.dtype(v.dtype), np.floating):
            v.assign(rng.normal(0.0, scale, v.shape).astype(v.dtype))
    return model


def sentencepiece(path):
    """The `sentencepiece` package's processor for a model file: an independent tokenizer."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def reference_greedy(translator, source_sp, target_sp, text, length_penalty):
    """Greedy decoding of one sentence written out by hand, as `(text, score, target pieces)`.

    Tokenizes with the `sentencepiece` package (not the in-graph tokenizers), runs the model's
    `decode_step` one token at a time in Python, takes the argmax, and scores as the search
    does: the sum of the tokens' log-probabilities over the GNMT length penalty.
    """
    from translator.tokenizer import BOS_ID, EOS_ID

    model = translator.model
    source = [*source_sp.encode(text), EOS_ID]
    max_length = math.ceil(translator.max_length_ratio * len(source)) + translator.max_length_offset
    constants, state = model.encode(np.array([source], "int32"))
    ids, log_prob, token = [], 0.0, BOS_ID
    while len(ids) < max_length:
        logits, state, _ = model.decode_step(np.array([token], "int32"), state, constants)
        logits = np.asarray(logits, np.float64)[0]
        token = int(np.argmax(logits))
        log_prob += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        ids.append(token)
        if token == EOS_ID:
            break
    score = log_prob / ((5.0 + len(ids)) / 6.0) ** length_penalty
    words = [i for i in ids if i != EOS_ID]
    return target_sp.decode(words), score, [target_sp.id_to_piece(i) for i in ids]


def sentencepieces(directory):
    """`(source, target)` `sentencepiece` processors of a run or export directory."""
    directory = Path(directory)
    if (directory / "spm.model").is_file():
        joint = sentencepiece(directory / "spm.model")
        return joint, joint
    return sentencepiece(directory / "spm.source.model"), sentencepiece(
        directory / "spm.target.model"
    )
