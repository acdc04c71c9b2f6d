"""Mixing per-task datasets: observed rates, missing-label weights, input checks, task sampling
schedules, determinism, and the digits_mixture experiment."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import experiment_scripts  # noqa: E402
import mtl  # noqa: E402
from mtl import experiment  # noqa: E402
from mtl.data import mixing  # noqa: E402


def _dataset(task, size, value, label):
    """`size` examples (features [2] filled with `value`, {task: label})."""
    features = tf.fill([size, 2], float(value))
    labels = tf.repeat(tf.constant(label)[tf.newaxis], size, axis=0)
    return tf.data.Dataset.from_tensor_slices((features, {task: labels}))


def _datasets(size_a=300, size_b=100):
    # a: int64 class ids []; b: float32 vectors [3]. Features tell the source apart: 1 vs 2.
    return {"a": _dataset("a", size_a, 1.0, np.int64(7)),
            "b": _dataset("b", size_b, 2.0, np.array([0.5, 1.5, 2.5], np.float32))}


def _share_of_a(ds, num_batches):
    weights = np.concatenate([w["a"].numpy() for _, _, w in ds.take(num_batches)])
    return weights.mean(), len(weights)


# Observed share of task a over n = 40 x 50 = 2,000 examples, each drawn independently with
# probability p: binomial standard deviation sqrt(p (1 - p) / n) <= 0.0112. Tolerance: 4 standard
# deviations (a false failure has probability about 6e-5 per case).
@pytest.mark.parametrize("rates, expected_a", [
    ("proportional", 0.75),                                       # 300 / (300 + 100)
    ("uniform", 0.5),
    ({"temperature": 2.0}, math.sqrt(300) / (math.sqrt(300) + math.sqrt(100))),   # 0.634
    ({"a": 0.3, "b": 0.7}, 0.3),
    ({"a": 3, "b": 7}, 0.3),                                       # normalised
])
def test_observed_rates_match_the_requested_ones(rates, expected_a):
    ds = mtl.data.mix(_datasets(), rates=rates, batch_size=50, seed=0)
    share, n = _share_of_a(ds, 40)
    assert n == 2000
    tolerance = 4 * math.sqrt(expected_a * (1 - expected_a) / n)
    assert abs(share - expected_a) < tolerance, (share, expected_a, tolerance)


def test_mixing_rates_by_hand():
    sizes = {"a": 900, "b": 100}
    assert mixing.mixing_rates("proportional", sizes) == pytest.approx({"a": 0.9, "b": 0.1})
    assert mixing.mixing_rates("uniform", tasks=["a", "b"]) == {"a": 0.5, "b": 0.5}
    # T = 2: sqrt(900) = 30, sqrt(100) = 10.
    assert mixing.mixing_rates({"temperature": 2}, sizes) == pytest.approx({"a": 0.75, "b": 0.25})
    assert mixing.mixing_rates({"a": 1, "b": 0}, sizes) == {"a": 1.0, "b": 0.0}


def test_other_tasks_have_weight_0_and_zero_labels_of_their_shape_and_dtype():
    ds = mtl.data.mix(_datasets(), batch_size=16, seed=1)
    features_spec, labels_spec, weights_spec = ds.element_spec
    assert features_spec.shape == (16, 2)
    assert labels_spec["a"].shape == (16,) and labels_spec["a"].dtype == tf.int64
    assert labels_spec["b"].shape == (16, 3) and labels_spec["b"].dtype == tf.float32
    assert {t: (s.shape, s.dtype) for t, s in weights_spec.items()} == {
        "a": ((16,), tf.float32), "b": ((16,), tf.float32)}
    for features, labels, weights in ds.take(10):
        from_a = features.numpy()[:, 0] == 1.0
        np.testing.assert_array_equal(weights["a"].numpy(), from_a.astype(np.float32))
        np.testing.assert_array_equal(weights["b"].numpy(), (~from_a).astype(np.float32))
        np.testing.assert_array_equal(labels["a"].numpy(), np.where(from_a, 7, 0))
        np.testing.assert_array_equal(labels["b"].numpy()[from_a], 0.0)
        np.testing.assert_array_equal(labels["b"].numpy()[~from_a],
                                      np.tile([0.5, 1.5, 2.5], [(~from_a).sum(), 1]))


def test_own_sample_weights_are_kept():
    ds = tf.data.Dataset.from_tensor_slices((tf.ones([4, 2]), {"a": tf.range(4, dtype=tf.int64)},
                                             {"a": tf.fill([4], 0.5)}))
    _, _, weights = next(iter(mtl.data.mix({"a": ds, "b": _datasets()["b"]},
                                           rates={"a": 1, "b": 0}, batch_size=4, seed=0)))
    np.testing.assert_array_equal(weights["a"].numpy(), [0.5] * 4)
    np.testing.assert_array_equal(weights["b"].numpy(), [0.0] * 4)


def test_same_seed_same_batches_other_seed_other_batches():
    def first_batches(seed):
        ds = mtl.data.mix(_datasets(), batch_size=20, seed=seed, shuffle_buffer=50)
        return np.stack([w["a"].numpy() for _, _, w in ds.take(5)])

    np.testing.assert_array_equal(first_batches(3), first_batches(3))
    assert not np.array_equal(first_batches(3), first_batches(4))


@pytest.mark.parametrize("change, message", [
    (lambda ds: ds.map(lambda x, y: (tf.concat([x, x], 0), y)),
     r"task 'b''s features are \(\(4,\), 'float32'\) but task 'a''s are \(\(2,\), 'float32'\)"),
    (lambda ds: ds.map(lambda x, y: (tf.cast(x, tf.uint8), y)),
     r"task 'b''s features are \(\(2,\), 'uint8'\) but task 'a''s are \(\(2,\), 'float32'\)"),
])
def test_features_of_another_shape_or_dtype_are_rejected(change, message):
    datasets = _datasets()
    datasets["b"] = change(datasets["b"])
    with pytest.raises(ValueError, match=message + r".*Map them to one shape and dtype"):
        mtl.data.mix(datasets, batch_size=8)


@pytest.mark.parametrize("rates, message", [
    ({"a": 1.0}, r"rates must name exactly the tasks \['a', 'b'\]; missing \['b'\], extra \[\]"),
    ({"a": 1.0, "b": 1.0, "c": 1.0}, r"missing \[\], extra \['c'\]"),
    ({"a": -0.5, "b": 1.0}, r"rates\['a'\] must be a finite number >= 0; got -0.5"),
    ({"a": 0, "b": 0.0}, r"rates are all zero"),
    ({"a": float("nan"), "b": 1.0}, r"rates\['a'\] must be a finite number >= 0; got nan"),
    ("balanced", r"Unknown rates 'balanced'; expected one of \['proportional', 'uniform'\]"),
    ({"temperature": 0}, r"temperature must be a finite number > 0; got 0"),
    ([0.5, 0.5], r"rates must be 'proportional', 'uniform'"),
])
def test_rates_that_do_not_fit_the_tasks_are_rejected(rates, message):
    with pytest.raises(ValueError, match=message):
        mtl.data.mix(_datasets(), rates=rates, batch_size=8)


def test_sizes_from_cardinality_or_given():
    datasets = {t: ds.repeat() for t, ds in _datasets().items()}
    with pytest.raises(ValueError, match=r"The size of task 'a''s dataset is infinite.*pass "
                                         r"sizes="):
        mtl.data.mix(datasets, batch_size=8)
    filtered = {t: ds.filter(lambda x, y: True) for t, ds in _datasets().items()}
    with pytest.raises(ValueError, match=r"dataset is unknown"):
        mtl.data.mix(filtered, batch_size=8)
    with pytest.raises(ValueError, match=r"sizes must name exactly the tasks"):
        mtl.data.mix(datasets, batch_size=8, sizes={"a": 10})
    ds = mtl.data.mix(datasets, batch_size=50, sizes={"a": 100, "b": 300}, seed=0)
    share, n = _share_of_a(ds, 40)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # Uniform and explicit rates need no sizes.
    assert mtl.data.mix(datasets, rates="uniform", batch_size=8).element_spec[0].shape == (8, 2)


def test_labels_missing_from_a_dataset_are_reported():
    datasets = _datasets()
    datasets["b"] = datasets["b"].map(lambda x, y: (x, {"c": y["b"]}))
    with pytest.raises(ValueError, match=r"Task 'b''s dataset has no label 'b'; its labels are "
                                         r"\['c'\]"):
        mtl.data.mix(datasets, batch_size=8)
    batched = {"a": _datasets()["a"].batch(4), "b": _datasets()["b"]}
    with pytest.raises(ValueError, match=r"Task 'a''s label must be a tensor of fully known "
                                         r"shape per example \(unbatched data\)"):
        mtl.data.mix(batched, batch_size=8)


def test_rates_from_string():
    assert mixing.rates_from_string("proportional") == "proportional"
    assert mixing.rates_from_string("temperature=2") == {"temperature": 2.0}
    assert mixing.rates_from_string("left=0.7, sum=0.3") == {"left": 0.7, "sum": 0.3}
    assert not mixing.is_rates_string("left:0.7")


# ------------------------------------------------------------------------- task sampling
def test_annealed_probabilities_by_hand():
    schedule = mixing.AnnealedSchedule({"a": 1000, "b": 100}, num_epochs=5, steps_per_epoch=10)
    # Step 0: epoch 1, alpha = 1 -> proportional: 1000 / 1100.
    assert schedule.alpha(0) == 1.0
    np.testing.assert_allclose(schedule.probabilities(0), [1000 / 1100, 100 / 1100])
    # Step 25: epoch 3, alpha = 1 - 0.8 * 2 / 4 = 0.6; 1000^0.6 = 63.0957, 100^0.6 = 15.8489,
    # p_a = 63.0957 / 78.9446.
    assert schedule.epoch(25) == 3 and schedule.alpha(25) == pytest.approx(0.6)
    np.testing.assert_allclose(schedule.probabilities(25), [0.799240, 0.200760], rtol=1e-5)
    # Steps 40..: epoch 5 = E, alpha = 0.2; 1000^0.2 = 3.98107, 100^0.2 = 2.51189,
    # p_a = 3.98107 / 6.49296. It stays there after epoch E.
    for step in (40, 49, 10_000):
        assert schedule.alpha(step) == pytest.approx(0.2)
        np.testing.assert_allclose(schedule.probabilities(step), [0.613137, 0.386863],
                                   rtol=1e-5)
    single = mixing.AnnealedSchedule({"a": 10, "b": 30}, num_epochs=1, steps_per_epoch=5)
    np.testing.assert_allclose(single.probabilities(100), [0.25, 0.75])


def test_schedules_draw_tasks_at_their_probabilities():
    # 4,000 independent draws: tolerance 4 binomial standard deviations (<= 0.032).
    n = 4000
    for schedule, expected_a in [
            (mixing.UniformSchedule(["a", "b"], seed=1), 0.5),
            (mixing.ProportionalSchedule({"a": 300, "b": 100}, seed=1), 0.75),
            (mixing.AnnealedSchedule({"a": 1000, "b": 100}, num_epochs=5, steps_per_epoch=n,
                                     seed=1), 1000 / 1100)]:
        share = np.mean(schedule.task_indices(0, n) == 0)
        assert abs(share - expected_a) < 4 * math.sqrt(expected_a * (1 - expected_a) / n)
    # Annealed, last epoch (alpha = 0.2): steps 16,000..19,999 are at p_a = 0.613137.
    late = mixing.AnnealedSchedule({"a": 1000, "b": 100}, num_epochs=5, steps_per_epoch=n,
                                   seed=1).task_indices(4 * n, n)
    assert abs(np.mean(late == 0) - 0.613137) < 4 * math.sqrt(0.613137 * 0.386863 / n)


def test_schedule_is_a_function_of_seed_and_step():
    make = lambda seed: mixing.task_schedule("proportional", {"a": 5, "b": 5, "c": 5},  # noqa
                                             seed=seed)
    full = make(7).task_indices(0, 300)
    # A resumed run at step 100 rebuilds the schedule and gets the same tasks.
    np.testing.assert_array_equal(make(7).task_indices(100, 50), full[100:150])
    assert [make(7).task(s) for s in range(5)] == [["a", "b", "c"][i] for i in full[:5]]
    assert not np.array_equal(make(8).task_indices(0, 300), full)
    assert full.dtype == np.int32 and set(full) == {0, 1, 2}


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"Unknown task schedule 'random'; expected one of "
                                         r"\['uniform', 'proportional', 'annealed'\]"):
        mixing.task_schedule("random", ["a"])
    with pytest.raises(ValueError, match="annealed schedule needs num_epochs and "
                                         "steps_per_epoch"):
        mixing.task_schedule("annealed", {"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"sizes\['b'\] must be an int >= 1; got 0"):
        mixing.ProportionalSchedule({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="seed must be an int >= 0; got -1"):
        mixing.UniformSchedule(["a"], seed=-1)


def test_task_datasets_share_one_structure_with_own_weight_1(tmp_path):
    per_task = mixing.task_datasets(_datasets(), batch_size=8, seed=0)
    assert per_task["a"].element_spec == per_task["b"].element_spec
    iterators = mixing.task_iterators(_datasets(), batch_size=8, seed=0)
    for task, other in (("a", "b"), ("b", "a")):
        _, _, weights = next(iterators[task])
        np.testing.assert_array_equal(weights[task].numpy(), np.ones(8))
        np.testing.assert_array_equal(weights[other].numpy(), np.zeros(8))
    # The per-task iterators are checkpointable: a restored copy continues where they were.
    checkpoint = tf.train.Checkpoint(**iterators)
    path = checkpoint.save(os.path.join(str(tmp_path), "ckpt"))
    expected = next(iterators["a"])
    fresh = mixing.task_iterators(_datasets(), batch_size=8, seed=0)
    tf.train.Checkpoint(**fresh).restore(path)
    np.testing.assert_array_equal(next(fresh["a"])[0].numpy(), expected[0].numpy())


# ------------------------------------------------------------------------------ experiment
def test_digits_mixture_trains_two_steps_and_evaluates(tmp_path, digits_data_dir):
    script = experiment_scripts.load("digits_mixture")
    config = experiment_scripts.small_config(tmp_path, data_dir=digits_data_dir,
                                             backbone="small_cnn", batch_size=16)
    exp = script.make_experiment(rates=mixing.rates_from_string("left=0.5,sum=0.5"),
                                 sum_examples=200)
    train = exp.train_data(config, ["left", "sum"])
    _, labels, weights = train.element_spec
    assert set(labels) == set(weights) == {"left", "sum"}
    results = experiment.train_and_evaluate(exp, config)
    assert set(results) == {"left", "sum"}
    assert set(results["left"]) == {"loss", "accuracy"} and set(results["sum"]) == {"loss", "mae"}
    assert all(math.isfinite(v) for values in results.values() for v in values.values())


def test_digits_mixture_single_task_and_proportional_rates(tmp_path, digits_data_dir):
    script = experiment_scripts.load("digits_mixture")
    config = experiment_scripts.small_config(tmp_path, data_dir=digits_data_dir, batch_size=50)
    # Proportional: 12,000 left and 1,000 sum examples -> left share 12/13 = 0.923; 1,000
    # draws, tolerance 4 binomial standard deviations (0.034).
    train = script.make_experiment(sum_examples=1000).train_data(config, ["left", "sum"])
    share = np.mean(np.concatenate([w["left"].numpy() for _, _, w in train.take(20)]))
    assert abs(share - 12 / 13) < 4 * math.sqrt(12 / 13 * 1 / 13 / 1000)
    exp = script.make_experiment(rates={"left": 0.5, "sum": 0.5})
    results = experiment.train_and_evaluate(
        exp, experiment_scripts.small_config(tmp_path / "left", data_dir=digits_data_dir,
                                             tasks=("left",)))
    assert set(results) == {"left"}
