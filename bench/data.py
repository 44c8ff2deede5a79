"""Benchmark: how many training batches per second the tf.data pipeline delivers.

With `--config`, it also times the model of that config consuming the same batches (training
steps, after an untimed warm-up) and prints pipeline rate / model rate: the pipeline must be at
least 10x faster than the model, so the CPU spends its time in the model.

    python bench/data.py --config configs/en_fr.yaml
"""

import argparse
import os
import tempfile
import time

import tensorflow as tf

from translator import corpora, data
from translator.tokenizer import SentencePieceTokenizer, train_sentencepiece


def pipeline_batches_per_second(dataset, n):
    """Measures how fast `dataset` yields batches, with nothing consuming them.

    The first batch is taken before the clock starts, so one-off work (filling the
    tokenization cache, the shuffle buffer and the prefetch buffer) is not counted.
    The dataset is repeated if it has fewer than `n + 1` batches.

    Args:
        dataset: a `tf.data.Dataset`, e.g. from `translator.data.make_dataset`.
        n: int, the number of batches to time.

    Returns:
        float, batches per second.

    Example:

    >>> pipeline_batches_per_second(tf.data.Dataset.range(100).batch(10), 5) > 0
    True
    """
    iterator = iter(dataset.repeat())
    next(iterator)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    return n / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="multi30k")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", default=None, help="default: $TRANSLATOR_DATA_DIR")
    parser.add_argument("--spm", default=None, help="SentencePiece model; trained if missing")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=100)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--config", help="also time this config's model consuming the batches")
    parser.add_argument("--model-steps", type=int, default=30)
    args = parser.parse_args(argv)
    config = None
    if args.config:
        from translator.config import load_config

        config = load_config(args.config)
        args.batch_tokens = config.data.batch_tokens
        args.max_length = config.data.max_length
        args.vocab_size = config.tokenizer.vocab_size

    pairs = corpora.load_pairs(args.corpus, args.split, args.data_dir)
    spm_path = args.spm or os.path.join(tempfile.gettempdir(), "translator-bench-spm.model")
    if not os.path.exists(spm_path):
        texts = [sentence for pair in pairs for sentence in pair]
        train_sentencepiece(texts, spm_path, vocab_size=args.vocab_size)
    tokenizer = SentencePieceTokenizer(model_path=spm_path)

    start = time.perf_counter()
    dataset = data.make_dataset(
        pairs,
        tokenizer,
        tokenizer,
        batch_tokens=args.batch_tokens,
        max_length=args.max_length,
        pad_to_bucket=bool(config and config.training.jit_compile),  # as `translator train`
    )
    build_seconds = time.perf_counter() - start
    rate = pipeline_batches_per_second(dataset, args.batches)
    print(
        f"{args.corpus}/{args.split}: {len(pairs):,} pairs, batch_tokens={args.batch_tokens}, "
        f"build {build_seconds:.1f}s (tokenize + length count), "
        f"{rate:.1f} batches/s over {args.batches} batches "
        f"(tf {tf.__version__}, {os.cpu_count()} CPUs)"
    )
    if config is not None:
        model_rate = model_batches_per_second(config, dataset, tokenizer, args.model_steps)
        print(
            f"model of {args.config} consumes {model_rate:.2f} batches/s: the pipeline is "
            f"{rate / model_rate:.0f}x faster than the model (target >= 10x)"
        )


def model_batches_per_second(config, dataset, tokenizer, steps, warmup=40):
    """Training steps per second of `config`'s model on batches taken from `dataset`."""
    from translator.hardware import resolve_precision
    from translator.training import build_model, compile_model, dtype_policy

    vocab = tokenizer.vocabulary_size()
    with dtype_policy(resolve_precision(config.training.precision)):
        model = build_model(config, vocab, vocab)
    compile_model(model, config)
    batches = list(dataset.take(warmup + steps))
    for inputs, target_out, _ in batches[:warmup]:
        model.train_on_batch(inputs, target_out)
    start = time.perf_counter()
    for inputs, target_out, _ in batches[warmup:]:
        model.train_on_batch(inputs, target_out)
    return steps / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
