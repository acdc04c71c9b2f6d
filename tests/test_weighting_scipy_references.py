"""FairGrad, DB-MTL, STCH, ConFIG, DualProj and MoCo against independent NumPy/SciPy references
written from the papers' and official codes' formulas (LibMTL, TorchJD, conflictfree); nothing
here is shared with `mtl/weighting/`."""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

import mtl
from mtl.weighting import StepContext


def _jacobians():
    rng = np.random.default_rng(7)
    random = rng.normal(size=(3, 40))
    u, _, vt = np.linalg.svd(rng.normal(size=(3, 40)), full_matrices=False)
    ill = u @ np.diag([1.0, 3e-2, 1e-3]) @ vt
    base = rng.normal(size=(2, 30))
    identical = np.stack([base[0], base[0], base[1]])
    return {
        "random": random,
        "ill_conditioned": ill,
        "two_identical_rows": identical,
        "one_task": rng.normal(size=(1, 25)),
        "ten_tasks": rng.normal(size=(10, 60)) + 0.3,
    }


JACOBIANS = _jacobians()


def _losses(t, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 3.0, size=t)


def _assert_same(direction, reference):
    direction, reference = np.asarray(direction, np.float64), np.asarray(reference, np.float64)
    cos = direction @ reference / (np.linalg.norm(direction) * np.linalg.norm(reference))
    assert cos >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(direction), np.linalg.norm(reference), rtol=1e-3)


def _assert_no_conflict(jacobian, direction):
    gains = jacobian @ direction
    bound = -1e-6 * np.linalg.norm(jacobian, axis=1) * np.linalg.norm(direction)
    assert np.all(gains >= bound), gains


# ---- References ---------------------------------------------------------------------------

def fairgrad_reference(j, alpha):
    """Official / LibMTL: least_squares(G x - x^(-1/alpha)), x >= 0, from 1/T; d = J^T x."""
    g = j @ j.T
    t = len(g)
    res = scipy.optimize.least_squares(lambda x: g @ x - np.power(1 / x, 1 / alpha),
                                       np.ones(t) / t, bounds=(0, np.inf), xtol=1e-15,
                                       ftol=1e-15, gtol=1e-15)
    return res.x @ j


def config_reference(j):
    """TorchJD / conflictfree: units, pinv(units) @ 1, normalised, times sum of projections."""
    units = j / np.linalg.norm(j, axis=1, keepdims=True)
    best = np.linalg.pinv(units) @ np.ones(len(j))
    unit = best / np.linalg.norm(best)
    return np.sum(j @ unit) * unit


def dualproj_reference(j, reg_eps=1e-4, norm_eps=1e-4):
    """TorchJD: v = argmin v^T G' v s.t. v >= 1/T, G' = G / tr(G) + reg_eps I; d = J^T v.
    Solved exactly as a non-negative least-squares problem in x = v - 1/T."""
    g = j @ j.T
    t = len(g)
    trace = np.trace(g)
    g = (g / trace if trace >= norm_eps else np.zeros_like(g)) + reg_eps * np.eye(t)
    eigenvalues, vectors = np.linalg.eigh(g)
    root = vectors @ np.diag(np.sqrt(np.maximum(eigenvalues, 0))) @ vectors.T  # G' = R R
    u = np.ones(t) / t
    x, _ = scipy.optimize.nnls(root, -root @ u)
    return (u + x) @ j


def db_mtl_reference(jacobians, losses_list, beta=0.9, beta_sigma=0.0):
    """LibMTL DB_MTL.backward over consecutive steps (rows = grads of L_t, grads of log(L+1e-8))."""
    buffer, out = np.zeros_like(jacobians[0]), []
    for step, (j, losses) in enumerate(zip(jacobians, losses_list), start=1):
        batch = j / (losses + 1e-8)[:, None]
        buffer = batch + (beta / step ** beta_sigma) * (buffer - batch)
        norms = np.linalg.norm(buffer, axis=1)
        alpha = norms.max() / (norms + 1e-8)
        out.append(alpha @ buffer)
    return out


def moco_reference(jacobians, losses_list, beta=0.5, beta_sigma=0.5, gamma=0.1,
                   gamma_sigma=0.5, rho=0.0, projection=False):
    """LibMTL MoCo.backward over consecutive steps."""
    t = len(jacobians[0])
    y, lambd, out = np.zeros_like(jacobians[0]), np.ones(t) / t, []
    for step, (j, losses) in enumerate(zip(jacobians, losses_list), start=1):
        grads = j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-8) * losses[:, None]
        y = y - (beta / step ** beta_sigma) * (y - grads)
        moved = lambd - (gamma / step ** gamma_sigma) * (y @ y.T + rho * np.eye(t)) @ lambd
        if projection:
            lambd = _simplex(moved)
        else:
            lambd = np.exp(moved - moved.max()) / np.exp(moved - moved.max()).sum()
        out.append(y.T @ lambd)
    return out


def _simplex(x):
    res = scipy.optimize.minimize(lambda p: np.sum((p - x) ** 2), np.ones(len(x)) / len(x),
                                  constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
                                  bounds=[(0, None)] * len(x), method="SLSQP",
                                  options={"ftol": 1e-14, "maxiter": 500})
    return res.x


def stch_reference_gradient(losses_seq, mu=1.0, warmup_epoch=1, steps_per_epoch=2):
    """LibMTL / official STCH_MTL objective per step, differentiated numerically (central
    differences in float64); epochs of `steps_per_epoch` steps."""
    average, count, nadir, grads = 0.0, 0, None, []
    for step, losses in enumerate(losses_seq):
        epoch = step // steps_per_epoch
        if epoch <= warmup_epoch:
            def objective(l):
                return np.sum(np.log(l + 1e-20))
            if epoch == warmup_epoch:
                average, count = average + losses, count + 1
        else:
            if nadir is None:
                nadir = average / count
            t = len(losses)

            def objective(l, nadir=nadir):
                # The official code subtracts the (detached) max inside the exp and adds
                # nothing back: a constant that does not change the gradient, left out here.
                logs = np.log(l / nadir + 1e-20)
                return mu * np.log(np.sum(np.exp(logs / mu))) * t
        eps = 1e-6
        grads.append(np.array([(objective(losses + eps * e) - objective(losses - eps * e))
                               / (2 * eps) for e in np.eye(len(losses))]))
    return grads


# ---- Stateless gradient methods -----------------------------------------------------------

@pytest.mark.parametrize("case", sorted(JACOBIANS))
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_fairgrad_matches_the_official_equations(case, alpha):
    j = JACOBIANS[case]
    d = mtl.weighting.get("fairgrad", alpha=alpha).aggregate(j.astype(np.float32)).numpy()
    _assert_same(d, fairgrad_reference(j, alpha))
    _assert_no_conflict(j, d)


def test_fairgrad_weights_solve_g_w_equals_w_to_the_minus_one_over_alpha():
    j = JACOBIANS["random"] * 0.01
    method = mtl.weighting.get("fairgrad", alpha=2.0)
    method.aggregate(j.astype(np.float32))
    w = method.weights().numpy().astype(np.float64)
    np.testing.assert_allclose((j @ j.T) @ w, w ** (-1 / 2.0), rtol=1e-4)


@pytest.mark.parametrize("case", sorted(JACOBIANS))
def test_config_matches_the_reference(case):
    j = JACOBIANS[case]
    d = mtl.weighting.get("config").aggregate(j.astype(np.float32)).numpy()
    _assert_same(d, config_reference(j))
    if case != "two_identical_rows":  # the paper's claim needs full row rank (there: too)
        _assert_no_conflict(j, d)


def test_config_leaves_a_zero_row_out():
    j = JACOBIANS["random"].copy()
    j[1] = 0.0
    d = mtl.weighting.get("config").aggregate(j.astype(np.float32)).numpy()
    units = np.nan_to_num(j / np.linalg.norm(j, axis=1, keepdims=True))
    best = np.linalg.pinv(units) @ np.ones(3)
    unit = best / np.linalg.norm(best)
    _assert_same(d, np.sum(j @ unit) * unit)


@pytest.mark.parametrize("case", sorted(JACOBIANS))
def test_dualproj_matches_torchjd_formula(case):
    j = JACOBIANS[case]
    d = mtl.weighting.get("dualproj").aggregate(j.astype(np.float32)).numpy()
    _assert_same(d, dualproj_reference(j))


@pytest.mark.parametrize("case", sorted(JACOBIANS))
def test_dualproj_without_regulariser_never_conflicts(case):
    j = JACOBIANS[case]
    d = mtl.weighting.get("dualproj", reg_eps=0.0).aggregate(j.astype(np.float32)).numpy()
    _assert_same(d, dualproj_reference(j, reg_eps=0.0))
    _assert_no_conflict(j, d)


# ---- Stateful gradient methods ------------------------------------------------------------

def _two_steps(case):
    j = JACOBIANS[case]
    rng = np.random.default_rng(3)
    j2 = j + 0.3 * rng.normal(size=j.shape)
    return [j, j2], [_losses(len(j), 1), _losses(len(j), 2)]


@pytest.mark.parametrize("case", sorted(JACOBIANS))
def test_db_mtl_two_steps_match_libmtl(case):
    jacobians, losses = _two_steps(case)
    method = mtl.weighting.get("db_mtl")
    ours = [method.aggregate(j.astype(np.float32),
                             StepContext(global_losses=tf.constant(l, tf.float32))).numpy()
            for j, l in zip(jacobians, losses)]
    for d, ref in zip(ours, db_mtl_reference(jacobians, losses)):
        _assert_same(d, ref)


def test_db_mtl_task_weights_multiply_the_balanced_gradients():
    jacobians, losses = _two_steps("random")
    task_weights = np.array([1.0, 0.5, 2.0])
    method = mtl.weighting.get("db_mtl")
    method.build(["a", "b", "c"], list(task_weights))
    d = method.aggregate((task_weights[:, None] * jacobians[0]).astype(np.float32),
                         StepContext(global_losses=tf.constant(losses[0], tf.float32))).numpy()
    buffer = 0.1 * jacobians[0] / (losses[0] + 1e-8)[:, None]
    norms = np.linalg.norm(buffer, axis=1)
    _assert_same(d, (task_weights * norms.max() / norms) @ buffer)


@pytest.mark.parametrize("case", sorted(JACOBIANS))
@pytest.mark.parametrize("update", ["softmax", "projection"])
def test_moco_two_steps_match_libmtl(case, update):
    jacobians, losses = _two_steps(case)
    method = mtl.weighting.get("moco", lambda_update=update, rho=0.1)
    ours = [method.aggregate(j.astype(np.float32),
                             StepContext(global_losses=tf.constant(l, tf.float32))).numpy()
            for j, l in zip(jacobians, losses)]
    refs = moco_reference(jacobians, losses, rho=0.1, projection=update == "projection")
    for d, ref in zip(ours, refs):
        _assert_same(d, ref)


def test_moco_and_db_mtl_state_restarts_when_the_parameter_count_changes():
    for name in ("moco", "db_mtl"):
        method = mtl.weighting.get(name)
        context = StepContext(global_losses=tf.constant([1.0, 2.0, 0.5]))
        method.aggregate(JACOBIANS["random"].astype(np.float32), context)
        wider = np.concatenate([JACOBIANS["random"], JACOBIANS["random"]], axis=1)
        d = method.aggregate(wider.astype(np.float32), context).numpy()
        assert d.shape == (80,) and np.all(np.isfinite(d))


def test_stateful_methods_in_a_compiled_function_match_eager():
    jacobians, losses = _two_steps("random")
    for name in ("moco", "db_mtl"):
        eager, compiled = mtl.weighting.get(name), mtl.weighting.get(name)
        eager.build(["a", "b", "c"], [1.0] * 3)
        compiled.build(["a", "b", "c"], [1.0] * 3)
        run = tf.function(lambda j, l, m=compiled: m.aggregate(j, StepContext(global_losses=l)))
        for j, l in zip(jacobians, losses):
            j, l = tf.constant(j, tf.float32), tf.constant(l, tf.float32)
            np.testing.assert_allclose(run(j, l).numpy(),
                                       eager.aggregate(j, StepContext(global_losses=l)).numpy(),
                                       rtol=1e-5, atol=1e-7)


# ---- STCH ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 3, 10])
def test_stch_gradients_match_the_official_objective_through_every_phase(t):
    rng = np.random.default_rng(t)
    steps = 7  # epochs of 2 steps: warm-up (0), averaging (1), STCH (2, 3)
    losses_seq = [rng.uniform(0.2, 3.0, size=t) for _ in range(steps)]
    method = mtl.weighting.get("stch", mu=0.5, warmup_periods=1, period=2)
    method.build([f"t{i}" for i in range(t)], [1.0] * t)
    refs = stch_reference_gradient(losses_seq, mu=0.5, warmup_epoch=1, steps_per_epoch=2)
    for losses, ref in zip(losses_seq, refs):
        x = tf.Variable(losses.astype(np.float32))
        with tf.GradientTape() as tape:
            total = method.combine(x, StepContext(global_losses=tf.constant(x)))
        np.testing.assert_allclose(tape.gradient(total, x).numpy(), ref, rtol=1e-4)


def test_stch_ignores_a_task_without_labels():
    method = mtl.weighting.get("stch", warmup_periods=0, period=1)
    method.build(["a", "b"], [1.0, 2.0])
    for losses in ([1.0, 2.0], [0.0, 1.5], [0.5, 0.0]):
        x = tf.Variable(losses)
        with tf.GradientTape() as tape:
            total = method.combine(x)
        gradient = tape.gradient(total, x).numpy()
        assert np.all(np.isfinite(gradient))
        assert np.all(gradient[np.array(losses) == 0.0] == 0.0)


def test_options_are_checked():
    for name, options in (("fairgrad", {"alpha": 0}), ("db_mtl", {"beta": 1.0}),
                          ("stch", {"mu": -1}), ("dualproj", {"reg_eps": -1}),
                          ("moco", {"lambda_update": "sgd"}), ("stch", {"period": 0})):
        with pytest.raises(mtl.UsageError, match=name):
            mtl.weighting.get(name, **options)
