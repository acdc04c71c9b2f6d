"""Exact mode (`JacobianRows`): the per-task gradients of the shared variables, J [T, P], turned
into one direction by the gradient method, once per update.

Shapes: each micro-batch's J [T, P] (P: the shared variables' total size, in their order) is
summed over micro-batches and replicas; the direction [P] unflattens to the shared variables.
With a granularity ("layer" or "variable"), J's columns are split by group and each group's own
method instance combines its columns.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mtl.step.parts import UpdateStats, accumulator, all_finite, zeros_for_none
from mtl.step.source import Source, Update
from mtl.step.task_jacobian import task_jacobian, unflatten
from mtl.weighting import StepContext


class JacobianRows(Source):
    """Exact mode: the per-task gradients of the shared variables, J [T, P] (one batched
    Jacobian per micro-batch, pfor), summed over micro-batches and replicas; the method turns
    the whole batch's J into one direction (cross-replica context), once per update. The other
    variables get the gradient of sum_t Task.weight * L_t, the regularisation its own."""

    def __init__(self, *, group_methods: dict | None = None, group_of=None,
                 jacobian_to_float32: bool = True, **kwargs):
        super().__init__(**kwargs)
        #: Convert the Jacobian to float32 before the method sees it (False: the method converts
        #: it block-wise itself, as the Gramian methods do).
        self.jacobian_to_float32 = jacobian_to_float32
        # Per-group aggregation: the columns of each group of shared variables (a layer, a
        # variable) are combined by that group's own method instance.
        self.groups = None
        if group_methods:
            keys = [group_of(v) for v in self.shared]
            self.groups = [(group_methods[key], [i for i, k in enumerate(keys) if k == key])
                           for key in dict.fromkeys(keys)]
        if self.method_variables:
            raise ValueError(f"Weighting {self.method.name!r} has trainable variables; a "
                             "gradient-based method must keep its state in non-trainable "
                             "variables.")
        self.variables = self.shared + self.plain
        size = sum(int(np.prod(v.shape)) for v in self.shared)
        shapes = ([[self.num_tasks, size]] + [v.shape for v in self.plain]
                  + [v.shape for v in self.shared])
        self.parts = accumulator(self.strategy, shapes, self.micro_batches,
                                 [self.jacobian_dtype] + [tf.float32] * (len(shapes) - 1))

    def replica_pass(self, batch, normalisers, scale):
        self.resolve_chunk_size(batch)
        with tf.GradientTape(persistent=True) as tape:
            outputs, _, shares, reg = self.losses_and_reg(batch, normalisers)
            rows = self.task_weights * shares
            scaled_rows = rows * scale
            reg_scaled = 0.0 if reg is None else reg * scale
            plain_target = tf.reduce_sum(scaled_rows) + reg_scaled
        jacobian = task_jacobian(tape, scaled_rows, self.shared, scale, self.jacobian_dtype,
                                 self.chunk_size)
        plain = tape.gradient(plain_target, self.plain)
        if reg is None:
            reg_shared = [None] * len(self.shared)
        else:
            reg_shared = tape.gradient(reg_scaled, self.shared)
        del tape
        plain = [g if g is None else g / scale for g in plain]
        reg_shared = [g if g is None else g / scale for g in reg_shared]
        # The shared variables always get the method's direction.
        self.connected = [True] * len(self.shared) + [g is not None for g in plain]
        plain = zeros_for_none(plain, self.plain)
        reg_shared = zeros_for_none(reg_shared, self.shared)
        stats = self.micro_batch_stats(batch, shares, reg, [jacobian, plain, reg_shared])
        return [jacobian] + plain + reg_shared, outputs, stats

    def _aggregate(self, jacobian, context):
        """The method's direction [P]: on the whole Jacobian, or group by group."""
        if self.jacobian_to_float32:
            jacobian = tf.cast(jacobian, tf.float32)
        if self.groups is None:
            return self.method.aggregate(jacobian, context)
        sizes = [int(np.prod(v.shape)) for v in self.shared]
        columns = tf.split(jacobian, sizes, axis=1)
        pieces = [None] * len(self.shared)
        for method, members in self.groups:
            group = tf.concat([columns[i] for i in members], axis=1)
            parts = tf.split(method.aggregate(group, context), [sizes[i] for i in members])
            for i, part in zip(members, parts):
                pieces[i] = part
        return tf.concat(pieces, axis=0)

    def replica_gradients(self, parts, direction):
        """This replica's gradients: the method's direction (the same on every replica, so
        1/R of it each) plus the local regularisation gradient; the plain ones as they are."""
        plain = parts[1:1 + len(self.plain)]
        reg_shared = parts[1 + len(self.plain):]
        replicas = float(self.strategy.num_replicas_in_sync)
        shared = [d / replicas + r for d, r in zip(unflatten(direction, self.shared),
                                                   reg_shared)]
        return shared + list(plain)

    def compute(self, batches, normalisers, scale, restore_state=()) -> Update:
        del restore_state
        self.parts.reset()
        stats, metric_inputs = 0.0, []
        for batch in batches:
            parts, outputs, local_stats = self.strategy.run(
                self.replica_pass, args=(batch, normalisers, scale))
            self.parts.add(parts)
            stats += self.sum_stats(local_stats)
            metric_inputs.append((batch, outputs))
        jacobian = self.parts.total_of(0)
        stats = UpdateStats.unpacked(stats, self.num_tasks)
        context = StepContext(global_losses=stats.task_losses,
                              num_replicas=self.strategy.num_replicas_in_sync)
        direction = self._aggregate(jacobian, context)
        return Update(apply_args=(self.parts.local(), direction), stats=stats,
                      finite=all_finite(direction), metric_inputs=metric_inputs)
