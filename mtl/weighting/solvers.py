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


def nonnegative_qp(gramian: tf.Tensor, linear: tf.Tensor, *, simplex: bool = False,
                   max_iterations: int | None = None, tolerance: float = 1e-12) -> tf.Tensor:
    """Solves  min_z  z^T G z / 2 + c^T z  s.t.  z >= 0  (and sum_t z_t = 1 with `simplex`)
    exactly, for every row c of `linear`, by a primal active-set method (Nocedal & Wright,
    Algorithm 16.3), in float64.

    The free set F starts empty (at the simplex vertex with the smallest objective for
    `simplex`). Each iteration solves the equality-constrained problem on F (its KKT system, by
    pseudo-inverse so that a rank-deficient Gramian is handled); if that point differs from z,
    z moves towards it until a free coordinate hits 0 (which leaves F); otherwise z is optimal
    on F and the bound with the most negative multiplier (G z + c, minus the equality's
    multiplier for `simplex`) joins F, or, with none negative, z is the solution. Each active
    set is visited at most once, so the method ends after finitely many steps with the exact
    optimum (up to the KKT system's rounding); `max_iterations` (default 10 T + 50) only guards
    against cycling on degenerate ties. The problems run together, each with its own free set.

    Args:
      gramian: [T, T] positive semi-definite (any float dtype).
      linear: [R, T], one problem per row.
    Returns:
      [R, T] float64 solutions.
    """
    g = tf.cast(gramian, tf.float64)
    c = tf.cast(linear, tf.float64)
    num_tasks = int(g.shape[0])
    rows = tf.shape(c)[0]
    max_iterations = max_iterations or 10 * num_tasks + 50
    scale = tf.maximum(tf.reduce_max(tf.abs(tf.linalg.diag_part(g))), tf.reduce_max(tf.abs(c)))
    tol = tolerance * tf.maximum(scale, 1e-300)

    if simplex:
        objective = 0.5 * tf.linalg.diag_part(g)[None, :] + c      # at each vertex e_t
        first = tf.one_hot(tf.argmin(objective, axis=1), num_tasks, dtype=tf.float64)
        z0, free0 = first, first > 0.5
    else:
        z0, free0 = tf.zeros_like(c), tf.zeros_like(c, tf.bool)

    def subproblem(free):
        """argmin on the free set (others 0), [R, T]."""
        f = tf.cast(free, tf.float64)
        matrix = g[None] * f[:, :, None] * f[:, None, :] + tf.linalg.diag(1.0 - f)
        rhs = -c * f
        if simplex:
            top = tf.concat([matrix, f[:, :, None]], axis=2)
            bottom = tf.concat([f[:, None, :], tf.zeros([rows, 1, 1], tf.float64)], axis=2)
            matrix = tf.concat([top, bottom], axis=1)
            rhs = tf.concat([rhs, tf.ones([rows, 1], tf.float64)], axis=1)
        solution = tf.linalg.matvec(tf.linalg.pinv(matrix), rhs)
        return solution[:, :num_tasks] * f

    def body(i, z, free, done):
        y = subproblem(free)
        p = tf.where(done[:, None], tf.zeros_like(z), y - z)
        # (A full step makes the next p exactly 0: the same system is solved again.)
        stationary = tf.reduce_max(tf.abs(p), axis=1) <= tolerance * (
            1.0 + tf.reduce_max(tf.abs(z), axis=1))
        # Stationary on F: the multipliers of the bounds decide.
        gradient = tf.linalg.matvec(g, z) + c
        if simplex:
            f = tf.cast(free, tf.float64)
            nu = tf.reduce_sum(gradient * f, axis=1) / tf.maximum(tf.reduce_sum(f, axis=1), 1.0)
            multipliers = gradient - nu[:, None]
        else:
            multipliers = gradient
        bound = tf.where(free, tf.fill(tf.shape(z), tf.constant(float("inf"), tf.float64)),
                         multipliers)
        entering = tf.argmin(bound, axis=1)
        optimal = tf.reduce_min(bound, axis=1) >= -tol
        join = tf.one_hot(entering, num_tasks, on_value=True, off_value=False)
        # Not stationary: step towards y until a free coordinate reaches 0.
        blocking = free & (p < 0.0)
        infinity = tf.fill(tf.shape(z), tf.constant(float("inf"), tf.float64))
        ratios = tf.where(blocking, z / tf.where(blocking, -p, tf.ones_like(p)), infinity)
        step = tf.minimum(tf.constant(1.0, tf.float64), tf.reduce_min(ratios, axis=1))
        leaving = tf.one_hot(tf.argmin(ratios, axis=1), num_tasks, on_value=True,
                             off_value=False) & (step < 1.0)[:, None]
        moved = tf.maximum(z + step[:, None] * p, 0.0)
        moved = tf.where(leaving, tf.zeros_like(moved), moved)
        z = tf.where(done[:, None] | stationary[:, None], z, moved)
        free = tf.where(done[:, None], free, tf.where(
            stationary[:, None], free | (join & ~optimal[:, None]), free & ~leaving))
        done = done | (stationary & optimal)
        return i + 1, z, free, done

    _, z, _, _ = tf.while_loop(
        lambda i, z, free, done: (i < max_iterations) & ~tf.reduce_all(done), body,
        (tf.constant(0), z0, free0, tf.zeros([rows], tf.bool)))
    return z


def min_norm_point(gramian: tf.Tensor) -> tf.Tensor:
    """argmin_{w in simplex} w^T G w (the min-norm point of the gradients' convex hull),
    exactly, by `nonnegative_qp` on G / (trace / T); [T] float32."""
    g = tf.cast(gramian, tf.float64)
    num_tasks = int(g.shape[0])
    g = tf.math.divide_no_nan(g, tf.linalg.trace(g) / num_tasks)
    # A ridge of 1e-10 (relative) makes the weights unique when the min-norm point is not a
    # unique combination (identical or dependent gradients: identical rows share their weight
    # equally); it moves the direction by ~1e-10.
    g += 1e-10 * tf.eye(num_tasks, dtype=tf.float64)
    w = nonnegative_qp(g, tf.zeros([1, num_tasks], tf.float64), simplex=True)[0]
    return tf.cast(w / tf.reduce_sum(w), tf.float32)


def project_to_dual_cone(gramian: tf.Tensor, lower: tf.Tensor) -> tf.Tensor:
    """For each row u of `lower`, solves  min_v v^T G v  s.t.  v >= u  (elementwise), exactly.

    J^T v is then the projection of J^T u onto the dual cone {x : J x >= 0} of the rows of J
    (Quinton & Rey 2024, Proposition 1); at the optimum G v >= 0, i.e. J^T v has a non-negative
    inner product with every row. With v = u + z it is the non-negative QP
    min z^T G z / 2 + (G u)^T z, z >= 0, solved by `nonnegative_qp` in float64.

    Args:
      gramian: [T, T] positive semi-definite.
      lower: [R, T] lower bounds, one problem per row.
    Returns:
      [R, T] float32 solutions.
    """
    g = tf.cast(gramian, tf.float64)
    u = tf.cast(lower, tf.float64)
    z = nonnegative_qp(g, tf.matmul(u, g), simplex=False)
    return tf.cast(u + z, tf.float32)


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
