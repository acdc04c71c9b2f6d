"""Gradient methods whose direction needs the Jacobian itself, not only its Gramian: `db_mtl`
(DB-MTL: gradients of the log losses, tracked by a moving average and rescaled to the largest
norm, Lin et al.), `moco` (MoCo: tracked gradients combined by weights moved along their
Gramian, Fernando et al.) and `config` (ConFIG: the least-norm direction with equal inner
products with every unit task gradient, rescaled, Liu, Chen & Thuerey). GradDrop, which also
needs the Jacobian, is with the other gradient surgery in `gradient_surgery`.

Each receives the whole update's Jacobian (the same on every replica); state is kept in
`state_variable`s (ONLY_FIRST_REPLICA), so every replica computes the same direction. `db_mtl`
and `moco` track one vector per task of the shared parameters' size, which `build` does not
know: their buffers are variables of shape [T, None], empty until the first call, and restart
from zero (as at the first call) if the number of shared parameters changes (e.g. when a frozen
backbone is unfrozen). Their directions are not combinations of the rows given: `weights()`
reports the least-squares combination of the rows closest to the direction; `config`'s weights
are exact.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting import solvers
from mtl.weighting.base import (GradientWeighting, StepContext, check_option, is_number,
                                state_variable)

_FLOAT32_EPS = 1.1920929e-07


def _row_buffer(num_tasks: int, name: str) -> tf.Variable:
    """A [T, None] state variable, empty ([T, 0]) until the first call assigns [T, P]."""
    return tf.Variable(tf.zeros([num_tasks, 0]), shape=tf.TensorShape([num_tasks, None]),
                       trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def _previous_rows(buffer: tf.Variable, width: tf.Variable, jacobian: tf.Tensor) -> tf.Tensor:
    """The buffer's value, or zeros like `jacobian` when it is empty or of another width.

    The width comes from its own variable, not `tf.shape(buffer)`: in a tf.function grappler's
    constant folding takes the shape of the buffer's value when the function was traced.
    """
    value = tf.convert_to_tensor(buffer)
    wanted = tf.shape(jacobian, out_type=tf.int64)[1]
    width = tf.convert_to_tensor(width)
    fitted = tf.pad(value, [[0, 0], [0, tf.maximum(wanted - width, 0)]])[:, :wanted]
    return fitted * tf.cast(tf.equal(width, wanted), fitted.dtype)


def _store_rows(buffer: tf.Variable, width: tf.Variable, rows: tf.Tensor) -> None:
    buffer.assign(rows)
    width.assign(tf.shape(rows, out_type=tf.int64)[1])


def _row_norms(matrix: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(matrix), axis=1))


class DBMTL(GradientWeighting):
    """Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen, Chen & Kwok,
    "Dual-Balancing for Multi-Task Learning", 2023), as in LibMTL (the authors' library).

    Loss-scale balancing: each task's gradient is taken of log(L_t + 1e-8), i.e.
    h_t = grad L_t / (L_t + 1e-8). Gradient-magnitude balancing: an exponential moving average
    of these,

        m_t(k) = h_t(k) + beta_k (m_t(k-1) - h_t(k)),   beta_k = beta / k^beta_sigma,  m(0) = 0,

    and the direction d = sum_t Task.weight_t * (max_j |m_j| / (|m_t| + 1e-8)) m_t: every
    tracked gradient rescaled to the largest norm. Row t of the Jacobian is grad of
    Task.weight_t L_t, so h_t = row_t / (Task.weight_t (L_t + 1e-8)); the fixed weights then
    multiply the balanced gradients (with all Task.weight = 1 this is exactly LibMTL).
    `weights()` reports the least-squares combination of the rows closest to d.

    Needs the losses: `context=StepContext(global_losses=...)`.

    Options:
      beta: EMA factor (in [0, 1)); default 0.9, LibMTL's `--DB_beta`.
      beta_sigma: decay exponent of beta over steps (>= 0); default 0, LibMTL's
        `--DB_beta_sigma`.

    State: the tracked gradients m [T, P] and the step count.
    rep mode: no (LibMTL refuses rep_grad for it).
    Cost: T backward passes + O(T P) + the Gramian for `weights()`; T x P float32 of state.
    """

    name = "db_mtl"
    needs_losses = True
    no_rep_reason = "LibMTL (the authors' implementation) refuses rep_grad for it"

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0):
        super().__init__()
        check_option(is_number(beta) and 0 <= beta < 1, self.name, "beta", beta,
                     "a number in [0, 1)")
        check_option(is_number(beta_sigma) and beta_sigma >= 0, self.name, "beta_sigma",
                     beta_sigma, "a number >= 0")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.grad_buffer = _row_buffer(self.num_tasks, "grad_buffer")
        self.grad_buffer_width = state_variable(0, "grad_buffer_width", tf.int64)
        self.steps = state_variable(0.0, "steps")

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        losses = self._losses(context)
        jacobian = tf.convert_to_tensor(jacobian, tf.float32)
        log_gradients = jacobian * tf.math.divide_no_nan(
            1.0, self.task_weights * (losses + 1e-8))[:, None]
        step = self.steps + 1.0
        beta = self.beta / tf.pow(step, self.beta_sigma)
        previous = _previous_rows(self.grad_buffer, self.grad_buffer_width, jacobian)
        buffer = log_gradients + beta * (previous - log_gradients)
        _store_rows(self.grad_buffer, self.grad_buffer_width, buffer)
        self.steps.assign(step)
        norms = _row_norms(buffer)
        scales = tf.reduce_max(norms) / (norms + 1e-8)
        direction = tf.linalg.matvec(buffer, self.task_weights * scales, transpose_a=True)
        self._record_gradient_weights(solvers.least_squares_weights(jacobian, direction))
        return direction


class ConFIG(GradientWeighting):
    """ConFIG (Liu, Chen & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR 2025; official package `conflictfree`, and TorchJD's `ConFIG`).

    With the unit rows u_t = g_t / |g_t| (a zero row stays zero), the direction whose inner
    product with every unit row is equal (= 1) and of least norm, b = pinv(U) 1, rescaled to the
    sum of the gradients' projections onto it:

        d = (sum_t g_t . b^) b^,   b^ = b / |b|.

    Where U has full row rank every g_t . d = |g_t| (b^ . u_t) * (sum_j g_j . b^) > 0: no conflict.
    pinv(U) 1 = U^T c with c = (U U^T)^+ 1; U U^T is formed in float64 from the Jacobian and
    pseudo-inverted with singular values of U below T * float32 eps * the largest treated as
    zero (float32 data does not resolve smaller ones; two identical rows count once). The
    official default length model `ProjectionLength` and equal weights are used.

    rep mode: no (the paper and official package act on the network's parameters).
    Cost: T backward passes + a float64 Gramian of the unit rows (T^2 P) + a T x T
    eigendecomposition.
    """

    name = "config"
    no_rep_reason = "its paper and official package combine the parameters' gradients"

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        del context
        jacobian64 = tf.cast(jacobian, tf.float64)
        norms = _row_norms(jacobian64)
        inverse_norms = tf.math.divide_no_nan(tf.ones_like(norms), norms)
        units = jacobian64 * inverse_norms[:, None]
        gram = tf.matmul(units, units, transpose_b=True)
        eigenvalues, eigenvectors = tf.linalg.eigh(gram)
        singular = tf.sqrt(tf.maximum(eigenvalues, 0.0))
        kept = singular > tf.reduce_max(singular) * self.num_tasks * _FLOAT32_EPS
        inverse = tf.where(kept, 1.0 / tf.where(kept, eigenvalues, 1.0), 0.0)
        pinv_gram = tf.matmul(eigenvectors * inverse[None, :], eigenvectors, transpose_b=True)
        c = tf.reduce_sum(pinv_gram, axis=1)                          # (U U^T)^+ 1
        b_norm = tf.sqrt(tf.maximum(tf.reduce_sum(c * tf.linalg.matvec(gram, c)), 0.0))
        # d = (1^T J b^) b^ = (1^T G_JU c / |b|^2) U^T c, with G_JU = J U^T = diag(|g|) U U^T.
        projections = norms * tf.linalg.matvec(gram, c)               # g_t . b
        length = tf.math.divide_no_nan(tf.reduce_sum(projections), tf.square(b_norm))
        row_weights = tf.cast(length * c * inverse_norms, tf.float32)
        self._record_gradient_weights(row_weights)
        return tf.linalg.matvec(jacobian, row_weights, transpose_a=True)


class MoCo(GradientWeighting):
    """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023), as in LibMTL
    (implemented there from the authors' code).

    Tracked gradients y_t and task weights lambda (start y = 0, lambda = 1/T); at step k,

        h_t = g_t / (|g_t| + 1e-8) * L_t                (LibMTL's normalisation of the rows)
        y_t <- y_t - beta_k (y_t - h_t),                 beta_k = beta / k^beta_sigma
        lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda),  gamma_k = gamma / k^gamma_sigma
        d = Y^T lambda.

    The paper projects lambda onto the simplex instead of the softmax (`lambda_update=
    "projection"`); LibMTL and the authors' code use the softmax (the default). Row t of the
    Jacobian is grad of Task.weight_t L_t, and L_t here is that weighted loss (with all
    Task.weight = 1, exactly LibMTL). `weights()` reports the least-squares combination of the
    rows closest to d. Needs the losses: `context=StepContext(global_losses=...)`.

    Options (defaults: LibMTL's `--MoCo_*` arguments):
      beta: step of y (in (0, 1]); default 0.5.      beta_sigma: its decay exponent; default 0.5.
      gamma: step of lambda (> 0); default 0.1.      gamma_sigma: its decay exponent; default 0.5.
      rho: l2 regularisation of lambda's update (>= 0); default 0.
      lambda_update: "softmax" (LibMTL, authors' code) or "projection" (the paper).

    State: y [T, P], lambda [T], the step count.
    rep mode: no (LibMTL refuses rep_grad for it).
    Cost: T backward passes + Y Y^T (T^2 P) + the Gramian for `weights()`; T x P float32 of state.
    """

    name = "moco"
    needs_losses = True
    no_rep_reason = "LibMTL (from the authors' code) refuses rep_grad for it"
    LAMBDA_UPDATES = ("softmax", "projection")

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, lambda_update: str = "softmax"):
        super().__init__()
        check_option(is_number(beta) and 0 < beta <= 1, self.name, "beta", beta,
                     "a number in (0, 1]")
        check_option(is_number(gamma) and gamma > 0, self.name, "gamma", gamma, "a number > 0")
        for option, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma),
                              ("rho", rho)):
            check_option(is_number(value) and value >= 0, self.name, option, value,
                         "a number >= 0")
        check_option(lambda_update in self.LAMBDA_UPDATES, self.name, "lambda_update",
                     lambda_update, f"one of {self.LAMBDA_UPDATES}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho = float(rho)
        self.lambda_update = lambda_update

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.tracked = _row_buffer(self.num_tasks, "tracked_gradients")
        self.tracked_width = state_variable(0, "tracked_width", tf.int64)
        self.lambdas = state_variable(tf.fill([self.num_tasks], 1.0 / self.num_tasks), "lambdas")
        self.steps = state_variable(0.0, "steps")

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        losses = self._losses(context) * self.task_weights
        jacobian = tf.convert_to_tensor(jacobian, tf.float32)
        step = self.steps + 1.0
        rows = jacobian / (_row_norms(jacobian) + 1e-8)[:, None] * losses[:, None]
        previous = _previous_rows(self.tracked, self.tracked_width, jacobian)
        y = previous - self.beta / tf.pow(step, self.beta_sigma) * (previous - rows)
        gram = tf.matmul(y, y, transpose_b=True) + self.rho * tf.eye(self.num_tasks)
        lambdas = tf.convert_to_tensor(self.lambdas)
        moved = lambdas - self.gamma / tf.pow(step, self.gamma_sigma) * tf.linalg.matvec(
            gram, lambdas)
        lambdas = (tf.nn.softmax(moved) if self.lambda_update == "softmax"
                   else _project_to_simplex(moved))
        _store_rows(self.tracked, self.tracked_width, y)
        self.lambdas.assign(lambdas)
        self.steps.assign(step)
        direction = tf.linalg.matvec(y, lambdas, transpose_a=True)
        self._record_gradient_weights(solvers.least_squares_weights(jacobian, direction))
        return direction


def _project_to_simplex(x: tf.Tensor) -> tf.Tensor:
    """Euclidean projection of x [T] onto the probability simplex (sort-based)."""
    t = x.shape[0]
    sorted_x = tf.sort(x, direction="DESCENDING")
    cumulative = tf.cumsum(sorted_x) - 1.0
    index = tf.range(1, t + 1, dtype=x.dtype)
    support = tf.reduce_sum(tf.cast(sorted_x - cumulative / index > 0.0, tf.int32))
    threshold = tf.gather(cumulative, support - 1) / tf.cast(support, x.dtype)
    return tf.maximum(x - threshold, 0.0)
