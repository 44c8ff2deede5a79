"""Training throughput (target tokens/s) and model-FLOPs utilisation (MFU) of a config's model.

MFU = (FLOPs of the training steps, counted from the architecture) / (step time) / (this
machine's matmul peak, measured in the same run with a large `tf.matmul`, float32 and bfloat16).
A training step is counted as 3x the forward FLOPs (backward ~ 2x forward), on the padded batch
shapes the machine really computes; element-wise ops are not counted. Real Multi30k batches of
the config's size are used, the way `translator train` makes them.

For scale, measured on this machine type: OpenNMT-tf 2.32 trains the `multi30k_lstm`
architecture (21M parameters) at 666 target tokens/s (1,209 source + target), about 33% of the
float32 matmul peak. Target: translator >= 2x that, and >= 40% of the bfloat16 peak under
`mixed_bfloat16`.

    python bench/train.py [--config configs/multi30k_lstm.yaml] [--steps 60]
        [--precisions float32,mixed_bfloat16] [--jit both|on|off]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TRANSLATOR_QUIET", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OPENNMT_TOKENS_PER_SECOND = 666.0


def matmul_peak(dtype, n=2048, repeats=10):
    """Best FLOP/s of an `n x n` matmul chain in `dtype` (one op per call, results kept live)."""
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)

    @tf.function
    def chain(a, b):
        out = a
        for _ in range(4):
            out = tf.matmul(out, b) * tf.constant(0.01, dtype)
        return out

    chain(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * n**3 / best


def forward_flops(m, batch, source_len, target_len, source_vocab, target_vocab):
    """Multiply-add FLOPs (2 per MAC) of one forward pass of `Seq2Seq` with model config `m`."""
    gates = 4 if m.cell_type == "lstm" else 3
    flops = 0.0
    width = m.embedding_dim
    for layer in range(m.encoder_layers):
        bidirectional = m.bidirectional == "all" or (m.bidirectional == "first" and layer == 0)
        directions = 2 if bidirectional else 1
        flops += directions * 2 * gates * m.encoder_units * (width + m.encoder_units)
        width = directions * m.encoder_units
    flops *= batch * source_len
    memory_width = width
    u = m.decoder_units
    per_target = 0.0
    for layer in range(m.decoder_layers):
        inputs = (m.embedding_dim + (u if m.input_feeding else 0)) if layer == 0 else u
        per_target += 2 * gates * u * (inputs + u)
    per_target += 2 * source_len * (u + memory_width)  # scores and context
    if m.attention == "bahdanau":
        per_target += 2 * u * u + 2 * source_len * u  # query projection, v . tanh(q + k)
    per_target += 2 * (memory_width + u) * u  # attentional vector tanh(W_c [c; h])
    per_target += 2 * u * target_vocab  # output projection
    flops += batch * target_len * per_target
    flops += batch * source_len * 2 * memory_width * u  # attention keys (general / Bahdanau)
    return flops


def real_batches(config, n):
    from translator import corpora, data
    from translator.tokenizer import SentencePieceTokenizer, train_sentencepiece

    pairs = corpora.load_pairs("multi30k", "train")
    folder = tempfile.mkdtemp()
    path = train_sentencepiece(
        [s for p in pairs for s in p], os.path.join(folder, "spm.model"),
        config.tokenizer.vocab_size, input_sentence_size=200_000,
    )  # fmt: skip
    tok = SentencePieceTokenizer(model_path=str(path))
    ds = data.make_dataset(
        pairs, tok, tok, batch_tokens=config.data.batch_tokens,
        max_length=config.data.max_length, shuffle=True, seed=0, repeat=True,
        pad_to_bucket=True,
    )  # fmt: skip
    return [b for b in ds.take(n)], tok.vocabulary_size()


def measure(config, batches, vocab, precision, jit, warmup, steps):
    from translator.training import build_model, compile_model, dtype_policy

    config = config.model_copy(deep=True)
    config.training.jit_compile = jit
    with dtype_policy(precision):
        model = build_model(config, vocab, vocab)
    compile_model(model, config)
    for inputs, target_out, _ in batches[:warmup]:
        model.train_on_batch(inputs, target_out)
    tokens = flops = 0.0
    start = time.perf_counter()
    for inputs, target_out, _ in batches[warmup : warmup + steps]:
        model.train_on_batch(inputs, target_out)
        b, s = inputs["source_ids"].shape
        t = target_out.shape[1]
        tokens += float(np.count_nonzero(target_out.numpy()))
        flops += 3 * forward_flops(config.model, b, s, t, vocab, vocab)
    elapsed = time.perf_counter() - start
    return tokens / elapsed, flops / elapsed, model.count_params()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/multi30k_lstm.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps (XLA compiles)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--jit", default="both", choices=["both", "on", "off"])
    args = parser.parse_args()

    from translator.config import load_config

    config = load_config(args.config)
    print(f"{args.config}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    peaks = {"float32": matmul_peak(tf.float32), "bfloat16": matmul_peak(tf.bfloat16)}
    print(f"matmul peak: float32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s")  # fmt: skip
    batches, vocab = real_batches(config, args.warmup + args.steps)
    jits = {"both": [False, True], "on": [True], "off": [False]}[args.jit]
    results = []
    for precision in args.precisions.split(","):
        for jit in jits:
            rate, flops, params = measure(
                config, batches, vocab, precision, jit, args.warmup, args.steps
            )
            results.append((precision, jit, rate, flops))
            print(f"  {precision:15s} XLA {'on ' if jit else 'off'}: {rate:7.0f} target tokens/s, "
                  f"{flops / 1e9:6.1f} GFLOP/s, {params / 1e6:.1f}M parameters", flush=True)  # fmt: skip
    # The peaks again, after the runs: the machine is shared, keep the best seen.
    peaks["float32"] = max(peaks["float32"], matmul_peak(tf.float32))
    peaks["bfloat16"] = max(peaks["bfloat16"], matmul_peak(tf.bfloat16))
    print("\nsummary")
    for precision, jit, rate, flops in results:
        peak = peaks["bfloat16" if "bfloat16" in precision else "float32"]
        print(f"  {precision:15s} XLA {'on ' if jit else 'off'}: MFU {flops / peak:6.1%} of the "
              f"{'bfloat16' if 'bfloat16' in precision else 'float32'} peak; "
              f"{rate / OPENNMT_TOKENS_PER_SECOND:.2f}x OpenNMT-tf's 666 target tokens/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
