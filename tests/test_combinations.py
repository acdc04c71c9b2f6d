"""The combination matrix: `mtl.Trainer` against the plain reference (`tests/oracle.py`: one
device, float32, eager, the whole update batch) across the axes that meet in a step.

Axes: every weighting method; micro-batches K in {1, 2} (with missing labels, and a task with no
label in some micro-batches); 1 device and 2 mirrored logical CPUs; exact and rep mode where the
method allows rep; with and without an L2 regulariser on a shared layer; a frozen backbone with
and without Dropout; SGD with momentum and Adam; per-layer aggregation (granularity="layer") for a few
gradient methods; every Gramian method's weights applied by a backward pass over a scope of
every shared layer (exact mode's update); per-task gradients a chunk of tasks at a time (a loop over the tasks), with
micro-batches, replicas, Adam, partial Jacobians and architectures; global gradient clipping (clip_norm) with loss and gradient methods, K = 2 and
mirrored replicas; soft-sharing architectures (every method with mmoe and with cross_stitch on
one device and on 2 replicas; cgc, ple and dselect_k with a few): the reference finds the shared
variables by differentiating each task's loss, mtl by reading the graph. The full cross product is too slow for the
suite; every pair of axes is covered (see `CASES_ONE` and `CASES_MIRRORED`). Triples left out:
mirrored x frozen x rep; mirrored x K=1 x regulariser for most methods; Adam x K=2; Adam x hard
sharing for most methods (Adam runs with mmoe for every method). float16
(overflow and NaN injection) is tested in `test_update_policy.py`: its numbers are float16's,
not the reference's.

Two processes (one per core), each with every other case of both lists, one-device and mirrored
alike, so that they take about the same time.
"""

import json

import pytest

import mtl
import worker_processes

METHODS = sorted(mtl.weighting.METHODS)
REP_METHODS = sorted(name for name, cls in mtl.weighting.METHODS.items()
                     if getattr(cls, "supports_rep", False))
GRAMIAN_METHODS = sorted(name for name, cls in mtl.weighting.METHODS.items()
                         if issubclass(cls, mtl.weighting.GramianWeighting))


def _cases_one():
    cases = []
    for method in METHODS:
        cases.append({"method": method, "k": 2, "reg": True})
        # Soft sharing (exact mode): the methods combine what more than one task uses.
        cases.append({"method": method, "k": 1, "optimizer": "adam", "arch": "mmoe"})
        cases.append({"method": method, "k": 2, "arch": "cross_stitch"})
    for method in REP_METHODS:
        cases.append({"method": method, "mode": "rep", "k": 2, "reg": True})
        cases.append({"method": method, "mode": "rep", "k": 1, "optimizer": "adam"})
    # The weights from a scope's Gramian applied by one backward pass (the path of rep mode and
    # partial Jacobians), with the scope = both shared layers: exact mode's update, for every
    # method defined by the Gramian.
    cases += [{"method": method, "k": 1, "scope": 2} for method in GRAMIAN_METHODS]
    cases += [
        {"method": "equal", "k": 1, "reg": True},
        {"method": "mgda", "k": 2, "optimizer": "adam"},
        # A frozen backbone: inference mode (Dropout off); gradient methods have nothing
        # shared to combine and train the heads on their plain gradients.
        {"method": "equal", "k": 2, "reg": True, "frozen": True, "dropout": True},
        {"method": "uncertainty", "k": 1, "frozen": True, "dropout": True},
        {"method": "mgda", "k": 2, "reg": True, "frozen": True, "dropout": True},
        {"method": "pcgrad", "k": 1, "frozen": True},
        {"method": "mgda", "mode": "rep", "k": 1, "frozen": True, "dropout": True},
        # Per-layer aggregation (granularity="layer"): each shared layer has its own method.
        {"method": "mgda", "k": 2, "reg": True, "granularity": "layer"},
        {"method": "pcgrad", "k": 1, "optimizer": "adam", "granularity": "layer"},
        # Clipping the whole update's gradient (the method's own variables are not clipped).
        {"method": "uncertainty", "k": 2, "reg": True, "clip": True},
        {"method": "mgda", "k": 1, "optimizer": "adam", "clip": True},
        {"method": "imtl", "mode": "rep", "k": 2, "clip": True},
        {"method": "equal", "k": 1, "optimizer": "adam"},
        {"method": "mgda", "k": 1, "optimizer": "adam"},
        {"method": "pcgrad", "k": 2, "arch": "dselect_k"},  # its entropy regulariser too
        {"method": "equal", "k": 1, "arch": "ple"},
        {"method": "nash_mtl", "k": 1, "arch": "cgc"},
        {"method": "famo", "k": 2, "arch": "mmoe", "clip": True},
        # The Jacobian a chunk of tasks at a time.
        {"method": "upgrad", "k": 2, "reg": True, "chunk": 1},
        # Partial Jacobian: the weights from the last shared layer's task gradients.
        {"method": "mgda", "k": 2, "reg": True, "scope": 1},
        {"method": "nash_mtl", "k": 1, "optimizer": "adam", "scope": 1},
        {"method": "upgrad", "k": 2, "scope": 1, "arch": "mmoe"},
        # Task chunks (a loop over the tasks) with micro-batches, Adam and architectures.
        {"method": "mgda", "k": 2, "reg": True, "chunk": 1},
        {"method": "nash_mtl", "k": 2, "optimizer": "adam", "chunk": 2, "arch": "mmoe"},
        {"method": "imtl", "k": 1, "scope": 1, "chunk": 1},
    ]
    return cases


def _cases_mirrored():
    cases = [{"method": method, "k": 2, "reg": True} for method in METHODS]
    cases += [{"method": method, "k": 1, "arch": "mmoe"} for method in METHODS]
    cases += [{"method": method, "k": 1, "arch": "cross_stitch"} for method in METHODS]
    cases += [{"method": method, "mode": "rep", "k": 2, "reg": True} for method in REP_METHODS]
    cases += [
        {"method": "equal", "k": 1, "optimizer": "adam"},
        {"method": "uncertainty", "k": 1, "reg": True},
        {"method": "mgda", "k": 1},
        {"method": "imtl", "mode": "rep", "k": 1},
        {"method": "equal", "k": 2, "frozen": True, "dropout": True},
        {"method": "cagrad", "k": 1, "reg": True, "frozen": True, "dropout": True},
        {"method": "nash_mtl", "k": 2, "granularity": "layer"},
        {"method": "famo", "k": 2, "reg": True, "clip": True},
        {"method": "pcgrad", "k": 1, "clip": True},
        {"method": "mgda", "mode": "rep", "k": 2, "clip": True},
        {"method": "nash_mtl", "k": 2, "arch": "cross_stitch", "chunk": 2},
        {"method": "cagrad", "k": 2, "reg": True, "scope": 1},
        {"method": "imtl", "k": 1, "scope": 1},
        {"method": "upgrad", "k": 2, "reg": True, "chunk": 2},
        {"method": "cagrad", "k": 1, "chunk": 1, "arch": "cross_stitch"},
        {"method": "mgda", "k": 2, "scope": 1, "chunk": 2},
    ]
    return cases


CASES_ONE = _cases_one()
CASES_MIRRORED = _cases_mirrored()


@pytest.fixture(scope="module")
def results():
    cases = ([{**case, "replicas": 1} for case in CASES_ONE]
             + [{**case, "replicas": 2} for case in CASES_MIRRORED])
    return worker_processes.json_lines(
        "combination_matrix.py", [[json.dumps(cases[i::2])] for i in range(2)],
        timeout=1200, log_level="3")


def _name(r):
    return (f"{r['method']}/{r['mode']} K={r['k']} R={r['replicas']} reg={r['reg']} "
            f"frozen={r['frozen']} dropout={r['dropout']} {r['optimizer']} "
            f"granularity={r['granularity']} clip={r['clip']} arch={r['arch']} "
            f"chunk={r['chunk']} scope={r['scope']}")


def test_every_case_ran(results):
    assert len(results) == len(CASES_ONE) + len(CASES_MIRRORED)
    errors = [f"{_name(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n".join(errors)


def test_every_pair_of_axes_is_covered(results):
    axes = {"method": lambda r: r["method"], "mode": lambda r: r["mode"],
            "k": lambda r: r["k"], "replicas": lambda r: r["replicas"],
            "reg": lambda r: r["reg"], "frozen": lambda r: r["frozen"]}
    values = {a: {f(r) for r in results} for a, f in axes.items()}
    assert values["k"] == {1, 2} and values["replicas"] == {1, 2}
    assert values["mode"] == {"exact", "rep"} and values["method"] == set(METHODS)
    for a in ("k", "replicas", "reg", "frozen", "mode"):
        for b in ("k", "replicas", "reg", "frozen", "mode"):
            if a < b:
                seen = {(axes[a](r), axes[b](r)) for r in results}
                missing = {(x, y) for x in values[a] for y in values[b]} - seen
                assert not missing, (a, b, missing)
    for axis in ("k", "replicas", "reg"):
        seen = {(r["method"], axes[axis](r)) for r in results}
        missing = {(m, v) for m in METHODS for v in values[axis]} - seen
        assert not missing, (axis, missing)
    # Every method with mmoe and with cross_stitch, on one device and on 2 replicas.
    seen = {(r["method"], r["arch"], r["replicas"]) for r in results}
    missing = {(m, a, n) for m in METHODS for a in ("mmoe", "cross_stitch")
               for n in (1, 2)} - seen
    assert not missing, missing


def test_mtl_matches_the_reference_update(results):
    # float32: the same sums in another order (pfor Jacobians, replica all-reduce); 3 updates.
    bad = [f"{_name(r)}: weights {r['weight_error']:.2e}, method state {r['state_error']:.2e}"
           for r in results if "error" not in r
           and (r["weight_error"] > 1e-5 or r["state_error"] > 1e-5)]
    assert not bad, "\n".join(bad)


def test_every_case_trained_and_stayed_finite(results):
    for r in results:
        if "error" in r:
            continue
        assert r["finite"], _name(r)
        assert r["moved"] > 1e-2, _name(r)  # the comparison is not between two idle models
        if r["frozen"]:
            assert r["frozen_kept"], _name(r)
        if r["clip"]:
            assert r["clipped"] >= 2, _name(r)  # the clipping acted on most of the 3 updates
