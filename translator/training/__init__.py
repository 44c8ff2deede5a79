"""Training: `train()` and what it is made of; importing it registers the loss and metrics.

Modules, each with one job:

- `objectives`: the masked loss, token metrics and learning-rate schedule.
- `building`: the model and optimizer from a config, the dtype policy, `save_model`.
- `inputs`: the run directory check and lock, SentencePiece models, training batches, validation sets.
- `init_from`: starting from a trained model (`training.init_from`).
- `distribution`: `tf.distribute` strategies and every workaround for Keras under them.
- `callback`: checkpoints, validation BLEU and stopping at the end of each chunk.
- `loop`: `train()`.
- `averaging`: `average_checkpoints`.
- `rescoring`: `rescore_checkpoints`, the checkpoints scored again after training.

`python -m translator.train --config ...` (translator/train.py) is `translator train --config ...`.
"""

from translator.hardware import resolve_precision
from translator.training.averaging import average_checkpoints
from translator.training.building import (
    build_model,
    build_optimizer,
    compile_model,
    dtype_policy,
    peak_learning_rate,
    resolve_jit_compile,
    save_model,
)
from translator.training.callback import TrainingMonitor
from translator.training.distribution import (
    WorkerBackup,
    check_keras_internals,
    loopback_cluster,
    make_strategy,
    resolve_strategy,
    weights_digest,
)
from translator.training.init_from import InitFromError, init_weights_from, load_init_model
from translator.training.inputs import (
    RunDirLock,
    check_run_dir,
    load_training_pairs,
    load_validation,
    prepare_tokenizers,
)
from translator.training.loop import ResumeError, train
from translator.training.objectives import (
    MaskedCrossEntropy,
    TargetTokens,
    TokenAccuracy,
    WarmupSchedule,
)

__all__ = [
    "InitFromError",
    "MaskedCrossEntropy",
    "ResumeError",
    "RunDirLock",
    "TargetTokens",
    "TokenAccuracy",
    "TrainingMonitor",
    "WarmupSchedule",
    "WorkerBackup",
    "average_checkpoints",
    "build_model",
    "build_optimizer",
    "check_keras_internals",
    "check_run_dir",
    "compile_model",
    "dtype_policy",
    "init_weights_from",
    "load_init_model",
    "load_training_pairs",
    "load_validation",
    "loopback_cluster",
    "make_strategy",
    "peak_learning_rate",
    "prepare_tokenizers",
    "resolve_jit_compile",
    "resolve_precision",
    "resolve_strategy",
    "save_model",
    "train",
    "weights_digest",
]
