"""Gradient surgery: `pcgrad`, `gradvac` and `graddrop` edit each task gradient against the
others, then sum them.

PCGrad and GradVac only ever add multiples of task gradients to task gradients, so the result is
`w @ J` for some weights w that depend on inner products alone: they are computed from the
Gramian (`uses_gramian = True`), tracking g_i' = c_i J as the coefficient row c_i, with
g_i' . g_j = c_i G[:, j] and |g_i'|^2 = c_i G c_i^T. GradDrop masks coordinates, so it needs the
Jacobian itself.

Random choices (task orders, GradDrop's uniform draw) use stateless ops seeded by the option
`seed` and the method's own call counter: every replica draws the same numbers, a resumed run
draws what the uninterrupted run would, and XLA compiles them.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import (GradientWeighting, GramianWeighting, SeededDraws, StepContext,
                                check_option, is_number, state_variable)


def _visit(orders: tf.Tensor, position: int, num_tasks: int):
    """For every task i: the task j_i it visits at `position` of its order, as a one-hot [T, T],
    and whether j_i != i (a task is not edited against itself)."""
    j = orders[:, position]
    return tf.one_hot(j, num_tasks), tf.not_equal(j, tf.range(num_tasks))


class PCGrad(SeededDraws, GramianWeighting):
    """Projecting Conflicting Gradients (Yu et al., "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020).

    For each task i, in a random order of the other tasks j: if g_i' . g_j < 0, then
    g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j  (g_i' starts as g_i). Direction: sum_i g_i'
    (the paper's sum). Each task has its own random order, drawn per call from (`seed`, call
    counter); the order only matters with three tasks or more.

    Exact weights: the direction is w @ J with w = column sums of the coefficient matrix, so
    `weights()` reports the weights actually applied.

    Options:
      seed: an int, for the task orders.

    Cost: T backward passes (the Jacobian) + the Gramian (T^2 P) + O(T^3). rep mode: no (see
    `no_rep_reason`).
    """

    name = "pcgrad"
    no_rep_reason = ("its paper and official code project the shared parameters' gradients "
                     "(LibMTL refuses rep_grad for it): conflicts there and in the "
                     "representation differ")

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        t = self.num_tasks
        orders = solvers.random_orders(t, self._next_seed())
        squared_norms = tf.linalg.diag_part(gramian)
        coefficients = tf.eye(t)                         # Row i: g_i' = coefficients[i] @ J.
        for position in range(t):
            target, other = _visit(orders, position, t)
            dots = tf.reduce_sum(tf.matmul(coefficients, gramian) * target, axis=1)
            scale = tf.math.divide_no_nan(dots, tf.linalg.matvec(target, squared_norms))
            scale = tf.where(other & (dots < 0.0), scale, 0.0)
            coefficients -= scale[:, None] * target
        return self._record_gradient_weights(tf.reduce_sum(coefficients, axis=0))


class GradVac(SeededDraws, GramianWeighting):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021), whole-model granularity.

    Keeps EMA targets phi_hat[i, j] of the cosine similarity of tasks i and j (a [T, T]
    variable, start 0). For each task i, in a random order of the other tasks j, with
    phi = cos(g_i', g_j): if phi < phi_hat[i, j],

        g_i' <- g_i' + |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                       / (|g_j| sqrt(1 - phi_hat^2)) * g_j

    which raises the similarity to phi_hat; then, in every case,
    phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi (the paper's Algorithm 1 and TorchJD;
    LibMTL updates only when the correction fires). Direction: sum_i g_i'. With phi_hat = 0 it
    behaves like PCGrad the first time.

    The paper's per-layer targets need the parameter layout, which `aggregate` does not see:
    this is its whole-model variant, hence `supports_rep = False` (the paper applies it to
    parameters, as LibMTL does).

    Options:
      beta: EMA rate in [0, 1]. Default 0.5, LibMTL's `--GradVac_beta`; the paper's
        experiments and TorchJD's default use 0.01 (`beta=0.01` for that form): targets that
        follow the cosines 50x more slowly.
      seed: an int, for the task orders.

    Cost: T backward passes + the Gramian + O(T^3).
    """

    name = "gradvac"
    no_rep_reason = "it acts on the shared parameters' gradients (per layer in the paper)"

    def __init__(self, beta: float = 0.5, seed: int = 0):
        super().__init__(seed=seed)
        check_option(is_number(beta) and 0.0 <= beta <= 1.0, self.name, "beta", beta,
                     "a number in [0, 1]")
        self.beta = float(beta)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.targets = state_variable(tf.zeros([self.num_tasks, self.num_tasks]), "targets")

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        t, eps = self.num_tasks, 1e-8
        orders = solvers.random_orders(t, self._next_seed())
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        targets = tf.convert_to_tensor(self.targets)
        coefficients = tf.eye(t)
        for position in range(t):
            target_onehot, other = _visit(orders, position, t)
            products = tf.matmul(coefficients, gramian)
            dots = tf.reduce_sum(products * target_onehot, axis=1)               # g_i' . g_j
            edited_norms = tf.sqrt(tf.maximum(tf.reduce_sum(products * coefficients, 1), 0.0))
            other_norms = tf.linalg.matvec(target_onehot, norms)                 # |g_j|
            phi = tf.clip_by_value(dots / (edited_norms * other_norms + eps), -1.0, 1.0)
            phi_hat = tf.reduce_sum(targets * target_onehot, axis=1)             # [i, j_i]
            scale = edited_norms * (phi_hat * tf.sqrt(1.0 - phi ** 2)
                                    - phi * tf.sqrt(1.0 - phi_hat ** 2)) \
                / (other_norms * tf.sqrt(1.0 - phi_hat ** 2) + eps)
            scale = tf.where(other & (phi < phi_hat), scale, 0.0)
            coefficients += scale[:, None] * target_onehot
            updated = tf.where(other, (1.0 - self.beta) * phi_hat + self.beta * phi, phi_hat)
            targets += (updated - phi_hat)[:, None] * target_onehot
        self.targets.assign(targets)
        return self._record_gradient_weights(tf.reduce_sum(coefficients, axis=0))


class GradDrop(SeededDraws, GradientWeighting):
    """Gradient Sign Dropout (Chen et al., "Just Pick a Sign", NeurIPS 2020).

    Per coordinate p of the gradients: sign purity P = (1 + sum_i g_ip / sum_i |g_ip|) / 2, a
    uniform draw U_p, and the mask M_ip = [P > U][g_ip > 0] + [P < U][g_ip < 0]: with
    probability P only the positive components pass, else only the negative ones. Direction:
    sum_i (leak + (1 - leak) M_i) * g_i.

    rep mode (the paper's form, `masks_from_rep`): the paper applies it to the gradients w.r.t.
    an activation A (the shared representation), batch-separated: each task's gradient is
    multiplied by sign(A) and summed over the batch, s_t = sum_b sign(A_b) dL_t/dA_b [D]; the
    purity, draw and mask are per feature of s, and the mask multiplies every example's
    gradient dL_t/dA_b before they are summed over tasks and carried back through the backbone
    (LibMTL's GradDrop, the only form it offers). The batch sums add up over micro-batches and
    replicas, so the mask is the whole update's. exact mode (`aggregate`): the same rule on the
    rows of the parameter Jacobian, per parameter, without the sign correction (a variant).

    `weights()` reports, in rep mode, each task's mean multiplier; in exact mode the
    least-squares weights of the rows closest to the direction (the direction is not a
    combination of the task gradients).

    Options:
      leak: in [0, 1]; fraction of every gradient always kept (default 0, the paper's method).
      seed: an int, for the uniform draw (from (seed, call counter)).

    Cost: T backward passes + O(T P) elementwise + the Gramian for the reported weights.
    """

    name = "graddrop"
    rep_mode = ("Chen et al. 2020, Algorithm 1 with batch-separated gradients: masks on the "
                "representation's gradients after the sign(input) correction (LibMTL's form)")
    rep_form = "masks"

    def __init__(self, leak: float = 0.0, seed: int = 0):
        super().__init__(seed=seed)
        check_option(is_number(leak) and 0.0 <= leak <= 1.0, self.name, "leak", leak,
                     "a number in [0, 1]")
        self.leak = float(leak)

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        del context
        jacobian = tf.convert_to_tensor(jacobian, tf.float32)
        purity = 0.5 * (1.0 + tf.reduce_sum(jacobian, 0)
                        / (tf.reduce_sum(tf.abs(jacobian), 0) + 1e-7))
        uniform = tf.random.stateless_uniform(tf.shape(purity), seed=self._next_seed())
        keep = ((purity > uniform)[None, :] & (jacobian > 0.0)) \
            | ((purity < uniform)[None, :] & (jacobian < 0.0))
        direction = tf.reduce_sum(
            jacobian * (self.leak + (1.0 - self.leak) * tf.cast(keep, tf.float32)), axis=0)
        self._record_gradient_weights(solvers.least_squares_weights(jacobian, direction))
        return direction

    def masks_from_rep(self, signed_sums: tf.Tensor) -> tf.Tensor:
        """rep mode: s [T, D], each task's representation gradient times sign(A), summed over
        the update's examples -> the multipliers [T, D] of each task's representation gradient,
        leak + (1 - leak) M (M the paper's mask, from the purity of s and one uniform draw per
        feature)."""
        s = tf.cast(signed_sums, tf.float32)
        purity = 0.5 * (1.0 + tf.reduce_sum(s, 0) / (tf.reduce_sum(tf.abs(s), 0) + 1e-7))
        uniform = tf.random.stateless_uniform(tf.shape(purity), seed=self._next_seed())
        keep = ((purity > uniform)[None, :] & (s > 0.0)) | ((purity < uniform)[None, :] & (s < 0.0))
        multipliers = self.leak + (1.0 - self.leak) * tf.cast(keep, tf.float32)
        self._record_gradient_weights(tf.reduce_mean(multipliers, axis=1))
        return multipliers
