"""Vocabulary shortlists: decode over the target pieces a batch's source makes likely.

The output projection, `(rows, units) x (units, vocab)`, is the largest matmul of a decoding
step: 54% of a beam-5 step of the shipped model at 320 rows (README, Benchmarks). A lexical
shortlist (as in Marian, Junczys-Dowmunt et al., 2018) keeps, for each call, only the target
pieces that can plausibly appear: for every source piece of the batch its `top_k` most likely
translations under an IBM Model 1 lexical table, plus the `frequent` most frequent target
pieces and the special ids. The projection is gathered to those columns once per call, the
search runs over them, and the chosen ids are mapped back to the full vocabulary.

The table is learned from the parallel corpus (`build`, `translator shortlist`), a few seconds
of numpy EM, and saved beside the model as `shortlist.npz`; `translator.load` uses it when it is
there, and `translator export` bakes it into the SavedModel.

References:
    - Brown et al., 1993, "The Mathematics of Statistical Machine Translation" (IBM Model 1).
    - Junczys-Dowmunt et al., 2018, "Marian: Cost-effective High-Quality Neural Machine
      Translation in C++" (lexical shortlists).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

log = logging.getLogger("translator.shortlist")

FILENAME = "shortlist.npz"
SPECIALS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


class ShortlistError(ValueError):
    """A shortlist file that cannot be used: the message names the file and what to do."""


def proto_digest(proto: bytes) -> str:
    """The SentencePiece model's fingerprint a shortlist records (it is valid for that model only)."""
    return hashlib.sha256(proto).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class Shortlist:
    """A lexical shortlist: `table[s]` holds the `top_k` target ids most likely for source id `s`
    (padded with `EOS_ID`), `frequent` the target ids always kept.

    Args:
        table: int32 `(source_vocab, top_k)`.
        frequent: int32 `(n,)`.
        target_vocab: size of the target vocabulary.
        digests: `(source, target)` fingerprints of the SentencePiece models it was built for.
    """

    table: np.ndarray
    frequent: np.ndarray
    target_vocab: int
    digests: tuple[str, str] = ("", "")

    @property
    def top_k(self) -> int:
        return int(self.table.shape[1])

    def __repr__(self) -> str:
        return f"Shortlist(top_k={self.top_k}, frequent={len(self.frequent)})"

    def save(self, path) -> None:
        """Writes the `.npz` atomically (a crash leaves the previous file or none)."""
        from translator.files import atomic_path

        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            table=self.table.astype(np.int32),
            frequent=self.frequent.astype(np.int32),
            target_vocab=np.int32(self.target_vocab),
            digests=np.array(self.digests),
        )
        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path) -> Shortlist:
        path = Path(path)
        try:
            with np.load(path) as f:
                shortlist = cls(
                    table=f["table"].astype(np.int32),
                    frequent=f["frequent"].astype(np.int32),
                    target_vocab=int(f["target_vocab"]),
                    digests=tuple(str(d) for d in f["digests"]),
                )
        except (OSError, KeyError, ValueError) as e:
            raise ShortlistError(
                f"cannot read the shortlist {path}: {type(e).__name__}: {e}. Rebuild it with "
                f"`translator shortlist --model {path.parent}`, or delete it to decode over the "
                "whole vocabulary."
            ) from e
        if shortlist.table.ndim != 2 or shortlist.frequent.ndim != 1:
            raise ShortlistError(f"{path} is not a shortlist (table must be 2-D, frequent 1-D)")
        return shortlist

    def check(self, source_proto: bytes, target_proto: bytes, source_vocab: int, where="") -> None:
        """Raises `ShortlistError` unless this shortlist was built for these tokenizers."""
        expected = (proto_digest(source_proto), proto_digest(target_proto))
        if self.digests != expected or self.table.shape[0] != source_vocab:
            raise ShortlistError(
                f"the shortlist {where or ''} was built for other SentencePiece models "
                f"(fingerprints {self.digests}, this model's {expected}): rebuild it with "
                "`translator shortlist --model <model directory>`, or delete it"
            )

    def select(self, source_ids):
        """The call's vocabulary, in the graph: sorted int32 target ids `(K,)` holding the
        specials (so they keep their ids: `SPECIALS` are the lowest), `frequent`, and the table
        rows of every id in `source_ids` (any shape; `PAD_ID` rows add nothing)."""
        import tensorflow as tf

        table = tf.constant(self.table, tf.int32)
        candidates = tf.concat(
            [
                tf.reshape(tf.gather(table, tf.reshape(source_ids, [-1])), [-1]),
                tf.constant(self.frequent, tf.int32),
                tf.constant(SPECIALS, tf.int32),
            ],
            0,
        )
        hits = tf.math.unsorted_segment_max(
            tf.ones_like(candidates), candidates, num_segments=self.target_vocab
        )
        return tf.cast(tf.where(hits > 0)[:, 0], tf.int32)

    def coverage(self, source_ids, target_ids) -> tuple[float, float]:
        """For numpy id lists (one per sentence): the fraction of target ids inside their own
        sentence's shortlist, and the mean shortlist size per sentence."""
        base = set(self.frequent.tolist()) | set(SPECIALS)
        covered = total = size = 0
        for src, tgt in zip(source_ids, target_ids, strict=True):
            allowed = base | set(self.table[np.asarray(src, np.int64)].ravel().tolist())
            covered += sum(t in allowed for t in tgt)
            total += len(tgt)
            size += len(allowed)
        return covered / max(total, 1), size / max(len(source_ids), 1)


def ibm1(source_ids, target_ids, source_vocab, target_vocab, iterations=5, progress=None):
    """IBM Model 1 lexical probabilities `t(target | source)`, `(source_vocab + 1, target_vocab)`
    float32, the last row the NULL word, by EM over id lists (one per sentence)."""
    null = source_vocab
    keys, rows = [], []
    row = 0
    for src, tgt in zip(source_ids, target_ids, strict=True):
        if not len(tgt):
            continue
        src = np.append(np.asarray(src, np.int64), null)
        tgt = np.asarray(tgt, np.int64)
        keys.append((src[None, :] * target_vocab + tgt[:, None]).ravel())
        rows.append(np.repeat(np.arange(row, row + len(tgt)), len(src)))
        row += len(tgt)
    if not keys:
        raise ValueError("no sentence pair with a target side: nothing to learn a shortlist from")
    keys = np.concatenate(keys)
    rows = np.concatenate(rows)
    size = (source_vocab + 1) * target_vocab
    # Start from co-occurrence counts (the first E-step of a uniform table), normalized per source.
    probs = np.bincount(keys, minlength=size).astype(np.float32).reshape(source_vocab + 1, -1)
    probs /= np.maximum(probs.sum(1, keepdims=True), 1e-9)
    for it in range(iterations):
        p = probs.ravel()[keys]
        denominator = np.bincount(rows, weights=p, minlength=row)
        counts = np.bincount(keys, weights=p / denominator[rows], minlength=size)
        counts = counts.reshape(source_vocab + 1, target_vocab)
        probs = (counts / np.maximum(counts.sum(1, keepdims=True), 1e-12)).astype(np.float32)
        if progress:
            progress(it + 1, iterations)
    return probs


def build(
    pairs,
    source_tokenizer,
    target_tokenizer,
    top_k=20,
    frequent=300,
    iterations=5,
    max_pairs=200_000,
    seed=0,
    progress=None,
) -> Shortlist:
    """Learns a `Shortlist` from `(english, french)` pairs for two `SentencePieceTokenizer`s.

    Args:
        pairs: the training pairs (a seeded sample of `max_pairs` is used when there are more).
        top_k: target ids kept per source id (by IBM Model 1 probability).
        frequent: most frequent target ids always kept.
        iterations: EM iterations of IBM Model 1.
        progress: optional `callable(done, total)` per EM iteration.
    """
    import sentencepiece as spm

    if top_k < 1 or frequent < 0:
        raise ValueError(f"top_k must be >= 1 and frequent >= 0, got {top_k} and {frequent}")
    pairs = list(pairs)
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    source = spm.SentencePieceProcessor(model_proto=source_tokenizer.proto)
    target = spm.SentencePieceProcessor(model_proto=target_tokenizer.proto)
    source_vocab, target_vocab = source.get_piece_size(), target.get_piece_size()
    src_ids = source.encode([english for english, _ in pairs])
    tgt_ids = target.encode([french for _, french in pairs])
    probs = ibm1(src_ids, tgt_ids, source_vocab, target_vocab, iterations, progress)[:source_vocab]
    probs[:, list(SPECIALS)] = 0  # always kept anyway
    k = min(top_k, target_vocab)
    table = np.argpartition(-probs, k - 1, axis=1)[:, :k].astype(np.int32)
    # Entries of probability 0 (pieces never seen in training) point to EOS: they add nothing.
    table = np.where(np.take_along_axis(probs, table, 1) > 0, table, EOS_ID).astype(np.int32)
    table[list(SPECIALS)] = EOS_ID
    counts = np.bincount(
        np.concatenate([np.asarray(t, np.int64) for t in tgt_ids]), minlength=target_vocab
    )
    counts[list(SPECIALS)] = 0
    frequent_ids = np.argsort(-counts, kind="stable")[:frequent].astype(np.int32)
    log.info("Shortlist: %d pairs, top %d per source piece, %d frequent.", len(pairs), k, frequent)
    return Shortlist(
        table=table,
        frequent=np.sort(frequent_ids),
        target_vocab=target_vocab,
        digests=(proto_digest(source_tokenizer.proto), proto_digest(target_tokenizer.proto)),
    )
