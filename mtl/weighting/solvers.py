"""Small numerical solvers shared by the gradient-based methods, in TensorFlow ops.

Every solver works on a `[T, T]` Gramian (T = number of tasks), so its cost does not depend on the
number of parameters. Iterative solvers run inside `tf.while_loop` with a fixed iteration bound
and a convergence test in the loop condition: no Python branching on tensor values, so they trace
once under `tf.function` (and compile with XLA).
"""

from __future__ import annotations

import tensorflow as tf

_TINY = 1e-12


def normalise_gramian(gramian: tf.Tensor) -> tf.Tensor:
    """`G / (trace(G) / T)`: mean squared gradient norm 1, so that tolerances are relative.

    An all-zero Gramian stays zero.
    """
    gramian = tf.convert_to_tensor(gramian, tf.float32)
    scale = tf.linalg.trace(gramian) / tf.cast(tf.shape(gramian)[0], tf.float32)
    return tf.math.divide_no_nan(gramian, scale)


def _dot(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(a * b)


def frank_wolfe_simplex(gradient_fn, line_search_fn, num_tasks: int, max_iterations: int,
                        tolerance: float) -> tf.Tensor:
    """Minimises a convex F over the probability simplex by away-step Frank-Wolfe, from the
    uniform point.

    Each iteration either moves towards the vertex e_s with the smallest partial derivative
    (direction e_s - w, steps up to 1), or away from the vertex e_v of the support with the
    largest one (direction w - e_v, steps up to w_v / (1 - w_v), which may drop v from the
    support), whichever descends faster; the step is an exact line search. Away steps make the
    convergence linear when the optimum lies on a face of the simplex, where plain Frank-Wolfe
    zig-zags (Lacoste-Julien & Jaggi 2015). Stops when the Frank-Wolfe duality gap
    `grad . (w - e_s)` (an upper bound on F(w) - min F) is below `tolerance`, or after
    `max_iterations`.

    Args:
      gradient_fn: w [T] -> dF/dw [T].
      line_search_fn: (w [T], d [T], max_step) -> the step in [0, max_step] minimising
        F(w + step * d).
    Returns:
      w [T] on the simplex.
    """
    w0 = tf.fill([num_tasks], 1.0 / num_tasks)

    def body(i, w, gap):
        gradient = gradient_fn(w)
        toward = tf.one_hot(tf.argmin(gradient), num_tasks) - w
        away_vertex = tf.argmax(tf.where(w > 0.0, gradient, -float("inf")))
        away = w - tf.one_hot(away_vertex, num_tasks)
        gap = -_dot(gradient, toward)
        use_away = -_dot(gradient, away) > gap
        away_weight = tf.gather(w, away_vertex)
        direction = tf.where(use_away, away, toward)
        max_step = tf.where(use_away, tf.math.divide_no_nan(away_weight, 1.0 - away_weight), 1.0)
        step = tf.where(gap > tolerance, line_search_fn(w, direction, max_step), 0.0)
        w = tf.maximum(w + step * direction, 0.0)
        return i + 1, w / tf.reduce_sum(w), gap

    _, w, _ = tf.while_loop(lambda i, w, gap: (i < max_iterations) & (gap > tolerance), body,
                            (tf.constant(0), w0, tf.constant(float("inf"))))
    return w


def min_norm_point(gramian: tf.Tensor, max_iterations: int = 250,
                   tolerance: float = 1e-7) -> tf.Tensor:
    """argmin_{w in simplex} |J^T w|^2 given G = J J^T: the min-norm point of the convex hull of
    the task gradients (Sener & Koltun 2018), by away-step Frank-Wolfe with exact line search.

    With two tasks it is exact after at most two steps (the simplex is a segment). Cost: O(T^2)
    per iteration.
    """
    g = normalise_gramian(gramian)
    num_tasks = gramian.shape[0]

    def gradient_fn(w):
        return tf.linalg.matvec(g, w)  # half the gradient of w^T G w; same argmin.

    def line_search_fn(w, d, max_step):
        gd = tf.linalg.matvec(g, d)
        curvature, slope = _dot(d, gd), _dot(w, gd)
        step = tf.math.divide_no_nan(-slope, curvature)
        step = tf.where(curvature > _TINY, step, tf.where(slope < 0.0, max_step, 0.0))
        return tf.clip_by_value(step, 0.0, max_step)

    return frank_wolfe_simplex(gradient_fn, line_search_fn, num_tasks, max_iterations, tolerance)


def cagrad_dual(gramian: tf.Tensor, c: float, max_iterations: int = 250,
                tolerance: float = 1e-7) -> tuple[tf.Tensor, tf.Tensor]:
    """Solves the CAGrad dual  min_{w in simplex} w^T G u + c |g_0| |J^T w|  (u = 1/T, g_0 the
    mean gradient) by away-step Frank-Wolfe with a closed-form exact line search.

    Along w + s d the objective is  b0 + b1 s + k sqrt(A s^2 + 2 B s + C)  (k = c |g_0|); its
    derivative vanishes where (A s + B) / sqrt(q(s)) = -b1 / k =: r, i.e., since
    (A s + B)^2 = A q(s) - (A C - B^2),  at  q = (A C - B^2) / (A - r^2),  s = (r sqrt(q) - B) / A
    when A > r^2; otherwise the objective is monotone along d and the step is 0 or the largest.

    Returns:
      (w [T], lam): the dual weights and lam = c |g_0| / |J^T w|, so that the CAGrad direction is
      g_0 + lam J^T w. Both are invariant to a rescaling of the Gramian.
    """
    g = normalise_gramian(gramian)
    num_tasks = gramian.shape[0]
    eps = 1e-8
    b = tf.reduce_mean(g, axis=1)                    # G u: the gradients' products with g_0.
    # Quadratic forms are clamped at 0: rounding can make them slightly negative.
    k = c * tf.sqrt(tf.maximum(tf.reduce_mean(g), 0.0) + eps)  # c |g_0|, |g_0|^2 = u^T G u.

    def gradient_fn(w):
        gw = tf.linalg.matvec(g, w)
        return b + k * gw / tf.sqrt(tf.maximum(_dot(w, gw), 0.0) + eps)

    def line_search_fn(w, d, max_step):
        gd = tf.linalg.matvec(g, d)
        a, bb = _dot(d, gd), _dot(w, gd)
        cc = tf.maximum(_dot(w, tf.linalg.matvec(g, w)), 0.0) + eps
        b1 = _dot(b, d)
        r = tf.math.divide_no_nan(-b1, k)
        interior = (k > 0.0) & (a > r * r + _TINY)
        q = tf.math.divide_no_nan(tf.maximum(a * cc - bb * bb, 0.0), a - r * r)
        step = tf.math.divide_no_nan(r * tf.sqrt(q) - bb, a)
        step = tf.where(interior, step, tf.where(b1 < 0.0, max_step, 0.0))
        return tf.clip_by_value(step, 0.0, max_step)

    w = frank_wolfe_simplex(gradient_fn, line_search_fn, num_tasks, max_iterations, tolerance)
    gw_norm = tf.sqrt(tf.maximum(_dot(w, tf.linalg.matvec(g, w)), 0.0) + eps)
    return w, k / gw_norm


def nash_bargaining(gramian: tf.Tensor, initial: tf.Tensor, max_iterations: int = 100,
                    tolerance: float = 1e-10) -> tf.Tensor:
    """Solves G a = 1 / a (elementwise), a > 0: the Nash bargaining weights (Navon et al. 2022).

    It is the stationarity condition of the strictly convex, self-concordant
    phi(a) = a^T G a / 2 - sum_i log a_i, minimised by damped Newton steps
    a <- a + delta / (1 + lambda)  (delta = -H^{-1} grad, H = G + diag(1/a^2), lambda^2 =
    delta^T H delta the Newton decrement), which stay inside a > 0 and converge quadratically
    once lambda < 1/4. Stops when lambda^2 < tolerance or after `max_iterations`.

    Args:
      gramian: [T, T] positive definite (add a small ridge for a singular Gramian: without it
        the solution does not exist when 0 is in the gradients' convex hull); float32 or
        float64, the dtype of the computation.
      initial: [T] positive starting point (warm start: the previous solution).
    """
    num_tasks = gramian.shape[0]

    def body(i, a, decrement):
        gradient = tf.linalg.matvec(gramian, a) - 1.0 / a
        hessian = gramian + tf.linalg.diag(1.0 / tf.square(a))
        chol = tf.linalg.cholesky(hessian)
        delta = -tf.linalg.cholesky_solve(chol, gradient[:, None])[:, 0]
        decrement = tf.maximum(-_dot(gradient, delta), 0.0)
        return i + 1, a + delta / (1.0 + tf.sqrt(decrement)), decrement

    initial = tf.reshape(tf.cast(initial, gramian.dtype), [num_tasks])
    _, a, _ = tf.while_loop(lambda i, a, dec: (i < max_iterations) & (dec > tolerance), body,
                            (tf.constant(0), initial, tf.constant(float("inf"), gramian.dtype)))
    return a


def project_to_dual_cone(gramian: tf.Tensor, lower: tf.Tensor, max_sweeps: int = 200,
                         tolerance: float = 1e-9) -> tf.Tensor:
    """For each row u of `lower`, solves  min_v v^T G v  s.t.  v >= u  (elementwise).

    J^T v is then the projection of J^T u onto the dual cone {x : J x >= 0} of the rows of J
    (Quinton & Rey 2024, Proposition 1); at the optimum G v >= 0, i.e. J^T v has a non-negative
    inner product with every row. Solved by projected coordinate descent (exact minimisation over
    one coordinate, then clipping to its bound), all rows at once; stops when a sweep changes no
    weight by more than `tolerance` (relative to the largest weight) or after `max_sweeps`.

    Args:
      gramian: [T, T] positive semi-definite.
      lower: [R, T] lower bounds, one problem per row.
    Returns:
      [R, T] solutions.
    """
    num_tasks = gramian.shape[0]
    diagonal = tf.linalg.diag_part(gramian)

    def sweep(s, v, change):
        start = v
        for k in range(num_tasks):  # Gauss-Seidel: each coordinate sees the updated others.
            column = tf.linalg.matvec(v, gramian[:, k])            # (v G)_k for every row.
            new = tf.maximum(lower[:, k], v[:, k] - tf.math.divide_no_nan(column, diagonal[k]))
            v = v + (new - v[:, k])[:, None] * tf.one_hot(k, num_tasks)[None, :]
        change = tf.reduce_max(tf.abs(v - start)) / (tf.reduce_max(tf.abs(v)) + _TINY)
        return s + 1, v, change

    lower = tf.convert_to_tensor(lower, tf.float32)
    _, v, _ = tf.while_loop(lambda s, v, change: (s < max_sweeps) & (change > tolerance), sweep,
                            (tf.constant(0), lower, tf.constant(float("inf"))))
    return v


def least_squares_weights(jacobian: tf.Tensor, direction: tf.Tensor) -> tf.Tensor:
    """argmin_w |J^T w - d|: the combination of the rows of J closest to d, [T].

    Minimum-norm solution `pinv(J J^T) J d`; used to report weights for methods whose direction is
    not a combination of the task gradients. Cost: one [T, P] matrix-vector product.
    """
    gramian = tf.matmul(jacobian, jacobian, transpose_b=True)
    return tf.linalg.matvec(tf.linalg.pinv(gramian), tf.linalg.matvec(jacobian, direction))


def random_orders(num_tasks: int, seed: tf.Tensor) -> tf.Tensor:
    """[T, T] int32: row i is a random permutation of the tasks, from a stateless seed [2]."""
    keys = tf.random.stateless_uniform([num_tasks, num_tasks], seed=seed)
    return tf.argsort(keys, axis=1)
