import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl


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
