"""Where an update's gradients come from: what every gradient source shares (`Source`) and what
it returns (`Update`). `mtl.step.plan.gradient_source` chooses one source per weighting family,
once.

An update is K micro-batches on R replicas. Whatever the family, a source returns the gradients
that one device in float32 would compute on the whole update batch (K x R x per-replica batch):

  * `mtl.step.weighted.WeightedGradients` (loss-based methods, and gradient methods in "rep"
    mode). The method looks at the whole batch once (its task losses; in rep mode also the
    Gramian of the task gradients w.r.t. the shared representation) and returns a weight per
    task loss; the backward pass then differentiates the weighted sum. With K > 1 and a method
    that must see the whole batch first, a forward-only pre-pass over the K micro-batches
    collects what it needs (the cost of one more forward per micro-batch;
    `scripts/benchmark.py` measures it).
  * `mtl.step.exact.JacobianRows` (gradient methods, "exact" mode): the per-task gradients of
    the shared variables are accumulated over micro-batches and replicas as a [T, P] Jacobian;
    the method aggregates it once into one direction.

In both, regularisation losses (`model.losses`) are not a task: their gradient is added once,
after the method has combined the task gradients, and variables that only one task uses get
their task's gradient (loss methods: times the method's weight, as the total is differentiated).

Distribution. A replica's task-loss *share* is its examples' weighted loss sum divided by the
task's normaliser over the whole update batch (`mtl.step.task_losses.compute_task_losses`): the
shares of all micro-batches and replicas add up to the task loss, and so do their gradients. A
quantity that every replica computes whole (the method's direction, its own variables'
gradients) is divided by R, because the optimizer sums the replicas' gradients. Regularisation
is divided by K x R in each micro-batch for the same reason.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from absl import logging

from mtl.step.parts import Forward, UpdateStats, all_finite, sum_over_replicas
from mtl.step.task_jacobian import activation_elements, default_chunk_size
from mtl.step.task_losses import compute_task_losses, unpack_batch


@dataclasses.dataclass
class Update:
    """What a source computed for one update (cross-replica context).

    `apply_args` are passed to `strategy.run(source.replica_gradients, args=apply_args)`, which
    returns this replica's gradient for each of `source.variables`. `stats` are summed over
    micro-batches and replicas; `finite` covers what the method computed from them;
    `metric_inputs` are the (batch, per-replica outputs) pairs for the train metrics.
    """

    apply_args: tuple
    stats: UpdateStats
    finite: tf.Tensor
    metric_inputs: list


class Source:
    """What the sources share: the variables, the micro-batch loss computation, finiteness.

    A subclass defines `replica_pass` (forward and backward on one replica's micro-batch, run
    by `strategy.run`), `replica_gradients` and `compute`. With `jit_compile`, `replica_pass`
    is compiled with XLA: the forward and backward pass only, as XLA cannot compile the
    cross-replica parts.
    """

    def __init__(self, *, forward: Forward, tasks, method, strategy, model_variables,
                 shared_variables, micro_batches: int, chunk_size: int | None = None,
                 jacobian_dtype=tf.float32, jit_compile: bool = False):
        self.forward = forward
        self.tasks = tuple(tasks)
        self.method = method
        self.strategy = strategy
        self.micro_batches = micro_batches
        shared_ids = {id(v) for v in shared_variables}
        self.shared = [v for v in model_variables if id(v) in shared_ids]
        self.plain = [v for v in model_variables if id(v) not in shared_ids]
        self.method_variables = list(method.trainable_variables)
        #: The variables this source computes gradients for, in `replica_gradients`' order.
        self.variables = self.shared + self.plain + self.method_variables
        self.task_weights = tf.constant([t.weight for t in self.tasks], tf.float32)
        #: Per variable of `variables`: does a loss reach it? (Set when the pass is traced;
        #: an unconnected variable is left out of the update, as Keras `fit` does.)
        self.connected = None
        #: Per-task gradients (exact mode, a partial Jacobian's scope): tasks whose backward
        #: passes run at once (None: `default_chunk_size`, decided when first traced), and
        #: their storage dtype (float32, or bfloat16 for half the memory).
        self.chunk_size = None if chunk_size is None else min(chunk_size, self.num_tasks)
        self.jacobian_dtype = tf.as_dtype(jacobian_dtype)
        #: The variables of a partial Jacobian (none: every shared variable, or no Jacobian).
        self.scope = []
        if jit_compile:
            self.replica_pass = tf.function(self.replica_pass, jit_compile=True)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def resolve_chunk_size(self, batch) -> int:
        """`jacobian_chunk_size` as given, or (unset) the default for this model and this
        replica's micro-batch size, decided when the pass is first traced."""
        if self.chunk_size is None:
            examples = tf.nest.flatten(unpack_batch(batch)[0])[0].shape[0] or 64
            activation_bytes = 4.0 * examples * activation_elements(self.forward.model,
                                                                    self.scope or None)
            self.chunk_size = default_chunk_size(self.num_tasks, activation_bytes)
            logging.info("Per-task gradients: %d of %d tasks at once (jacobian_chunk_size; "
                         "%.0f MB of activations per task's backward pass).", self.chunk_size,
                         self.num_tasks, activation_bytes / 2 ** 20)
        return self.chunk_size

    def losses_and_reg(self, batch, normalisers):
        """Forward on this replica's micro-batch: (outputs, shared features, task-loss shares
        [T], regularisation share or None). Call under a tape to differentiate them."""
        features, labels, sample_weights = unpack_batch(batch)
        outputs, shared_features = self.forward(features)
        shares = compute_task_losses(self.tasks, outputs, labels, sample_weights,
                                     global_normalisers=normalisers)
        reg = self.forward.regularisation()
        if reg is not None:
            replicas = self.strategy.num_replicas_in_sync
            reg = reg / float(self.micro_batches * replicas)
        return outputs, shared_features, shares, reg

    @staticmethod
    def micro_batch_stats(batch, shares, reg, gradients) -> tf.Tensor:
        """This replica's `UpdateStats` of one micro-batch, packed [T + 3]: its task-loss shares,
        regularisation share, examples, and whether `gradients` hold a NaN or inf."""
        features = unpack_batch(batch)[0]
        examples = tf.cast(tf.shape(tf.nest.flatten(features)[0])[0], tf.float32)
        reg_value = tf.zeros([]) if reg is None else tf.stop_gradient(reg)
        bad = tf.cast(tf.logical_not(all_finite(gradients)), tf.float32)
        return UpdateStats(tf.stop_gradient(shares), reg_value, examples, bad).packed()

    def sum_stats(self, per_replica_stats) -> tf.Tensor:
        """Packed micro-batch statistics summed over the replicas (one all-reduce)."""
        return sum_over_replicas(self.strategy, per_replica_stats)
