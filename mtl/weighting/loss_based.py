"""Loss-based weighting methods: one weighted sum of task losses, one backward pass."""

from __future__ import annotations

import tensorflow as tf

from mtl.weighting.base import LossWeighting, StepContext


class Equal(LossWeighting):
    """The sum of the tasks' losses, each times its fixed `Task.weight` (Keras `loss_weights`).

    Linear in the losses, so combining each replica's share and summing the gradients across
    replicas gives exactly the single-device gradient of the global batch.
    """

    name = "equal"

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        del context
        return tf.reduce_sum(self.task_weights * losses)
