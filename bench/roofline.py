"""How close one decoding step runs to this machine's limits: memory bandwidth and matmul peak.

A decoding step multiplies a few rows (batch x beam) by every weight matrix of the decoder. With
few rows, each weight is used for a handful of multiply-adds per byte read, so the step cannot
run faster than the time it takes to stream the decoder's weights from memory; with many rows it
is bounded by the matmul peak. This benchmark measures both limits on this machine, in this run
(a large matrix-vector product for the bandwidth, a 1024 x 1024 x 1024 product for the peak),
then times the model's step function as the search runs it (greedy's, or beam search's with the
beams of a sentence sharing its encoder memory; top-k and log-normalizer included, in a
`tf.while_loop`) for 1 sentence at beam 1 and at beam 5, and 8 and 64 sentences at beam 5 (1 to
320 rows), and prints each time against its floor (the larger of the weights' bytes / bandwidth
and FLOPs / peak; the encoder memory and attention keys a step reads, 4 KB per source subword
and sentence, are left out):

    python bench/roofline.py --model saved_models/en-fr [--source-length 16] [--shapes 1x1,1x5]

A ratio near 1 means the step is at the machine's limit: only fewer bytes per step (a vocabulary
shortlist, bfloat16 weights on a CPU with bfloat16 units, a smaller model) make it faster; a
large ratio means per-op overhead or a poor kernel, which code can fix.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def timed(fn, *args, repeats=15):
    """Median seconds of `fn(*args)`, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop(body, iterations):
    """A tf.function running `body(x) -> x` `iterations` times in one `tf.while_loop`."""

    @tf.function
    def run(*x):
        return tf.while_loop(
            lambda i, *x: i < iterations, lambda i, *x: (i + 1, *body(*x)), (0, *x)
        )[1:]

    return run


def bandwidth(megabytes=256, iterations=20):
    """Bytes/s streaming a float32 matrix of `megabytes` through one matrix-vector product.

    256 MB, well beyond any cache, so each product reads the matrix from memory."""
    columns = 4096
    rows = megabytes * 2**20 // (4 * columns)
    matrix = tf.random.normal([rows, columns])
    vector = tf.random.normal([1, rows])
    # Each product depends on the previous one (not through `0 * acc`, which the graph optimizer
    # folds away), so none is hoisted out of the loop.
    run = loop(
        lambda acc: (acc + tf.reduce_sum(tf.matmul(vector + 1e-30 * acc, matrix)),), iterations
    )
    return rows * columns * 4 * iterations / timed(run, tf.constant(0.0), repeats=5)


def matmul_peak(n=1024, iterations=10):
    """Float32 FLOP/s of an n x n x n matmul."""
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n]) / np.sqrt(n)
    run = loop(lambda x: (tf.matmul(x, b),), iterations)
    return 2 * n**3 * iterations / timed(run, a, repeats=5)


def step_weights(model):
    """`(bytes, FLOPs per row)` of the weights one decoding step reads: the decoder's inference
    weights (the embedding half and input-feeding half of the first cell's kernel, each cell's
    recurrent kernel, the attention's weights, the attentional layer, the output projection), not
    the first cell's whole kernel (the halves replace it) nor the embedding table (a step gathers
    its rows)."""
    weights = model.decoder.inference_weights()
    cells = weights.pop("cells")
    tensors = [cells[0]["recurrent_kernel"], cells[0]["bias"]]
    for cell in cells[1:]:
        tensors += [cell["kernel"], cell["recurrent_kernel"], cell["bias"]]
    tensors += tf.nest.flatten(weights)
    nbytes = sum(int(np.prod(t.shape)) * t.dtype.size for t in tensors)
    flops = sum(2 * int(np.prod(t.shape)) for t in tensors if len(t.shape) == 2)
    return nbytes, flops


def step_seconds(model, sentences, beam, source_length, steps=30):
    """Seconds per decoding step of `sentences` x `beam` rows, as the search runs it: greedy's
    step (`beam` 1), or beam search's, whose beams share their sentence's encoder memory
    (`step_function(shared_constants=True)`); top-k and log-normalizer included."""
    rng = np.random.default_rng(0)
    source = tf.constant(rng.integers(4, 1000, size=(sentences, source_length)), tf.int32)
    constants, state = model.encode(source)
    state = tf.nest.map_structure(lambda t: tf.repeat(t, beam, axis=0), state)
    step_fn = model.step_function(shared_constants=beam > 1)
    ids = tf.constant(rng.integers(4, 1000, size=(sentences * beam,)), tf.int32)

    def body(ids, state):
        logits, state, _ = step_fn(ids, state, constants)
        top, tokens = tf.math.top_k(logits, beam + 1)
        normalizer = tf.reduce_logsumexp(logits, axis=1)
        # A comparison, not `0 * x`, which the graph optimizer folds away with `x` unused.
        used = tf.cast(normalizer + top[:, 0] < -1e30, tf.int32)
        return tokens[:, 0] + used, state

    return timed(loop(body, steps), ids, state) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory with model.keras")
    parser.add_argument("--source-length", type=int, default=16, help="source subwords")
    parser.add_argument(
        "--shapes",
        default="1x1,1x5,8x5,64x5",
        help="sentences x beam size per step (default 1x1,1x5,8x5,64x5: 1 to 320 rows)",
    )
    args = parser.parse_args()

    from translator.inference import load

    model = load(args.model, compute_dtype="float32").model
    nbytes, flops_per_row = step_weights(model)
    bw, peak = bandwidth(), matmul_peak()
    print(f"{args.model}: a decoding step reads {nbytes / 1e6:.1f} MB of weights and does "
          f"{flops_per_row / 1e6:.1f} MFLOP per row (float32)")  # fmt: skip
    print(f"this machine, measured now: memory bandwidth {bw / 1e9:.1f} GB/s, "
          f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s")  # fmt: skip
    print(
        "| sentences x beam | rows | step ms | bandwidth floor ms | FLOP floor ms | step / floor |"
    )
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        sentences, beam = (int(n) for n in shape.split("x"))
        rows = sentences * beam
        took = step_seconds(model, sentences, beam, args.source_length)
        memory_floor, compute_floor = nbytes / bw, rows * flops_per_row / peak
        print(f"| {sentences} x {beam} | {rows} | {took * 1e3:.2f} | {memory_floor * 1e3:.2f} | "
              f"{compute_floor * 1e3:.2f} | {took / max(memory_floor, compute_floor):.2f}x |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
