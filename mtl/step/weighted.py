"""Gradients of weighted task-loss sums (`WeightedGradients`): the source of loss-based methods,
of gradient methods in "rep" mode or with a `jacobian_scope`, and of a gradient method with
nothing to combine (no shared trainable variable). The weights come from a decision made once
per update (`mtl.step.decisions`).

Shapes: the decision's statistic is the Gramian [T, T] of the task rows' gradients w.r.t. the
shared representation (rep mode), the scope's per-task gradients [T, P_s] (a partial Jacobian,
whose Gramian is taken after the sum), or GradDrop's signed sums [T, D]; each is summed over
micro-batches and replicas.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mtl.step.decisions import RepDecision, RepMaskDecision
from mtl.step.parts import UpdateStats, accumulator, sum_over_replicas, zeros_for_none
from mtl.step.source import Source, Update
from mtl.step.task_jacobian import flatten_gradients, task_jacobian


class WeightedGradients(Source):
    """Gradients of weighted task-loss sums, with weights from a decision made once per update
    (`LossDecision`, `RepDecision` or `PlainSum`).

    K = 1: one pass; the decision is made inside it, between the forward and the backward pass
    (the losses, and in rep mode the Gramian, all-reduced over replicas first). K > 1: the
    decision comes first, from a forward-only pre-pass over the K micro-batches when the method
    must see the whole batch; then K backward passes with fixed weights.
    """

    def __init__(self, decision, scope_variables=None, **kwargs):
        super().__init__(**kwargs)
        self.decision = decision
        # The shared variables are differentiated apart only when their weights differ.
        self.separate_shared = isinstance(decision, (RepDecision, RepMaskDecision))
        self.masked = isinstance(decision, RepMaskDecision)
        self.scope = list(scope_variables or ())
        if self.scope:
            size = sum(int(np.prod(v.shape)) for v in self.scope)
            self.statistic_shape = [self.num_tasks, size]
        elif self.masked:
            size = int(np.prod(self.forward.feature_shape))
            self.statistic_shape = [self.num_tasks, size]
        else:
            self.statistic_shape = [self.num_tasks, self.num_tasks]
        self.statistic_dtype = self.jacobian_dtype if self.scope else tf.float32
        self.gradients = accumulator(self.strategy, [v.shape for v in self.variables[
            :len(self.shared) + len(self.plain)]], self.micro_batches)

    # -- replica side
    def _rep_jacobian(self, tape, scaled_rows, shared_features):
        """The task rows' gradients w.r.t. the shared features, [T, B, ...] (scaled rows)."""
        return tape.jacobian(scaled_rows, shared_features, experimental_use_pfor=True,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _gramian(self, tape, scaled_rows, shared_features, scale, jacobian=None):
        """This replica's statistic of the task rows' gradients w.r.t. the shared features
        (float32: the features may be float16 or bfloat16): their Gramian [T, T], or (masked,
        GradDrop) their sums over the examples times sign(features), [T, D]."""
        if self.scope:
            # Partial Jacobian: the scope's per-task gradients, [T, P_s] (additive).
            return task_jacobian(tape, scaled_rows, self.scope, scale, self.jacobian_dtype,
                                 self.chunk_size)  # resolved by the pass
        if jacobian is None:
            jacobian = self._rep_jacobian(tape, scaled_rows, shared_features)
        if self.masked:
            signs = tf.cast(tf.sign(shared_features), tf.float32)
            signed = tf.cast(jacobian, tf.float32) * signs[None] / scale
            return tf.reshape(tf.reduce_sum(signed, axis=1), self.statistic_shape)
        rows = flatten_gradients([jacobian], self.num_tasks) / scale
        return tf.matmul(rows, rows, transpose_b=True)

    def _masked_shared_gradients(self, tape, masks, scaled_rows, shared_features, jacobian):
        """The shared variables' gradient for the upstream sum_t m_t * d row_t / d A."""
        if jacobian is None:
            jacobian = self._rep_jacobian(tape, scaled_rows, shared_features)
        shape = tf.concat([[self.num_tasks, 1], tf.shape(shared_features)[1:]], axis=0)
        upstream = tf.reduce_sum(tf.reshape(masks, shape) * tf.cast(jacobian, tf.float32), 0)
        return tape.gradient(shared_features, self.shared,
                             output_gradients=tf.cast(upstream, shared_features.dtype))

    def _decide_inline(self, tape, shares, scaled_rows, shared_features, scale):
        """The K = 1 decision, on the whole batch: the replicas' losses (and Gramians) are
        summed first."""
        replica = tf.distribute.get_replica_context()
        replicas = self.strategy.num_replicas_in_sync
        losses = tf.stop_gradient(shares)
        gramian = jacobian = None
        if self.decision.needs_gramian and self.scope:
            gramian = self._gramian(tape, scaled_rows, shared_features, scale)
        elif self.decision.needs_gramian:
            jacobian = self._rep_jacobian(tape, scaled_rows, shared_features)
            gramian = self._gramian(tape, scaled_rows, shared_features, scale, jacobian)
        if self.decision.needs_whole_batch and replicas > 1:
            losses = replica.all_reduce(tf.distribute.ReduceOp.SUM, losses)
            if gramian is not None:
                gramian = replica.all_reduce(tf.distribute.ReduceOp.SUM, gramian)
        return self.decision.decide(losses, gramian, replicas), jacobian

    def replica_pass(self, batch, normalisers, scale, decision):
        """Forward and backward on this replica's micro-batch. `decision` None: decide here."""
        if self.scope:
            self.resolve_chunk_size(batch)
        jacobian = None
        with tf.GradientTape(persistent=self.separate_shared) as tape:
            outputs, shared_features, shares, reg = self.losses_and_reg(batch, normalisers)
            scaled_rows = self.task_weights * shares * scale
            if decision is None:
                with tape.stop_recording():
                    decision, jacobian = self._decide_inline(tape, shares, scaled_rows,
                                                             shared_features, scale)
            shared_weights, plain_weights, method_gradients = decision
            reg_scaled = 0.0 if reg is None else reg * scale
            plain_target = tf.reduce_sum(tf.stop_gradient(plain_weights) * shares) * scale \
                + reg_scaled
            if self.separate_shared and not self.masked:
                shared_target = tf.reduce_sum(tf.stop_gradient(shared_weights) * shares) \
                    * scale + reg_scaled
        if self.masked:
            masked = self._masked_shared_gradients(tape, shared_weights, scaled_rows,
                                                   shared_features, jacobian)
            if reg is not None:
                masked = [m if r is None else (r if m is None else m + r) for m, r in zip(
                    masked, tape.gradient(reg_scaled, self.shared))]
            gradients = masked + tape.gradient(plain_target, self.plain)
        elif self.separate_shared:
            gradients = tape.gradient(shared_target, self.shared) + tape.gradient(
                plain_target, self.plain)
        else:
            gradients = tape.gradient(plain_target, self.shared + self.plain)
        del tape
        gradients = [g if g is None else g / scale for g in gradients]
        # The method's own variables always get a gradient (zero when unconnected).
        self.connected = [g is not None for g in gradients] + [True] * len(
            self.method_variables)
        gradients = zeros_for_none(gradients, self.shared + self.plain)
        stats = self.micro_batch_stats(batch, shares, reg,
                                       [gradients, method_gradients, shared_weights])
        return gradients, list(method_gradients), outputs, stats

    def _replica_prepass(self, batch, normalisers, scale):
        """Forward only (and, in rep mode, the Gramian): this replica's loss shares [T] and
        Gramian [T, T] (zeros when not needed)."""
        if self.scope:
            self.resolve_chunk_size(batch)
        with tf.GradientTape(persistent=True) as tape:
            _, shared_features, shares, _ = self.losses_and_reg(batch, normalisers)
            scaled_rows = self.task_weights * shares * scale
        gramian = tf.zeros(self.statistic_shape, self.statistic_dtype)
        if self.decision.needs_gramian:
            gramian = self._gramian(tape, scaled_rows, shared_features, scale)
        del tape
        return tf.stop_gradient(shares), gramian

    def _replica_decide(self, losses, gramian):
        return self.decision.decide(losses, gramian if self.decision.needs_gramian else None,
                                    self.strategy.num_replicas_in_sync)

    def replica_gradients(self, gradients, method_gradients):
        return list(gradients) + list(method_gradients)

    # -- cross-replica side
    def _whole_batch(self, batches, normalisers, scale, restore_state):
        """The forward-only pre-pass: the update's losses [T] and Gramian, summed. Layer state
        that a forward pass advances (BatchNorm statistics, Dropout's RNG) is restored after it,
        so the backward passes see exactly what a single pass would."""
        saved = [tf.identity(v) for v in restore_state]
        losses = tf.zeros([self.num_tasks])
        gramian = tf.zeros(self.statistic_shape, self.statistic_dtype)
        for batch in batches:
            shares, local_gramian = self.strategy.run(self._replica_prepass,
                                                      args=(batch, normalisers, scale))
            losses += sum_over_replicas(self.strategy, shares)
            gramian += sum_over_replicas(self.strategy, local_gramian)
        with tf.control_dependencies([losses, gramian]):
            for variable, value in zip(restore_state, saved):
                variable.assign(value)
        return losses, gramian

    def compute(self, batches, normalisers, scale, restore_state=()) -> Update:
        self.gradients.reset()
        decision = None  # K = 1: made inside the pass.
        if len(batches) > 1:
            losses = tf.zeros([self.num_tasks])
            gramian = tf.zeros(self.statistic_shape, self.statistic_dtype)
            if self.decision.needs_whole_batch:
                losses, gramian = self._whole_batch(batches, normalisers, scale, restore_state)
            decision = self.strategy.run(self._replica_decide, args=(losses, gramian))
        stats, metric_inputs, method_gradients = 0.0, [], None
        for batch in batches:
            gradients, method_gradients, outputs, local_stats = self.strategy.run(
                self.replica_pass, args=(batch, normalisers, scale, decision))
            self.gradients.add(gradients)
            stats += self.sum_stats(local_stats)
            metric_inputs.append((batch, outputs))
        if decision is not None:
            method_gradients = decision[2]
        return Update(apply_args=(self.gradients.local(), method_gradients),
                      stats=UpdateStats.unpacked(stats, self.num_tasks),
                      finite=tf.constant(True), metric_inputs=metric_inputs)
