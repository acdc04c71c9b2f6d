"""The interface every task-weighting method implements.

The train step calls a method without knowing which one runs:

  * a loss-based method (`LossWeighting`) turns the vector of task losses into one scalar, and one
    backward pass follows;

Methods are `tf.Module`s: every variable a method keeps across steps is an attribute, so it is
saved in the trainer's checkpoint and a resumed run continues with the same state. `build` is
called once, under the strategy scope, before the first step.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import tensorflow as tf


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


class LossWeighting(Weighting):
    """A method that combines task losses into one scalar before a single backward pass."""

    def combine(self, losses: tf.Tensor) -> tf.Tensor:
        """Total loss from task losses.

        Args:
          losses: [num_tasks] float32, this replica's share of each task loss (the shares of all
            replicas sum to the task's mean over the global batch; on one device, the mean).
        Returns:
          A scalar whose gradient, summed across replicas, is the update direction.
        """
        raise NotImplementedError

    def weights(self) -> tf.Tensor:
        """The weight each task's loss currently gets, [num_tasks] (for summaries)."""
        return self.task_weights
