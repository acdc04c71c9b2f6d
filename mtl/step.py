"""The compiled train and eval steps.

Only this module's functions run inside `tf.function`; everything with Python side effects lives
in `mtl.trainer`. A batch is `(features, labels)` or `(features, labels, sample_weights)` with
`labels = {label_key: tensor}` and `sample_weights = {task_name: float [batch]}` (0 = no label).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from mtl.tasks import Task
from mtl.weighting import LossWeighting, StepContext


def unpack_batch(batch):
    """`(features, labels[, sample_weights])` -> (features, labels, sample_weights or {})."""
    if len(batch) == 2:
        features, labels = batch
        return features, labels, {}
    features, labels, sample_weights = batch
    return features, labels, sample_weights


def task_label_and_weight(task: Task, output: tf.Tensor, labels, sample_weights):
    """This task's label, shaped like its output, and its per-example weight [batch] float32.

    Where the weight is 0 the label is replaced by zeros, so that a placeholder value for a
    missing label (-1, NaN) can never turn into NaN (0 * NaN = NaN) or an invalid class id.
    """
    label = labels[task.label_key]
    if not task.sparse_labels and output.shape.rank is not None and label.shape.rank is not None \
            and label.shape.rank == output.shape.rank - 1:
        label = tf.expand_dims(label, -1)  # [batch] -> [batch, 1] to match a [batch, 1] output.
    batch_size = tf.shape(output)[0]
    if task.name in sample_weights:
        weight = tf.reshape(tf.cast(sample_weights[task.name], tf.float32), [batch_size])
        has_label = tf.reshape(weight > 0, [-1] + [1] * (label.shape.rank - 1))
        label = tf.where(has_label, label, tf.zeros_like(label))
    else:
        weight = tf.ones([batch_size], tf.float32)
    return label, weight


def compute_task_losses(tasks: Sequence[Task], outputs, labels, sample_weights) -> tf.Tensor:
    """Each task's share of its loss on this replica, [num_tasks] float32.

    Distribution semantics. Task t's loss is the weighted mean over the *global* batch:

        L_t = sum_{i in global batch} w_ti * l_ti  /  sum_{i in global batch} w_ti

    where w_ti is the example's sample weight (1 without sample weights, 0 for a missing label).
    The normaliser is summed across replicas with one all-reduce; each replica returns
    sum_{i on this replica} w_ti l_ti / normaliser. The replicas' shares add up to L_t, so their
    gradients, summed across replicas by the optimizer, are exactly the gradient of L_t, however
    the examples fall across replicas. Without sample weights the normaliser is the global batch
    size: this is `tf.nn.compute_average_loss`. A task with no labelled example in the global batch
    has normaliser 0 and contributes 0 (divide_no_nan), never NaN. On one device the all-reduce is
    the identity and the share is the loss itself.
    """
    numerators, normalisers = [], []
    for task in tasks:
        output = outputs[task.name]
        label, weight = task_label_and_weight(task, output, labels, sample_weights)
        per_example = task.per_example_loss(label, output)  # [local batch]
        per_example = tf.where(weight > 0, per_example, tf.zeros_like(per_example))
        numerators.append(tf.reduce_sum(weight * per_example))
        normalisers.append(tf.reduce_sum(weight))
    local_normalisers = tf.stack(normalisers)
    replica_context = tf.distribute.get_replica_context()
    global_normalisers = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_normalisers)
    return tf.math.divide_no_nan(tf.stack(numerators), global_normalisers)


def update_metrics(tasks: Sequence[Task], metrics: dict, outputs, labels, sample_weights,
                   loss_trackers: dict | None = None) -> None:
    """Updates each task's metrics with its labelled examples only (sample weight as weight)."""
    for task in tasks:
        output = outputs[task.name]
        label, weight = task_label_and_weight(task, output, labels, sample_weights)
        if loss_trackers is not None:
            per_example = task.per_example_loss(label, output)
            per_example = tf.where(weight > 0, per_example, tf.zeros_like(per_example))
            loss_trackers[task.name].update_state(per_example, sample_weight=weight)
        for metric in metrics[task.name]:
            metric.update_state(label, output, sample_weight=weight)


class StepFunctions:
    """Builds the compiled train loop and eval step for one model, task list and strategy."""

    def __init__(self, *, model: keras.Model, tasks: Sequence[Task], weighting: LossWeighting,
                 optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy,
                 variables: Sequence[tf.Variable], train_metrics: dict, eval_metrics: dict,
                 eval_losses: dict, step: tf.Variable):
        self.model = model
        self.tasks = tuple(tasks)
        self.weighting = weighting
        self.optimizer = optimizer
        self.strategy = strategy
        self.variables = list(variables)
        self.train_metrics = train_metrics
        self.eval_metrics = eval_metrics
        self.eval_losses = eval_losses
        self.step = step
        self.train_loop = tf.function(self._train_loop)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)

    def _replica_train_step(self, batch):
        features, labels, sample_weights = unpack_batch(batch)
        with tf.GradientTape() as tape:
            outputs = self.model(features, training=True)
            task_losses = compute_task_losses(self.tasks, outputs, labels, sample_weights)
            replica_context = tf.distribute.get_replica_context()
            context = StepContext(
                global_losses=replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                         tf.stop_gradient(task_losses)),
                num_replicas=self.strategy.num_replicas_in_sync)
            total = self.weighting.combine(task_losses, context)
            if self.model.losses:
                # Regularisers are not per-example: divide by the replica count so that the
                # cross-replica gradient sum counts them once.
                total += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
        # One backward pass: a shared variable's gradient is the sum over every head using it.
        gradients = tape.gradient(total, self.variables)
        pairs = [(g, v) for g, v in zip(gradients, self.variables) if g is not None]
        # Keras 3 sums the per-replica gradients across replicas inside apply_gradients.
        self.optimizer.apply_gradients(pairs)
        update_metrics(self.tasks, self.train_metrics, outputs, labels, sample_weights)
        num_examples = tf.cast(tf.shape(tf.nest.flatten(features)[0])[0], tf.float32)
        # One vector, so the loop needs one cross-replica reduction per step.
        return tf.concat([task_losses, [total, num_examples]], axis=0)

    def _train_loop(self, iterator, num_steps: tf.Tensor):
        """Runs `num_steps` train steps in one call; returns the mean task losses, total loss and
        the number of examples seen (all summed over replicas)."""
        num_tasks = len(self.tasks)
        sums = tf.zeros([num_tasks + 2], tf.float32)  # task losses, total loss, examples
        for _ in tf.range(num_steps):
            per_replica = self.strategy.run(self._replica_train_step, args=(next(iterator),))
            sums += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            self.step.assign_add(1)
        steps = tf.cast(tf.maximum(num_steps, 1), tf.float32)
        return sums[:num_tasks] / steps, sums[num_tasks] / steps, sums[num_tasks + 1]

    def _replica_eval_step(self, batch):
        features, labels, sample_weights = unpack_batch(batch)
        outputs = self.model(features, training=False)
        update_metrics(self.tasks, self.eval_metrics, outputs, labels, sample_weights,
                       loss_trackers=self.eval_losses)

    def _eval_step(self, batch):
        self.strategy.run(self._replica_eval_step, args=(batch,))
