"""`translator evaluate`: translate a test set and score it with sacreBLEU (BLEU and chrF)."""

from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

from translator.files import atomic_write
from translator.scoring import bleu_chrf


def _read_lines(path: str) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None


def load_test_set(corpus=None, split="test", data_dir=None, source=None, references=None):
    """Sources, reference lists and a label, from a corpus split or from plain files.

    Args:
        corpus, split, data_dir: a named corpus (`translator.corpora.load_references`).
        source: a plain-text source file instead, with `references`, a list of reference
            files aligned with it line by line (several give multi-reference BLEU).

    Returns:
        `(sources, references, label)`: sources a list of strings, references a list of
        lists (one list of references per source), label e.g. `"multi30k.test"`.
    """
    if source:
        if not references:
            raise ValueError("--source needs at least one --reference file")
        sources = _read_lines(source)
        streams = [_read_lines(r) for r in references]
        for path, stream in zip(references, streams, strict=True):
            if len(stream) != len(sources):
                raise ValueError(
                    f"{source} has {len(sources)} lines but {path} has {len(stream)}: "
                    "sources and references must be line-aligned"
                )
        grouped = [list(refs) for refs in zip(*streams, strict=True)]
        return sources, grouped, Path(source).name
    if not corpus:
        raise ValueError("give --corpus (and --split), or --source with --reference files")
    from translator import corpora

    grouped = corpora.load_references(corpus, split, data_dir=data_dir)
    return [s for s, _ in grouped], [r for _, r in grouped], f"{corpus}.{split}"


def evaluate(translator, sources, references, beam_size=None, length_penalty=None, progress=True):
    """Translates `sources` and scores them against `references` (a list of lists).

    Returns:
        dict with `bleu`, `chrf`, both signatures, `hypotheses`, `sentences_per_second`.
    """
    start = time.time()
    hypotheses = []
    chunk = max(translator.batch_size * 4, 1)
    for i in range(0, len(sources), chunk):
        results = translator.translate(
            sources[i : i + chunk], beam_size=beam_size, length_penalty=length_penalty
        )
        hypotheses.extend(r.text for r in results)
        if progress:
            done = min(i + chunk, len(sources))
            rate = done / max(time.time() - start, 1e-9)
            print(
                f"\rtranslated {done}/{len(sources)} ({rate:.1f} sentences/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    elapsed = time.time() - start
    bleu, chrf, bleu_signature, chrf_signature = bleu_chrf(hypotheses, references)
    return {
        "bleu": round(bleu.score, 2),
        "chrf": round(chrf.score, 2),
        "bleu_signature": str(bleu_signature),
        "chrf_signature": str(chrf_signature),
        "bleu_detail": str(bleu),
        "sentences": len(sources),
        "sentences_per_second": round(len(sources) / max(elapsed, 1e-9), 2),
        "hypotheses": hypotheses,
    }


def write_hypotheses(path, hypotheses) -> None:
    """Writes one hypothesis per line, atomically."""
    atomic_write(path, "\n".join(hypotheses) + "\n")
