"""What training optimizes and reports: the masked loss, token metrics, the learning-rate schedule."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from translator.tokenizer import PAD_ID


@keras.saving.register_keras_serializable(package="translator")
class MaskedCrossEntropy(keras.losses.Loss):
    """Label-smoothed cross-entropy averaged over real (non-PAD) target tokens.

    `loss = -(1 - eps) log p(y) - eps/V sum_v log p(v)`, computed in float32 from logits, summed
    over tokens whose label is not PAD and divided by their count (a per-token mean, so long and
    short batches weigh each token alike). Under a `tf.distribute` strategy with N replicas each
    replica's mean is also divided by N, as Keras' own reductions do: the gradients, summed over
    the replicas, are then those of the mean over replicas.
    """

    def __init__(self, label_smoothing=0.0, pad_id=PAD_ID, name="masked_cross_entropy", **kwargs):
        super().__init__(name=name, reduction=None, **kwargs)
        self.label_smoothing = label_smoothing
        self.pad_id = pad_id

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.int32)
        log_probs = tf.nn.log_softmax(tf.cast(y_pred, tf.float32), axis=-1)  # (B, T, V)
        nll = -tf.gather(log_probs, y_true, batch_dims=2)  # (B, T)
        if self.label_smoothing:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * tf.reduce_mean(
                log_probs, axis=-1
            )
        mask = tf.cast(tf.not_equal(y_true, self.pad_id), tf.float32)
        loss = tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # `reduction=None` skips Keras' scaling for distribution (which fit() undoes for the logs).
        return loss / replicas if replicas > 1 else loss

    def get_config(self):
        return {"label_smoothing": self.label_smoothing, "pad_id": self.pad_id, "name": self.name}


class _TargetTokenMetric(keras.metrics.Metric):
    """A metric over the real (non-PAD) tokens of the target; `pad_id` is its one setting."""

    def __init__(self, pad_id, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id

    def real_tokens(self, y_true):
        """1.0 where `y_true` is a real token, 0.0 on padding; shaped like `y_true`."""
        return tf.cast(tf.not_equal(y_true, self.pad_id), tf.float32)

    def get_config(self):
        return {"pad_id": self.pad_id, "name": self.name}


@keras.saving.register_keras_serializable(package="translator")
class TokenAccuracy(_TargetTokenMetric):
    """Accuracy of the argmax prediction over real (non-PAD) target tokens."""

    def __init__(self, pad_id=PAD_ID, name="token_accuracy", **kwargs):
        super().__init__(pad_id=pad_id, name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true, tf.int32)
        mask = self.real_tokens(y_true)
        hit = tf.cast(tf.equal(tf.argmax(y_pred, -1, output_type=tf.int32), y_true), tf.float32)
        self.correct.assign_add(tf.reduce_sum(hit * mask))
        self.total.assign_add(tf.reduce_sum(mask))

    def result(self):
        return self.correct / tf.maximum(self.total, 1.0)


@keras.saving.register_keras_serializable(package="translator")
class TargetTokens(_TargetTokenMetric):
    """Counts real target tokens since the last reset (for tokens/s)."""

    def __init__(self, pad_id=PAD_ID, name="target_tokens", **kwargs):
        super().__init__(pad_id=pad_id, name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.count.assign_add(tf.reduce_sum(self.real_tokens(y_true)))

    def result(self):
        return self.count


@keras.saving.register_keras_serializable(package="translator")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then inverse-square-root, cosine or no decay.

    A function of the optimizer step alone, so a resumed run (whose optimizer `iterations` is
    restored) continues on exactly the same curve.
    """

    def __init__(self, peak, warmup_steps, decay="inverse_sqrt", total_steps=0, minimum=0.0):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.total_steps = int(total_steps)
        self.minimum = float(minimum)

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        warmup = float(max(self.warmup_steps, 1))
        rate = self.peak * tf.minimum(1.0, step / warmup)
        if self.decay == "inverse_sqrt":
            rate = rate * tf.minimum(1.0, tf.math.rsqrt(step / warmup))
        elif self.decay == "cosine" and self.total_steps > self.warmup_steps:
            progress = tf.clip_by_value(
                (step - warmup) / float(self.total_steps - self.warmup_steps), 0.0, 1.0
            )
            cosine = self.minimum + 0.5 * (self.peak - self.minimum) * (
                1.0 + tf.cos(math.pi * progress)
            )
            rate = tf.where(step < warmup, rate, cosine)
        return tf.maximum(rate, self.minimum)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "total_steps": self.total_steps,
            "minimum": self.minimum,
        }
