import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

HERE = os.path.dirname(os.path.abspath(__file__))


class ScaledMSE(keras.losses.Loss):
    """A custom loss whose `get_config` does not return its constructor argument `factor`."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, y_true, y_pred):
        return self.factor * keras.ops.mean(keras.ops.square(y_pred - y_true), axis=-1)


class FractionAbove(keras.metrics.Mean):
    """The fraction of predictions above `threshold`; `get_config` does not return it."""

    def __init__(self, threshold=0.5, name="above", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold

    def update_state(self, y_true, y_pred, sample_weight=None):
        del y_true
        return super().update_state(tf.cast(y_pred > self.threshold, tf.float32), sample_weight)


def absolute_error(y_true, y_pred):  # Not registered with Keras: from_config cannot find it.
    return tf.abs(y_true - y_pred)


def test_string_loss_gives_per_example_values():
    task = mtl.Task("sum", loss="mse")
    values = task.per_example_loss(tf.constant([1.0, 3.0]), tf.constant([[0.0], [0.0]]))
    np.testing.assert_allclose(values.numpy(), [1.0, 9.0])


def test_loss_object_is_rebuilt_without_reduction():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    task = mtl.Task("left", loss=loss)
    values = task.per_example_loss(tf.constant([0, 1]), tf.constant([[0.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(values.numpy(), [np.log(2.0)] * 2, rtol=1e-6)
    assert task.sparse_labels


def test_loss_object_keeps_arguments_that_its_config_omits():
    loss = ScaledMSE(factor=100.0)
    task = mtl.Task("sum", loss=loss)
    values = task.per_example_loss(tf.constant([[1.0], [3.0]]), tf.constant([[0.0], [0.0]]))
    np.testing.assert_allclose(values.numpy(), [100.0, 900.0])  # Per example, not reduced.
    assert loss.reduction == "sum_over_batch_size"  # The object given is left as it was.
    assert float(loss(tf.constant([[1.0], [3.0]]), tf.constant([[0.0], [0.0]]))) == 500.0


def test_per_example_loss_averages_extra_axes():
    task = mtl.Task("seg", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logits = tf.zeros([2, 3, 4])  # 3 positions per example, 4 classes
    values = task.per_example_loss(tf.zeros([2, 3], tf.int32), logits)
    assert values.shape == (2,)


@pytest.mark.parametrize("loss, expected", [
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True),
     keras.metrics.SparseCategoricalAccuracy),
    (keras.losses.CategoricalCrossentropy(from_logits=True), keras.metrics.CategoricalAccuracy),
    (keras.losses.BinaryCrossentropy(from_logits=True), keras.metrics.BinaryAccuracy),
    ("mse", keras.metrics.Accuracy),
])
def test_accuracy_name_follows_the_loss(loss, expected):
    (metric,) = mtl.Task("t", loss=loss, metrics=["accuracy"]).build_metrics()
    assert type(metric) is expected
    assert metric.name == "accuracy"


def test_binary_accuracy_on_logits_thresholds_at_zero():
    task = mtl.Task("t", loss=keras.losses.BinaryCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    (metric,) = task.build_metrics()
    metric.update_state(tf.constant([[1.0], [0.0]]), tf.constant([[0.3], [-0.3]]))
    assert float(metric.result()) == 1.0


def test_metric_keeps_the_name_given():
    (metric,) = mtl.Task("sum", loss="mse", metrics=["mae"]).build_metrics()
    assert metric.name == "mae"


def test_build_metrics_returns_fresh_objects():
    given = keras.metrics.MeanAbsoluteError(name="mae")
    task = mtl.Task("sum", loss="mse", metrics=[given])
    a, = task.build_metrics()
    b, = task.build_metrics()
    assert a is not given and a is not b and a.name == "mae"


def test_metric_object_keeps_arguments_that_its_config_omits():
    given = FractionAbove(threshold=10.0)
    (metric,) = mtl.Task("sum", loss="mse", metrics=[given]).build_metrics()
    assert metric.threshold == 10.0
    metric.update_state(tf.zeros([3, 1]), tf.constant([[11.0], [9.0], [0.7]]))
    assert float(metric.result()) == pytest.approx(1 / 3)  # Above 10, not above 0.5 (1.0).


def test_mean_metric_wrapper_of_an_unregistered_function():
    task = mtl.Task("sum", loss="mse",
                    metrics=[keras.metrics.MeanMetricWrapper(absolute_error, name="abs_error")])
    (metric,) = task.build_metrics()
    metric.update_state(tf.constant([[1.0], [0.0]]), tf.constant([[3.0], [0.5]]))
    assert metric.name == "abs_error"
    assert float(metric.result()) == pytest.approx(1.25)  # (2 + 0.5) / 2


def test_each_build_has_its_own_state_and_the_given_metric_is_untouched():
    given = FractionAbove(threshold=0.0)
    task = mtl.Task("sum", loss="mse", metrics=[given])
    (train,), (evaluation,) = task.build_metrics(), task.build_metrics()
    train.update_state(tf.zeros([2, 1]), tf.constant([[1.0], [-1.0]]))
    evaluation.update_state(tf.zeros([1, 1]), tf.constant([[1.0]]))
    assert float(train.result()) == 0.5 and float(evaluation.result()) == 1.0
    assert float(given.result()) == 0.0 and float(given.count) == 0.0
    assert len(train.variables) == len(given.variables) == 2
    assert {v.path for v in train.variables} == {"above/total", "above/count"}


class MeanOfScaled(keras.metrics.Metric):
    """Holds another metric and a list of variables: both must get new state in a copy."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.inner = keras.metrics.Mean(name="inner")
        self.calls = [self.add_variable((), "zeros", name="calls")]

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.inner.update_state(y_pred * self.scale)
        self.calls[0].assign_add(1.0)

    def result(self):
        return self.inner.result() + 100.0 * self.calls[0]


def test_metrics_inside_a_metric_get_their_own_state():
    given = MeanOfScaled(3.0, name="scaled")
    a, = mtl.Task("t", loss="mse", metrics=[given]).build_metrics()
    b, = mtl.Task("t", loss="mse", metrics=[given]).build_metrics()
    a.update_state(None, tf.constant([1.0, 2.0]))
    assert float(a.result()) == pytest.approx(104.5)  # 3 * 1.5 + 100 * 1 call
    assert float(b.result()) == 0.0 and float(given.result()) == 0.0
    assert a.inner is not given.inner and a.calls[0] is not given.calls[0]
    assert len(a.variables) == 3  # calls, inner/total, inner/count: each tracked once.


def test_metric_built_on_first_update_builds_its_own_variables():
    given = keras.metrics.F1Score(threshold=0.3)  # Creates its variables on its first update.
    task = mtl.Task("t", loss="binary_crossentropy", metrics=[given])
    (metric,) = task.build_metrics()
    metric.update_state(tf.constant([[1.0, 0.0], [0.0, 1.0]]), tf.constant([[0.4, 0.1],
                                                                            [0.2, 0.35]]))
    np.testing.assert_allclose(metric.result().numpy(), [1.0, 1.0], rtol=1e-5)  # 0.35 > 0.3
    assert given.variables == [] and task.build_metrics()[0].variables == []


def test_metric_with_tf_variable_state_names_it():
    class Counter(keras.metrics.Metric):
        def __init__(self):
            super().__init__(name="counter")
            self.count = tf.Variable(0.0, name="my_count")

    with pytest.raises(TypeError, match=r"Task 't': metric 'counter' keeps its state in the "
                                        r"tf.Variable 'my_count:0'.*expected state made with "
                                        r"`self.add_variable\(...\)`"):
        mtl.Task("t", loss="mse", metrics=[Counter()])


def test_given_losses_and_metrics_under_mirrored_strategy():
    """Metrics given outside the scope are copied into it: the 2-replica evaluation matches a
    plain computation of the loss and metrics over the model's outputs."""
    worker = os.path.join(HERE, "workers", "task_metrics_mirrored.py")
    run = subprocess.run([sys.executable, worker], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["distributed_state"]
    assert result["evaluated"]["loss"] == pytest.approx(result["expected"]["loss"], rel=1e-5)
    assert result["evaluated"]["above"] == pytest.approx(result["expected"]["above"])
    assert result["evaluated"]["abs_error"] == pytest.approx(result["expected"]["abs_error"],
                                                             rel=1e-5)
    assert 0.0 < result["expected"]["above"] < 1.0  # The threshold splits the predictions.
    assert result["expected"]["loss"] == pytest.approx(100 * result["expected"]["plain_mse"])


def test_label_key_defaults_to_name():
    assert mtl.Task("left", loss="mse").label_key == "left"
    assert mtl.Task("left", loss="mse", label_key="digit").label_key == "digit"


def test_unknown_loss_names_task_and_value():
    with pytest.raises(ValueError, match=r"Task 'left': unknown loss 'crossentropyy'"):
        mtl.Task("left", loss="crossentropyy")


def test_unknown_metric_names_task_and_value():
    with pytest.raises(ValueError, match=r"Task 'left': unknown metric 'acuracy'"):
        mtl.Task("left", loss="mse", metrics=["acuracy"])


@pytest.mark.parametrize("weight", [-1.0, float("nan"), "heavy"])
def test_bad_weight(weight):
    with pytest.raises(ValueError, match="weight"):
        mtl.Task("left", loss="mse", weight=weight)


# ------------------------------------------------------------- what a loss is, not its name
class SparseFocal(keras.losses.SparseCategoricalCrossentropy):
    """A subclass of a Keras sparse loss: sparse by what it computes."""


def my_sparse_loss(y_true, y_pred):  # A plain function: its name says nothing to mtl.
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


@pytest.mark.parametrize("loss, sparse", [
    ("sparse_categorical_crossentropy", True),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), True),
    (SparseFocal(from_logits=True), True),
    (keras.losses.sparse_categorical_crossentropy, True),
    ("categorical_crossentropy", False),
    (keras.losses.BinaryCrossentropy(from_logits=True), False),
    ("mse", False),
    (my_sparse_loss, False),  # Not guessed from the name "my_sparse_loss".
])
def test_sparse_is_known_from_the_loss_itself(loss, sparse):
    assert mtl.Task("t", loss=loss).sparse_labels is sparse


def test_declared_sparse_loss_function_takes_class_ids():
    task = mtl.Task("t", loss=my_sparse_loss, sparse=True, metrics=["accuracy"])
    assert task.sparse_labels and task.label_kind == "class_ids"
    (metric,) = task.build_metrics()
    assert type(metric) is keras.metrics.SparseCategoricalAccuracy
    values = task.per_example_loss(tf.constant([0, 1]), tf.constant([[0.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(values.numpy(), [np.log(2.0)] * 2, rtol=1e-6)  # Ids stay ints.
    (plain,) = mtl.Task("t", loss=my_sparse_loss, metrics=["accuracy"]).build_metrics()
    assert type(plain) is keras.metrics.Accuracy


@pytest.mark.parametrize("loss, sparse, message", [
    ("mse", True, r"Task 't': sparse=True contradicts the loss 'mean_squared_error', a Keras "
                  r"loss that takes one label per output unit"),
    (keras.losses.SparseCategoricalCrossentropy(), False,
     r"sparse=False contradicts the loss 'SparseCategoricalCrossentropy', a Keras loss that "
     r"takes integer class ids"),
])
def test_declared_sparse_that_contradicts_a_keras_loss(loss, sparse, message):
    with pytest.raises(mtl.UsageError, match=message):
        mtl.Task("t", loss=loss, sparse=sparse)
    assert mtl.Task("t", loss=loss, sparse=not sparse).sparse_labels is (not sparse)


def test_sparse_must_be_a_bool():
    with pytest.raises(TypeError, match=r"Task 't': sparse must be True, False or None; got "
                                        r"'yes' of type str"):
        mtl.Task("t", loss=my_sparse_loss, sparse="yes")


@pytest.mark.parametrize("loss, probabilities", [
    ("sparse_categorical_crossentropy", True),
    ("binary_crossentropy", True),
    (keras.losses.CategoricalCrossentropy(), True),
    (keras.losses.BinaryFocalCrossentropy(from_logits=True), False),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), False),
    ("mse", False),
    (my_sparse_loss, False),  # Unknown: not judged.
])
def test_takes_probabilities(loss, probabilities):
    assert mtl.Task("t", loss=loss).takes_probabilities is probabilities


def test_ignored_class_id_comes_from_the_loss():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)
    assert mtl.Task("t", loss=loss).ignored_class_id == 255
    assert mtl.Task("t", loss="sparse_categorical_crossentropy").ignored_class_id is None
