"""The loss reduction of the train step: means over labelled examples, never NaN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl.step.task_losses import compute_task_losses

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


# ------------------------------------------------------------ class ids out of range in a step
def test_labelled_class_id_out_of_range_makes_only_that_task_nan():
    outputs, labels = _outputs(), _labels()
    bad = {**labels, "a": tf.constant([0, 3, 2, 1])}  # 3 classes: id 3 is out of range.
    losses = compute_task_losses(TASKS, outputs, bad, {}).numpy()
    assert np.isnan(losses[0])
    np.testing.assert_allclose(losses[1], compute_task_losses(TASKS, outputs, labels, {})[1])
    # Unlabelled (weight 0), the same id is never read: the loss is that of the other three.
    weights = {"a": tf.constant([1.0, 0.0, 1.0, 1.0])}
    keep = [0, 2, 3]
    expected = CE(tf.gather(labels["a"], keep), tf.gather(outputs["a"], keep)).numpy()
    np.testing.assert_allclose(compute_task_losses(TASKS, outputs, bad, weights)[0], expected,
                               rtol=1e-6)


def test_ignore_class_is_not_out_of_range():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    tasks = [mtl.Task("a", loss=loss), TASKS[1]]
    outputs, labels = _outputs(), {**_labels(), "a": tf.constant([0, -1, 2, 1])}
    losses = compute_task_losses(tasks, outputs, labels, {}).numpy()
    per_example = keras.losses.sparse_categorical_crossentropy(
        labels["a"], outputs["a"], from_logits=True, ignore_class=-1).numpy()
    np.testing.assert_allclose(losses[0], per_example.sum() / 4, rtol=1e-6)
    assert per_example[1] == 0.0


def _digit_data():
    """Two batches of 8: the first good, the second with class id 7 at example 5 (3 classes)."""
    rng = np.random.RandomState(0)
    x = rng.randn(16, 6).astype(np.float32)
    a = np.arange(16) % 3
    a[13] = 7
    return tf.data.Dataset.from_tensor_slices((x, {"a": a, "b": x[:, 0]})).batch(8).repeat()


def _trainer(**settings):
    keras.utils.set_random_seed(0)
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                               {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})
    return mtl.Trainer(model, TASKS, optimizer="sgd", steps_per_loop=1, **settings)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_class_id_out_of_range_during_training_stops_naming_the_task(jit_compile):
    """Past the first batch (which is checked before training), an id out of range stops the
    run with the task's name, not TensorFlow's `InvalidArgumentError`; the update is not
    applied."""
    trainer = _trainer(jit_compile=jit_compile)
    data = _digit_data()
    trainer.fit(data, steps=1)
    after_one = [v.numpy() for v in trainer.model.weights]
    with pytest.raises(mtl.NonFiniteError, match=r"Training stopped at step 2: non-finite loss in "
                                                 r"task\(s\) \['a'\]; the update was not applied"):
        trainer.fit(data, steps=2)
    assert trainer.global_step == 1
    for before, now in zip(after_one, trainer.model.weights):
        np.testing.assert_array_equal(before, now.numpy())


def test_class_id_out_of_range_with_skip_drops_the_update():
    trainer = _trainer(on_nonfinite="skip")
    trainer.fit(_digit_data(), steps=4)  # Steps 2 and 4 read the bad batch.
    assert trainer.global_step == 4 and int(trainer.skipped_steps.numpy()) == 2


def test_class_id_out_of_range_in_later_eval_batch_gives_nan_loss_for_that_task():
    trainer = _trainer()
    results = trainer.evaluate(_digit_data().take(2))
    assert np.isnan(results["a"]["loss"])
    assert np.isfinite(results["b"]["loss"]) and results["b"]["loss"] > 0.0
