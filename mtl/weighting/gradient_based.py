"""Gradient-based methods that choose weights of the task gradients from their Gramian.

Each method here is `w @ J` with weights w computed from G = J J^T ([T, T]) by a closed form or
a small solver in `mtl.weighting.solvers`, so the step may pass the Gramian alone
(`weights_from_gramian`); `aggregate(J)` forms it (T^2 P) and returns `J^T w`. The weights each
method returns are the ones applied, so `weights()` is exact. Cost beyond `equal`: T backward
passes (the Jacobian) and the Gramian; the T x T solve is negligible for T up to tens.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import (GramianWeighting, StepContext, check_option, is_int, is_number,
                                state_variable)
from mtl.weighting.base import gramian as gramian_of


class MGDA(GramianWeighting):
    """Multiple-Gradient Descent (Sener & Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018).

    Weights w = argmin_{w in simplex} |sum_t w_t g_t / n_t|^2: the min-norm point of the convex
    hull of the (normalised) task gradients, solved exactly by an active-set method in float64
    (`solvers.min_norm_point`; the official code's Frank-Wolfe stops early near Pareto
    stationarity). As in the
    official code, the weights found for the normalised gradients are applied to the gradients
    themselves: direction = sum_t w_t g_t, sum_t w_t = 1.

    Options:
      normalization: n_t = 1 ("none"), |g_t| ("l2"), L_t ("loss") or L_t |g_t| ("loss+"); the
        loss forms need `context.global_losses`. Default "none": LibMTL's `--mgda_gn` default;
        the official code offers all four.

    rep mode: yes (the paper's MGDA-UB runs on the shared representation's gradients).
    Cost: T backward passes + the Gramian + an active-set QP of size T.
    """

    name = "mgda"
    gramian_dtype = tf.float64
    rep_mode = "Sener & Koltun 2018, MGDA-UB (gradients w.r.t. the shared representation)"
    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, normalization: str = "none"):
        super().__init__()
        check_option(normalization in self.NORMALIZATIONS, self.name, "normalization",
                     normalization, f"one of {self.NORMALIZATIONS}")
        self.normalization = normalization
        self.needs_losses = normalization in ("loss", "loss+")

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        scale = tf.ones([self.num_tasks], tf.float64)
        if self.normalization in ("l2", "loss+"):
            scale *= tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))
        if self.normalization in ("loss", "loss+"):
            scale *= tf.cast(self._losses(context), tf.float64)
        inverse = tf.math.divide_no_nan(1.0, scale)
        normalised = gramian * inverse[:, None] * inverse[None, :]
        return self._record_gradient_weights(solvers.min_norm_point(normalised))


class CAGrad(GramianWeighting):
    """Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021).

    d = argmax_d min_i g_i . d  s.t.  |d - g_0| <= c |g_0|  (g_0 the mean gradient). Its dual:
    w = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|  (g_w = J^T w), solved here by
    Frank-Wolfe with a closed-form line search (`solvers.cagrad_dual`); then
    d = g_0 + (c |g_0| / |g_w|) g_w, divided by 1 (`rescale=0`), 1 + c^2 (`rescale=1`, the
    official default) or 1 + c (`rescale=2`, the official toy script). Weights:
    (1/T + lam w) / rescale. With c = 0 the direction is the mean gradient.

    Options:
      c: the radius factor, >= 0; default 0.5, LibMTL's `--CAGrad_alpha` default (the
        official code's `alpha`).
      rescale: 0, 1 or 2 as above; default 1, the official code's.

    rep mode: no (see `no_rep_reason`).
    Cost: T backward passes + the Gramian + O(250 T^2) (Frank-Wolfe on the dual, stopped on
    its duality gap).
    """

    name = "cagrad"
    no_rep_reason = ("its paper and official code act on the shared parameters (LibMTL refuses "
                     "rep_grad for it)")

    def __init__(self, c: float = 0.5, rescale: int = 1):
        super().__init__()
        check_option(is_number(c) and c >= 0, self.name, "c", c, "a number >= 0")
        check_option(is_int(rescale) and rescale in (0, 1, 2), self.name, "rescale", rescale,
                     "0 (none), 1 (divide by 1 + c^2) or 2 (divide by 1 + c)")
        self.c = float(c)
        self.rescale = int(rescale)

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        w, lam = solvers.cagrad_dual(gramian, self.c)
        divisor = {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        return self._record_gradient_weights((1.0 / self.num_tasks + lam * w) / divisor)


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


class NashMTL(GramianWeighting):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    Weights a > 0 with G a = 1 / a (elementwise) on the raw Gramian: the Nash bargaining
    solution, for which every task's gain g_t . d = 1 / a_t and |d|^2 = a^T G a = T at any
    gradient scale, as in the official code. Solved on G / |G|_F and scaled back (see `_solve`),
    with a tiny ridge so that a solution exists when the gradients are (nearly)
    Pareto-stationary. Solved without cvxpy by damped
    Newton on the convex a^T G a / 2 - sum log a (`solvers.nash_bargaining`), warm-started at
    the previous weights. Weights are recomputed every `update_every` calls and reused in
    between (kept in a variable). Then, as the official code's `max_norm`, the direction is
    scaled down to norm `max_norm` if longer (0 turns it off); the reported weights include
    that scale.

    Options:
      update_every: recompute the weights every k calls (an int >= 1); default 1, the official
        `update_weights_every` default.
      max_norm: clip norm of the direction (>= 0; 0 = no clipping); default 1, the official
        default.

    rep mode: no (the official implementation and LibMTL run it on the shared parameters).
    Cost: T backward passes + the Gramian + O(T^3) Newton steps (on update calls only).
    """

    name = "nash_mtl"
    gramian_dtype = tf.float64
    no_rep_reason = "the official code and LibMTL solve it on the shared parameters' gradients"
    RIDGE = 1e-10

    def __init__(self, update_every: int = 1, max_norm: float = 1.0):
        super().__init__()
        check_option(is_int(update_every) and update_every >= 1, self.name, "update_every",
                     update_every, "an integer >= 1")
        check_option(is_number(max_norm) and max_norm >= 0, self.name, "max_norm", max_norm,
                     "a number >= 0 (0: no clipping)")
        self.update_every = int(update_every)
        self.max_norm = float(max_norm)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.alpha = state_variable(tf.ones([self.num_tasks]), "alpha")
        self.calls = state_variable(0, "calls", tf.int64)

    def _solve(self, gramian: tf.Tensor) -> tf.Tensor:
        """alpha > 0 with alpha_t (G alpha)_t = 1 on the raw Gramian, as the official code.

        Solved on G / |G|_F (whose solution is alpha * sqrt(|G|_F)) and scaled back, so alpha
        keeps its meaning at any gradient scale: the unclipped direction has norm sqrt(T).
        float64: near the Pareto set the normalised Gramian's smallest eigenvalue falls far
        below float32's resolution of the Newton system, and the ridge must stay below it (a
        ridge that dominates it turns the weights into equal weights).
        """
        gramian = tf.cast(gramian, tf.float64)
        scale = tf.sqrt(tf.norm(gramian))
        normalised = tf.math.divide_no_nan(gramian, tf.square(scale))
        # The ridge is relative to each task's own squared gradient norm (a fixed one is not
        # small against a task whose gradient is 1000x smaller than another's); the floor keeps
        # a zero gradient's row solvable (its weight is large, its contribution zero).
        diagonal = tf.linalg.diag_part(normalised)
        floor = 1e-12 * tf.reduce_max(diagonal) + 1e-300
        normalised += tf.linalg.diag(self.RIDGE * tf.maximum(diagonal, floor))
        previous = tf.convert_to_tensor(self.alpha)
        # Warm start at the previous weights (in normalised units), or at the solution for a
        # diagonal Gramian when that is closer (the first call; a jump in gradient scale).
        warm = tf.cast(previous, tf.float64) * scale
        cold = tf.math.rsqrt(tf.maximum(tf.linalg.diag_part(normalised), 1e-30))

        def objective(a):  # the convex function whose minimiser is the solution
            return 0.5 * tf.reduce_sum(a * tf.linalg.matvec(normalised, a)) \
                - tf.reduce_sum(tf.math.log(a))

        start = tf.where(objective(warm) <= objective(cold), warm, cold)
        alpha = solvers.nash_bargaining(normalised, start)
        alpha = tf.cast(tf.math.divide_no_nan(alpha, scale), tf.float32)
        return tf.where(tf.reduce_all(tf.math.is_finite(alpha) & (alpha > 0.0)), alpha, previous)

    def _next_alpha(self, gramian_fn) -> tf.Tensor:
        """The weights for this call: solved from `gramian_fn()` on update calls, else stored."""
        if self.update_every == 1:
            alpha = self._solve(gramian_fn())
        else:
            # No assignment inside the branches: in a replica context, assigning a mirrored
            # variable inside `tf.cond` needs a merge_call, which control flow does not allow.
            alpha = tf.cond(self.calls % self.update_every == 0,
                            lambda: self._solve(gramian_fn()),
                            lambda: tf.convert_to_tensor(self.alpha))
        self.alpha.assign(alpha)
        self.calls.assign_add(1)
        return alpha

    def _clip_scale(self, direction_norm: tf.Tensor) -> tf.Tensor:
        if self.max_norm == 0.0:
            return tf.constant(1.0)
        return tf.minimum(1.0, tf.math.divide_no_nan(self.max_norm, direction_norm))

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        alpha = self._next_alpha(lambda: gramian)
        alpha64 = tf.cast(alpha, tf.float64)
        norm = tf.sqrt(tf.maximum(tf.reduce_sum(alpha64 * tf.linalg.matvec(gramian, alpha64)),
                                  0.0))
        return self._record_gradient_weights(alpha * self._clip_scale(tf.cast(norm, tf.float32)))

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        """Forms the Gramian only on update calls."""
        del context
        jacobian = tf.convert_to_tensor(jacobian, tf.float32)
        alpha = self._next_alpha(lambda: gramian_of(jacobian))
        direction = tf.linalg.matvec(jacobian, alpha, transpose_a=True)
        scale = self._clip_scale(tf.norm(direction))
        self._record_gradient_weights(alpha * scale)
        return direction * scale


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


class TraceNormalisedGramian(GramianWeighting):
    """TorchJD's dual-cone methods (`upgrad`, `dualproj`): the Gramian divided by its trace
    (`norm_eps` guards a zero trace) and regularised with `reg_eps` I."""

    def __init__(self, reg_eps: float = 1e-4, norm_eps: float = 1e-4):
        super().__init__()
        check_option(is_number(reg_eps) and reg_eps >= 0, self.name, "reg_eps", reg_eps,
                     "a number >= 0")
        check_option(is_number(norm_eps) and norm_eps >= 0, self.name, "norm_eps", norm_eps,
                     "a number >= 0")
        self.reg_eps = float(reg_eps)
        self.norm_eps = float(norm_eps)

    gramian_dtype = tf.float64

    def _normalised(self, gramian: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(the normalised, regularised Gramian in float64, whether the trace was large
        enough)."""
        trace = tf.linalg.trace(gramian)
        usable = trace >= self.norm_eps
        normalised = tf.where(usable, gramian / trace, tf.zeros_like(gramian))
        return normalised + self.reg_eps * tf.eye(self.num_tasks, dtype=gramian.dtype), usable


class UPGrad(TraceNormalisedGramian):
    """Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024; TorchJD's `UPGrad`).

    Projects each scaled task gradient g_i / T onto the dual cone of the rows of J,
    {x : J x >= 0}, and sums the projections. By the paper's Proposition 1 the projection of
    J^T u is J^T v with v = argmin v^T G v s.t. v >= u; with u = e_i / T for each i the weights
    are sum_i v_i. As TorchJD, the Gramian is first divided by its trace (`norm_eps` guards a
    zero trace) and regularised with `reg_eps` I. The T small QPs are solved exactly, by an
    active-set method in float64 (`solvers.project_to_dual_cone`; TorchJD uses quadprog). The
    direction has a non-negative inner product with every task gradient (up to the
    regulariser).

    Options:
      reg_eps: ridge added to the normalised Gramian (>= 0); default 1e-4, TorchJD's default.
      norm_eps: a trace below this gives zero weights (>= 0); default 1e-4, TorchJD's default.

    rep mode: no (defined on the Jacobian w.r.t. the parameters; LibMTL refuses rep mode).
    Cost: T backward passes + the Gramian + T active-set QPs of size T (O(T^4) at most).
    """

    name = "upgrad"
    no_rep_reason = "TorchJD defines it on the Jacobian of the shared parameters"

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        normalised, _ = self._normalised(gramian)
        lower = tf.eye(self.num_tasks) / self.num_tasks
        projections = solvers.project_to_dual_cone(normalised, lower)
        return self._record_gradient_weights(tf.reduce_sum(projections, axis=0))


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
