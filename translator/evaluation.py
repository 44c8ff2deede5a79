"""`translator evaluate`: translate a test set and score it with sacreBLEU (BLEU and chrF)."""

from __future__ import annotations

import gzip
import sys
import time
import zlib
from pathlib import Path

from translator.files import atomic_write
from translator.scoring import bleu_chrf


def _read_lines(path: str) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # a BOM opening it is not text
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e}): give it uncompressed, "
                         "or without the .gz ending if it is plain text") from None  # fmt: skip


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
        if corpus:
            raise ValueError(f"give --corpus ({corpus}) or --source ({source}), not both")
        sources = _read_lines(source)
        if not sources:
            raise ValueError(f"{source} is empty: a test set needs at least one line")
        streams = [_read_lines(r) for r in references]
        for path, stream in zip(references, streams, strict=True):
            if len(stream) != len(sources):
                raise ValueError(
                    f"{source} has {len(sources)} lines but {path} has {len(stream)}: "
                    "sources and references must be line-aligned"
                )
        grouped = [list(refs) for refs in zip(*streams, strict=True)]
        return sources, grouped, Path(source).name
    if references:
        raise ValueError("--reference goes with --source (the source file it is aligned with)")
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


# The test sets of a model card: the benchmark captions, everyday sentences, news (the dev set
# of the general model) and software documentation.
SCORECARD_SETS = (
    "multi30k:val",
    "multi30k:test_2016_flickr",
    "tatoeba:test",
    "news:newstest2013",
    "python-docs-fr:test",
)


def parse_test_sets(spec: str) -> list[tuple[str, str]]:
    """`"corpus:split,corpus"` -> `[(corpus, split), (corpus, "test")]`.

    Raises:
        ValueError: naming the malformed entry.
    """
    sets = []
    for entry in spec.split(","):
        entry = entry.strip()
        corpus, _, split = entry.partition(":")
        if not corpus or entry.count(":") > 1 or (":" in entry and not split):
            raise ValueError(
                f"test set {entry!r}: write corpus:split (e.g. multi30k:val) or corpus (its test "
                "split), separated by commas"
            )
        sets.append((corpus, split or "test"))
    if len(set(sets)) != len(sets):
        raise ValueError(f"a test set is listed twice in {spec!r}")
    return sets


def scorecard(translator, test_sets, beam_sizes, report=None) -> list[dict]:
    """BLEU and chrF of `translator` on each test set at each beam size (a model card's table).

    Args:
        translator: A `Translator` (anything with its `translate`).
        test_sets: `[(label, sources, references)]`, as `load_test_set` gives them.
        beam_sizes: The beam sizes to score each set with (1 is greedy search).
        report: Called with each row as it is done (progress for long runs).

    Returns:
        One dict per (test set, beam size): `test_set`, `beam_size`, `sentences`, `bleu`,
        `chrf`, `sentences_per_second` and both sacreBLEU signatures.
    """
    rows = []
    for label, sources, references in test_sets:
        for beam in beam_sizes:
            result = evaluate(translator, sources, references, beam_size=beam, progress=False)
            row = {"test_set": label, "beam_size": beam}
            row.update({k: v for k, v in result.items() if k not in ("hypotheses", "bleu_detail")})
            rows.append(row)
            if report is not None:
                report(row)
    return rows


def format_scorecard(rows: list[dict]) -> str:
    """The rows of `scorecard` as a Markdown table: one line per test set, BLEU and chrF per
    beam size, then the sacreBLEU signatures."""
    beams = sorted({row["beam_size"] for row in rows})
    sets = list(dict.fromkeys(row["test_set"] for row in rows))
    by_key = {(row["test_set"], row["beam_size"]): row for row in rows}
    name = {1: "greedy"}
    head = ["test set", "sentences"]
    for beam in beams:
        head += [f"{name.get(beam, f'beam {beam}')} BLEU", f"{name.get(beam, f'beam {beam}')} chrF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in sets:
        cells = [label, str(by_key[label, beams[0]]["sentences"])]
        for beam in beams:
            row = by_key[label, beam]
            cells += [f"{row['bleu']:.2f}", f"{row['chrf']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # The signatures, once each (they differ in nrefs where a set has several references).
    lines.append("")
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF")):
        by_signature = {}
        for row in rows:
            by_signature.setdefault(row[f"{metric}_signature"], []).append(row["test_set"])
        for signature, labels in by_signature.items():
            where = "" if len(by_signature) == 1 else f" ({', '.join(dict.fromkeys(labels))})"
            lines.append(f"{title}{where}: {signature}")
    return "\n".join(lines)
