"""Gramian methods that find a common descent direction from a small problem over the simplex
of task weights: `mgda` (MGDA: the min-norm point of the task gradients' convex hull, Sener &
Koltun) and `cagrad` (CAGrad: the conflict-averse direction in a ball around the mean gradient,
through its dual over the simplex, Liu et al.). The solvers are in `solvers` (an exact
active-set QP; Frank-Wolfe).

Each is a `GramianWeighting` (`base`: its weights come from the Gramian alone, what that
means for the step, for `weights()` and for the cost).
"""

from __future__ import annotations

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import GramianWeighting, StepContext, check_option, is_int, is_number


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
