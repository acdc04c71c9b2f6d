"""Where an update's gradients come from: one part per weighting family, chosen once.

An update is K micro-batches on R replicas. Whatever the family, a source returns the gradients
that one device in float32 would compute on the whole update batch (K x R x per-replica batch):

  * `WeightedGradients` (loss-based methods, and gradient methods in "rep" mode). The method
    looks at the whole batch once (its task losses; in rep mode also the Gramian of the task
    gradients w.r.t. the shared representation) and returns a weight per task loss; the backward
    pass then differentiates the weighted sum. With K > 1 and a method that must see the whole
    batch first, a forward-only pre-pass over the K micro-batches collects what it needs (the
    cost of one more forward per micro-batch; `scripts/benchmark.py` measures it).
  * `JacobianRows` (gradient methods, "exact" mode): the per-task gradients of the shared
    variables are accumulated over micro-batches and replicas as a [T, P] Jacobian; the method
    aggregates it once into one direction.

In both, regularisation losses (`model.losses`) are not a task: their gradient is added once,
after the method has combined the task gradients, and variables that only one task uses get
their task's gradient (loss methods: times the method's weight, as the total is differentiated).

Distribution. A replica's task-loss *share* is its examples' weighted loss sum divided by the
task's normaliser over the whole update batch (`mtl.task_losses.compute_task_losses`): the shares of
all micro-batches and replicas add up to the task loss, and so do their gradients. A quantity
that every replica computes whole (the method's direction, its own variables' gradients) is
divided by R, because the optimizer sums the replicas' gradients. Regularisation is divided by
K x R in each micro-batch for the same reason.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from mtl import weighting as weighting_lib
from mtl.task_losses import compute_task_losses, unpack_batch
from mtl.tasks import Task
from mtl.weighting import StepContext
from mtl.weighting.base import gramian as gramian_of

# Layout of the statistics vector each micro-batch returns per replica (summed over both):
# [task-loss shares (T), regularisation share, examples, non-finite gradient flag].
REG, EXAMPLES, BAD_GRAD = range(3)
NUM_EXTRA_STATS = 3


def flatten_gradients(gradients: Sequence[tf.Tensor], num_tasks: int) -> tf.Tensor:
    """[g_1, ..., g_n] (each [num_tasks, *shape_i]) -> [num_tasks, num_params] float32."""
    return tf.concat([tf.reshape(tf.cast(g, tf.float32), [num_tasks, -1]) for g in gradients],
                     axis=1)


def unflatten(direction: tf.Tensor, variables: Sequence[tf.Variable]) -> list[tf.Tensor]:
    """[num_params] -> one tensor per variable, in the variables' shapes."""
    sizes = [int(np.prod(v.shape)) for v in variables]
    return [tf.reshape(part, v.shape) for part, v in zip(tf.split(direction, sizes), variables)]


def all_finite(tensors) -> tf.Tensor:
    tensors = [t for t in tf.nest.flatten(tensors) if t is not None]
    if not tensors:
        return tf.constant(True)
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def _sum_over_replicas(strategy, value):
    return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


# --------------------------------------------------------------------------------- forward
class Forward:
    """How the model runs in a train step: returns ({task: output}, shared features or None).

    The whole Functional model, or (when the shared features are needed, or the backbone is
    frozen) the backbone and then each head, the same layer objects the model runs. A frozen
    backbone runs in inference mode (Dropout off, BatchNorm on its moving statistics); the
    heads in training mode.
    """

    def __init__(self, model, tasks: Sequence[Task], *, need_features: bool):
        backbone = getattr(model, "backbone", None)
        self.model = model
        self.task_names = [t.name for t in tasks]
        self.backbone_frozen = backbone is not None and not backbone.trainable_weights
        self.split = backbone is not None and (need_features or self.backbone_frozen)

    @property
    def feature_shape(self) -> tuple:
        """The shared features' shape without the batch axis."""
        return tuple(int(d) for d in self.model.backbone.output.shape[1:])

    def __call__(self, features):
        if not self.split:
            return self.model(features, training=True), None
        shared = self.model.backbone(features, training=not self.backbone_frozen)
        heads = self.model.heads
        return {name: heads[name](shared, training=True) for name in self.task_names}, shared

    def regularisation(self):
        """The sum of the model's regularisation losses (None when it has none)."""
        losses = self.model.losses
        return tf.add_n([tf.cast(l, tf.float32) for l in losses]) if losses else None


# ---------------------------------------------------------------------------- accumulators
class PassThrough:
    """K = 1: the one micro-batch's per-replica gradients are the update's."""

    def __init__(self, strategy):
        self.strategy = strategy
        self._value = None

    def reset(self) -> None:
        self._value = None

    def add(self, per_replica) -> None:
        self._value = per_replica

    def local(self):
        """Per-replica values (to pass into `strategy.run`)."""
        return self._value

    def total_of(self, index: int):
        """Part `index` summed over replicas (cross-replica context)."""
        return _sum_over_replicas(self.strategy, self._value[index])


class Summed:
    """K > 1: per-replica sums over the micro-batches, in ON_READ variables (each replica adds
    its own gradients; reading in the cross-replica context sums the replicas)."""

    def __init__(self, strategy, shapes: Sequence[Sequence[int]], dtypes=None):
        self.strategy = strategy
        dtypes = dtypes or [tf.float32] * len(shapes)
        with strategy.scope():
            self.variables = [
                tf.Variable(tf.zeros(shape, dtype), trainable=False,
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.SUM)
                for shape, dtype in zip(shapes, dtypes)]

    def reset(self) -> None:
        self.strategy.run(lambda: [v.assign(tf.zeros_like(v)) for v in self.variables])

    def add(self, per_replica) -> None:
        def add_local(values):
            for variable, value in zip(self.variables, values):
                variable.assign_add(tf.cast(value, variable.dtype))
        self.strategy.run(add_local, args=(per_replica,))

    def local(self):
        return self.strategy.run(lambda: [v.read_value() for v in self.variables])

    def total_of(self, index: int):
        return self.variables[index].read_value()


def accumulator(strategy, shapes, micro_batches: int, dtypes=None):
    return PassThrough(strategy) if micro_batches == 1 else Summed(strategy, shapes, dtypes)


def task_jacobian(tape, rows, variables, scale, dtype, chunk_size: int) -> tf.Tensor:
    """The (loss-scaled) rows' gradients w.r.t. `variables`, unscaled, as [T, P] in `dtype`.

    chunk_size >= T: one batched Jacobian (pfor): every task's backward pass vectorised at
    once, holding T copies of the activation gradients. chunk_size < T: a loop over the tasks
    with at most `chunk_size` of their backward passes in flight (a `tf.while_loop`, one
    instance of the backward graph), so the memory is bounded in the chunk, not in T.
    """
    num_tasks = int(rows.shape[0])
    batched = chunk_size >= num_tasks
    jacobian = tape.jacobian(rows, variables, experimental_use_pfor=batched,
                             parallel_iterations=None if batched else chunk_size,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.cast(flatten_gradients(jacobian, num_tasks) / scale, dtype)


#: The least extra memory the per-task backward passes may take by default (see
#: `default_chunk_size`): TensorFlow's own runtime takes more than this.
MIN_CHUNK_BUDGET_BYTES = 256 * 2 ** 20
#: The per-task backward passes may hold this many forward passes' activations by default.
CHUNK_BUDGET_FORWARD_PASSES = 4


def default_chunk_size(num_tasks: int, activation_bytes: float) -> int:
    """Tasks whose backward passes run at once when `jacobian_chunk_size` is not set.

    `activation_bytes`: one forward pass's activations (per replica and micro-batch), an upper
    bound on what one task's backward pass holds (measured on the 64x64 resnet: ~0.5 of it per
    batched task). The per-task passes may hold `CHUNK_BUDGET_FORWARD_PASSES` forward passes'
    activations (at least `MIN_CHUNK_BUDGET_BYTES`), about as much again as `equal` needs:
    every task batched (one pfor Jacobian) when that fits, else a loop with the largest number
    of tasks in flight that does (at least 1).
    """
    budget = max(CHUNK_BUDGET_FORWARD_PASSES * activation_bytes, MIN_CHUNK_BUDGET_BYTES)
    if num_tasks * activation_bytes <= budget:
        return num_tasks
    return int(max(1, min(num_tasks - 1, budget // max(activation_bytes, 1))))


def _flat_layers(model) -> list:
    """The layers of a (nested) Functional model in their graph order, sub-models opened."""
    layers = []
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, tf.keras.Model) and getattr(layer, "layers", None):
            layers.extend(_flat_layers(layer))
        else:
            layers.append(layer)
    return layers


def activation_elements(model, from_variables=None) -> int:
    """Elements of the layer outputs of a (nested) Functional model, per example: of every
    layer, or (`from_variables`) of the layers from the first one that owns one of them on,
    which a backward pass to those variables goes through."""
    wanted = None if from_variables is None else {id(v) for v in from_variables}
    total = 0
    for layer in _flat_layers(model):
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue  # the inputs: no layer's output, and counted once per nesting
        if wanted is not None:
            if not any(id(v) in wanted for v in layer.weights):
                continue
            wanted = None  # the backward pass reaches this layer and everything after it
        for node in getattr(layer, "_inbound_nodes", ()):
            for tensor in tf.nest.flatten(getattr(node, "outputs", ())):
                shape = getattr(tensor, "shape", None)
                if shape is not None and None not in tuple(shape[1:]):
                    total += int(np.prod(tuple(shape[1:])))
    return total


# ---------------------------------------------------------------------------------- update
@dataclasses.dataclass
class Update:
    """What a source computed for one update (cross-replica context).

    `apply_args` are passed to `strategy.run(source.replica_gradients, args=apply_args)`, which
    returns this replica's gradient for each of `source.variables`. `stats` [T + 3] are summed
    over micro-batches and replicas; `finite` covers what the method computed from them;
    `metric_inputs` are the (batch, per-replica outputs) pairs for the train metrics.
    """

    apply_args: tuple
    stats: tf.Tensor
    finite: tf.Tensor
    metric_inputs: list


class _Source:
    """What the sources share: the variables, the micro-batch loss computation, finiteness."""

    def __init__(self, *, forward: Forward, tasks, method, strategy, model_variables,
                 shared_variables, micro_batches: int, chunk_size: int | None = None,
                 jacobian_dtype=tf.float32):
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

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _resolve_chunk_size(self, batch) -> int:
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

    def _losses_and_reg(self, batch, normalisers):
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

    def _stats(self, batch, shares, reg, gradients):
        features = unpack_batch(batch)[0]
        examples = tf.cast(tf.shape(tf.nest.flatten(features)[0])[0], tf.float32)
        reg_value = tf.zeros([]) if reg is None else tf.stop_gradient(reg)
        bad = tf.cast(tf.logical_not(all_finite(gradients)), tf.float32)
        return tf.concat([tf.stop_gradient(shares), [reg_value, examples, bad]], axis=0)

    @staticmethod
    def _zeros_for_none(gradients, variables) -> list:
        return [tf.zeros_like(v) if g is None else tf.cast(g, tf.float32)
                for g, v in zip(gradients, variables)]

    def _reduce_stats(self, per_replica_stats):
        return _sum_over_replicas(self.strategy, per_replica_stats)


# ---------------------------------------------------------------- weighted-sum gradients
class LossDecision:
    """A loss-based method decides from the whole batch's task losses L [T]:

        total = method.combine(L);  weight_t = d total / d L_t;  its own variables' gradient
        = d total / d theta_method

    so a method whose weights depend on the losses sees the update's losses once, and its
    trainable variables (uncertainty's log-variances) get the whole batch's gradient once.
    """

    needs_gramian = False

    def __init__(self, method):
        self.method = method
        #: Must the method see the update's losses before the backward pass?
        self.needs_whole_batch = bool(getattr(method, "needs_global_losses", True)
                                      or method.trainable_variables)

    def decide(self, losses, gramian=None, num_replicas: int = 1):
        del gramian
        losses = tf.stop_gradient(tf.convert_to_tensor(losses, tf.float32))
        variables = list(self.method.trainable_variables)
        with tf.GradientTape() as tape:
            tape.watch(losses)
            total = self.method.combine(losses, StepContext(global_losses=losses,
                                                            num_replicas=1))
        weights, *method_gradients = tape.gradient(
            total, [losses] + variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # Every replica computes the whole gradient; the optimizer sums the replicas'.
        method_gradients = [g / float(num_replicas) for g in method_gradients]
        return weights, weights, method_gradients


class RepDecision:
    """A Gramian method in "rep" mode decides from the Gramian of the per-task gradients
    w.r.t. the shared representation, summed over the update's examples (the representation of
    different examples are different coordinates, so the whole batch's Gramian is the sum of
    the micro-batches' and replicas'). The shared variables get sum_t w_t grad(row_t), the other
    variables their task's plain gradient (row_t = Task.weight * L_t)."""

    needs_gramian = True
    needs_whole_batch = True

    def __init__(self, method, task_weights):
        self.method = method
        self.task_weights = task_weights

    def decide(self, losses, gramian, num_replicas: int = 1):
        losses = tf.stop_gradient(tf.convert_to_tensor(losses, tf.float32))
        w = self.method.weights_from_gramian(
            gramian, StepContext(global_losses=losses, num_replicas=num_replicas))
        w = tf.stop_gradient(tf.cast(w, tf.float32))
        return w * self.task_weights, self.task_weights, []


class RepMaskDecision:
    """GradDrop in "rep" mode: the method decides from each task's representation gradient
    times sign(representation), summed over the update's examples (s [T, D]: sums over
    micro-batches and replicas), a multiplier per task and feature [T, D]. The shared
    variables get the backbone's gradient for the upstream sum_t m_t * d row_t / d A (every
    example's representation gradient masked alike); the other variables their task's plain
    gradient."""

    needs_gramian = True  # a statistic of the representation's gradients
    needs_whole_batch = True

    def __init__(self, method, task_weights):
        self.method = method
        self.task_weights = task_weights

    def decide(self, losses, signed_sums, num_replicas: int = 1):
        del losses, num_replicas
        masks = self.method.masks_from_rep(signed_sums)
        return tf.stop_gradient(tf.cast(masks, tf.float32)), self.task_weights, []


class ScopeDecision(RepDecision):
    """Partial Jacobian descent (`jacobian_scope`): a Gramian method decides from the Gramian
    of the per-task gradients of a scope of the shared variables, J_s [T, P_s], summed over the
    update's micro-batches and replicas first (the Gramian of a sum is not the sum of the
    Gramians); every shared variable then gets sum_t w_t grad(row_t), the other variables their
    task's plain gradient, as in rep mode."""

    def decide(self, losses, jacobian, num_replicas: int = 1):
        return super().decide(losses, gramian_of(jacobian), num_replicas)


class PlainSum:
    """No trainable variable is shared between tasks: a gradient method has nothing to
    combine, and every variable gets its task's plain gradient (the weighted loss sum)."""

    needs_gramian = False
    needs_whole_batch = False

    def __init__(self, task_weights):
        self.task_weights = task_weights

    def decide(self, losses, gramian=None, num_replicas: int = 1):
        del losses, gramian, num_replicas
        return self.task_weights, self.task_weights, []


class WeightedGradients(_Source):
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

    def _replica_pass(self, batch, normalisers, scale, decision):
        """Forward and backward on this replica's micro-batch. `decision` None: decide here."""
        if self.scope:
            self._resolve_chunk_size(batch)
        jacobian = None
        with tf.GradientTape(persistent=self.separate_shared) as tape:
            outputs, shared_features, shares, reg = self._losses_and_reg(batch, normalisers)
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
        gradients = self._zeros_for_none(gradients, self.shared + self.plain)
        stats = self._stats(batch, shares, reg, [gradients, method_gradients, shared_weights])
        return gradients, list(method_gradients), outputs, stats

    def _replica_prepass(self, batch, normalisers, scale):
        """Forward only (and, in rep mode, the Gramian): this replica's loss shares [T] and
        Gramian [T, T] (zeros when not needed)."""
        if self.scope:
            self._resolve_chunk_size(batch)
        with tf.GradientTape(persistent=True) as tape:
            _, shared_features, shares, _ = self._losses_and_reg(batch, normalisers)
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
            losses += _sum_over_replicas(self.strategy, shares)
            gramian += _sum_over_replicas(self.strategy, local_gramian)
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
                self._replica_pass, args=(batch, normalisers, scale, decision))
            self.gradients.add(gradients)
            stats += self._reduce_stats(local_stats)
            metric_inputs.append((batch, outputs))
        if decision is not None:
            method_gradients = decision[2]
        return Update(apply_args=(self.gradients.local(), method_gradients), stats=stats,
                      finite=tf.constant(True), metric_inputs=metric_inputs)


# ------------------------------------------------------------------------ Jacobian rows
class JacobianRows(_Source):
    """Exact mode: the per-task gradients of the shared variables, J [T, P] (one batched
    Jacobian per micro-batch, pfor), summed over micro-batches and replicas; the method turns
    the whole batch's J into one direction (cross-replica context), once per update. The other
    variables get the gradient of sum_t Task.weight * L_t, the regularisation its own."""

    def __init__(self, *, group_methods: dict | None = None, group_of=None, **kwargs):
        super().__init__(**kwargs)
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

    def _replica_pass(self, batch, normalisers, scale):
        self._resolve_chunk_size(batch)
        with tf.GradientTape(persistent=True) as tape:
            outputs, _, shares, reg = self._losses_and_reg(batch, normalisers)
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
        plain = self._zeros_for_none(plain, self.plain)
        reg_shared = self._zeros_for_none(reg_shared, self.shared)
        stats = self._stats(batch, shares, reg, [jacobian, plain, reg_shared])
        return [jacobian] + plain + reg_shared, outputs, stats

    def _aggregate(self, jacobian, context):
        """The method's direction [P]: on the whole Jacobian, or group by group."""
        if not isinstance(self.method, weighting_lib.GramianWeighting):
            jacobian = tf.cast(jacobian, tf.float32)  # Gramian methods convert block-wise.
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
                self._replica_pass, args=(batch, normalisers, scale))
            self.parts.add(parts)
            stats += self._reduce_stats(local_stats)
            metric_inputs.append((batch, outputs))
        jacobian = self.parts.total_of(0)
        losses = stats[:self.num_tasks]
        context = StepContext(global_losses=losses,
                              num_replicas=self.strategy.num_replicas_in_sync)
        direction = self._aggregate(jacobian, context)
        return Update(apply_args=(self.parts.local(), direction), stats=stats,
                      finite=all_finite(direction), metric_inputs=metric_inputs)


# --------------------------------------------------------------------------- the choice
def gradient_source(*, method, gradient_mode: str, forward_for: Callable, tasks, strategy,
                    model_variables, shared_variables, micro_batches: int,
                    group_methods: dict | None = None, group_of=None,
                    jacobian_chunk_size: int | None = None, scope_variables=None,
                    jacobian_dtype="float32") -> _Source:
    """The one place where the weighting family decides how gradients are computed.

    `forward_for(need_features)` builds the `Forward` the source needs.
    """
    task_weights = tf.constant([t.weight for t in tasks], tf.float32)
    common = dict(tasks=tasks, method=method, strategy=strategy,
                  model_variables=model_variables, micro_batches=micro_batches,
                  chunk_size=jacobian_chunk_size, jacobian_dtype=jacobian_dtype)
    if isinstance(method, weighting_lib.LossWeighting):
        return WeightedGradients(LossDecision(method), forward=forward_for(False),
                                 shared_variables=(), **common)
    if not shared_variables:
        logging.info("Weighting %r has nothing to combine: no trainable variable is shared "
                     "between tasks; every variable trains on its task's plain gradient.",
                     method.name)
        return WeightedGradients(PlainSum(task_weights), forward=forward_for(False),
                                 shared_variables=(), **common)
    if scope_variables:
        return WeightedGradients(ScopeDecision(method, task_weights), forward=forward_for(False),
                                 shared_variables=shared_variables,
                                 scope_variables=scope_variables, **common)
    if gradient_mode == "rep":
        decision = (RepMaskDecision if method.rep_form == "masks" else RepDecision)(
            method, task_weights)
        return WeightedGradients(decision, forward=forward_for(True),
                                 shared_variables=shared_variables, **common)
    return JacobianRows(forward=forward_for(False), shared_variables=shared_variables,
                        group_methods=group_methods, group_of=group_of, **common)
