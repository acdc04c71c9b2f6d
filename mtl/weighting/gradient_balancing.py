"""Gramian methods that balance the task gradients' magnitudes: `imtl` (IMTL-G: a direction
with equal projections on every unit task gradient, Liu et al.), `aligned_mtl` (Aligned-MTL:
the Jacobian replaced by one with orthogonal rows of equal norm, Senushkin et al.) and
`gradnorm` (GradNorm: weights that move the gradient norms towards each task's relative
training rate, Chen et al.).

Each is a `GramianWeighting` (`base`: its weights come from the Gramian alone, what that
means for the step, for `weights()` and for the cost).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting.base import (GramianWeighting, StepContext, check_option, is_number,
                                state_variable)


class IMTL(GramianWeighting):
    """Impartial MTL, gradient part IMTL-G (Liu et al., "Towards Impartial Multi-task
    Learning", ICLR 2021).

    The direction d = sum_t a_t g_t with sum_t a_t = 1 whose projections onto every unit task
    gradient u_t = g_t / |g_t| are equal: d . (u_1 - u_t) = 0 for t > 1. Closed form:
    a_{2:} = g_1 U^T (D U^T)^+, a_1 = 1 - sum a_{2:}, with D rows g_1 - g_t and U rows u_1 - u_t,
    all inner products read from the Gramian (pseudo-inverse for degenerate cases).

    rep mode: yes (the paper computes it on the shared representation).
    Cost: T backward passes + the Gramian + O(T^3).
    """

    name = "imtl"
    gramian_dtype = tf.float64
    rep_mode = "Liu et al. 2021, IMTL-G on the shared feature's gradients (as LibMTL's rep_grad)"

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        if self.num_tasks == 1:
            return self._record_gradient_weights(tf.ones([1]))
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        g_dot_u = tf.math.divide_no_nan(gramian, norms[None, :])        # [i, j] = g_i . u_j
        first = g_dot_u[0, 0] - g_dot_u[0, 1:]                          # g_1 . (u_1 - u_j)
        # (D U^T)[j, k] = (g_1 - g_j) . (u_1 - u_k),  j, k >= 2.
        du = (g_dot_u[0, 0] - g_dot_u[0, 1:][None, :]
              - g_dot_u[1:, 0][:, None] + g_dot_u[1:, 1:])
        # Singular values below 1e-10 of the largest are rounding (identical or dependent
        # gradients, where d . (u_1 - u_k) = 0 holds for any weights): the pseudo-inverse drops
        # them (float64's default cut-off, ~1e-14, would invert the rounding).
        rest = tf.linalg.matvec(tf.linalg.pinv(du, rcond=1e-10), first, transpose_a=True)
        weights = tf.concat([[1.0 - tf.reduce_sum(rest)], rest], 0)
        return self._record_gradient_weights(tf.cast(weights, tf.float32))


class AlignedMTL(GramianWeighting):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023).

    Replaces J by the aligned Jacobian J' = sigma_min V Sigma^{-1} V^T J, whose rows are
    orthogonal with equal norms sigma_min (G = V Sigma^2 V^T, eigenvalues below
    max(eig) * T * float32 eps dropped as rank deficiency, sigma_min the smallest kept singular
    value), and steps along its row sum: weights a = sigma_min V Sigma^{-1} V^T 1.

    rep mode: yes (the paper's Aligned-MTL-UB runs on the shared representation).
    Cost: T backward passes + the Gramian + one T x T eigendecomposition.
    """

    name = "aligned_mtl"
    gramian_dtype = tf.float64
    rep_mode = "Senushkin et al. 2023, Aligned-MTL-UB (the upper bound on representation gradients)"

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        eigenvalues, eigenvectors = tf.linalg.eigh(gramian)
        tolerance = tf.reduce_max(eigenvalues) * self.num_tasks * 1.1920929e-07
        kept = eigenvalues > tolerance
        singular = tf.sqrt(tf.where(kept, eigenvalues, 1.0))
        sigma_min = tf.reduce_min(tf.where(kept, singular, float("inf")))
        inverse = tf.where(kept, 1.0 / singular, 0.0)
        b = tf.matmul(eigenvectors * inverse[None, :], eigenvectors, transpose_b=True)
        weights = tf.where(tf.reduce_any(kept), sigma_min * tf.reduce_sum(b, axis=1), 0.0)
        return self._record_gradient_weights(tf.cast(weights, tf.float32))


class GradNorm(GramianWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018), aggregate-only form.

    Task weights w (a variable, start 1, sum T). Each call, with the rows' norms n_t = |g_t|
    (from the Gramian) and the loss ratios L~_t = L_t / L_t(0) (L_t(0) = the first positive
    loss seen, stored), r_t = L~_t / mean(L~):

        target_t = mean_j(w_j n_j) * r_t^alpha          (held constant)
        L_grad = sum_t |w_t n_t - target_t|,   dL_grad/dw_t = sign(w_t n_t - target_t) n_t

    The direction uses the current weights, sum_t w_t g_t; then w takes one gradient step on
    L_grad, w <- w - lr * dL_grad/dw / mean(n) (divided by the mean norm so that `lr` does not
    depend on the gradients' scale; the paper trains w with the model's optimizer instead),
    clipped at 0 and renormalised to sum T.

    Needs the losses: call with `context=StepContext(global_losses=...)` (raw task losses of
    the global batch); `needs_losses = True`.

    Options:
      alpha: the restoring-force exponent (>= 0); default 1.5, the paper's value for NYUv2 and
        LibMTL's `--alpha` default.
      lr: step size of the weights (> 0); default 0.025 (ours: the paper trains the weights
        with the model's optimizer and learning rate).

    rep mode: yes (the paper uses the last shared layer; gradients w.r.t. the shared
    representation are the usual stand-in, as LibMTL).
    Cost: T backward passes + the Gramian's diagonal (T P).
    """

    name = "gradnorm"
    rep_mode = "Chen et al. 2018: gradient norms at the last shared layer"
    needs_losses = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025):
        super().__init__()
        check_option(is_number(alpha) and alpha >= 0, self.name, "alpha", alpha,
                     "a number >= 0")
        check_option(is_number(lr) and lr > 0, self.name, "lr", lr, "a number > 0")
        self.alpha = float(alpha)
        self.lr = float(lr)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.loss_scales = state_variable(tf.ones([self.num_tasks]), "loss_scales")
        self.initial_losses = state_variable(tf.zeros([self.num_tasks]), "initial_losses")

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        losses = self._losses(context)
        initial = tf.convert_to_tensor(self.initial_losses)
        initial = tf.where(initial > 0.0, initial, losses)
        self.initial_losses.assign(initial)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        w = tf.convert_to_tensor(self.loss_scales)
        weighted_norms = w * norms
        ratios = tf.where(initial > 0.0, tf.math.divide_no_nan(losses, initial), 1.0)
        relative = tf.math.divide_no_nan(ratios, tf.reduce_mean(ratios))
        target = tf.reduce_mean(weighted_norms) * relative ** self.alpha
        gradient = tf.sign(weighted_norms - target) * tf.math.divide_no_nan(
            norms, tf.reduce_mean(norms))
        updated = tf.maximum(w - self.lr * gradient, 0.0)
        total = tf.reduce_sum(updated)
        updated = tf.where(total > 0.0, self.num_tasks * updated / total, tf.ones_like(w))
        self.loss_scales.assign(updated)
        return self._record_gradient_weights(w)
