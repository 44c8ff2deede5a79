"""Vocabulary shortlists: decode over the target pieces a batch's source makes likely.

The output projection, `(rows, units) x (units, vocab)`, is the largest matmul of a decoding
step: 54% of a beam-5 step of the shipped model at 320 rows (measured 2026-12-06). A lexical
shortlist (as in Marian, Junczys-Dowmunt et al., 2018) keeps, for each call, only the target
pieces that can plausibly appear: for every source piece of the batch its `top_k` most likely
translations under an IBM Model 1 lexical table, plus the `frequent` most frequent target
pieces and the special ids. The projection is gathered to those columns once per call, the
search runs over them, and the chosen ids are mapped back to the full vocabulary.

Each sentence decodes over its own shortlist: the matmul runs over the union of the call's
shortlists (one gather of the projection per call), and the pieces outside a sentence's own
are masked in its logits, so a translation does not depend on the sentences it is batched with.

The table is learned from the parallel corpus (`build`, `translator shortlist`: IBM Model 1 by
numpy EM over the pairs' co-occurring pieces, about a minute for 128k pairs) and saved beside the
model as `shortlist.npz`; `translator.load` uses it when it is there, and `translator export`
builds it into the SavedModel.

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
# Logit added to the pieces outside a sentence's own shortlist (never chosen, and exp() of it
# adds nothing to the softmax's normalizer).
MASKED = -1e9
_WORKAROUND = "or pass --no-shortlist (`shortlist=None`) to decode over the whole vocabulary"


class ShortlistError(ValueError):
    """A shortlist file that cannot be used: the message names the file and what to do."""


def proto_digest(proto: bytes) -> str:
    """The SentencePiece model's fingerprint a shortlist records (it is valid for that model only)."""
    return hashlib.sha256(proto).hexdigest()[:16]


@dataclass(frozen=True, repr=False, eq=False)
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
        """Reads a `.npz` written by `save`; `ShortlistError` (naming the file and what to do)
        when it is missing, damaged or not a shortlist."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                shortlist = cls(
                    table=f["table"].astype(np.int32),
                    frequent=f["frequent"].astype(np.int32),
                    target_vocab=int(f["target_vocab"]),
                    digests=tuple(str(d) for d in f["digests"]),
                )
        except Exception as e:  # noqa: BLE001 - any damage: OSError, BadZipFile, zlib.error, ...
            raise ShortlistError(
                f"cannot read the shortlist {path}: {type(e).__name__}: {e}. Rebuild it with "
                f"`translator shortlist --model {path.parent}`, delete it, {_WORKAROUND}."
            ) from e
        if shortlist.table.ndim != 2 or shortlist.frequent.ndim != 1 or len(shortlist.digests) != 2:
            raise ShortlistError(
                f"{path} is not a shortlist (its table must be 2-D and frequent 1-D): rebuild it "
                f"with `translator shortlist --model {path.parent}`, {_WORKAROUND}."
            )
        return shortlist

    def check(
        self, source_proto: bytes, target_proto: bytes, source_vocab: int, target_vocab: int
    ) -> None:
        """Raises `ShortlistError` unless this shortlist was built for these tokenizers (and its
        ids are within the target vocabulary)."""
        rebuild = f"rebuild it with `translator shortlist --model <model directory>`, {_WORKAROUND}"
        expected = (proto_digest(source_proto), proto_digest(target_proto))
        if self.digests != expected:
            raise ShortlistError(
                "the shortlist was built for other SentencePiece models (fingerprints "
                f"{self.digests}, this model's {expected}): {rebuild}"
            )
        ids = np.concatenate([self.table.ravel(), self.frequent])
        if (
            self.table.shape[0] != source_vocab
            or self.target_vocab != target_vocab
            or (ids.size and (ids.min() < 0 or ids.max() >= target_vocab))
        ):
            raise ShortlistError(
                f"the shortlist does not fit this model: {self.table.shape[0]} source and "
                f"{self.target_vocab} target pieces with ids up to {ids.max() if ids.size else 0}, "
                f"the model has {source_vocab} and {target_vocab}: {rebuild}"
            )

    def select(self, source_ids):
        """The call's vocabulary and each sentence's mask, in the graph.

        Args:
            source_ids: int32 `(batch, S)`, padded with `PAD_ID` (padding adds nothing).

        Returns:
            `(vocabulary, mask)`: `vocabulary` the sorted int32 target ids `(K,)` of the union
            of the sentences' shortlists (each the specials, `frequent` and the table rows of
            its source ids; the specials, the lowest ids, keep their positions), and `mask`
            float32 `(batch, K)`, 0 where a piece is in the sentence's own shortlist and
            `MASKED` where it is not.
        """
        import tensorflow as tf

        batch = tf.shape(source_ids)[0]
        rows = tf.gather(tf.constant(self.table, tf.int32), source_ids)  # (batch, S, top_k)
        # Padding adds nothing, whatever the table's PAD row holds: a sentence's shortlist is
        # the same alone and in a batch of longer ones.
        rows = tf.where(source_ids[:, :, tf.newaxis] == PAD_ID, EOS_ID, rows)
        rows = tf.reshape(rows, [batch, -1])
        always = tf.constant(np.union1d(self.frequent, SPECIALS).astype(np.int32))
        candidates = tf.concat([rows, tf.tile(always[tf.newaxis], [batch, 1])], axis=1)
        sentence = tf.broadcast_to(tf.range(batch)[:, tf.newaxis], tf.shape(candidates))
        indices = tf.stack([tf.reshape(sentence, [-1]), tf.reshape(candidates, [-1])], axis=1)
        hits = tf.scatter_nd(
            indices, tf.ones([tf.shape(indices)[0]], tf.int32), [batch, self.target_vocab]
        )  # (batch, V): how often each piece is a candidate of each sentence
        vocabulary = tf.cast(tf.where(tf.reduce_any(hits > 0, axis=0))[:, 0], tf.int32)
        own = tf.gather(hits, vocabulary, axis=1) > 0  # (batch, K)
        return vocabulary, tf.where(own, 0.0, MASKED)

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
    """IBM Model 1 lexical probabilities `t(target | source)` by EM over id lists (one per
    sentence; a NULL word, id `source_vocab`, is added to every source).

    Only pairs that co-occur in a sentence can have a probability, so the table is sparse: it
    is returned as `(sources, targets, probs)`, three aligned arrays, one entry per co-occurring
    (source, target) pair. Memory is about 40 bytes per link (target token x source token of a
    sentence): `build` caps the links it learns from.
    """
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
    pairs, link_pair = np.unique(np.concatenate(keys), return_inverse=True)
    del keys
    rows = np.concatenate(rows)
    sources, targets = pairs // target_vocab, pairs % target_vocab
    probs = np.ones(len(pairs))  # uniform t(f|e): the first E-step weighs each link 1/(l+1)
    for it in range(iterations):
        p = probs[link_pair]
        denominator = np.bincount(rows, weights=p, minlength=row)
        counts = np.bincount(link_pair, weights=p / denominator[rows], minlength=len(pairs))
        totals = np.bincount(sources, weights=counts, minlength=source_vocab + 1)
        probs = counts / np.maximum(totals[sources], 1e-12)
        if progress:
            progress(it + 1, iterations)
    return sources, targets, probs


def build(
    pairs,
    source_tokenizer,
    target_tokenizer,
    top_k=20,
    frequent=300,
    iterations=5,
    max_pairs=200_000,
    max_length=100,
    max_links=40_000_000,
    seed=0,
    progress=None,
) -> Shortlist:
    """Learns a `Shortlist` from `(english, french)` pairs for two `SentencePieceTokenizer`s.

    Args:
        pairs: the training pairs; a seeded sample of at most `max_pairs` of those with both
            sides within `max_length` subwords is used, cut to `max_links` links (source x
            target subwords summed over pairs, about 40 bytes each in `ibm1`).
        top_k: target ids kept per source id (by IBM Model 1 probability).
        frequent: most frequent target ids always kept.
        iterations: EM iterations of IBM Model 1.
        progress: optional `callable(done, total)` per EM iteration.
    """
    import sentencepiece as spm

    if top_k < 1 or frequent < 0 or iterations < 1 or max_pairs < 1:
        raise ValueError(
            "top_k, iterations and max_pairs must be >= 1 and frequent >= 0, got "
            f"{top_k}, {iterations}, {max_pairs} and {frequent}"
        )
    pairs = list(pairs)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    source = spm.SentencePieceProcessor(model_proto=source_tokenizer.proto)
    target = spm.SentencePieceProcessor(model_proto=target_tokenizer.proto)
    source_vocab, target_vocab = source.get_piece_size(), target.get_piece_size()
    src_ids, tgt_ids, links = [], [], 0
    for start in range(0, len(order), 10_000):
        chunk = [pairs[i] for i in order[start : start + 10_000]]
        for s, t in zip(
            source.encode([english for english, _ in chunk]),
            target.encode([french for _, french in chunk]),
            strict=True,
        ):
            if len(s) > max_length or len(t) > max_length or not t:
                continue
            if links + (len(s) + 1) * len(t) > max_links or len(src_ids) >= max_pairs:
                break
            src_ids.append(s)
            tgt_ids.append(t)
            links += (len(s) + 1) * len(t)
        else:
            continue
        break
    log.info("Shortlist: learning from %d of %d pairs (%d links).", len(src_ids), len(pairs), links)
    sources, targets, probs = ibm1(
        src_ids, tgt_ids, source_vocab, target_vocab, iterations, progress
    )
    keep = (sources < source_vocab) & ~np.isin(targets, SPECIALS)  # specials: always kept
    sources, targets, probs = sources[keep], targets[keep], probs[keep]
    # Per source id, its `top_k` targets by probability: sort by (source, -prob), take the
    # first `top_k` of each source's run; the rest of a row stays EOS (adds nothing).
    order = np.lexsort((-probs, sources))
    sources, targets = sources[order], targets[order]
    first = np.searchsorted(sources, np.arange(source_vocab))
    rank = np.arange(len(sources)) - first[sources]
    kept = rank < top_k
    table = np.full((source_vocab, top_k), EOS_ID, np.int32)
    table[sources[kept], rank[kept]] = targets[kept]
    table[list(SPECIALS)] = EOS_ID
    counts = np.bincount(np.concatenate([np.asarray(t, np.int64) for t in tgt_ids]),
                         minlength=target_vocab)  # fmt: skip
    counts[list(SPECIALS)] = 0
    frequent_ids = np.argsort(-counts, kind="stable")[:frequent].astype(np.int32)
    return Shortlist(
        table=table,
        frequent=np.sort(frequent_ids),
        target_vocab=target_vocab,
        digests=(proto_digest(source_tokenizer.proto), proto_digest(target_tokenizer.proto)),
    )
