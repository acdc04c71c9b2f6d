"""mtl.weighting: registry, option errors, and each method against answers worked out by hand or
by an independent NumPy reference."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import mtl  # noqa: E402
import reference_methods as reference  # noqa: E402
from mtl import weighting  # noqa: E402
from mtl.weighting import StepContext, solvers  # noqa: E402

LOSS_METHODS = ["equal", "uncertainty", "dwa", "rlw", "gls", "famo", "stch"]
GRADIENT_METHODS = ["pcgrad", "gradvac", "graddrop", "mgda", "cagrad", "imtl", "nash_mtl",
                    "aligned_mtl", "upgrad", "gradnorm", "fairgrad", "db_mtl", "config",
                    "dualproj", "moco"]


def built(name, num_tasks=2, task_weights=None, **options):
    method = weighting.get(name, **options)
    names = [f"task{i}" for i in range(num_tasks)]
    method.build(names, task_weights or [1.0] * num_tasks)
    return method


def aggregate(method, jacobian, losses=None):
    jacobian = tf.constant(jacobian, tf.float32)
    if losses is None:
        losses = np.ones(jacobian.shape[0])
    return method.aggregate(jacobian, StepContext(tf.constant(losses, tf.float32))).numpy()


def random_jacobian(num_tasks=3, num_params=5, seed=0):
    return np.random.default_rng(seed).normal(size=(num_tasks, num_params)).astype(np.float32)


# --- registry and errors -------------------------------------------------------------------------

def test_registry_holds_every_method_under_its_name():
    assert sorted(weighting.METHODS) == sorted(LOSS_METHODS + GRADIENT_METHODS)
    for name, cls in weighting.METHODS.items():
        method = weighting.get(name)
        assert type(method) is cls and method.name == name
        family = weighting.LossWeighting if name in LOSS_METHODS else weighting.GradientWeighting
        assert isinstance(method, family)


def test_rep_mode_support_follows_the_papers():
    supports = {name: weighting.METHODS[name].supports_rep for name in GRADIENT_METHODS}
    assert supports == {"pcgrad": False, "gradvac": False, "graddrop": True, "mgda": True,
                        "cagrad": False, "imtl": True, "nash_mtl": False, "aligned_mtl": True,
                        "upgrad": False, "gradnorm": True, "fairgrad": False, "db_mtl": False,
                        "config": False, "dualproj": False, "moco": False}


def test_unknown_method_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown weighting method 'cagard'.*'cagrad'"):
        weighting.get("cagard")


def test_an_option_the_method_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError,
                       match=r"'pcgrad' takes no option 'c'; its options are \['seed'\]"):
        weighting.get("pcgrad", c=0.5)


@pytest.mark.parametrize("name,options,shown", [
    ("cagrad", {"c": -0.1}, "c=-0.1"),
    ("cagrad", {"rescale": 3}, "rescale=3"),
    ("mgda", {"normalization": "max"}, "normalization='max'"),
    ("nash_mtl", {"update_every": 0}, "update_every=0"),
    ("nash_mtl", {"max_norm": -1.0}, "max_norm=-1.0"),
    ("dwa", {"period": 2.5}, "period=2.5"),
    ("dwa", {"temperature": 0.0}, "temperature=0.0"),
    ("rlw", {"seed": "7"}, "seed='7'"),
    ("pcgrad", {"seed": True}, "seed=True"),
    ("gradvac", {"beta": 1.5}, "beta=1.5"),
    ("graddrop", {"leak": -0.5}, "leak=-0.5"),
    ("famo", {"w_lr": 0.0}, "w_lr=0.0"),
    ("famo", {"gamma": -1.0}, "gamma=-1.0"),
    ("famo", {"min_losses": "low"}, "min_losses='low'"),
    ("upgrad", {"reg_eps": -1e-3}, "reg_eps=-0.001"),
    ("gradnorm", {"alpha": -1.0}, "alpha=-1.0"),
    ("gradnorm", {"lr": 0}, "lr=0"),
])
def test_bad_option_values_name_the_option_and_value(name, options, shown):
    with pytest.raises(ValueError, match=f"'{name}': option {shown} is invalid; expected"):
        weighting.get(name, **options)


def test_famo_min_losses_must_have_one_value_per_task():
    method = weighting.get("famo", min_losses=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"min_losses=\[0.0, 0.0, 0.0\].*2 numbers"):
        method.build(["a", "b"], [1.0, 1.0])


@pytest.mark.parametrize("name,options", [("gradnorm", {}), ("mgda", {"normalization": "loss"})])
def test_methods_that_need_losses_say_so_without_a_context(name, options):
    method = built(name, **options)
    assert method.needs_losses
    with pytest.raises(ValueError, match="needs the task losses"):
        method.aggregate(tf.eye(2))


def test_state_variables_allow_assignment_in_the_replica_context():
    for name in LOSS_METHODS + GRADIENT_METHODS:
        method = built(name, num_tasks=3)
        for variable in method.variables:
            if not variable.trainable:
                assert variable.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA, \
                    (name, variable.name)
    assert [v.name for v in built("uncertainty").trainable_variables] == ["log_variances:0"]


# --- gradient methods: known answers -------------------------------------------------------------

def test_pcgrad_projects_two_conflicting_gradients():
    # g1 . g2 = -1 < 0: g1' = g1 - (-1 / |g2|^2) g2 = (0.5, 0.5),
    #                    g2' = g2 - (-1 / |g1|^2) g1 = (0, 1).
    method = built("pcgrad")
    np.testing.assert_allclose(aggregate(method, [[1.0, 0.0], [-1.0, 1.0]]), [0.5, 1.5], atol=1e-6)
    # g1' + g2' = (g1 + 0.5 g2) + (g2 + g1) = 2 g1 + 1.5 g2.
    np.testing.assert_allclose(method.weights().numpy(), [2.0, 1.5], atol=1e-6)


def test_pcgrad_leaves_agreeing_gradients_alone():
    np.testing.assert_allclose(aggregate(built("pcgrad"), [[1.0, 0.0], [1.0, 1.0]]), [2.0, 1.0])


def test_pcgrad_three_tasks_follow_the_seeded_random_order():
    jacobian = [[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-0.5, -1.0, 1.0]]
    first, second = built("pcgrad", 3, seed=3), built("pcgrad", 3, seed=3)
    sequence = [aggregate(first, jacobian) for _ in range(6)]
    np.testing.assert_allclose(sequence, [aggregate(second, jacobian) for _ in range(6)])
    # The order matters with three tasks: across calls (new orders) the results differ.
    assert len({tuple(np.round(d, 5)) for d in sequence}) > 1
    # Each result is one of the PCGrad outcomes of some order, worked out in NumPy.
    outcomes = np.array([reference.pcgrad(np.array(jacobian), orders)
                         for orders in all_order_choices(3)])
    for d in sequence:
        assert np.min(np.abs(outcomes - d).max(axis=1)) < 1e-5, d


def all_order_choices(num_tasks):
    import itertools
    permutations = list(itertools.permutations(range(num_tasks)))
    return itertools.product(permutations, repeat=num_tasks)


@pytest.mark.parametrize("jacobian,point", [
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
    # w = g2 . (g2 - g1) / |g1 - g2|^2 = 4 / 10: 0.4 (2, 0) + 0.6 (-1, 1).
    ([[2.0, 0.0], [-1.0, 1.0]], [0.2, 0.6]),
    # g1 . (g2 - g1) > 0: the segment's closest point to 0 is g1 itself.
    ([[1.0, 0.0], [2.0, 0.1]], [1.0, 0.0]),
    # Three tasks: the hull's min-norm point lies on the edge [e1, e2].
    ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], [0.5, 0.5, 0.0]),
])
def test_mgda_returns_the_min_norm_point_of_the_hull(jacobian, point):
    method = built("mgda", len(jacobian))
    np.testing.assert_allclose(aggregate(method, jacobian), point, atol=1e-4)
    assert np.sum(method.weights().numpy()) == pytest.approx(1.0, abs=1e-5)


def test_mgda_normalisations_weight_the_raw_gradients_as_the_official_code():
    jacobian = [[2.0, 0.0], [0.0, 1.0]]
    # none: min-norm of (2, 0), (0, 1): w1 = 1 / (4 + 1).
    np.testing.assert_allclose(aggregate(built("mgda"), jacobian), [0.4, 0.8], atol=1e-5)
    # l2 or loss (losses 2, 1): the normalised gradients are e1, e2 -> w = (0.5, 0.5), applied
    # to the raw gradients.
    for normalization in ("l2", "loss"):
        method = built("mgda", normalization=normalization)
        np.testing.assert_allclose(aggregate(method, jacobian, losses=[2.0, 1.0]), [1.0, 0.5],
                                   atol=1e-5)
    # loss+ with losses (1, 2): n = (2, 2) -> w = (0.2, 0.8) as for (1, 0), (0, 0.5).
    method = built("mgda", normalization="loss+")
    np.testing.assert_allclose(aggregate(method, jacobian, losses=[1.0, 2.0]), [0.4, 0.8],
                               atol=1e-5)


def test_imtl_projects_equally_onto_every_task_gradient():
    # Two tasks by hand: d = a (1, 0) + (1 - a)(0, 2) with d . e1 = d . e2 -> a = 2/3.
    method = built("imtl")
    np.testing.assert_allclose(aggregate(method, [[1.0, 0.0], [0.0, 2.0]]), [2 / 3, 2 / 3],
                               atol=1e-5)
    jacobian = random_jacobian(4, 6)
    method = built("imtl", 4)
    d = aggregate(method, jacobian)
    projections = jacobian @ d / np.linalg.norm(jacobian, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
    assert np.sum(method.weights().numpy()) == pytest.approx(1.0, abs=1e-5)


def test_cagrad_with_c_zero_is_the_mean_gradient():
    jacobian = random_jacobian(3, 5)
    np.testing.assert_allclose(aggregate(built("cagrad", 3, c=0.0), jacobian),
                               jacobian.mean(0), atol=1e-6)


def cagrad_reference(jacobian, c):
    """The CAGrad repository's toy solver (two tasks), minimize_scalar replaced by a fine grid."""
    g1, g2 = jacobian.astype(np.float64)
    g0 = (g1 + g2) / 2
    g11, g12, g22 = g1 @ g1, g1 @ g2, g2 @ g2
    coef = c * 0.5 * np.sqrt(g11 + g22 + 2 * g12 + 1e-4)
    x = np.linspace(0.0, 1.0, 2_000_001)
    obj = coef * np.sqrt(x ** 2 * (g11 + g22 - 2 * g12) + 2 * x * (g12 - g22) + g22 + 1e-4) \
        + 0.5 * x * (g11 + g22 - 2 * g12) + (0.5 + x) * (g12 - g22) + g22
    x = x[np.argmin(obj)]
    gw = x * g1 + (1 - x) * g2
    return (g0 + coef / (np.linalg.norm(gw) + 1e-4) * gw) / (1 + c)


@pytest.mark.parametrize("jacobian", [
    [[1.0, 0.0], [-0.5, 1.0]], [[3.0, 1.0], [-1.0, 0.2]], [[1.0, 0.2, 0.0], [-1.0, 0.1, 0.3]]])
def test_cagrad_matches_the_reference_toy_solver(jacobian):
    jacobian = np.array(jacobian, np.float32)
    d = aggregate(built("cagrad", c=0.5, rescale=2), jacobian)
    np.testing.assert_allclose(d, cagrad_reference(jacobian, 0.5), atol=2e-3)


def test_cagrad_dual_is_optimal_over_the_simplex_for_three_tasks():
    jacobian = random_jacobian(3, 4, seed=2).astype(np.float64)
    gram = jacobian @ jacobian.T
    c, g0_norm = 0.5, np.sqrt(gram.mean())

    def dual(w):
        return w @ gram.mean(1) + c * g0_norm * np.sqrt(w @ gram @ w)

    grid = np.linspace(0, 1, 301)
    best = min(dual(np.array([a, b, 1 - a - b])) for a in grid for b in grid if a + b <= 1)
    from mtl.weighting import solvers
    w, _ = solvers.cagrad_dual(tf.constant(gram, tf.float32), c)
    assert dual(w.numpy().astype(np.float64)) <= best + 1e-4 * abs(best)


def test_nash_mtl_weights_solve_the_bargaining_equations():
    jacobian = random_jacobian(3, 5, seed=1)
    method = built("nash_mtl", 3, max_norm=0.0)
    d = aggregate(method, jacobian)
    alpha = method.weights().numpy()
    gram = jacobian.astype(np.float64) @ jacobian.T  # the raw Gramian, as the official code
    np.testing.assert_allclose(gram @ alpha, 1.0 / alpha, rtol=1e-4)
    assert np.all(alpha > 0)
    np.testing.assert_allclose(d, alpha @ jacobian, rtol=1e-5)
    # |d|^2 = alpha^T G alpha = T, whatever the gradients' scale.
    assert np.linalg.norm(d) == pytest.approx(np.sqrt(3), rel=1e-4)
    small = aggregate(built("nash_mtl", 3, max_norm=0.0), 0.01 * jacobian)
    assert np.linalg.norm(small) == pytest.approx(np.sqrt(3), rel=1e-4)


def test_nash_mtl_direction_is_invariant_to_a_task_loss_scale():
    jacobian = random_jacobian(3, 5, seed=4)
    scaled = jacobian * np.array([[0.1], [1.0], [5.0]], np.float32)
    d = aggregate(built("nash_mtl", 3, max_norm=0.0), jacobian)
    d_scaled = aggregate(built("nash_mtl", 3, max_norm=0.0), scaled)
    np.testing.assert_allclose(d_scaled / np.linalg.norm(d_scaled), d / np.linalg.norm(d),
                               atol=1e-4)


def test_nash_mtl_recomputes_every_k_calls_and_clips():
    method = built("nash_mtl", 2, update_every=3, max_norm=0.0)
    first, second = [[1.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [1.0, 1.0]]
    aggregate(method, first)                      # call 0: solved (G = I: alpha = 1).
    alpha = method.weights().numpy()
    np.testing.assert_allclose(alpha, [1.0, 1.0], rtol=1e-4)
    for _ in range(2):                            # calls 1, 2: stored weights reused.
        np.testing.assert_allclose(aggregate(method, second), alpha @ np.array(second),
                                   rtol=1e-5)
    aggregate(method, second)                     # call 3: solved again.
    assert not np.allclose(method.weights().numpy(), alpha)
    clipped = built("nash_mtl", 2, max_norm=0.01)
    assert np.linalg.norm(aggregate(clipped, second)) == pytest.approx(0.01, rel=1e-5)


def test_upgrad_is_non_conflicting_with_every_task():
    jacobian = random_jacobian(5, 3, seed=3)          # More tasks than dimensions: conflicts.
    d = aggregate(built("upgrad", 5), jacobian)
    scale = np.linalg.norm(jacobian, axis=1) * np.linalg.norm(d)
    assert np.all(jacobian @ d >= -1e-4 * scale), jacobian @ d


def test_upgrad_projects_onto_the_dual_cone_by_hand():
    # Rows (1, 0), (-1, 1); dual cone {x1 >= 0, x2 >= x1}. g1 / 2 = (0.5, 0) projects onto the
    # face x2 = x1: (0.25, 0.25); g2 / 2 = (-0.5, 0.5) onto x1 = 0: (0, 0.5). Sum (0.25, 0.75).
    d = aggregate(built("upgrad", reg_eps=0.0), [[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(d, [0.25, 0.75], atol=1e-5)
    # Without conflict every g_i / T is already in the cone: the mean.
    np.testing.assert_allclose(aggregate(built("upgrad", reg_eps=0.0), [[1.0, 0.0], [1.0, 1.0]]),
                               [1.0, 0.5], atol=1e-5)


def _kkt_problems():
    """PSD Gramians: random, singular values 1 .. 1e-4, rank-deficient, identical rows, a zero
    row, and ten tasks in three dimensions."""
    rng = np.random.default_rng(11)
    cases = {"random": rng.normal(size=(4, 6)),
             "ill_conditioned": rng.normal(size=(4, 4)) @ np.diag(np.logspace(0, -4, 4))
             @ np.linalg.qr(rng.normal(size=(4, 6)).T)[0].T,
             "rank_deficient": rng.normal(size=(5, 3)),
             "zero_row": np.vstack([rng.normal(size=(2, 4)), np.zeros((1, 4))]),
             "ten_tasks": rng.normal(size=(10, 3))}
    cases["identical_rows"] = cases["random"][[0, 1, 0, 2]]
    return {name: j @ j.T for name, j in cases.items()}


@pytest.mark.parametrize("case", sorted(_kkt_problems()))
@pytest.mark.parametrize("simplex", [False, True], ids=["bounds", "simplex"])
def test_nonnegative_qp_satisfies_the_kkt_conditions(case, simplex):
    """The active-set solver's output is the exact optimum: feasible, every bound's multiplier
    >= 0 and zero where the bound is inactive (relative residual <= 1e-9, the 1e-6 the
    methods need with room to spare), for the linear terms UPGrad (G u) and MGDA (0) use."""
    gram = _kkt_problems()[case]
    t = len(gram)
    linear = np.zeros((1, t)) if simplex else (np.eye(t) / t) @ gram  # v = u + z: c = G u
    z = solvers.nonnegative_qp(tf.constant(gram), tf.constant(linear), simplex=simplex).numpy()
    scale = max(np.abs(np.diag(gram)).max(), 1e-300)
    for zr, c in zip(z, linear):
        assert zr.min() >= 0.0
        gradient = gram @ zr + c
        if simplex:
            assert abs(zr.sum() - 1.0) <= 1e-12
            nu = gradient[zr > 0].mean()
            multipliers = gradient - nu
            assert np.abs(multipliers[zr > 0]).max() <= 1e-9 * scale
        else:
            multipliers = gradient
        assert multipliers.min() >= -1e-9 * scale, multipliers
        assert np.abs(multipliers * zr).max() <= 1e-9 * scale * max(1.0, zr.max())


def aligned_mtl_reference(jacobian):
    """LibMTL's Aligned-MTL weights, in NumPy."""
    gram = jacobian.astype(np.float64) @ jacobian.T
    values, vectors = np.linalg.eigh(gram)
    keep = values > values.max() * len(values) * np.finfo(np.float32).eps
    values, vectors = values[keep], vectors[:, keep]
    b = np.sqrt(values.min()) * (vectors / np.sqrt(values)) @ vectors.T
    return b.sum(0)


def test_aligned_mtl_equalises_the_singular_values():
    # Orthogonal gradients of norms 1 and 2: the aligned rows both have norm 1 -> g1 + g2 / 2.
    np.testing.assert_allclose(aggregate(built("aligned_mtl"), [[1.0, 0.0], [0.0, 2.0]]),
                               [1.0, 1.0], atol=1e-5)
    jacobian = random_jacobian(3, 5, seed=5)
    method = built("aligned_mtl", 3)
    d = aggregate(method, jacobian)
    np.testing.assert_allclose(method.weights().numpy(), aligned_mtl_reference(jacobian),
                               rtol=1e-3)
    np.testing.assert_allclose(d, aligned_mtl_reference(jacobian) @ jacobian, rtol=1e-3,
                               atol=1e-5)


def test_gradvac_moves_similarity_to_its_ema_target():
    method = built("gradvac", beta=0.5)
    # Call 1: cos(g1, g2) = 1/sqrt(2) >= target 0: no correction; targets -> 0.5 / sqrt(2).
    np.testing.assert_allclose(aggregate(method, [[1.0, 0.0], [1.0, 1.0]]), [2.0, 1.0], atol=1e-6)
    target = 0.5 / np.sqrt(2)
    np.testing.assert_allclose(method.targets.numpy(), [[0, target], [target, 0]], atol=1e-6)
    # Call 2: g1 = (1, 0), g2 = (-1, 1), cos = -1/sqrt(2) < target: each edited gradient is
    # moved so that its cosine with the other task's gradient equals the target.
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    d = aggregate(method, [g1, g2])
    edited = [vaccinated(g1, g2, target), vaccinated(g2, g1, target)]
    for own, other in ((edited[0], g2), (edited[1], g1)):
        assert own @ other / np.linalg.norm(own) / np.linalg.norm(other) == \
            pytest.approx(target, abs=1e-5)
    np.testing.assert_allclose(d, edited[0] + edited[1], atol=1e-5)
    # EMA, applied whether or not the correction fired: 0.5 target + 0.5 (-1/sqrt(2)).
    updated = 0.5 * target - 0.5 / np.sqrt(2)
    np.testing.assert_allclose(method.targets.numpy(), [[0, updated], [updated, 0]], atol=1e-6)


def vaccinated(g_i, g_j, target):
    phi = g_i @ g_j / np.linalg.norm(g_i) / np.linalg.norm(g_j)
    w = np.linalg.norm(g_i) * (target * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - target ** 2)) \
        / (np.linalg.norm(g_j) * np.sqrt(1 - target ** 2))
    return g_i + w * g_j


def test_graddrop_is_reproducible_and_keeps_agreeing_signs():
    jacobian = random_jacobian(3, 200, seed=6)
    first, second = built("graddrop", 3, seed=5), built("graddrop", 3, seed=5)
    sequence = [aggregate(first, jacobian) for _ in range(3)]
    for expected in sequence:
        np.testing.assert_array_equal(aggregate(second, jacobian), expected)
    assert not np.allclose(sequence[0], sequence[1])          # A new draw per call.
    other_seed = aggregate(built("graddrop", 3, seed=6), jacobian)
    assert not np.allclose(other_seed, sequence[0])
    # Each coordinate keeps only the positive or only the negative components.
    totals = [jacobian[:, p][jacobian[:, p] > 0].sum() for p in range(200)], \
        [jacobian[:, p][jacobian[:, p] < 0].sum() for p in range(200)]
    for p, value in enumerate(sequence[0]):
        assert np.isclose(value, totals[0][p], atol=1e-6) or np.isclose(value, totals[1][p],
                                                                         atol=1e-6)
    # Where all signs agree the purity is 0 or 1: nothing is dropped.
    agreeing = np.abs(jacobian)
    np.testing.assert_allclose(aggregate(built("graddrop", 3), agreeing), agreeing.sum(0),
                               rtol=1e-6)
    np.testing.assert_allclose(aggregate(built("graddrop", 3, leak=1.0), jacobian),
                               jacobian.sum(0), rtol=1e-5, atol=1e-6)


def test_gradnorm_step_by_hand():
    method = built("gradnorm", alpha=1.5, lr=0.1)
    jacobian = [[1.0, 0.0], [0.0, 3.0]]                       # Norms 1 and 3.
    # First call: weights 1 -> plain sum; initial losses stored; equal ratios -> r = 1, target
    # = mean(w n) = 2; dL/dw = sign(n - 2) n / mean(n) = (-0.5, 1.5).
    np.testing.assert_allclose(aggregate(method, jacobian, losses=[2.0, 4.0]), [1.0, 3.0])
    w = np.array([1.0 + 0.05, 1.0 - 0.15])
    np.testing.assert_allclose(method.loss_scales.numpy(), 2 * w / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(method.initial_losses.numpy(), [2.0, 4.0])
    # Second call: task 0's loss fell less (ratio 1 vs 0.5): r = (4/3, 2/3), its target rises.
    w = method.loss_scales.numpy()
    n = w * np.array([1.0, 3.0])
    target = n.mean() * np.array([4 / 3, 2 / 3]) ** 1.5
    step = np.sign(n - target) * np.array([1.0, 3.0]) / 2.0
    np.testing.assert_allclose(aggregate(method, jacobian, losses=[2.0, 2.0]),
                               w @ np.array(jacobian), rtol=1e-6)
    expected = np.maximum(w - 0.1 * step, 0)
    np.testing.assert_allclose(method.loss_scales.numpy(), 2 * expected / expected.sum(),
                               rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if n != "graddrop"])
def test_gradient_weights_reproduce_the_direction(name):
    """weights() / Task.weight are the coefficients of the Jacobian's rows in the direction."""
    jacobian = random_jacobian(3, 6, seed=7)
    task_weights = np.array([2.0, 1.0, 0.5], np.float32)
    method = built(name, 3, task_weights=list(task_weights))
    d = aggregate(method, jacobian, losses=[1.0, 2.0, 3.0])
    coefficients = method.weights().numpy() / task_weights
    np.testing.assert_allclose(coefficients @ jacobian, d, rtol=1e-4, atol=1e-5)


def test_graddrop_weights_are_least_squares():
    jacobian = random_jacobian(3, 40, seed=8)
    method = built("graddrop", 3)
    d = aggregate(method, jacobian)
    expected, *_ = np.linalg.lstsq(jacobian.T, d, rcond=None)
    np.testing.assert_allclose(method.weights().numpy(), expected, rtol=1e-3, atol=1e-4)


# --- loss methods: known answers -----------------------------------------------------------------

def test_uncertainty_log_variance_gradient_vanishes_at_log_loss():
    losses = tf.constant([0.5, 2.0, 4.0])
    method = built("uncertainty", 3)
    method.log_variances.assign(tf.math.log(losses))
    with tf.GradientTape() as tape:
        total = method.combine(losses, StepContext(losses))
    np.testing.assert_allclose(tape.gradient(total, method.log_variances).numpy(), 0.0,
                               atol=1e-6)
    np.testing.assert_allclose(method.weights().numpy(), 1 / losses.numpy(), rtol=1e-6)
    # Two replicas: the regulariser s_t is split so that the replicas' sum counts it once.
    halves = [method.combine(losses / 2, StepContext(losses, num_replicas=2)) for _ in range(2)]
    assert float(sum(halves)) == pytest.approx(float(total), rel=1e-6)


def test_dwa_weights_follow_the_period_means():
    method = built("dwa", period=2, temperature=2.0)
    sequence = [[1.0, 1.0], [3.0, 1.0], [1.0, 2.0], [1.0, 2.0]]   # Period means (2, 1), (1, 2).
    for losses in sequence:
        total = method.combine(tf.constant(losses), None)
        np.testing.assert_allclose(method.weights().numpy(), [1.0, 1.0])  # First two periods.
        assert float(total) == pytest.approx(sum(losses))
    r = np.array([1 / 2, 2 / 1])
    expected = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    total = method.combine(tf.constant([1.0, 1.0]), None)
    np.testing.assert_allclose(method.weights().numpy(), expected, rtol=1e-6)
    assert float(total) == pytest.approx(expected.sum(), rel=1e-6)


def test_rlw_weights_are_a_seeded_softmax_of_a_normal_draw():
    first, second = built("rlw", 4, seed=11), built("rlw", 4, seed=11)
    losses = tf.constant([1.0, 2.0, 3.0, 4.0])
    for call in range(3):
        total = first.combine(losses)
        second.combine(losses)
        z = tf.random.stateless_normal([4], seed=tf.constant([11, call], tf.int64))
        np.testing.assert_allclose(first.weights().numpy(), tf.nn.softmax(z).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(first.weights().numpy(), second.weights().numpy())
        assert float(total) == pytest.approx(float(tf.reduce_sum(first.weights() * losses)))
    other = built("rlw", 4, seed=12)
    other.combine(losses)
    assert not np.allclose(other.weights().numpy(), first.weights().numpy())


def test_gls_gradient_is_the_gradient_of_the_geometric_mean():
    theta = tf.Variable([0.3, -1.2, 2.0])

    def task_losses():
        return tf.stack([tf.exp(theta[0]) + theta[1] ** 2, 1.0 + theta[2] ** 2,
                         tf.exp(theta[0] * theta[2])])

    with tf.GradientTape() as tape:
        losses = task_losses()
        total = built("gls", 3).combine(losses, StepContext(tf.stop_gradient(losses)))
    with tf.GradientTape() as reference_tape:
        geometric_mean = tf.reduce_prod(task_losses()) ** (1.0 / 3.0)
    np.testing.assert_allclose(tape.gradient(total, theta).numpy(),
                               reference_tape.gradient(geometric_mean, theta).numpy(), rtol=1e-5)
    assert float(total) == pytest.approx(float(geometric_mean), rel=1e-6)
    # A task with loss 0 (no label in the batch) is left out instead of zeroing the product.
    method = built("gls", 3)
    assert float(method.combine(tf.constant([4.0, 0.0, 1.0]))) == pytest.approx(2.0)


def test_famo_weights_and_logit_updates_follow_the_paper():
    method = built("famo", gamma=0.0, w_lr=0.1)
    # Call 1: z = (0.5, 0.5), lambda ∝ z / L = (0.5, 0.25); no update yet.
    method.combine(tf.constant([1.0, 2.0]))
    np.testing.assert_allclose(method.weights().numpy(), [2 / 3, 1 / 3], rtol=1e-6)
    # Call 2: delta = log L(k-1) - log L(k); grad = z (delta - z . delta); Adam's first step
    # moves each logit by lr * sign(grad).
    previous, current = np.array([1.0, 2.0]), np.array([0.5, 1.8], np.float32)
    delta = np.log(previous) - np.log(current)
    gradient = 0.5 * (delta - 0.5 * delta.sum())
    logits = -0.1 * np.sign(gradient)
    np.testing.assert_allclose(method.combine(tf.constant(current)).numpy(),
                               famo_weights(logits, current) @ current, rtol=1e-5)
    np.testing.assert_allclose(method.logits.numpy(), logits, rtol=1e-5)
    np.testing.assert_allclose(method.weights().numpy(), famo_weights(logits, current), rtol=1e-5)


def famo_weights(logits, losses):
    z = np.exp(logits) / np.exp(logits).sum()
    return (z / losses) / (z / losses).sum()


def test_famo_gradient_equals_the_papers_log_objective():
    theta = tf.Variable([0.4, 1.5])
    method = built("famo", min_losses=[-1.0, 0.0])
    method.logits.assign([0.3, -0.2])
    method.has_previous.assign(0.0)                     # No update in this call.
    with tf.GradientTape() as tape:
        losses = tf.stack([theta[0] ** 2 - 0.5, tf.exp(theta[1])])
        total = method.combine(losses)
    with tf.GradientTape() as reference_tape:
        losses = tf.stack([theta[0] ** 2 - 0.5, tf.exp(theta[1])])
        gaps = losses - tf.constant([-1.0, 0.0]) + 1e-8
        z = tf.nn.softmax(tf.constant([0.3, -0.2]))
        c = tf.stop_gradient(tf.reduce_sum(z / gaps))
        objective = tf.reduce_sum(z * tf.math.log(gaps) / c)
    np.testing.assert_allclose(tape.gradient(total, theta).numpy(),
                               reference_tape.gradient(objective, theta).numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", ["equal", "dwa", "rlw", "gls", "famo", "uncertainty"])
def test_loss_methods_give_the_single_device_gradient_from_replica_shares(name):
    """Two replicas' shares (summing to the global losses) with the global losses in the context:
    the summed gradients equal the one-device gradient."""
    theta = tf.Variable([0.5, -0.3, 1.2])
    shares = [tf.constant([0.25, 0.75, 0.5]), tf.constant([0.75, 0.25, 0.5])]

    def losses(share):
        return share * tf.stack([1.0 + theta[0] ** 2, tf.exp(theta[1]), 2.0 + theta[2]])

    def gradient(method, share, context):
        with tf.GradientTape() as tape:
            total = method.combine(losses(share), context)
        return tape.gradient(total, [theta] + list(method.trainable_variables))

    global_losses = tf.stop_gradient(losses(tf.ones(3)))
    single = gradient(built(name, 3), tf.ones(3), StepContext(global_losses))
    replicas = [gradient(built(name, 3), share, StepContext(global_losses, num_replicas=2))
                for share in shares]
    for one, *parts in zip(single, *replicas):
        np.testing.assert_allclose(sum(p.numpy() for p in parts), one.numpy(), rtol=1e-5)


# --- compiled = eager ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_METHODS + GRADIENT_METHODS)
def test_tf_function_matches_eager(name):
    eager, compiled = built(name, 3), built(name, 3)
    if name in LOSS_METHODS:
        def call(method, inputs, losses):
            return method.combine(losses, StepContext(losses))
    else:
        def call(method, inputs, losses):
            return method.aggregate(inputs, StepContext(losses))
    traced = tf.function(lambda inputs, losses: call(compiled, inputs, losses))
    for step in range(4):                                     # Stateful methods: a sequence.
        jacobian = tf.constant(random_jacobian(3, 7, seed=10 + step))
        losses = tf.constant([1.0 + step, 2.0 / (1 + step), 0.5], tf.float32)
        np.testing.assert_allclose(traced(jacobian, losses).numpy(),
                                   call(eager, jacobian, losses).numpy(), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(compiled.weights().numpy(), eager.weights().numpy(),
                                   rtol=2e-5, atol=1e-6)


# --- distribution --------------------------------------------------------------------------------

MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mtl import weighting
from mtl.weighting import StepContext
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
jacobian = tf.constant(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32))
losses = tf.constant([1.0, 2.0, 3.0])
# Every method with default options; Nash-MTL also with a tf.cond between update and reuse.
cases = [(name, {}) for name in weighting.METHODS] + [("nash_mtl", {"update_every": 2})]
for name, options in cases:
    with strategy.scope():
        method = weighting.get(name, **options)
        method.build(["a", "b", "c"], [1.0, 1.0, 0.5])
    reference = weighting.get(name, **options)
    reference.build(["a", "b", "c"], [1.0, 1.0, 0.5])
    loss_based = isinstance(method, weighting.LossWeighting)

    @tf.function
    def step():
        def replica():
            context = StepContext(losses, num_replicas=2)
            if loss_based:
                return method.combine(losses / 2, context)   # Each replica's share: half.
            return method.aggregate(jacobian, context)       # Inputs all-reduced: the same.
        return strategy.experimental_local_results(strategy.run(replica))

    for call in range(4):
        first, second = (v.numpy() for v in step())
        if loss_based:
            expected = reference.combine(losses, StepContext(losses)).numpy()
            np.testing.assert_allclose(first + second, expected, rtol=1e-5, err_msg=name)
        else:
            expected = reference.aggregate(jacobian, StepContext(losses)).numpy()
            np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_array_equal(first, second, err_msg=name)
        np.testing.assert_allclose(method.weights().numpy(), reference.weights().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
print("checked", len(cases))
"""


def test_every_method_under_mirrored_strategy_matches_one_device():
    """Two replicas on two logical CPUs (configured before TF starts, hence a subprocess), four
    calls: state assigned in the replica context stays in sync (ONLY_FIRST_REPLICA variables,
    stateless random draws), loss methods' replica totals sum to the one-device total, and
    gradient methods give the one-device direction on both replicas."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checked {len(weighting.METHODS) + 1}" in run.stdout


# --- standalone use --------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_a_gradient_method_works_alone_on_a_jacobian(name):
    jacobian = random_jacobian(3, 6, seed=7)
    method = weighting.get(name)  # no build(): it builds itself from the Jacobian
    context = StepContext(tf.constant([1.0, 2.0, 0.5]))
    alone = method.aggregate(tf.constant(jacobian), context).numpy()
    assert method.num_tasks == 3 and alone.shape == (6,) and np.all(np.isfinite(alone))
    reference = aggregate(built(name, 3), jacobian, [1.0, 2.0, 0.5])
    np.testing.assert_allclose(alone, reference, rtol=1e-5, atol=1e-6)


def test_bad_jacobians_get_clear_errors():
    method = weighting.get("mgda")
    with pytest.raises(mtl.UsageError, match=r"aggregate takes a \[tasks, params\] Jacobian; "
                                             r"got shape \(5,\)"):
        method.aggregate(tf.ones([5]))
    method.aggregate(tf.constant(random_jacobian(3, 4)))
    with pytest.raises(mtl.UsageError, match=r"was built for 3 tasks .*aggregate got 2 rows"):
        method.aggregate(tf.constant(random_jacobian(2, 4)))
    with pytest.raises(mtl.UsageError, match="holds NaN or inf"):
        method.aggregate(tf.constant([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(mtl.UsageError, match=r"weights_from_gramian takes a \[tasks, tasks\] "
                                             r"Gramian; got shape \(3, 4\)"):
        weighting.get("imtl").weights_from_gramian(tf.ones([3, 4]))


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS
                                  if not weighting.METHODS[n].supports_rep])
def test_rep_mode_is_refused_with_the_reason_for_methods_whose_paper_does_not_define_it(name):
    import re

    import keras

    model = mtl.MultiTaskModel(mtl.backbones.mlp((4,), widths=(4,)),
                               {"a": mtl.heads.regression(1), "b": mtl.heads.regression(1)})
    tasks = [mtl.Task("a", loss="mse"), mtl.Task("b", loss="mse")]
    reason = re.escape(weighting.METHODS[name].no_rep_reason)
    with pytest.raises(mtl.UsageError, match=rf"gradient_mode='rep' is not defined for weighting "
                                             rf"'{name}': {reason}.*aligned_mtl, graddrop, "
                                             r"gradnorm, imtl, mgda"):
        mtl.Trainer(model, tasks, optimizer=keras.optimizers.SGD(0.1), weighting=name,
                    gradient_mode="rep")


def test_uncertainty_half_form_is_the_papers_likelihood():
    """form="half": sum_t (exp(-s_t) L_t / 2 + s_t / 2) (Kendall et al.'s regression form, as
    LibMTL): its value and gradients against the formula, and the same optimum s_t = log L_t as
    the standard form with weights halved."""
    losses = tf.constant([0.5, 2.0, 4.0])
    for form, factor in (("standard", 1.0), ("half", 0.5)):
        method = built("uncertainty", 3, form=form)
        s = np.array([0.3, -0.2, 1.0], np.float32)
        method.log_variances.assign(s)
        with tf.GradientTape() as tape:
            total = method.combine(losses)
        grad = tape.gradient(total, method.log_variances).numpy()
        expected = factor * (np.exp(-s) * losses.numpy() + s)
        np.testing.assert_allclose(total.numpy(), expected.sum(), rtol=1e-6)
        np.testing.assert_allclose(grad, factor * (1.0 - np.exp(-s) * losses.numpy()), rtol=1e-5)
        np.testing.assert_allclose(method.weights().numpy(), factor * np.exp(-s), rtol=1e-6)
        method.log_variances.assign(np.log(losses.numpy()))
        with tf.GradientTape() as tape:
            total = method.combine(losses)
        np.testing.assert_allclose(tape.gradient(total, method.log_variances).numpy(), 0.0,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="form"):
        mtl.weighting.get("uncertainty", form="paper")
