"""Gramian methods that project onto the dual cone {x : J x >= 0} of the task gradients, so
that the direction conflicts with no task (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024; their library TorchJD): `upgrad` (each scaled task gradient projected, the
projections summed) and `dualproj` (the mean gradient projected). Both normalise the Gramian as
TorchJD does (`TraceNormalisedGramian`) and solve their QPs exactly
(`solvers.project_to_dual_cone`).

Each is a `GramianWeighting` (`base`: its weights come from the Gramian alone, what that
means for the step, for `weights()` and for the cost).
"""

from __future__ import annotations

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import GramianWeighting, StepContext, check_option, is_number


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


class DualProj(TraceNormalisedGramian):
    """DualProj (TorchJD's `DualProj`; Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024; Equation 11 of Lopez-Paz & Ranzato's GEM, NeurIPS 2017).

    The mean of the rows projected onto the dual cone of the rows {x : J x >= 0}: by the
    paper's Proposition 1 the projection of J^T u (u = 1/T) is J^T v with

        v = argmin_v v^T G v  s.t.  v >= u,

    so every task's gain g_t . d = (G v)_t >= 0. As TorchJD, G is divided by its trace (a trace
    below `norm_eps` gives zero weights) and `reg_eps` I is added; the non-conflict property
    then holds up to that regulariser (exactly with reg_eps = 0). The QP is solved exactly, by an
    active-set method in float64 (`solvers.project_to_dual_cone`).

    Options:
      reg_eps: ridge added to the normalised Gramian (>= 0); default 1e-4, TorchJD's default.
      norm_eps: trace below which the weights are zero (>= 0); default 1e-4, TorchJD's default.

    rep mode: no (TorchJD defines it on the Jacobian of the shared parameters).
    Cost: T backward passes + the Gramian + the T x T QP.
    """

    name = "dualproj"
    no_rep_reason = "TorchJD defines it on the Jacobian of the shared parameters"

    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        del context
        normalised, usable = self._normalised(gramian)
        lower = tf.fill([1, self.num_tasks], 1.0 / self.num_tasks)
        v = solvers.project_to_dual_cone(normalised, lower)[0]
        v = tf.where(usable, v, tf.zeros_like(v))
        return self._record_gradient_weights(v)
