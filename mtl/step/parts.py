"""The small parts every gradient source is built from: how the model runs in a train step
(`Forward`), where micro-batches' gradients add up (the accumulators), what an update reports
besides its gradients (`UpdateStats`), and the layer state a forward pass advances.

`UpdateStats` holds tensors inside the compiled step and NumPy values after `numpy()` (the outer
loop's logs read the same names). Inside a micro-batch it travels as one vector [T + 3]
(`packed`), so that one all-reduce sums every statistic over the replicas.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtl.model import seed_states
from mtl.tasks import Task


# --------------------------------------------------------------------------- tensor helpers
def all_finite(tensors) -> tf.Tensor:
    tensors = [t for t in tf.nest.flatten(tensors) if t is not None]
    if not tensors:
        return tf.constant(True)
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def sum_over_replicas(strategy, value):
    """A per-replica value summed over the replicas (cross-replica context)."""
    return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def zeros_for_none(gradients, variables) -> list:
    """Each gradient as float32, zeros for a variable no loss reaches (None)."""
    return [tf.zeros_like(v) if g is None else tf.cast(g, tf.float32)
            for g, v in zip(gradients, variables)]


# ------------------------------------------------------------------------------ statistics
class UpdateStats(NamedTuple):
    """What an update reports besides its gradients, summed over its micro-batches and
    replicas (or, as the train loop returns them, over the applied updates).

    Attributes:
      task_losses: [T], each task's loss (the sum of its shares: the mean over the labelled
        examples of the whole update batch).
      regularisation: [], the regularisation loss (`model.losses`).
      examples: [], the examples read.
      bad_gradient: [], > 0 when a replica's gradients (or what the method computed from them)
        held a NaN or inf.
    """

    task_losses: Any
    regularisation: Any
    examples: Any
    bad_gradient: Any

    @classmethod
    def zeros(cls, num_tasks: int) -> "UpdateStats":
        return cls(tf.zeros([num_tasks]), tf.zeros([]), tf.zeros([]), tf.zeros([]))

    def packed(self) -> tf.Tensor:
        """One vector [T + 3]: the task losses, the regularisation, the examples, the bad-gradient
        flag; one all-reduce sums them all."""
        return tf.concat([self.task_losses, [self.regularisation, self.examples,
                                             self.bad_gradient]], axis=0)

    @classmethod
    def unpacked(cls, vector: tf.Tensor, num_tasks: int) -> "UpdateStats":
        """The statistics of a `packed` vector."""
        return cls(vector[:num_tasks], vector[num_tasks], vector[num_tasks + 1],
                   vector[num_tasks + 2])

    def where(self, condition) -> "UpdateStats":
        """These statistics where `condition` holds, zeros elsewhere."""
        return UpdateStats(*(tf.where(condition, v, tf.zeros_like(v)) for v in self))

    def plus(self, other: "UpdateStats") -> "UpdateStats":
        return UpdateStats(*(a + b for a, b in zip(self, other)))

    def numpy(self) -> "UpdateStats":
        """The same statistics as NumPy values (outside the compiled step)."""
        return UpdateStats(*(v.numpy() for v in self))

    def mean(self, count: int) -> "UpdateStats":
        """NumPy statistics divided by `count` (NaN when it is 0)."""
        if not count:
            return UpdateStats(*(np.full_like(v, np.nan) for v in self))
        return UpdateStats(*(v / count for v in self))


# --------------------------------------------------------------------------------- forward
class Forward:
    """How the model runs in a train step: returns ({task: output}, shared features or None).

    The whole Functional model, or (when the shared features are needed, or the backbone is
    frozen) the backbone and then each head, the same layer objects the model runs. A frozen
    backbone runs in inference mode (Dropout off, BatchNorm on its moving statistics); the
    heads in training mode.
    """

    def __init__(self, model, tasks: Sequence[Task], *, need_features: bool):
        backbone = getattr(model, "backbone", None)
        self.model = model
        self.task_names = [t.name for t in tasks]
        self.backbone_frozen = backbone is not None and not backbone.trainable_weights
        self.split = backbone is not None and (need_features or self.backbone_frozen)

    @property
    def feature_shape(self) -> tuple:
        """The shared features' shape without the batch axis."""
        return tuple(int(d) for d in self.model.backbone.output.shape[1:])

    def __call__(self, features):
        if not self.split:
            return self.model(features, training=True), None
        shared = self.model.backbone(features, training=not self.backbone_frozen)
        heads = self.model.heads
        return {name: heads[name](shared, training=True) for name in self.task_names}, shared

    def regularisation(self):
        """The sum of the model's regularisation losses (None when it has none)."""
        losses = self.model.losses
        return tf.add_n([tf.cast(l, tf.float32) for l in losses]) if losses else None


# ---------------------------------------------------------------------------- accumulators
class PassThrough:
    """K = 1: the one micro-batch's per-replica gradients are the update's."""

    def __init__(self, strategy):
        self.strategy = strategy
        self._value = None

    def reset(self) -> None:
        self._value = None

    def add(self, per_replica) -> None:
        self._value = per_replica

    def local(self):
        """Per-replica values (to pass into `strategy.run`)."""
        return self._value

    def total_of(self, index: int):
        """Part `index` summed over replicas (cross-replica context)."""
        return sum_over_replicas(self.strategy, self._value[index])


class Summed:
    """K > 1: per-replica sums over the micro-batches, in ON_READ variables (each replica adds
    its own gradients; reading in the cross-replica context sums the replicas)."""

    def __init__(self, strategy, shapes: Sequence[Sequence[int]], dtypes=None):
        self.strategy = strategy
        dtypes = dtypes or [tf.float32] * len(shapes)
        with strategy.scope():
            self.variables = [
                tf.Variable(tf.zeros(shape, dtype), trainable=False,
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.SUM)
                for shape, dtype in zip(shapes, dtypes)]

    def reset(self) -> None:
        self.strategy.run(lambda: [v.assign(tf.zeros_like(v)) for v in self.variables])

    def add(self, per_replica) -> None:
        def add_local(values):
            for variable, value in zip(self.variables, values):
                variable.assign_add(tf.cast(value, variable.dtype))
        self.strategy.run(add_local, args=(per_replica,))

    def local(self):
        return self.strategy.run(lambda: [v.read_value() for v in self.variables])

    def total_of(self, index: int):
        return self.variables[index].read_value()


def accumulator(strategy, shapes, micro_batches: int, dtypes=None):
    return PassThrough(strategy) if micro_batches == 1 else Summed(strategy, shapes, dtypes)


# ----------------------------------------------------------------------------- layer state
def unique_variables(variables) -> list:
    """`variables` without repeats (by identity), in order."""
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def layer_state(model: keras.Model) -> list:
    """Non-trainable layer state that a forward pass in training mode advances: BatchNorm's
    moving statistics and the RNG state of Dropout-like layers (`SeedGenerator`s)."""
    return unique_variables(list(model.non_trainable_variables) + seed_states(model))
