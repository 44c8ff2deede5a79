"""The model and optimizer a training run builds from its config, its dtype policy, and saving."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import keras
import tensorflow as tf

from translator.config import Config
from translator.files import atomic_path
from translator.model import Seq2Seq
from translator.training.objectives import (
    MaskedCrossEntropy,
    TargetTokens,
    TokenAccuracy,
    WarmupSchedule,
)


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Makes `policy` (`float32`, `mixed_bfloat16`) Keras' global dtype policy inside the block.

    Keras layers take their dtype policy from this global when they are created, so a model is
    built in mixed precision by creating it inside the block; the previous policy is restored
    when the block exits, whether it succeeds or fails.

    Example:

    >>> import keras
    >>> before = keras.config.dtype_policy().name
    >>> with dtype_policy("mixed_bfloat16"):
    ...     keras.layers.Dense(2).dtype_policy.name
    'mixed_bfloat16'
    >>> keras.config.dtype_policy().name == before
    True
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def resolve_jit_compile(jit_compile: bool | str, precision: str, distributed: bool) -> bool:
    """`training.jit_compile` with `auto` resolved for the (resolved) `precision`.

    `auto` is on in float32 and off under mixed_bfloat16, where XLA's step is slower than
    TensorFlow's own on CPU (bench/train.py: 2,026 against 1,408 target tokens/s for
    multi30k_lstm). XLA is always off under a distribution strategy: Keras compiles the whole
    step, all-reduce included, and XLA can neither place one program on several devices nor
    (yet) compile collectives on CPU.
    """
    if distributed:
        return False
    if jit_compile == "auto":
        return precision == "float32"
    return bool(jit_compile)


def build_model(config: Config, source_vocab_size: int, target_vocab_size: int) -> Seq2Seq:
    """A built `Seq2Seq` with the architecture of `config.model`, in the current dtype policy.

    Build it inside `dtype_policy("mixed_bfloat16")` for mixed precision.
    """
    # The model section is Seq2Seq's keyword arguments, one for one (as `load_init_model`
    # relies on when it compares a config with a saved model's `get_config()`).
    model = Seq2Seq(source_vocab_size, target_vocab_size, **config.model.model_dump())
    model.build()
    return model


def peak_learning_rate(config: Config, replicas: int = 1) -> float:
    """`training.learning_rate` scaled for `replicas` by `training.learning_rate_scaling`.

    With N replicas a step averages the gradients of N batches, each of `data.batch_tokens`
    tokens, so the batch is N times larger: `sqrt` multiplies the peak rate by sqrt(N) (the
    square-root rule suited to Adam), `linear` by N (the rule for SGD), `none` keeps it.
    """
    t = config.training
    factor = {"none": 1.0, "sqrt": math.sqrt(replicas), "linear": float(replicas)}
    return t.learning_rate * factor[t.learning_rate_scaling]


def build_optimizer(config: Config, replicas: int = 1) -> keras.optimizers.Optimizer:
    """Adam on the `WarmupSchedule` of `config.training`, its peak scaled for `replicas`."""
    t = config.training
    schedule = WarmupSchedule(
        peak_learning_rate(config, replicas),
        t.warmup_steps,
        t.decay,
        total_steps=t.max_steps,
        minimum=t.min_learning_rate,
    )
    return keras.optimizers.Adam(schedule, global_clipnorm=t.clip_norm)


def compile_model(model, config: Config, replicas: int = 1):
    """Compiles `model`; under a `tf.distribute` strategy call it inside `strategy.scope()`.

    `training.jit_compile: auto` is resolved for the model's own dtype policy (see
    `resolve_jit_compile`), the one it was built in.
    """
    precision = "mixed_bfloat16" if model.dtype_policy.name == "mixed_bfloat16" else "float32"
    model.compile(
        optimizer=build_optimizer(config, replicas),
        loss=MaskedCrossEntropy(config.training.label_smoothing),
        metrics=[TokenAccuracy(), TargetTokens()],
        jit_compile=resolve_jit_compile(
            config.training.jit_compile, precision, tf.distribute.has_strategy()
        ),
    )
    return model


def save_model(model: Seq2Seq, path: Path) -> None:
    """Saves an uncompiled float32 copy of `model` to a `.keras` file, atomically."""
    clean = model.copy("float32")
    with atomic_path(path) as tmp:
        clean.save(tmp)
