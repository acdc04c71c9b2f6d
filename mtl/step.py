"""The compiled train step, composed of parts chosen once at construction.

Reference semantics (README "How a step works"). One update is K micro-batches on R replicas:

  1. each task's loss is the weighted mean over the labelled examples of the whole update
     batch (all K micro-batches, all replicas): `mtl.task_losses.compute_task_losses`;
  2. the weighting method is applied once per update to what the whole batch gives it (the task
     losses; the per-task gradients of the shared variables; in rep mode the Gramian of the
     per-task gradients w.r.t. the shared representation); its state advances once, and its own
     trainable variables get the whole batch's gradient once: `mtl.gradient_sources`;
  3. regularisation losses are not a task: their gradient is added once, after the method has
     combined the task gradients; task-specific variables get their own task's gradient;
  4. frozen variables are not trained and a frozen backbone runs in inference mode;
  5. an update that is not applied (non-finite, float16 overflow) changes nothing: not the
     weights, not the method's state, not the train metrics or logged means:
     `mtl.update_policy`;
  6. one `apply_gradients` per update (the backbone's own optimizer for its variables when it
     has a learning-rate multiplier): `OptimizerApply`.

Where each axis is decided: the weighting family and gradient mode in
`gradient_sources.gradient_source`; micro-batches in `gradient_sources.accumulator` and the
sources' `compute`; replicas in the sources' reductions; precision and the non-finite policy in
`update_policy.UpdatePolicy`; freezing in `gradient_sources.Forward`; the optimizers in
`OptimizerApply`. Only this module's `TrainStep` builds `tf.function`s; everything with Python
side effects lives in `mtl.trainer`.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from mtl import gradient_sources
from mtl.gradient_sources import BAD_GRAD, NUM_EXTRA_STATS, REG, all_finite, flatten_gradients
from mtl.options import TrainerOptions
from mtl.task_losses import (compute_task_losses, local_normalisers, unpack_batch,
                             update_metrics)
from mtl.tasks import Task
from mtl.update_policy import LossScale, UpdatePolicy


class OptimizerApply:
    """Applies one update's gradients (replica context), one `apply_gradients` per optimizer
    group (`mtl.finetune.optimizer_groups`): each variable goes to the optimizer of its group;
    the user's optimizer ("optimizer") is applied last, after the groups whose learning-rate
    schedule follows its step."""

    def __init__(self, groups: dict, clip_norm: float | None = None, unclipped=()):
        self.groups = [(optimizer, {id(v) for v in variables})
                       for name, (optimizer, variables) in groups.items() if name != "optimizer"]
        self.groups.append((groups["optimizer"][0], None))  # None: every other variable
        self.clip_norm = clip_norm
        self.unclipped = {id(v) for v in unclipped}  # a weighting method's own variables

    def _clip(self, pairs):
        """Scales the model's gradients by min(1, clip_norm / |g|), |g| the global norm of the
        whole update's gradient: the replicas' parts are summed first (PITFALLS: Keras's
        clipnorm clips each replica's part)."""
        clipped = [i for i, (_, v) in enumerate(pairs) if id(v) not in self.unclipped]
        local = [tf.convert_to_tensor(pairs[i][0]) for i in clipped]
        context = tf.distribute.get_replica_context()
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local) if context else local
        norm = tf.linalg.global_norm(total)
        factor = tf.minimum(1.0, tf.math.divide_no_nan(tf.constant(self.clip_norm, norm.dtype),
                                                       norm))
        factor = tf.where(norm > 0.0, factor, 1.0)
        pairs = list(pairs)
        for i, g in zip(clipped, local):
            pairs[i] = (g * tf.cast(factor, g.dtype), pairs[i][1])
        return pairs

    def __call__(self, pairs) -> None:
        # tf.identity: every gradient a tensor of this graph (some are captured from outside
        # the cond that decides whether to apply), as Keras's all-reduce requires.
        remaining = [(tf.identity(g), v) for g, v in pairs]
        if self.clip_norm:
            remaining = self._clip(remaining)
        for optimizer, ids in self.groups:
            mine = remaining if ids is None else [(g, v) for g, v in remaining if id(v) in ids]
            remaining = [] if ids is None else [(g, v) for g, v in remaining if id(v) not in ids]
            if mine:
                optimizer.apply_gradients(mine)


def layer_state(model: keras.Model) -> list:
    """Non-trainable layer state that a forward pass in training mode advances: BatchNorm's
    moving statistics and the RNG state of Dropout-like layers (`SeedGenerator`s)."""
    state = list(model.non_trainable_variables)
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()) or ():
            state.append(generator.state)
    return unique_variables(state)


def unique_variables(variables) -> list:
    """`variables` without repeats (by identity), in order."""
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


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
                 group_methods: dict | None = None, group_of=None,
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
        self.source = gradient_sources.gradient_source(
            method=weighting, gradient_mode=options.gradient_mode,
            forward_for=lambda need_features: gradient_sources.Forward(
                model, self.tasks, need_features=need_features),
            tasks=self.tasks, strategy=strategy, model_variables=model_variables,
            shared_variables=self.shared_variables, micro_batches=self.micro_batches,
            group_methods=group_methods, group_of=group_of,
            jacobian_chunk_size=options.jacobian_chunk_size,
            jacobian_dtype=options.jacobian_dtype,
            scope_variables=None if scope_variables is None else [
                v for v in scope_variables if id(v) in variable_ids])
        if options.jit_compile:
            # Forward and backward only: XLA cannot compile the cross-replica parts (PITFALLS).
            self.source._replica_pass = tf.function(self.source._replica_pass,
                                                    jit_compile=True)
        self.policy = UpdatePolicy(options.on_nonfinite, loss_scale)
        self.apply_gradients = OptimizerApply(optimizer_groups, options.clip_norm,
                                              unclipped=weighting.trainable_variables)
        # What a dropped update must leave as it was.
        self.method_state = list(weighting.non_trainable_variables) + [
            v for method in (group_methods or {}).values() for v in method.non_trainable_variables]
        self.layer_state = layer_state(model)
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

    def _drop(self, saved_method_state) -> None:
        for variable, value in zip(self.method_state, saved_method_state):
            variable.assign(value)

    def _train_loop(self, iterator, num_steps: tf.Tensor):
        """Runs up to `num_steps` updates in one call.

        Returns (sums over the applied updates of the statistics [T + 3]: task losses,
        regularisation, examples, -; updates applied; updates run; examples read; the last
        update's statistics). Fewer than `num_steps` run only when a non-finite loss or
        gradient stops the loop (policy "stop"); that update is not applied.
        """
        num_tasks = len(self.tasks)
        size = num_tasks + NUM_EXTRA_STATS
        sums, last = tf.zeros([size]), tf.zeros([size])
        steps_run, applied, examples = tf.constant(0), tf.constant(0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            batches = [next(iterator) for _ in range(self.micro_batches)]
            # Every micro-batch's loss is normalised by the labelled examples of all K.
            normalisers = tf.add_n([self._global_normalisers(b) for b in batches])
            saved_method_state = [tf.identity(v) for v in self.method_state]
            update = self.source.compute(batches, normalisers, self.policy.scale(),
                                         self.layer_state)
            stats = update.stats
            verdict = self.policy.judge(
                losses_finite=all_finite(stats[:num_tasks + REG + 1]),
                gradients_finite=(stats[num_tasks + BAD_GRAD] == 0.0) & update.finite)
            last = stats
            if verdict.stop:
                self._drop(saved_method_state)
                break
            if verdict.apply:
                self._apply(update)
            else:
                self._drop(saved_method_state)
                self.skipped_steps.assign_add(1)
            self.policy.after(verdict)
            self.step.assign_add(1)
            steps_run += 1
            applied += tf.cast(verdict.apply, tf.int32)
            examples += stats[num_tasks + gradient_sources.EXAMPLES]
            sums += tf.where(verdict.apply, stats, tf.zeros_like(stats))
        return sums, applied, steps_run, examples, last

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
