"""BLEU, chrF and numbers kept verbatim with and without translator.segmentation, per test set.

Four ways through the same model: `before` is what `translate` did before segmentation
(`segment=False, protect=False`, no `split_length`: each line one sentence, the model's own
numbers); `placeholders` adds only the placeholders; `sentences` only sentence segmentation and
clause cuts over `split_length`; `after` is today's default (both). "numbers" is the share of
the source's numbers (digits) found verbatim in the output. Run it on an idle machine:

    python bench/segmentation_bleu.py --model saved_models/en-fr --beam-size 5 \\
        --set multi30k:val --set tatoeba:val --set news:newstest2013
"""

import argparse
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from translator.evaluation import load_test_set  # noqa: E402
from translator.inference import load  # noqa: E402
from translator.scoring import bleu_chrf  # noqa: E402

NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,:/-]\d+)*(?![\w])")
WAYS = {
    "before": dict(segment=False, protect=False, split_length=None),
    "placeholders": dict(segment=False, protect=True, split_length=None),
    "sentences": dict(segment=True, protect=False),
    "after": dict(segment=True, protect=True),
}


def numbers_kept(sources, hypotheses):
    total = kept = 0
    for source, hypothesis in zip(sources, hypotheses, strict=True):
        for number in NUMBER.findall(source):
            total += 1
            kept += number in hypothesis
    return kept / max(total, 1), total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="saved_models/en-fr")
    parser.add_argument("--beam-size", type=int, default=None)
    parser.add_argument("--set", action="append", default=None, metavar="CORPUS:SPLIT")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of WAYS")
    parser.add_argument("--limit", type=int, default=None, help="first N sentences of each set")
    args = parser.parse_args()
    sets = args.set or ["multi30k:val", "tatoeba:val", "news:newstest2013"]
    translator = load(args.model)
    split_length = translator.split_length
    print("| test set | way | BLEU | chrF | numbers verbatim | sentences/s |")
    print("|---|---|---|---|---|---|")
    for name in sets:
        corpus, split = name.split(":")
        sources, references, label = load_test_set(corpus, split)
        if args.limit:
            sources, references = sources[: args.limit], references[: args.limit]
        for way in args.ways.split(","):
            options = dict(WAYS[way])
            translator.split_length = options.pop("split_length", split_length)
            start = time.time()
            hypotheses = [
                r.text for r in translator.translate(sources, beam_size=args.beam_size, **options)
            ]
            speed = len(sources) / (time.time() - start)
            bleu, chrf, _, _ = bleu_chrf(hypotheses, references)
            kept, total = numbers_kept(sources, hypotheses)
            print(
                f"| {label} ({len(sources)}) | {way} | {bleu.score:.2f} | {chrf.score:.2f} | "
                f"{kept:.1%} of {total} | {speed:.1f} |",
                flush=True,
            )
        translator.split_length = split_length


if __name__ == "__main__":
    main()
