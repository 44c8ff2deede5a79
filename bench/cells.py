"""Training speed of translator's recurrent layers against Keras' built-in LSTM and GRU.

Each contender runs forward + backward (gradients of a scalar loss with respect to inputs and
weights) on batch 64, 20 steps, 256 inputs, 512 units, compiled with `tf.function`. Runs are
interleaved (A, B, C, A, B, C, ...) and the median time of each is compared, so machine load
drift hits every contender alike. Ratios > 1 mean ours is faster than Keras.

    python bench/cells.py [--rounds 7] [--steps 10] [--policies float32,mixed_bfloat16]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from translator import layers  # noqa: E402

BATCH, TIME, INPUTS, UNITS = 64, 20, 256, 512


def make_train_step(layer, x):
    layer(x)  # build

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        return tape.gradient(loss, [x, *layer.trainable_variables])

    step(x)  # trace + warm up
    return step


def time_steps(step, x, steps):
    start = time.perf_counter()
    for _ in range(steps):
        out = step(x)
    _ = [o.numpy() for o in out[:1]]
    return (time.perf_counter() - start) / steps


def contenders(kind):
    cell = layers.LSTMCell if kind == "lstm" else layers.GRUCell
    builtin = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    return {
        f"keras.layers.{kind.upper()}": lambda: builtin(UNITS, return_sequences=True),
        f"keras.layers.RNN(translator {cell.__name__})": lambda: keras.layers.RNN(
            cell(UNITS), return_sequences=True
        ),
        f"translator.layers.Recurrent({cell.__name__})": lambda: layers.Recurrent(cell(UNITS)),
    }


def run(policy, kind, rounds, steps):
    keras.mixed_precision.set_global_policy(policy)
    x = tf.random.normal(
        (BATCH, TIME, INPUTS), dtype=keras.mixed_precision.global_policy().compute_dtype
    )
    builders = contenders(kind)
    train_steps = {name: make_train_step(build(), x) for name, build in builders.items()}
    times = {name: [] for name in builders}
    for _ in range(rounds):
        for name, step in train_steps.items():
            times[name].append(time_steps(step, x, steps))
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians[next(iter(medians))]
    print(f"\n{kind.upper()} {policy}: batch {BATCH}, {TIME} steps, {INPUTS} inputs, {UNITS} units")
    for name, t in medians.items():
        print(f"  {name:48s} {t * 1e3:8.2f} ms/step   speed ratio vs Keras {reference / t:5.2f}")
    keras.mixed_precision.set_global_policy("float32")
    return {name: reference / t for name, t in medians.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--kinds", default="lstm,gru")
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    for policy in args.policies.split(","):
        for kind in args.kinds.split(","):
            run(policy, kind, args.rounds, args.steps)


if __name__ == "__main__":
    main()
