"""Independent NumPy/SciPy implementations of the task-weighting methods, for
`tests/test_weighting_reference.py`.

Each function is written from the paper's formula or the official code (named in its docstring),
in float64, and shares no code with `mtl/weighting/`. Where `mtl` runs an iterative solver, the
reference solves the same problem another way:
  * MGDA's min-norm point: Lawson-Hanson NNLS, then an exact KKT solve on its active set (mtl:
    away-step Frank-Wolfe);
  * CAGrad: the primal max_d min_i g_i . d in closed form on the active set that an SLSQP solve
    of the dual locates, certified by the KKT conditions (mtl: Frank-Wolfe on the dual);
  * UPGrad's dual-cone projections: NNLS (mtl: coordinate descent);
  * Nash-MTL: the primal, maximising sum_i log(g_i . d) - |d|^2 / 2 over the row space (mtl:
    damped Newton on the dual potential a^T G a / 2 - sum log a);
  * Aligned-MTL: the SVD of J (mtl: eigendecomposition of the Gramian);
  * IMTL-G: its linear conditions in parameter space (mtl: a closed form on the Gramian).

Conventions: a Jacobian J is [T, P], row t the gradient g_t of task t; a direction is [P]. Random
methods take their draws as arguments (task orders, uniform numbers), so that a test can hand them
the draws `mtl` made.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize, special

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


# --- gradient methods ----------------------------------------------------------------------------

def min_norm_weights(jacobian) -> np.ndarray:
    """argmin_{w in simplex} |J^T w|^2 (the min-norm point of the rows' convex hull).

    Lawson-Hanson NNLS on the penalised problem min_{w >= 0} |J^T w|^2 + M^2 (sum w - 1)^2 finds
    the active set; the equality-constrained problem on that set is then solved exactly (its KKT
    system), and accepted when its weights are non-negative and optimal (KKT) for the full problem.
    """
    j = _f64(jacobian)
    t = j.shape[0]
    scale = np.max(np.linalg.norm(j, axis=1))
    if scale == 0.0:
        return np.full(t, 1.0 / t)
    j = j / scale
    gram = j @ j.T
    penalty = 1e4
    a = np.vstack([j.T, penalty * np.ones((1, t))])
    b = np.concatenate([np.zeros(j.shape[1]), [penalty]])
    w, _ = optimize.nnls(a, b, maxiter=50 * t)
    w = w / w.sum()
    support = w > 1e-9
    k = int(support.sum())
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = gram[np.ix_(support, support)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    solution = np.linalg.lstsq(kkt, np.concatenate([np.zeros(k), [1.0]]), rcond=None)[0]
    exact = np.zeros(t)
    exact[support] = solution[:k]
    level = exact @ gram @ exact                      # (G w)_i for i in the support.
    if np.all(exact >= -1e-12) and np.all(gram @ exact >= level - 1e-10):
        return np.maximum(exact, 0.0) / np.maximum(exact, 0.0).sum()
    return w


def mgda(jacobian, normalization: str = "none", losses=None) -> np.ndarray:
    """MGDA (Sener & Koltun, NeurIPS 2018; official code isl-org/MultiObjectiveOptimization).

    The official `gradient_normalizers` divide each g_t by n_t = 1 ("none"), |g_t| ("l2"), L_t
    ("loss") or L_t |g_t| ("loss+"); `MinNormSolver.find_min_norm_element` gives the simplex
    weights w of the normalised rows; the training loss is sum_t w_t L_t, so the direction is
    sum_t w_t g_t on the *raw* gradients. A zero row stays zero under normalisation (0/0 := 0):
    it is a point of the hull, so the min-norm point is 0.
    """
    j = _f64(jacobian)
    norms = np.ones(j.shape[0])
    if normalization in ("l2", "loss+"):
        norms = norms * np.linalg.norm(j, axis=1)
    if normalization in ("loss", "loss+"):
        norms = norms * _f64(losses)
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    w = min_norm_weights(j * inverse[:, None])
    return w @ j


def cagrad(jacobian, c: float = 0.5, rescale: int = 1) -> np.ndarray:
    """CAGrad (Liu et al., NeurIPS 2021, eq. 2-3; official `cagrad` / LibMTL's `CAGrad`).

    d* = argmax_d min_i g_i . d  s.t.  |d - g_0| <= c |g_0|  (g_0 the mean gradient). Its dual
    min_{w in simplex} g_w . g_0 + c |g_0| |g_w|  (g_w = J^T w) is solved by SLSQP, as the official
    code, only to find the active set A of the primal; the primal is then solved exactly on it
    (`_primal_on_active_set`) and certified by its KKT conditions. The maximiser is unique when
    the optimal value is not 0 (checked: a maximiser inside the ball needs 0 in the hull of the
    active rows, hence value 0; a zero row makes the value 0 and the maximiser a set). Then
    divided by 1 (rescale 0), 1 + c^2 (1) or 1 + c (2) as the official code.
    """
    j = _f64(jacobian)
    scale = np.max(np.linalg.norm(j, axis=1))
    j = j / scale
    t = j.shape[0]
    gram = j @ j.T
    g0 = j.mean(0)
    k = c * np.linalg.norm(g0)
    b = gram.mean(1)                                   # g_i . g_0

    def dual(w):
        return w @ b + k * np.sqrt(w @ gram @ w)

    def dual_gradient(w):
        return b + k * gram @ w / np.sqrt(w @ gram @ w)

    result = optimize.minimize(dual, np.full(t, 1.0 / t), jac=dual_gradient, method="SLSQP",
                               bounds=[(0.0, 1.0)] * t,
                               constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                             "jac": lambda w: np.ones((1, t))}],
                               options={"ftol": 1e-16, "maxiter": 5000})
    gw = result.x @ j
    d = _primal_on_active_set(j, g0, k, g0 + k * gw / np.linalg.norm(gw))
    divisor = {0: 1.0, 1: 1.0 + c ** 2, 2: 1.0 + c}[rescale]
    return d * scale / divisor


def _primal_on_active_set(j, g0, k, approximate):
    """The exact maximiser of min_i g_i . d over the ball |d - g0| <= k, given an approximate one.

    For a candidate active set A, the maximiser of g_a . d on the subspace {(g_i - g_a) . d = 0,
    i in A} within the ball is in closed form (project the ball's centre and g_a onto the
    subspace). It is the global maximiser when the KKT conditions hold: d - g0 is a non-negative
    combination of the rows in A (checked by NNLS to round-off) and the other rows stay above the
    optimal value. Candidates: the sets of the m smallest g_i . approximate, then every subset.
    """
    order = np.argsort(j @ approximate)
    prefixes = [order[:m] for m in range(1, len(j) + 1)]
    subsets = (np.flatnonzero(mask) for mask in itertools.product([False, True], repeat=len(j))
               if any(mask))
    for active in itertools.chain(prefixes, subsets):
        d = _maximiser_on(j, g0, k, active)
        if d is not None:
            return d
    raise ValueError("CAGrad: no active set satisfies the KKT conditions (no unique optimum)")


def _maximiser_on(j, g0, k, active):
    """The KKT-certified maximiser with active set `active`, or None."""
    constraints = j[active[1:]] - j[active[0]]
    projector = np.eye(j.shape[1])
    if len(constraints):
        projector -= np.linalg.pinv(constraints) @ constraints
    centre, slope = projector @ g0, projector @ j[active[0]]
    radius2 = k ** 2 - np.sum((g0 - centre) ** 2)
    if radius2 <= 0 or np.linalg.norm(slope) == 0:
        return None
    d = centre + np.sqrt(radius2) * slope / np.linalg.norm(slope)
    value = j[active[0]] @ d
    multipliers, residual = optimize.nnls(j[active].T, d - g0)
    others = np.setdiff1d(np.arange(len(j)), active)
    certified = (abs(value) > 1e-9 and residual <= 1e-10 * k and multipliers.sum() > 0
                 and np.all(np.abs(j[active] @ d - value) <= 1e-10 * abs(value))
                 and np.all(j[others] @ d >= value * (1 - 1e-10)))
    return d if certified else None


def imtl(jacobian) -> np.ndarray:
    """IMTL-G (Liu et al., ICLR 2021, Sec. 3.2): d = J^T a with sum_t a_t = 1 and equal projections
    of d onto every unit gradient u_t: d . (u_1 - u_t) = 0, t >= 2. Solved as the T x T linear
    system in a (least squares, minimum norm when degenerate), every product formed in parameter
    space (LibMTL's `IMTL.backward` inverts D U^T instead)."""
    j = _f64(jacobian)
    units = j / np.linalg.norm(j, axis=1, keepdims=True)
    conditions = [np.ones(j.shape[0])] + [j @ (units[0] - units[t]) for t in range(1, len(j))]
    rhs = np.zeros(len(j))
    rhs[0] = 1.0
    a = np.linalg.lstsq(np.stack(conditions), rhs, rcond=None)[0]
    return a @ j


def nash_mtl_weights(jacobian) -> np.ndarray:
    """The Nash bargaining weights a > 0 with a_i (G a)_i = 1 (Navon et al., ICML 2022, Thm 5.1;
    the official code's constraint -log(a_i * nf) - log((G/nf) a)_i <= 0 on the raw Gramian G).

    Solved in the primal, as the paper states the bargaining problem: d = V y in the row space
    (J = U S V^T), maximise the strictly concave sum_i log(g_i . d) - |d|^2 / 2, whose maximiser
    has |d|^2 = T and d = sum_i g_i / (g_i . d), i.e. a_i = 1 / (g_i . d). A strictly feasible
    start (all g_i . d > 0) comes from a linear program, SLSQP climbs, and a root solve of the
    stationarity condition polishes it (certified to round-off). A zero row (a task whose loss no
    direction changes) gets weight 0: its utility is constant, so it takes no part.
    """
    j = _f64(jacobian)
    weights = np.zeros(j.shape[0])
    active = np.linalg.norm(j, axis=1) > 0
    u, s, vt = np.linalg.svd(j[active], full_matrices=False)
    kept = s > s.max() * 1e-12
    gains_matrix = u[:, kept] * s[kept]                # gains = gains_matrix @ y = J_active d.
    t, r = gains_matrix.shape
    program = optimize.linprog(np.concatenate([np.zeros(r), [-1.0]]),
                               A_ub=np.hstack([-gains_matrix, np.ones((t, 1))]), b_ub=np.zeros(t),
                               bounds=[(-1.0, 1.0)] * r + [(None, 1.0)])
    if program.x is None or program.x[-1] <= 0:
        raise ValueError("Nash-MTL: no direction improves every task (0 is in the hull)")

    def objective(y):
        gains = gains_matrix @ y
        if np.any(gains <= 0):
            return np.inf
        return -np.sum(np.log(gains)) + y @ y / 2

    def stationarity(y):
        return gains_matrix.T @ (1.0 / (gains_matrix @ y)) - y

    def stationarity_jacobian(y):
        inverse = 1.0 / (gains_matrix @ y)
        return -(gains_matrix.T * inverse ** 2) @ gains_matrix - np.eye(r)

    climbed = optimize.minimize(objective, program.x[:r], jac=lambda y: -stationarity(y),
                                method="SLSQP", options={"ftol": 1e-14, "maxiter": 2000},
                                constraints=[{"type": "ineq",
                                              "fun": lambda y: gains_matrix @ y - 1e-300}])
    y = optimize.root(stationarity, climbed.x, jac=stationarity_jacobian, method="hybr",
                      options={"xtol": 1e-15}).x
    gains = gains_matrix @ y
    if np.any(gains <= 0) or np.max(np.abs(stationarity(y))) > 1e-10 * np.sqrt(t):
        raise ValueError(f"Nash bargaining equations unsolved: {stationarity(y)}")
    weights[active] = 1.0 / gains
    return weights


def nash_mtl(jacobian, max_norm: float = 1.0) -> np.ndarray:
    """Nash-MTL's step (official `NashMTL`): d = J^T a (a from `nash_mtl_weights`), so
    |d|^2 = sum_i a_i (G a)_i = T (the tasks with a non-zero gradient); then, as the official
    `clip_grad_norm_(shared_parameters, max_norm)`, scaled to norm `max_norm` when longer
    (max_norm = 0: no clipping)."""
    j = _f64(jacobian)
    d = nash_mtl_weights(j) @ j
    norm = np.linalg.norm(d)
    if max_norm > 0 and norm > max_norm:
        d = d * (max_norm / norm)
    return d


def aligned_mtl(jacobian) -> np.ndarray:
    """Aligned-MTL (Senushkin et al., CVPR 2023; official `ProcrustesSolver.apply`, scale 'min').

    The official code eigendecomposes G = J J^T, keeps eigenvalues above max * T * eps (float32
    eps, torch's default dtype), and aligns J to B J with B = sqrt(lambda_min) V Lambda^{-1/2} V^T;
    the step is the sum of the aligned rows. Here from the SVD J = U S V^T instead: the aligned
    rows are s_min U V^T on the kept singular values (s^2 > s_max^2 T eps).
    """
    j = _f64(jacobian)
    u, s, vt = np.linalg.svd(j, full_matrices=False)
    if s.max() == 0.0:
        return np.zeros(j.shape[1])
    kept = s ** 2 > s.max() ** 2 * j.shape[0] * FLOAT32_EPS
    u, s, vt = u[:, kept], s[kept], vt[kept]
    aligned = s.min() * u @ vt
    return aligned.sum(0)


def upgrad(jacobian, reg_eps: float = 1e-4, norm_eps: float = 1e-4) -> np.ndarray:
    """UPGrad (Quinton & Rey 2024; TorchJD's `UPGradWeighting` with the mean preference).

    As TorchJD: G is divided by its trace (zero when the trace is below `norm_eps`) and `reg_eps`
    I is added; for each i, v_i = argmin v^T G v s.t. v >= e_i / T (the paper's Proposition 1:
    J^T v_i is the projection of g_i / T onto the dual cone of the rows); the weights sum_i v_i
    apply to the raw J. Each QP is solved as NNLS: with v = u + s, s >= 0,
    v^T G v = |A (u + s)|^2 for A = [J^T / sqrt(tr G); sqrt(reg_eps) I]  (TorchJD: quadprog).
    """
    j = _f64(jacobian)
    t, p = j.shape
    trace = np.sum(j * j)
    scaled = j.T / np.sqrt(trace) if trace >= norm_eps else np.zeros((p, t))
    a = np.vstack([scaled, np.sqrt(reg_eps) * np.eye(t)])
    weights = np.zeros(t)
    for i in range(t):
        u = np.eye(t)[i] / t
        s, _ = optimize.nnls(a, -a @ u, maxiter=50 * t)
        weights += u + s
    return weights @ j


def pcgrad(jacobian, orders) -> np.ndarray:
    """PCGrad (Yu et al., NeurIPS 2020, Algorithm 1; LibMTL's `PCGrad.backward`): for each task i,
    visiting the tasks j in `orders[i]` (j = i skipped), g_i' -= (g_i' . g_j / |g_j|^2) g_j when
    g_i' . g_j < 0; the step is sum_i g_i'."""
    j = _f64(jacobian)
    edited = j.copy()
    for i, order in enumerate(orders):
        for other in order:
            dot = edited[i] @ j[other]
            if other != i and dot < 0:
                edited[i] -= dot / (j[other] @ j[other]) * j[other]
    return edited.sum(0)


def gradvac(jacobian, orders, targets, beta: float):
    """GradVac (Wang et al., ICLR 2021, Algorithm 1; whole-model granularity; TorchJD's `GradVac`).

    For each task i, visiting j in `orders[i]` (j = i skipped), phi = cos(g_i', g_j): if phi <
    phi_hat[i, j], g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (|g_j| sqrt(1 - phi_hat^2)) g_j (eq. 2); then phi_hat[i, j] <- (1 - beta) phi_hat + beta phi
    (eq. 3). Returns (sum_i g_i', the new targets).
    """
    j = _f64(jacobian)
    targets = _f64(targets).copy()
    edited = j.copy()
    for i, order in enumerate(orders):
        for other in order:
            if other == i:
                continue
            own_norm, other_norm = np.linalg.norm(edited[i]), np.linalg.norm(j[other])
            # A zero gradient has no direction: cosine 0 (TorchJD's eps gives the same), and
            # adding multiples of a zero row, or of anything to a zero row's scale 0, is no edit.
            defined = own_norm > 0 and other_norm > 0
            phi = edited[i] @ j[other] / (own_norm * other_norm) if defined else 0.0
            target = targets[i, other]
            if defined and phi < target:
                edited[i] += own_norm * (target * np.sqrt(1 - phi ** 2)
                                         - phi * np.sqrt(1 - target ** 2)) \
                    / (other_norm * np.sqrt(1 - target ** 2)) * j[other]
            targets[i, other] = (1 - beta) * target + beta * phi
    return edited.sum(0), targets


def graddrop(jacobian, uniform, leak: float = 0.0) -> np.ndarray:
    """GradDrop (Chen et al., NeurIPS 2020, eq. 1-3; LibMTL's `GradDrop.backward`) applied to the
    rows as given (no input-sign correction, no batch sum): purity P = (1 + sum_i g_i /
    (sum_i |g_i| + 1e-7)) / 2 per coordinate, mask M_i = [P > U][g_i > 0] + [P < U][g_i < 0] with
    the uniform draw U [P]; the step is sum_i (leak + (1 - leak) M_i) g_i."""
    j = _f64(jacobian)
    purity = 0.5 * (1.0 + j.sum(0) / (np.abs(j).sum(0) + 1e-7))
    uniform = _f64(uniform)
    mask = ((purity > uniform) & (j > 0)) | ((purity < uniform) & (j < 0))
    return np.sum((leak + (1.0 - leak) * mask) * j, axis=0)


def graddrop_rep(per_example_gradients, representation, uniform, leak: float = 0.0):
    """GradDrop in its paper's form on a representation A (LibMTL's `GradDrop.backward`, the
    batch-separated case of Algorithm 1): per_example_gradients [T, B, D] = dL_t / dA,
    representation [B, D]. s_t = sum_b sign(A_b) dL_t/dA_b; purity and mask per feature from s
    and the draw U [D]; returns the upstream gradient of A, sum_t (leak + (1 - leak) M_t) g_t
    [B, D] (the same mask for every example)."""
    g = _f64(per_example_gradients)
    s = (g * np.sign(_f64(representation))[None]).sum(1)
    purity = 0.5 * (1.0 + s.sum(0) / (np.abs(s).sum(0) + 1e-7))
    uniform = _f64(uniform)
    mask = ((purity > uniform) & (s > 0)) | ((purity < uniform) & (s < 0))
    return np.sum((leak + (1.0 - leak) * mask)[:, None, :] * g, axis=0)


class GradNorm:
    """GradNorm (Chen et al., ICML 2018, eq. 1-2 and Algorithm 1) on given rows, one call per step.

    G_t = w_t |g_t|, Gbar = mean_t G_t, r_t = Ltilde_t / mean(Ltilde) with Ltilde_t = L_t / L_t(0)
    (L_t(0): the first positive loss); L_grad = sum_t |G_t - Gbar r_t^alpha| with the targets held
    constant; w takes one gradient step on L_grad and is renormalised to sum T. The direction uses
    the weights before the step. `mtl`'s documented step rule (its docstring): step size
    lr / mean_t |g_t| and weights clipped at 0 before the renormalisation. dL_grad/dw is taken by
    central differences here.
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        self.w = np.ones(num_tasks)
        self.initial = np.zeros(num_tasks)
        self.alpha, self.lr = alpha, lr

    def step(self, jacobian, losses) -> np.ndarray:
        j, losses = _f64(jacobian), _f64(losses)
        self.initial = np.where(self.initial > 0, self.initial, losses)
        norms = np.linalg.norm(j, axis=1)
        ratios = np.where(self.initial > 0, losses / np.where(self.initial > 0, self.initial, 1),
                          1.0)
        targets = np.mean(self.w * norms) * (ratios / ratios.mean()) ** self.alpha

        def l_grad(w):
            return np.sum(np.abs(w * norms - targets))

        h = 1e-7
        gradient = np.array([(l_grad(self.w + h * e) - l_grad(self.w - h * e)) / (2 * h)
                             for e in np.eye(len(self.w))])
        direction = self.w @ j
        updated = np.maximum(self.w - self.lr * gradient / norms.mean(), 0.0)
        self.w = len(updated) * updated / updated.sum()
        return direction


# --- loss methods --------------------------------------------------------------------------------

def uncertainty(losses, log_variances, task_weights):
    """Uncertainty weighting in the form of the authors' example code (yaringal/
    multi-task-learning-example: `precision * loss + log_var`, precision = exp(-log_var)), each
    term times the task's fixed weight. Returns (total, d total / d L, d total / d s)."""
    losses, s, w = _f64(losses), _f64(log_variances), _f64(task_weights)
    total = np.sum(w * (np.exp(-s) * losses + s))
    return total, w * np.exp(-s), w * (1.0 - np.exp(-s) * losses)


def dwa_weights(loss_history, period: int, temperature: float, task_weights) -> np.ndarray:
    """DWA (Liu, Johns & Davison, CVPR 2019, eq. 7; official mtan code), with periods of `period`
    steps in place of epochs: at step n in period k = n // period, lambda = T softmax(r / temp)
    with r_t = mean loss of period k-1 / mean loss of period k-2, and lambda = 1 for k < 2.
    Returns [steps, T]: the weights used at each step (times the fixed weights)."""
    history = _f64(loss_history)
    weights = []
    for n in range(len(history)):
        k = n // period
        if k < 2:
            lam = np.ones(history.shape[1])
        else:
            last = history[(k - 1) * period:k * period].mean(0)
            before = history[(k - 2) * period:(k - 1) * period].mean(0)
            lam = history.shape[1] * special.softmax(last / before / temperature)
        weights.append(lam * _f64(task_weights))
    return np.array(weights)


def rlw_weights(normal_draw, task_weights) -> np.ndarray:
    """RLW (Lin et al., TMLR 2022; LibMTL's `RLW` with dist='Normal'): softmax of a standard
    normal draw, times the fixed weights."""
    return special.softmax(_f64(normal_draw)) * _f64(task_weights)


def gls(losses):
    """GLS (Chennupati et al., CVPRW 2019, eq. 2; LibMTL's `GLS`): the geometric mean
    (prod_t L_t)^(1/T), and its gradient with respect to the losses by central differences."""
    losses = _f64(losses)

    def value(x):
        return np.exp(np.mean(np.log(x)))

    h = 1e-6 * losses
    gradient = np.array([(value(losses + h[t] * e) - value(losses - h[t] * e)) / (2 * h[t])
                         for t, e in enumerate(np.eye(len(losses)))])
    return value(losses), gradient


class FAMO:
    """FAMO (Liu et al., NeurIPS 2023; official `famo.py`), one call per step, as its toy loop
    (where the losses after the update are the next step's losses).

    `weights(L)`: when a previous loss exists, first the official `update(curr_loss)`: delta =
    log(L_prev - m + 1e-8) - log(L - m + 1e-8), grad = d softmax(xi)/d xi ^T delta, one
    torch.optim.Adam step (lr=w_lr, weight_decay=gamma: L2 added to the gradient, betas 0.9/0.999,
    eps 1e-8); then the gradient of the official loss sum_t z_t log(D_t) / c with respect to L_t,
    lambda_t = (z_t / D_t) / sum_j (z_j / D_j), D = L - m + 1e-8, z = softmax(xi).
    """

    def __init__(self, num_tasks: int, gamma: float = 0.01, w_lr: float = 0.025,
                 min_losses=0.0):
        self.xi = np.zeros(num_tasks)
        self.m = np.zeros(num_tasks)
        self.v = np.zeros(num_tasks)
        self.steps = 0
        self.gamma, self.w_lr = gamma, w_lr
        self.min_losses = np.broadcast_to(_f64(min_losses), (num_tasks,))
        self.previous = None

    def _update(self, losses):
        delta = np.log(self.previous - self.min_losses + 1e-8) \
            - np.log(losses - self.min_losses + 1e-8)
        z = special.softmax(self.xi)
        softmax_jacobian = np.diag(z) - np.outer(z, z)
        gradient = softmax_jacobian.T @ delta + self.gamma * self.xi
        self.steps += 1
        self.m = 0.9 * self.m + 0.1 * gradient
        self.v = 0.999 * self.v + 0.001 * gradient ** 2
        m_hat = self.m / (1 - 0.9 ** self.steps)
        v_hat = self.v / (1 - 0.999 ** self.steps)
        self.xi = self.xi - self.w_lr * m_hat / (np.sqrt(v_hat) + 1e-8)

    def weights(self, losses) -> np.ndarray:
        losses = _f64(losses)
        if self.previous is not None:
            self._update(losses)
        self.previous = losses
        z = special.softmax(self.xi)
        ratios = z / (losses - self.min_losses + 1e-8)
        return ratios / ratios.sum()
