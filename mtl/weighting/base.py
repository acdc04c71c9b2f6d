"""The interface every task-weighting method implements.

The train step calls a method without knowing which one runs. Two families:

  * `LossWeighting`: turns the task losses into one scalar; one backward pass follows.
  * `GradientWeighting`: combines per-task gradients of the shared variables (a Jacobian
    `[num_tasks, num_params]`, or only its Gramian `J J^T` when that suffices) into one update
    direction `[num_params]`. Heads' own variables always get their task's plain gradient.

Methods are `tf.Module`s: every variable a method keeps across steps is an attribute, so it is
saved in the trainer's checkpoint and a resumed run continues with the same state. `build` is
called once, under the strategy scope, before the first step.

Distribution. Under a multi-replica strategy the step calls a method in the *replica* context,
with inputs that are the same on every replica (all-reduced before the call), so every replica
computes the same weights. State variables are created with
`aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA` so that assigning them in the replica
context is allowed. Random methods draw with stateless ops seeded from their own step counter, so
all replicas draw the same numbers and a resumed run draws what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the step tells a method besides the losses.

    Attributes:
      global_losses: [num_tasks] float32, each task's loss over the global batch (the same on
        every replica).
      num_replicas: replicas in sync; a term added to the total loss that is not a task loss
        share must be divided by it (the replicas' gradients are summed).
    """

    global_losses: tf.Tensor
    num_replicas: int = 1


class Weighting(tf.Module):
    """Base class of all weighting methods."""

    #: Registry name, e.g. "equal".
    name: str = ""

    def __init__(self):
        super().__init__(name=type(self).__name__)
        self.task_names: tuple[str, ...] = ()
        self._task_weights = None

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        """Creates the method's state for these tasks. Called under the strategy scope."""
        self.task_names = tuple(task_names)
        self._task_weights = tf.constant(list(task_weights), tf.float32)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def task_weights(self) -> tf.Tensor:
        """The tasks' fixed weights (`Task.weight`), shape [num_tasks]."""
        if self._task_weights is None:
            raise RuntimeError(f"Weighting {self.name!r} used before build().")
        return self._task_weights

    @classmethod
    def options(cls) -> list[str]:
        """Names of the options the constructor takes."""
        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p != "self"]

    def weights(self) -> tf.Tensor:
        """The weight each task currently gets, [num_tasks] (for summaries)."""
        return self.task_weights


class LossWeighting(Weighting):
    """A method that combines task losses into one scalar before a single backward pass."""

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        """Total loss from task losses.

        Args:
          losses: [num_tasks] float32, this replica's share of each task loss (the shares of all
            replicas sum to the task's mean over the global batch; on one device, the mean).
          context: global losses and replica count, for methods whose weights depend on them.
        Returns:
          A scalar whose gradient, summed across replicas, is the update direction.
        """
        raise NotImplementedError


class GradientWeighting(Weighting):
    """A method that combines per-task gradients of the shared variables.

    Subclasses implement `aggregate`, or, when only inner products of task gradients matter,
    `weights_from_gramian` (then `uses_gramian = True`, and the step may pass the Gramian alone).
    """

    #: True when the method can run on gradients w.r.t. the shared representation ("rep" mode).
    supports_rep: bool = True
    #: True when `weights_from_gramian` defines the method (the direction is `w @ J`).
    uses_gramian: bool = False

    def weights_from_gramian(self, gramian: tf.Tensor) -> tf.Tensor:
        """[num_tasks, num_tasks] Gramian J J^T -> [num_tasks] weights of the task gradients."""
        raise NotImplementedError

    def aggregate(self, jacobian: tf.Tensor) -> tf.Tensor:
        """[num_tasks, num_params] per-task gradients -> [num_params] update direction."""
        if not self.uses_gramian:
            raise NotImplementedError
        jacobian = tf.convert_to_tensor(jacobian, tf.float32)
        w = self.weights_from_gramian(tf.matmul(jacobian, jacobian, transpose_b=True))
        return tf.linalg.matvec(jacobian, w, transpose_a=True)
