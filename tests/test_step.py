"""The loss reduction of the train step: means over labelled examples, never NaN."""

import keras
import numpy as np
import tensorflow as tf

import mtl
from mtl.step import compute_task_losses

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TASKS = [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse")]


def _outputs(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return {"a": tf.constant(rng.randn(n, 3), tf.float32),
            "b": tf.constant(rng.randn(n, 1), tf.float32)}


def _labels(n=4):
    return {"a": tf.constant([0, 1, 2, 1][:n]), "b": tf.constant([0.5, -1.0, 2.0, 0.0][:n])}


def test_without_weights_each_task_loss_is_the_batch_mean():
    outputs, labels = _outputs(), _labels()
    losses = compute_task_losses(TASKS, outputs, labels, {}).numpy()
    np.testing.assert_allclose(losses[0], CE(labels["a"], outputs["a"]).numpy(), rtol=1e-6)
    mse = np.mean((labels["b"].numpy() - outputs["b"].numpy()[:, 0]) ** 2)
    np.testing.assert_allclose(losses[1], mse, rtol=1e-6)


def test_half_missing_equals_the_labelled_half():
    outputs, labels = _outputs(), _labels()
    weights = {"a": tf.constant([1.0, 0.0, 1.0, 0.0])}
    losses = compute_task_losses(TASKS, outputs, labels, weights).numpy()
    keep = [0, 2]
    half = compute_task_losses(
        TASKS, {k: tf.gather(v, keep) for k, v in outputs.items()},
        {k: tf.gather(v, keep) for k, v in labels.items()}, {}).numpy()
    np.testing.assert_allclose(losses[0], half[0], rtol=1e-6)
    # Task b carries all its labels: its loss is unchanged by a's weights.
    np.testing.assert_allclose(losses[1], compute_task_losses(TASKS, outputs, labels, {})[1],
                               rtol=1e-6)


def test_zero_weight_removes_only_that_tasks_contribution():
    outputs, labels = _outputs(), _labels()
    weights = {"a": tf.constant([1.0, 1.0, 1.0, 0.0])}
    with tf.GradientTape() as tape:
        tape.watch(outputs["a"])
        tape.watch(outputs["b"])
        losses = compute_task_losses(TASKS, outputs, labels, weights)
        total = tf.reduce_sum(losses)
    grad_a, grad_b = tape.gradient(total, [outputs["a"], outputs["b"]])
    np.testing.assert_array_equal(grad_a.numpy()[3], 0.0)  # example 3 is unlabelled for a
    assert np.all(grad_a.numpy()[:3] != 0.0)
    assert grad_b.numpy()[3, 0] != 0.0  # ...but still counts for b


def test_missing_placeholder_labels_never_make_nan():
    outputs = _outputs()
    labels = {"a": tf.constant([0, -1, 2, -1]), "b": tf.constant([1.0, np.nan, 0.0, np.nan])}
    weights = {"a": tf.constant([1.0, 0.0, 1.0, 0.0]), "b": tf.constant([1.0, 0.0, 1.0, 0.0])}
    losses = compute_task_losses(TASKS, outputs, labels, weights).numpy()
    assert np.all(np.isfinite(losses))


def test_task_with_no_label_in_batch_contributes_zero_without_nan():
    outputs, labels = _outputs(), _labels()
    weights = {"b": tf.zeros([4])}
    with tf.GradientTape() as tape:
        tape.watch(outputs["b"])
        losses = compute_task_losses(TASKS, outputs, labels, weights)
        loss_b = losses[1]
    assert losses.numpy()[1] == 0.0
    grad = tape.gradient(loss_b, outputs["b"])
    np.testing.assert_array_equal(grad.numpy(), 0.0)


def test_fractional_weights_give_a_weighted_mean():
    outputs, labels = _outputs(), _labels()
    w = np.array([0.5, 2.0, 1.0, 0.0], np.float32)
    losses = compute_task_losses(TASKS, outputs, labels, {"b": tf.constant(w)}).numpy()
    per_example = (labels["b"].numpy() - outputs["b"].numpy()[:, 0]) ** 2
    np.testing.assert_allclose(losses[1], np.sum(w * per_example) / np.sum(w), rtol=1e-6)
