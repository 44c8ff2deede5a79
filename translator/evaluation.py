"""`translator evaluate`: translate a test set and score it with sacreBLEU (BLEU and chrF)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

from translator.training import bleu_chrf

log = logging.getLogger("translator.evaluation")


def _read_lines(path: str) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None


def load_test_set(args) -> tuple[list[str], list[list[str]], str]:
    """Sources, reference lists and a label, from `--corpus/--split` or from plain files."""
    if args.source:
        if not args.reference:
            raise ValueError("--source needs at least one --reference file")
        sources = _read_lines(args.source)
        streams = [_read_lines(r) for r in args.reference]
        for path, stream in zip(args.reference, streams, strict=True):
            if len(stream) != len(sources):
                raise ValueError(
                    f"{args.source} has {len(sources)} lines but {path} has {len(stream)}: "
                    "sources and references must be line-aligned"
                )
        references = [list(refs) for refs in zip(*streams, strict=True)]
        return sources, references, Path(args.source).name
    if not args.corpus:
        raise ValueError("give --corpus (and --split), or --source with --reference files")
    from translator import data

    grouped = data.load_references(args.corpus, args.split, data_dir=args.data_dir)
    return [s for s, _ in grouped], [r for _, r in grouped], f"{args.corpus}.{args.split}"


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


def evaluate_cli(args) -> int:
    from translator.cli import decoding_overrides
    from translator.inference import load

    translator = load(args.model, **decoding_overrides(args))
    sources, references, label = load_test_set(args)
    beam = args.beam_size if args.beam_size is not None else translator.beam_size
    result = evaluate(translator, sources, references, args.beam_size, args.length_penalty)
    output = Path(args.output) if args.output else Path(args.model) / f"hyp.{label}.beam{beam}.txt"
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("\n".join(result["hypotheses"]) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    print(f"{label}, beam {beam}: BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}")
    print(f"  {result['bleu_detail']}")
    print(f"  BLEU signature: {result['bleu_signature']}")
    print(f"  chrF signature: {result['chrf_signature']}")
    print(f"  hypotheses: {output}")
    summary = {k: v for k, v in result.items() if k != "hypotheses"}
    summary.update(label=label, beam_size=beam)
    log.debug(json.dumps(summary))
    return 0
