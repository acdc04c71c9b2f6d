"""Whether an update is applied: the finite check, float16 loss scaling, skip or stop.

Decided once per update in the cross-replica context, from flags summed over every replica and
micro-batch (Keras 3's `LossScaleOptimizer` checks only the first replica's gradients, so an
overflow on another replica would write inf into the weights).

  * A non-finite task loss is a real non-finite: the `on_nonfinite` policy applies.
  * A non-finite gradient with finite losses is a float16 overflow while the loss scale can
    still shrink: the update is skipped and the scale halved. At the minimum scale (1), or
    without loss scaling, it is a real non-finite too.
  * Policy "stop": the loop ends before the update (the trainer raises `NonFiniteError`);
    "skip": the update is dropped and counted in `skipped_steps`.

A dropped update changes nothing: the step restores the method's state and leaves the train
metrics and logged means alone.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from mtl.errors import check_choice
from mtl.options import ON_NONFINITE


class LossScale(tf.Module):
    """Dynamic loss scaling for float16: the scale starts at 2^15, halves on an overflow (down
    to `MIN_SCALE`) and doubles after `growth_interval` applied updates in a row."""

    MIN_SCALE = 1.0

    def __init__(self, initial_scale: float = 2.0 ** 15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.growth_interval = growth_interval

    def can_shrink(self) -> tf.Tensor:
        return self.scale > self.MIN_SCALE

    def update(self, overflow: tf.Tensor, applied: tf.Tensor) -> None:
        """Called once per update in the cross-replica context."""
        if overflow:
            self.scale.assign(tf.maximum(self.scale / 2.0, self.MIN_SCALE))
            self.good_steps.assign(0)
        elif applied:
            self.good_steps.assign_add(1)
            if self.good_steps >= self.growth_interval:
                self.scale.assign(self.scale * 2.0)
                self.good_steps.assign(0)


@dataclasses.dataclass
class Verdict:
    apply: tf.Tensor     # bool: apply the update
    stop: tf.Tensor      # bool: end the loop before it (policy "stop")
    overflow: tf.Tensor  # bool: a float16 overflow (skipped, scale halved)


class UpdatePolicy:
    """Judges each update from its losses' and gradients' finiteness."""

    def __init__(self, on_nonfinite: str, loss_scale: LossScale | None):
        check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        self.on_nonfinite = on_nonfinite
        self.loss_scale = loss_scale

    def scale(self) -> tf.Tensor:
        """The loss scale for this update (1 without float16)."""
        if self.loss_scale is None:
            return tf.constant(1.0)
        return tf.identity(self.loss_scale.scale)

    def judge(self, losses_finite: tf.Tensor, gradients_finite: tf.Tensor) -> Verdict:
        if self.loss_scale is not None:
            overflow = (losses_finite & tf.logical_not(gradients_finite)
                        & self.loss_scale.can_shrink())
        else:
            overflow = tf.constant(False)
        bad = tf.logical_not(losses_finite & gradients_finite) & tf.logical_not(overflow)
        stop = bad if self.on_nonfinite == "stop" else tf.constant(False)
        apply = tf.logical_not(bad | overflow)
        return Verdict(apply=apply, stop=stop, overflow=overflow)

    def after(self, verdict: Verdict) -> None:
        """Updates the loss scale once the update was applied or dropped."""
        if self.loss_scale is not None:
            self.loss_scale.update(verdict.overflow, verdict.apply)
