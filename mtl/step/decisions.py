"""The decision each update's weighted-sum gradients follow: one weight per task loss (or, for
GradDrop in rep mode, a mask per task and feature), made once per update from what the whole
batch gives the method.

`decide(losses, statistic, num_replicas)` returns (the shared variables' weights [T] (or masks
[T, D]), the other variables' weights [T], the method's own variables' gradients), the same on
every replica: its inputs are summed over micro-batches and replicas first.
"""

from __future__ import annotations

import tensorflow as tf

from mtl.weighting import StepContext
from mtl.weighting.base import gramian as gramian_of


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

