"""Training under `tf.distribute`: strategies, the distributed input, workers, Keras workarounds.

Every workaround for Keras' `fit()` under a distribution strategy lives here: Keras 3 offers no
public hook for them, so `patch_distributed_fit` replaces private methods of one model instance,
and `check_keras_internals` (run before patching, and by a test) fails loudly, naming the Keras
version, when a Keras release no longer has what it replaces.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from translator.checkpoint import CheckpointError

log = logging.getLogger(__name__)


# -- strategies -----------------------------------------------------------------------------


def _tf_config_tasks() -> int:
    """Number of training tasks (chief and workers) in `$TF_CONFIG`; 0 when it is not set."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError) as e:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster' ({e})") from None
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _local_devices() -> list[str]:
    """This machine's GPUs, else its (logical) CPU devices."""
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def resolve_strategy(name: str) -> str:
    """`training.strategy` with `auto` resolved.

    `auto` is `multi_worker` when `TF_CONFIG` names several tasks, else `mirrored` when this
    machine has several GPUs (or logical CPU devices), else `default`.
    """
    if name != "auto":
        return name
    if _tf_config_tasks() > 1:
        return "multi_worker"
    return "mirrored" if len(_local_devices()) > 1 else "default"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy named by `training.strategy`.

    `default` is TensorFlow's default (one device, no distribution); `mirrored` is a
    `MirroredStrategy` over this machine's GPUs, or over its logical CPU devices when it has no
    GPU; `multi_worker` is a `MultiWorkerMirroredStrategy` over the cluster in the standard
    `TF_CONFIG` environment variable (each worker's own devices are mirrored too); `auto` is
    resolved by `resolve_strategy`.

    Call it before TensorFlow runs anything: `MultiWorkerMirroredStrategy` configures the
    runtime's collective ops, which must happen at program start-up.
    """
    name = resolve_strategy(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = _local_devices()
        if len(devices) == 1:
            log.warning(
                "strategy mirrored on one device (%s): one replica, no speed-up, and XLA is off "
                "under distribution; use `default`, or declare logical CPUs with "
                "tf.config.set_logical_device_configuration before training",
                devices[0],
            )
        return tf.distribute.MirroredStrategy(devices)
    if name != "multi_worker":
        raise ValueError(f"unknown strategy {name!r}: auto, default, mirrored or multi_worker")
    if _tf_config_tasks() == 0:
        log.warning("strategy multi_worker without TF_CONFIG: training on this machine alone")
    implementation = tf.distribute.experimental.CommunicationImplementation.AUTO  # RING on CPU
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation
        )
    )


@dataclass(frozen=True)
class Topology:
    """What a training process needs to know of its strategy.

    Attributes:
        chief: This process writes the run directory (always true without multi-worker).
        multi_worker: The strategy is a `MultiWorkerMirroredStrategy`.
        distributed: Several replicas may train (mirrored or multi-worker).
        replicas: Replicas in sync, over all workers.
    """

    chief: bool
    multi_worker: bool
    distributed: bool
    replicas: int

    @classmethod
    def of(cls, strategy: tf.distribute.Strategy, chief: bool) -> Topology:
        multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        distributed = multi_worker or isinstance(strategy, tf.distribute.MirroredStrategy)
        return cls(chief, multi_worker, distributed, strategy.num_replicas_in_sync)

    def describe(self) -> str:
        """How the strategy is named in the log (`MirroredStrategy: 2 replicas`...)."""
        name = "MultiWorkerMirroredStrategy" if self.multi_worker else "MirroredStrategy"
        role = ""
        if self.multi_worker:
            role = f" (this worker is {'the chief' if self.chief else 'not the chief'})"
        return f"{name}: {self.replicas} replicas{role}"


def loopback_cluster(workers: int) -> list[dict]:
    """The `TF_CONFIG` of each of `workers` workers on free ports of 127.0.0.1 (tests, bench).

    Example:

    >>> configs = loopback_cluster(2)
    >>> [c["task"] for c in configs]
    [{'type': 'worker', 'index': 0}, {'type': 'worker', 'index': 1}]
    >>> configs[0]["cluster"] == configs[1]["cluster"]
    True
    """
    sockets = [socket.socket() for _ in range(workers)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(workers)]


# -- input and agreement between workers ----------------------------------------------------


def distributed_batches(strategy, training_batches, pairs, step: int):
    """The training stream of a distributed run, resumed after `step` optimizer steps.

    One input pipeline per worker reads its own share of `pairs` (every n-th pair, so no pair
    is read twice in an epoch) and hands one batch of `data.batch_tokens` to each local
    replica in turn; a step therefore takes as many batches from it as there are local
    replicas. `training_batches(pairs)` is the (repeated) dataset of batches of `pairs`.
    """

    def dataset_fn(context: tf.distribute.InputContext):
        share = pairs[context.input_pipeline_id :: context.num_input_pipelines]
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return training_batches(share).skip(step * local_replicas).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def chief_decision(strategy: tf.distribute.Strategy):
    """`decide(flag)`: the chief's `flag`, sent to every worker by an all-reduce.

    In a multi-worker run only the chief validates and keeps the training progress, so it alone
    decides when to stop; the others follow, so that all keep running the same collective ops.
    Every worker must call `decide` at the same point (it is also a barrier).
    """
    chief = strategy.extended.should_checkpoint

    @tf.function
    def total(value):
        local = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, local, axis=None)

    def decide(flag: bool) -> bool:
        return float(total(tf.constant(1.0 if flag and chief else 0.0))) > 0.0

    return decide


def weights_digest(model) -> str:
    """SHA-256 of the model's weights (workers of a run must agree on it)."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


# -- Keras workarounds ----------------------------------------------------------------------

# The private `keras.Model` methods `patch_distributed_fit` replaces, with the parameters Keras
# calls them with (checked by `check_keras_internals`; last seen in Keras 3.15).
PATCHED_METHODS = {
    "_symbolic_build": ("self", "iterator", "data_batch"),
    "_maybe_symbolic_build": ("self", "iterator", "data_batch"),
    "train_step": ("self", "data"),
}


def check_keras_internals() -> None:
    """Fails, naming the Keras version, if `patch_distributed_fit` no longer fits this Keras.

    Raises:
        RuntimeError: a method of `PATCHED_METHODS` is gone or takes other parameters, or
            `fit()` no longer builds through `_maybe_symbolic_build` (so replacing it would not
            stop what it works around).
    """
    problems = []
    for name, parameters in PATCHED_METHODS.items():
        method = getattr(keras.Model, name, None)
        if method is None:
            problems.append(f"keras.Model.{name} is gone")
        elif tuple(inspect.signature(method).parameters) != parameters:
            found = tuple(inspect.signature(method).parameters)
            problems.append(f"keras.Model.{name} takes {found}, not {parameters}")
    try:
        fit_source = inspect.getsource(keras.Model.fit)
    except (OSError, TypeError):
        fit_source = ""
    if "self._maybe_symbolic_build(" not in fit_source:
        problems.append("keras.Model.fit no longer calls self._maybe_symbolic_build")
    if problems:
        raise RuntimeError(
            f"Keras {keras.__version__} changed what translator.training.distribution patches "
            f"to train under tf.distribute: {'; '.join(problems)}. Revisit "
            "patch_distributed_fit (the Keras bugs it works around may be fixed)."
        )


def patch_distributed_fit(model, multi_worker: bool) -> None:
    """Works around two Keras 3 bugs of `fit()` under a `tf.distribute` strategy.

    Call it inside `strategy.scope()`, on a built and compiled model. It changes this model
    instance only.

    1. `fit()` pulls a batch and all-reduces it to build the compiled loss and metrics
       symbolically; that fails for dict inputs (keras-team/keras#20329) and for replicas whose
       batches differ in shape, as token-bucketed ones do. The model is built already, so its
       input signature is all the build needs: it is done here and `fit()`'s is skipped.
    2. Under `MultiWorkerMirroredStrategy` the per-step logs are averaged with
       `reduce("MEAN", axis=0)`, which fails on scalars (tensorflow/tensorflow#72388): each
       replica's are given a length-1 axis. (The epoch's logs, which the checkpoints record,
       come from the metrics themselves, summed over all replicas.)
    """
    check_keras_internals()
    ids = tf.TensorSpec([None, None], tf.int32)
    model._symbolic_build(data_batch=({"source_ids": ids, "target_in_ids": ids}, ids))

    def skip_symbolic_build(iterator=None, data_batch=None):
        return None

    model._maybe_symbolic_build = skip_symbolic_build
    if multi_worker:
        train_step = model.train_step

        def train_step_with_axis(data):
            return tf.nest.map_structure(lambda v: tf.reshape(v, [1]), train_step(data))

        model.train_step = train_step_with_axis


class WorkerBackup(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for a multi-worker run on a shared run directory.

    Every worker writes its backup (weights with the optimizer state, and the epoch) at the end
    of every chunk, as the Keras callback does, into `write_dir`: the chief's is the run's
    `backup/`, the other workers' go to their scratch directories, so all run the same code and
    only the chief writes into the run directory. The backup is deleted when training ends; one
    that exists at start-up marks an interrupted run, which every worker resumes from the
    chief's backup in `read_dir`.

    `train` restores it before building the data pipeline (where the data resumes depends on
    the restored step), so `on_train_begin` does nothing. The step is read from the optimizer
    state inside the weights file, so it matches the weights even if a worker died between
    writing them and the epoch file; with `double_checkpoint`, a torn weights file falls back
    to the previous backup.
    """

    # The weights files of `BackupAndRestore(double_checkpoint=True)`, newest first.
    FILES = ("latest.weights.h5", "latest.weights.h5.bkp")

    def __init__(self, read_dir: Path, write_dir: Path):
        super().__init__(str(write_dir), double_checkpoint=True)
        self.read_dir = Path(read_dir)
        self.write_dir = Path(write_dir)

    def exists(self) -> bool:
        return any((self.read_dir / name).is_file() for name in self.FILES)

    def restore(self, model) -> int:
        """Loads the newest readable backup into `model`; returns its optimizer step."""
        errors = []
        for name in self.FILES:
            path = self.read_dir / name
            if not path.is_file():
                continue
            if not name.endswith(".weights.h5"):  # Keras loads only files named *.weights.h5
                self.write_dir.mkdir(parents=True, exist_ok=True)
                path = Path(shutil.copy(path, self.write_dir / "previous.weights.h5"))
            try:
                model.load_weights(path)
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable backup %s (%s)", self.read_dir / name, e)
                errors.append(f"{name}: {e}")
                continue
            return int(model.optimizer.iterations.numpy())
        raise CheckpointError(
            f"no usable backup in {self.read_dir}:\n  "
            + "\n  ".join(errors)
            + "\nDelete it, then pass --resume to continue from the last checkpoint instead."
        )

    def on_train_begin(self, logs=None):
        pass  # restored by `train` before the data pipeline was built
