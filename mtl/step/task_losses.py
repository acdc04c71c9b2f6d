"""Task losses and metrics of a batch: the per-example reduction every step shares.

A batch is `(features, labels)` or `(features, labels, sample_weights)` with
`labels = {label_key: tensor}` and `sample_weights = {task_name: float [batch]}` (0 = no label).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.tasks import Task


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


def per_example_task_loss(task: Task, label: tf.Tensor, output: tf.Tensor) -> tf.Tensor:
    """`task.per_example_loss`, [batch] float32, where a class id out of range gives NaN.

    A sparse task's class ids must lie in [0, num_classes) (num_classes: the output's last
    axis), or equal the loss's `ignore_class`. The values of the first batch are checked before
    training (`mtl.training.validation.check_first_batch`); an id that comes later would make
    TensorFlow's sparse cross-entropy fail on CPU with a bare `InvalidArgumentError` naming no
    task (on GPU it gives NaN). Here such an id is read as class 0 and that example's loss set
    to NaN, so the task's loss is NaN and the step's non-finite guard acts as on any non-finite
    loss: the update is not applied and `Trainer.fit` stops with "non-finite loss in task(s)
    [<task>]" (with `on_nonfinite="skip"`, the update is dropped and counted instead). This
    costs a few element-wise ops on the labels: no assert op, no host round trip, and it works
    the same under XLA (which drops assert ops) and on every device. Call it with the label of
    `task_label_and_weight`, whose unlabelled examples (weight 0) hold 0: a placeholder such as
    -1 there is never read.
    """
    if not task.sparse_labels:
        return task.per_example_loss(label, output)
    num_classes = output.shape[-1] if output.shape[-1] is not None else tf.shape(output)[-1]
    ids = tf.cast(label, tf.int64)
    out_of_range = (ids < 0) | (ids >= tf.cast(num_classes, tf.int64))
    if task.ignored_class_id is not None:
        out_of_range &= ids != int(task.ignored_class_id)
    per_example = task.per_example_loss(tf.where(out_of_range, tf.zeros_like(label), label),
                                         output)
    bad_example = tf.reduce_any(tf.reshape(out_of_range, [tf.shape(out_of_range)[0], -1]),
                                axis=1)  # [batch]
    return tf.where(bad_example, tf.constant(float("nan"), per_example.dtype), per_example)


def local_normalisers(tasks: Sequence[Task], labels, sample_weights, batch_size) -> tf.Tensor:
    """This replica's sum of each task's sample weights, [num_tasks] float32."""
    sums = []
    for task in tasks:
        if task.name in sample_weights:
            sums.append(tf.reduce_sum(tf.cast(sample_weights[task.name], tf.float32)))
        else:
            sums.append(tf.cast(batch_size, tf.float32))
    return tf.stack(sums)


def compute_task_losses(tasks: Sequence[Task], outputs, labels, sample_weights,
                        global_normalisers: tf.Tensor | None = None) -> tf.Tensor:
    """Each task's share of its loss on this replica, [num_tasks] float32.

    Distribution semantics. Task t's loss is the weighted mean over the *global* batch:

        L_t = sum_{i in global batch} w_ti * l_ti  /  sum_{i in global batch} w_ti

    where w_ti is the example's sample weight (1 without sample weights, 0 for a missing label).
    The normaliser is summed across replicas (passed in as `global_normalisers`, or all-reduced
    here when None); each replica returns sum_{i on this replica} w_ti l_ti / normaliser. The
    replicas' shares add up to L_t, so their gradients, summed across replicas by the optimizer,
    are exactly the gradient of L_t, however the examples fall across replicas. Without sample
    weights the normaliser is the global batch size: this is `tf.nn.compute_average_loss`. A task
    with no labelled example in the global batch has normaliser 0 and contributes 0
    (divide_no_nan), never NaN. On one device the share is the loss itself. A labelled class id
    outside [0, num_classes) makes the task's share NaN (`per_example_task_loss`), which the
    step's non-finite guard reports by the task's name.
    """
    numerators, normalisers = [], []
    for task in tasks:
        output = outputs[task.name]
        label, weight = task_label_and_weight(task, output, labels, sample_weights)
        per_example = per_example_task_loss(task, label, output)  # [local batch]
        per_example = tf.where(weight > 0, per_example, tf.zeros_like(per_example))
        numerators.append(tf.reduce_sum(weight * per_example))
        normalisers.append(tf.reduce_sum(weight))
    if global_normalisers is None:
        global_normalisers = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.stack(normalisers))
    return tf.math.divide_no_nan(tf.stack(numerators), global_normalisers)


def update_metrics(tasks: Sequence[Task], metrics: dict, outputs, labels, sample_weights,
                   loss_trackers: dict | None = None) -> None:
    """Updates each task's metrics with its labelled examples only (sample weight as weight).
    A labelled class id out of range makes the task's tracked loss NaN (`per_example_task_loss`)
    rather than an error."""
    for task in tasks:
        output = outputs[task.name]
        label, weight = task_label_and_weight(task, output, labels, sample_weights)
        if loss_trackers is not None:
            per_example = per_example_task_loss(task, label, output)
            per_example = tf.where(weight > 0, per_example, tf.zeros_like(per_example))
            loss_trackers[task.name].update_state(per_example, sample_weight=weight)
        for metric in metrics[task.name]:
            metric.update_state(label, output, sample_weight=weight)
