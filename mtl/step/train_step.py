"""The compiled train step (`TrainStep`), composed of parts chosen once at construction: the
gradient source (`mtl.step.plan.gradient_source`), the update policy
(`mtl.step.update_policy.UpdatePolicy`) and the optimizers (`mtl.step.apply.OptimizerApply`);
with the eval step and the conflict diagnostics. Only `mtl.step` builds `tf.function`s;
everything with Python side effects lives in `mtl.training.trainer`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import keras
import tensorflow as tf

from mtl.options import TrainerOptions
from mtl.step import plan
from mtl.step.apply import OptimizerApply
from mtl.step.parts import UpdateStats, all_finite, layer_state, unique_variables
from mtl.step.task_jacobian import flatten_gradients
from mtl.step.task_losses import (compute_task_losses, local_normalisers, unpack_batch,
                                  update_metrics)
from mtl.step.update_policy import LossScale, UpdatePolicy
from mtl.tasks import Task


class LoopOutputs(NamedTuple):
    """What one call of `TrainStep.train_loop` returns (tensors)."""

    sums: UpdateStats    # the statistics summed over the applied updates
    applied: Any         # int32 []: updates applied
    steps_run: Any       # int32 []: updates run (applied or dropped)
    examples: Any        # float32 []: examples read
    last: UpdateStats    # the last update's statistics


class TrainStep:
    """The compiled train loop, eval step and diagnostics for one model, task list, strategy.

    An update, in the cross-replica context of `train_loop`:
      1. fetch the K micro-batches and sum each task's normaliser over all of them;
      2. the gradient source computes the update's gradients (forward/backward on every replica,
         the method applied once to the whole batch);
      3. the update policy judges them (finite? float16 overflow? skip or stop);
      4. apply them with one `apply_gradients` on every replica, or drop the update and restore
         the method's state.
    """

    def __init__(self, *, model: keras.Model, tasks: Sequence[Task], weighting,
                 strategy: tf.distribute.Strategy, options: TrainerOptions,
                 optimizer_groups: dict, variables: Sequence[tf.Variable],
                 shared_variables=(), scope_variables=None,
                 group_methods: dict | None = None,
                 train_metrics: dict, eval_metrics: dict,
                 eval_losses: dict, step: tf.Variable, skipped_steps: tf.Variable,
                 loss_scale: LossScale | None = None):
        self.model = model
        self.tasks = tuple(tasks)
        self.weighting = weighting
        self.strategy = strategy
        self.train_metrics = train_metrics
        self.eval_metrics = eval_metrics
        self.eval_losses = eval_losses
        self.step = step
        self.skipped_steps = skipped_steps
        self.micro_batches = options.grad_accum_steps
        self.task_weights = tf.constant([t.weight for t in self.tasks], tf.float32)
        variables = list(variables)
        method_ids = {id(v) for v in weighting.trainable_variables}
        model_variables = [v for v in variables if id(v) not in method_ids]
        variable_ids = {id(v) for v in variables}
        self.shared_variables = [v for v in shared_variables if id(v) in variable_ids]
        self.source = plan.gradient_source(
            method=weighting, options=options, model=model, tasks=self.tasks,
            strategy=strategy, model_variables=model_variables,
            shared_variables=self.shared_variables, group_methods=group_methods,
            scope_variables=None if scope_variables is None else [
                v for v in scope_variables if id(v) in variable_ids])
        self.policy = UpdatePolicy(options.on_nonfinite, loss_scale)
        self.apply_gradients = OptimizerApply(optimizer_groups, options.clip_norm,
                                              unclipped=weighting.trainable_variables)
        self.method_state = list(weighting.non_trainable_variables) + [
            v for method in (group_methods or {}).values() for v in method.non_trainable_variables]
        # What a forward pass in training mode advances: BatchNorm's moving statistics and the
        # RNG state of Dropout-like layers.
        self.layer_state = layer_state(model)
        # What a dropped update must leave as it was. The forward pass has moved the layer
        # state before the update is judged: a NaN batch would otherwise leave NaN in
        # BatchNorm's moving statistics (every later inference output NaN), and Dropout's RNG
        # would have drawn for an update that never happened.
        self.dropped_state = unique_variables(self.method_state + self.layer_state)
        self.train_loop = tf.function(self._train_loop)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)
        self.diagnostics = tf.function(self._diagnostics, reduce_retracing=True)

    # ------------------------------------------------------------------------------- train
    def _global_normalisers(self, batch):
        """Each task's sum of sample weights over the global batch, [num_tasks]."""
        def local(batch):
            features, labels, sample_weights = unpack_batch(batch)
            batch_size = tf.shape(tf.nest.flatten(features)[0])[0]
            return local_normalisers(self.tasks, labels, sample_weights, batch_size)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                    self.strategy.run(local, args=(batch,)), axis=None)

    def _replica_apply(self, *apply_args):
        gradients = self.source.replica_gradients(*apply_args)
        self.apply_gradients([(g, v) for g, v, connected in zip(
            gradients, self.source.variables, self.source.connected) if connected])

    def _replica_update_metrics(self, batch, outputs):
        _, labels, sample_weights = unpack_batch(batch)
        update_metrics(self.tasks, self.train_metrics, outputs, labels, sample_weights)

    def _apply(self, update) -> None:
        self.strategy.run(self._replica_apply, args=update.apply_args)
        for batch, outputs in update.metric_inputs:
            self.strategy.run(self._replica_update_metrics, args=(batch, outputs))

    def _drop(self, saved_state) -> None:
        for variable, value in zip(self.dropped_state, saved_state):
            variable.assign(value)

    def _train_loop(self, iterator, num_steps: tf.Tensor) -> LoopOutputs:
        """Runs up to `num_steps` updates in one call.

        Fewer than `num_steps` run only when a non-finite loss or gradient stops the loop
        (policy "stop"); that update is not applied, and `last` holds its statistics.
        """
        sums, last = UpdateStats.zeros(len(self.tasks)), UpdateStats.zeros(len(self.tasks))
        steps_run, applied, examples = tf.constant(0), tf.constant(0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            batches = [next(iterator) for _ in range(self.micro_batches)]
            # Every micro-batch's loss is normalised by the labelled examples of all K.
            normalisers = tf.add_n([self._global_normalisers(b) for b in batches])
            saved_state = [tf.identity(v) for v in self.dropped_state]
            update = self.source.compute(batches, normalisers, self.policy.scale(),
                                         self.layer_state)
            stats = update.stats
            verdict = self.policy.judge(
                losses_finite=all_finite([stats.task_losses, stats.regularisation]),
                gradients_finite=(stats.bad_gradient == 0.0) & update.finite)
            last = stats
            if verdict.stop:
                self._drop(saved_state)
                break
            if verdict.apply:
                self._apply(update)
            else:
                self._drop(saved_state)
                self.skipped_steps.assign_add(1)
            self.policy.after(verdict)
            self.step.assign_add(1)
            steps_run += 1
            applied += tf.cast(verdict.apply, tf.int32)
            examples += stats.examples
            sums = sums.plus(stats.where(verdict.apply))
        return LoopOutputs(sums=sums, applied=applied, steps_run=steps_run, examples=examples,
                           last=last)

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
                                               unconnected_gradients="zero"), len(self.tasks))

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

    # -------------------------------------------------------------------------------- eval
    def _replica_eval_step(self, batch):
        features, labels, sample_weights = unpack_batch(batch)
        outputs = self.model(features, training=False)
        update_metrics(self.tasks, self.eval_metrics, outputs, labels, sample_weights,
                       loss_trackers=self.eval_losses)

    def _eval_step(self, batch):
        self.strategy.run(self._replica_eval_step, args=(batch,))
