"""Gramian methods that share the update among the tasks as a fair-allocation game: `nash_mtl`
(Nash-MTL: the Nash bargaining solution, Navon et al.) and `fairgrad` (FairGrad: the alpha-fair
allocation, Ban & Ji; alpha = 1 is Nash-MTL's solution). Both solve G w = w^(-1/alpha)
(elementwise, w > 0) by damped Newton in float64 on a normalised Gramian, so that every task's
gain g_t . d = w_t^(-1/alpha) is positive.

Each is a `GramianWeighting` (`base`: its weights come from the Gramian alone, what that
means for the step, for `weights()` and for the cost).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import (GramianWeighting, StepContext, check_option, is_int, is_number,
                                state_variable)
from mtl.weighting.base import gramian as gramian_of


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


class FairGrad(GramianWeighting):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    Maximises the alpha-fair utility sum_t (g_t . d)^{1-alpha} / (1 - alpha) of the tasks' gains
    over a ball; with d = sum_t w_t g_t its optimality condition is

        G w = w^{-1/alpha}   (elementwise, w > 0),   d = J^T w,

    so every task's gain is g_t . d = w_t^{-1/alpha} > 0 (the direction conflicts with no task).
    alpha = 1 is Nash-MTL's bargaining solution; alpha -> infinity approaches max-min fairness.
    The official code (and LibMTL) solves the equations with `scipy.optimize.least_squares` from
    w = 1/T; here they are the stationarity condition of the strictly convex
    phi(w) = w^T G w / 2 - sum_t h(w_t), h' = w^{-1/alpha}, minimised by damped Newton in float64
    on G / |G|_F (the solution for G is the one for G / |G|_F times |G|_F^{-alpha/(alpha+1)}),
    with a 1e-10 ridge so that a solution exists for (nearly) Pareto-stationary gradients.
    The official code then clips the shared gradient at norm `max_norm` = 1: that is the
    step's gradient clipping, the trainer's `clip_norm=1` (`--clip_norm=1`), not a weighting
    option.

    Options:
      alpha: the fairness exponent (> 0). Default 1.0: the official `FairGrad(alpha=1.0)`
        class default and LibMTL's `--FairGrad_alpha` default (the official CelebA script runs
        alpha = 2).

    rep mode: no (LibMTL refuses rep_grad for it; the official code uses the shared
    parameters). Cost: T backward passes + the Gramian + O(T^3) Newton steps.
    """

    name = "fairgrad"
    no_rep_reason = ("its official code and LibMTL solve it on the shared parameters' gradients "
                     "(LibMTL refuses rep_grad for it)")
    RIDGE = 1e-10

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        check_option(is_number(alpha) and alpha > 0, self.name, "alpha", alpha, "a number > 0")
        self.alpha = float(alpha)

    def _solve(self, gramian: tf.Tensor, max_iterations: int = 200) -> tf.Tensor:
        """w > 0 with G w = w^(-1/alpha), for a positive definite float64 G."""
        t = self.num_tasks
        exponent = 1.0 / self.alpha

        def body(i, w, decrement):
            gradient = tf.linalg.matvec(gramian, w) - tf.pow(w, -exponent)
            hessian = gramian + tf.linalg.diag(exponent * tf.pow(w, -exponent - 1.0))
            delta = -tf.linalg.cholesky_solve(tf.linalg.cholesky(hessian), gradient[:, None])[:, 0]
            decrement = tf.maximum(-tf.reduce_sum(gradient * delta), 0.0)
            step = 1.0 / (1.0 + tf.sqrt(decrement))
            # Stay inside w > 0: at most 90% of the way to the boundary.
            limit = tf.reduce_min(tf.where(delta < 0.0, -0.9 * w / delta,
                                           tf.constant(float("inf"), tf.float64)))
            return i + 1, w + tf.minimum(step, limit) * delta, decrement

        _, w, _ = tf.while_loop(
            lambda i, w, dec: (i < max_iterations) & (dec > 1e-20), body,
            (tf.constant(0), tf.fill([t], tf.constant(1.0 / t, tf.float64)),
             tf.constant(float("inf"), tf.float64)))
        return w

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        gramian = tf.cast(gramian, tf.float64)
        scale = tf.norm(gramian)
        normalised = tf.math.divide_no_nan(gramian, scale)
        normalised += self.RIDGE * tf.eye(self.num_tasks, dtype=tf.float64)
        w = self._solve(normalised)
        w = w * tf.pow(tf.maximum(scale, 1e-300), -self.alpha / (self.alpha + 1.0))
        w = tf.where(scale > 0.0, w, tf.zeros_like(w))
        return self._record_gradient_weights(tf.cast(w, tf.float32))
