"""The compiled train and eval steps.

Only this module's functions run inside `tf.function`; everything with Python side effects lives
in `mtl.trainer`. A batch is `(features, labels)` or `(features, labels, sample_weights)` with
`labels = {label_key: tensor}` and `sample_weights = {task_name: float [batch]}` (0 = no label).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from mtl.tasks import Task
from mtl.weighting import GradientWeighting, StepContext


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
    (divide_no_nan), never NaN. On one device the share is the loss itself.
    """
    numerators, normalisers = [], []
    for task in tasks:
        output = outputs[task.name]
        label, weight = task_label_and_weight(task, output, labels, sample_weights)
        per_example = task.per_example_loss(label, output)  # [local batch]
        per_example = tf.where(weight > 0, per_example, tf.zeros_like(per_example))
        numerators.append(tf.reduce_sum(weight * per_example))
        normalisers.append(tf.reduce_sum(weight))
    if global_normalisers is None:
        global_normalisers = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.stack(normalisers))
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


class LossScale(tf.Module):
    """Dynamic loss scaling for float16 training, decided by all replicas together.

    Like Keras's `LossScaleOptimizer` (scale starts at 2^15, halves on a non-finite gradient and
    the step is skipped, doubles after `growth_interval` finite steps), but the overflow check
    covers every replica: Keras 3 checks only the first replica's gradients, so an overflow on
    another replica would write inf into the weights.
    """

    def __init__(self, initial_scale: float = 2.0 ** 15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False, name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.growth_interval = growth_interval

    def update(self, finite: tf.Tensor) -> None:
        """Called once per step in the cross-replica context."""
        if finite:
            self.good_steps.assign_add(1)
            if self.good_steps >= self.growth_interval:
                self.scale.assign(self.scale * 2.0)
                self.good_steps.assign(0)
        else:
            self.scale.assign(tf.maximum(self.scale / 2.0, 1.0))
            self.good_steps.assign(0)


def flatten_gradients(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """[g_1, ..., g_n] (each [num_tasks, *shape_i]) -> [num_tasks, num_params]."""
    num_tasks = tf.shape(gradients[0])[0]
    return tf.concat([tf.reshape(g, [num_tasks, -1]) for g in gradients], axis=1)


def unflatten(direction: tf.Tensor, variables: Sequence[tf.Variable]) -> list[tf.Tensor]:
    """[num_params] -> one tensor per variable, in the variables' shapes."""
    sizes = [int(np.prod(v.shape)) for v in variables]
    return [tf.reshape(part, v.shape) for part, v in zip(tf.split(direction, sizes), variables)]


# Layout of the per-step statistics vector returned by every replica (summed across replicas):
# [task losses (num_tasks), total loss, examples, non-finite loss flag, non-finite gradient flag]
_TOTAL, _EXAMPLES, _BAD_LOSS, _BAD_GRAD = range(4)


class StepFunctions:
    """Builds the compiled train loop and eval step for one model, task list and strategy.

    A train step is split in two functions run with `strategy.run`, with a decision in the
    cross-replica context between them:

      1. `_replica_compute` (forward + backward; the part `jit_compile` compiles with XLA):
         per-replica gradients, this replica's share of each task loss, finite-ness flags, and
         for gradient-based weighting the per-task gradients of the shared variables.
      2. In the cross-replica context: the statistics are summed across replicas; if anything is
         non-finite the update is skipped on *every* replica (or the loop stops, by policy); a
         gradient-based method combines the all-reduced per-task gradients.
      3. `_replica_apply`: one `optimizer.apply_gradients` (Keras 3 sums the replicas'
         gradients). With gradient accumulation, step 1 runs K times into accumulators first.
    """

    def __init__(self, *, model: keras.Model, tasks: Sequence[Task], weighting,
                 optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy,
                 variables: Sequence[tf.Variable], train_metrics: dict, eval_metrics: dict,
                 eval_losses: dict, step: tf.Variable, shared_variables=(),
                 grad_accum_steps: int = 1, jit_compile: bool = False,
                 loss_scale: LossScale | None = None, on_nonfinite: str = "stop",
                 skipped_steps: tf.Variable | None = None, gradient_mode: str = "exact",
                 backbone_optimizer=None, backbone_ids=frozenset()):
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
        self.grad_accum_steps = grad_accum_steps
        self.loss_scale = loss_scale
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = skipped_steps
        self.gradient_mode = gradient_mode
        self.backbone_optimizer = backbone_optimizer
        self.backbone_ids = set(backbone_ids)
        self.task_weights = tf.constant([t.weight for t in self.tasks], tf.float32)
        self.is_gradient_method = isinstance(weighting, GradientWeighting)
        shared_ids = {id(v) for v in shared_variables}
        self.shared_variables = [v for v in self.variables if id(v) in shared_ids]
        self.jacobian_mode = self.is_gradient_method and gradient_mode == "exact"
        self.rep_mode = self.is_gradient_method and gradient_mode == "rep"
        # Gradients w.r.t. the shared variables come from the method in exact mode: the plain
        # backward pass then only needs the other variables.
        self.plain_variables = ([v for v in self.variables if id(v) not in shared_ids]
                                if self.jacobian_mode else self.variables)
        self._connected = None  # Which plain variables got a gradient (set when traced).
        self.accumulators = []
        self.jacobian_accumulator = None
        if grad_accum_steps > 1:
            with strategy.scope():
                # ON_READ + SUM: each replica adds its local gradients; reading in the
                # cross-replica context sums the replicas.
                self.accumulators = [
                    tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.SUM)
                    for v in self.plain_variables]
                if self.jacobian_mode:
                    size = sum(int(np.prod(v.shape)) for v in self.shared_variables)
                    self.jacobian_accumulator = tf.Variable(
                        tf.zeros([len(self.tasks), size]), trainable=False,
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.SUM)
        compute = self._replica_compute
        self._compute = tf.function(compute, jit_compile=True) if jit_compile else compute
        self.train_loop = tf.function(self._train_loop)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)
        self.diagnostics = tf.function(self._diagnostics, reduce_retracing=True)

    # ------------------------------------------------------------------------ replica side
    def _replica_normalisers(self, batch):
        features, labels, sample_weights = unpack_batch(batch)
        batch_size = tf.shape(tf.nest.flatten(features)[0])[0]
        return local_normalisers(self.tasks, labels, sample_weights, batch_size)

    def _replica_compute(self, batch, normalisers, scale):
        """Forward and backward on this replica's batch.

        Returns (plain gradients, per-task shared-variable gradients [T, P] or a [T, T]
        Gramian or a dummy, outputs, stats [T + 4]).
        """
        features, labels, sample_weights = unpack_batch(batch)
        needs_global = (getattr(self.weighting, "needs_global_losses", False)
                        and self.strategy.num_replicas_in_sync > 1)
        with tf.GradientTape(persistent=self.is_gradient_method) as tape:
            if self.rep_mode:
                # Backbone and heads called apart (the same layers the Functional model runs),
                # to differentiate the task losses w.r.t. the shared features.
                shared_features = self.model.backbone(features, training=True)
                outputs = {t.name: self.model.heads[t.name](shared_features, training=True)
                           for t in self.tasks}
            else:
                outputs = self.model(features, training=True)
            task_losses = compute_task_losses(self.tasks, outputs, labels, sample_weights,
                                              global_normalisers=normalisers)
            replica_context = tf.distribute.get_replica_context()
            global_losses = (replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                        tf.stop_gradient(task_losses))
                             if needs_global else tf.stop_gradient(task_losses))
            context = StepContext(global_losses=global_losses,
                                  num_replicas=self.strategy.num_replicas_in_sync)
            if self.is_gradient_method:
                weighted = self.task_weights * task_losses  # rows of the Jacobian
                scaled_rows = weighted * scale  # (on the tape, so the Jacobian sees it)
                total = tf.reduce_sum(weighted)
            else:
                total = self.weighting.combine(task_losses, context)
            if self.model.losses:
                # Regularisers are not per-example: divide by the replica count (and by the
                # micro-batches accumulated) so that the summed gradients count them once.
                total += tf.nn.scale_regularization_loss(
                    tf.add_n(self.model.losses)) / float(self.grad_accum_steps)
            # Loss scaling (float16) acts on the scalar that is differentiated.
            scaled = total * scale
        per_task = tf.zeros([0])
        if self.jacobian_mode:
            # One batched Jacobian (pfor) for all tasks, not T separate backward passes.
            jacobian = tape.jacobian(scaled_rows, self.shared_variables,
                                     experimental_use_pfor=True)
            per_task = flatten_gradients(jacobian) / scale
        if self.rep_mode:
            gradients = self._rep_mode_gradients(tape, scaled, scaled_rows, shared_features,
                                                 task_losses, context, scale)
        else:
            gradients = tape.gradient(scaled, self.plain_variables)
        if self._connected is None:
            self._connected = [g is not None for g in gradients]
        gradients = [tf.zeros_like(v) if g is None else g / scale
                     for g, v in zip(gradients, self.plain_variables)]
        del tape
        bad_grad = tf.logical_not(tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
            + [tf.reduce_all(tf.math.is_finite(per_task))]))
        bad_loss = tf.logical_not(tf.reduce_all(tf.math.is_finite(task_losses)))
        num_examples = tf.cast(tf.shape(tf.nest.flatten(features)[0])[0], tf.float32)
        stats = tf.concat([task_losses, [total, num_examples, tf.cast(bad_loss, tf.float32),
                                         tf.cast(bad_grad, tf.float32)]], axis=0)
        return gradients, per_task, outputs, stats

    def _rep_mode_gradients(self, tape, scaled, scaled_rows, shared_features, task_losses,
                            context, scale):
        """Gradients in "rep" mode (MGDA-UB style): the method weighs the tasks from the Gramian
        of their gradients w.r.t. the shared features; the shared variables get the gradient of
        the weighted loss sum, the heads their plain gradients.

        The features of different replicas are different examples, so the global Gramian is the
        sum of the replicas' Gramians (one all-reduce of [T, T]).
        """
        jacobian = tape.jacobian(scaled_rows, shared_features, experimental_use_pfor=True)
        rows = flatten_gradients([jacobian]) / scale  # [T, local batch * feature size]
        replica_context = tf.distribute.get_replica_context()
        gramian = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                             tf.matmul(rows, rows, transpose_b=True))
        losses = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                            tf.stop_gradient(task_losses))
        weights = tf.stop_gradient(self.weighting.weights_from_gramian(
            gramian, StepContext(global_losses=losses, num_replicas=context.num_replicas)))
        shared_ids = {id(v) for v in self.shared_variables}
        # The gradient of sum_t weights_t * row_t (a vector-Jacobian product with the method's
        # weights as the upstream gradient of the rows; the tape has stopped recording).
        shared = tape.gradient(scaled_rows, self.shared_variables, output_gradients=weights)
        plain = tape.gradient(scaled, self.plain_variables)
        by_id = {id(v): g for v, g in zip(self.shared_variables, shared)}
        return [by_id[id(v)] if id(v) in shared_ids else g
                for v, g in zip(self.plain_variables, plain)]

    # ---------------------------------------------------------------------------- diagnostics
    def _replica_task_jacobian(self, batch, normalisers):
        """Per-task gradients of the shared variables on this replica's share, [T, P]."""
        features, labels, sample_weights = unpack_batch(batch)
        with tf.GradientTape() as tape:
            outputs = self.model(features, training=False)
            losses = compute_task_losses(self.tasks, outputs, labels, sample_weights,
                                         global_normalisers=normalisers)
            rows = self.task_weights * losses
        return flatten_gradients(tape.jacobian(rows, self.shared_variables,
                                               experimental_use_pfor=True,
                                               unconnected_gradients="zero"))

    def _diagnostics(self, batch):
        """Conflict diagnostics on one batch: each task's gradient norm on the shared
        variables [T], their pairwise cosine similarities [T, T], and the method's current
        task weights [T] (cross-replica; Jacobian rows summed over replicas)."""
        normalisers = self._global_normalisers(batch)
        jacobian = self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(self._replica_task_jacobian, args=(batch, normalisers)), axis=None)
        gramian = tf.matmul(jacobian, jacobian, transpose_b=True)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        cosine = tf.math.divide_no_nan(gramian, norms[:, None] * norms[None, :])
        return norms, cosine, tf.convert_to_tensor(self.weighting.weights())

    def _replica_update_metrics(self, batch, outputs):
        _, labels, sample_weights = unpack_batch(batch)
        update_metrics(self.tasks, self.train_metrics, outputs, labels, sample_weights)

    def _replica_accumulate(self, gradients, per_task):
        for accumulator, g in zip(self.accumulators, gradients):
            accumulator.assign_add(g)
        if self.jacobian_accumulator is not None:
            self.jacobian_accumulator.assign_add(per_task)

    def _replica_apply(self, gradients, shared_gradients):
        # tf.identity: every gradient a tensor of this graph (some are captured from outside
        # the cond that decides whether to apply), as Keras's all-reduce requires.
        pairs = [(tf.identity(g), v)
                 for g, v, c in zip(gradients, self.plain_variables, self._connected) if c]
        if self.jacobian_mode:
            # The combined direction is the same on every replica; Keras sums the replicas'
            # gradients, so each replica contributes 1/R of it.
            replicas = float(self.strategy.num_replicas_in_sync)
            pairs += [(tf.identity(g) / replicas, v)
                      for g, v in zip(shared_gradients, self.shared_variables)]
        if self.backbone_optimizer is None:
            self.optimizer.apply_gradients(pairs)
            return
        # The backbone's variables have their own optimizer (a multiple of the learning rate).
        backbone = [(g, v) for g, v in pairs if id(v) in self.backbone_ids]
        rest = [(g, v) for g, v in pairs if id(v) not in self.backbone_ids]
        if backbone:
            self.backbone_optimizer.apply_gradients(backbone)
        if rest:
            self.optimizer.apply_gradients(rest)

    def _replica_apply_accumulated(self, shared_gradients):
        self._replica_apply([a.read_value() for a in self.accumulators], shared_gradients)

    def _replica_reset_accumulators(self):
        for accumulator in self.accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        if self.jacobian_accumulator is not None:
            self.jacobian_accumulator.assign(tf.zeros_like(self.jacobian_accumulator))

    # -------------------------------------------------------------------- cross-replica side
    def _global_normalisers(self, batch):
        """Each task's sum of sample weights over the global batch, [num_tasks]."""
        return self.strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            self.strategy.run(self._replica_normalisers, args=(batch,)), axis=None)

    def _compute_on(self, batch, normalisers, scale):
        """Forward/backward on `batch`; returns (per-replica gradients, per-task gradients,
        stats summed over replicas)."""
        gradients, per_task, outputs, stats = self.strategy.run(
            self._compute, args=(batch, normalisers, scale))
        self.strategy.run(self._replica_update_metrics, args=(batch, outputs))
        stats = self.strategy.reduce(tf.distribute.ReduceOp.SUM, stats, axis=None)
        return gradients, per_task, stats

    def _micro_step(self, iterator, scale):
        batch = next(iterator)
        return self._compute_on(batch, self._global_normalisers(batch), scale)

    def _accumulate_micro_steps(self, iterator, scale):
        """K forward/backward passes into the accumulators; returns the step's stats.

        The K micro-batches are fetched first so that each task's normaliser counts the labelled
        examples of all of them: the accumulated gradient is then exactly the gradient of the
        K-times larger batch, missing labels included.
        """
        num_tasks = len(self.tasks)
        batches = [next(iterator) for _ in range(self.grad_accum_steps)]
        normalisers = tf.add_n([self._global_normalisers(batch) for batch in batches])
        stats = tf.zeros([num_tasks + 4], tf.float32)
        for batch in batches:
            gradients, per_task, micro = self._compute_on(batch, normalisers, scale)
            self.strategy.run(self._replica_accumulate, args=(gradients, per_task))
            stats += micro  # Shares of the big-batch losses: they add up.
        return stats

    def _combine_shared(self, per_task, global_losses):
        """The method's direction for the shared variables (cross-replica context)."""
        if not self.jacobian_mode:
            return []
        context = StepContext(global_losses=global_losses,
                              num_replicas=self.strategy.num_replicas_in_sync)
        direction = self.weighting.aggregate(per_task, context)
        return unflatten(direction, self.shared_variables)

    def _train_loop(self, iterator, num_steps: tf.Tensor):
        """Runs up to `num_steps` train steps in one call.

        Returns (mean task losses [T], mean total loss, examples seen, steps run, stats of the
        last step [T + 4]). Fewer than `num_steps` run only when a non-finite loss or gradient
        stops the loop (policy "stop"); the bad update is not applied.
        """
        num_tasks = len(self.tasks)
        k = self.grad_accum_steps
        sums = tf.zeros([num_tasks + 4], tf.float32)
        last = tf.zeros([num_tasks + 4], tf.float32)
        steps_run = tf.constant(0, tf.int32)
        scale = self.loss_scale.scale if self.loss_scale is not None else tf.constant(1.0)
        for _ in tf.range(num_steps):
            scale_now = tf.identity(scale)
            if k == 1:
                gradients, per_task, stats = self._micro_step(iterator, scale_now)
                if self.jacobian_mode:
                    per_task = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_task,
                                                    axis=None)
            else:
                gradients = None  # In the accumulators.
                stats = self._accumulate_micro_steps(iterator, scale_now)
                per_task = (self.jacobian_accumulator.read_value()  # summed over replicas
                            if self.jacobian_mode else None)
            bad_loss = stats[num_tasks + _BAD_LOSS] > 0
            bad_grad = stats[num_tasks + _BAD_GRAD] > 0
            overflow = tf.logical_and(bad_grad, tf.logical_not(bad_loss))
            if self.loss_scale is not None:
                bad = bad_loss  # A float16 overflow is handled by the loss scale.
            else:
                bad = tf.logical_or(bad_loss, bad_grad)
            last = stats
            if self.on_nonfinite == "stop":
                if bad:
                    if k > 1:
                        self.strategy.run(self._replica_reset_accumulators)
                    break
            apply = tf.logical_not(bad)
            if self.loss_scale is not None:
                apply = tf.logical_and(apply, tf.logical_not(overflow))
                self.loss_scale.update(tf.logical_not(overflow))
            if apply:
                shared = self._combine_shared(per_task, stats[:num_tasks])
                if k == 1:
                    self.strategy.run(self._replica_apply, args=(gradients, shared))
                else:
                    self.strategy.run(self._replica_apply_accumulated, args=(shared,))
            elif self.skipped_steps is not None:
                self.skipped_steps.assign_add(1)
            if k > 1:
                self.strategy.run(self._replica_reset_accumulators)
            self.step.assign_add(1)
            steps_run += 1
            sums += stats
        n = tf.cast(tf.maximum(steps_run, 1), tf.float32)
        return (sums[:num_tasks] / n, sums[num_tasks + _TOTAL] / n, sums[num_tasks + _EXAMPLES],
                steps_run, last)

    # -------------------------------------------------------------------------------- eval
    def _replica_eval_step(self, batch):
        features, labels, sample_weights = unpack_batch(batch)
        outputs = self.model(features, training=False)
        update_metrics(self.tasks, self.eval_metrics, outputs, labels, sample_weights,
                       loss_trackers=self.eval_losses)

    def _eval_step(self, batch):
        self.strategy.run(self._replica_eval_step, args=(batch,))
