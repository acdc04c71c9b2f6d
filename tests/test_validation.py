"""Bad input to the Python API stops before any graph is built, naming what was given and what
was expected: the loss against its head, model and head structure, task names."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BCE = keras.losses.BinaryCrossentropy(from_logits=True)


def _model(**extra_heads):
    keras.utils.set_random_seed(0)
    backbone = mtl.backbones.mlp((6,), widths=(8,))
    return mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                         "b": mtl.heads.regression(1), **extra_heads})


def _tasks(**extra):
    return [mtl.Task("a", loss=CE, metrics=["accuracy"]), mtl.Task("b", loss="mse"),
            *(mtl.Task(name, loss=loss) for name, loss in extra.items())]


def _trainer(model=None, tasks=None):
    return mtl.Trainer(model or _model(), tasks or _tasks(), optimizer="sgd")


def _labels(n=8, **changes):
    labels = {"a": np.arange(n, dtype=np.int64) % 3, "b": np.linspace(-1, 1, n, dtype=np.float32)}
    labels.update(changes)
    return labels


def _dataset(labels, weights=None, n=8):
    x = np.random.RandomState(0).randn(n, 6).astype(np.float32)
    element = (x, labels) if weights is None else (x, labels, weights)
    return tf.data.Dataset.from_tensors(element)


def _assert_not_traced(trainer):
    assert trainer._steps.train_loop.experimental_get_tracing_count() == 0
    assert trainer._steps.eval_step.experimental_get_tracing_count() == 0


# --------------------------------------------------------------------------- loss and head
@pytest.mark.parametrize("loss, fix", [
    ("sparse_categorical_crossentropy",
     r"keras\.losses\.SparseCategoricalCrossentropy\(from_logits=True\)"),
    (keras.losses.SparseCategoricalCrossentropy(),
     r"keras\.losses\.SparseCategoricalCrossentropy\(from_logits=True\)"),
])
def test_probability_loss_on_a_logits_head_is_refused_with_the_fix(loss, fix):
    trainer = _trainer(tasks=[mtl.Task("a", loss=loss), mtl.Task("b", loss="mse")])
    with pytest.raises(mtl.UsageError, match=r"train data: task 'a': the loss .* takes "
                                             r"probabilities \(from_logits=False\), but its head "
                                             rf"\(mtl\.heads\.classification\) outputs logits; .*"
                                             rf"use {fix}"):
        trainer.fit(_dataset(_labels()).repeat(), steps=1)
    _assert_not_traced(trainer)


@pytest.mark.parametrize("loss, given, fix", [
    ("binary_crossentropy", "'binary_crossentropy'", r"BinaryCrossentropy\(from_logits=True\)\."),
    (keras.losses.binary_crossentropy, "'binary_crossentropy'",
     r"BinaryCrossentropy\(from_logits=True\)\."),
    (keras.losses.BinaryFocalCrossentropy(gamma=3.0), "'BinaryFocalCrossentropy'",
     r"BinaryFocalCrossentropy\(from_logits=True\) \(its other arguments as before\)"),
])
def test_probability_loss_on_a_binary_head_is_refused(loss, given, fix):
    trainer = _trainer(_model(c=mtl.heads.binary(2)), _tasks(c=loss))
    with pytest.raises(mtl.UsageError, match=rf"task 'c': the loss {given} takes probabilities "
                                             r"\(from_logits=False\), but its head "
                                             r"\(mtl\.heads\.binary\) outputs logits; .*"
                                             rf"use keras\.losses\.{fix}"):
        trainer.evaluate(_dataset(_labels(c=np.zeros((8, 2), np.float32))))


def test_probability_loss_on_a_softmax_head_of_your_own_is_fine():
    head = keras.Sequential([keras.layers.Dense(3, activation="softmax")])
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                               {"a": head, "b": mtl.heads.regression(1)})
    trainer = _trainer(model, [mtl.Task("a", loss="sparse_categorical_crossentropy"),
                               mtl.Task("b", loss="mse")])
    assert np.isfinite(trainer.evaluate(_dataset(_labels()))["a"]["loss"])


def test_a_sparse_loss_of_your_own_needs_sparse_true():
    def focal(y_true, y_pred):  # A plain function: Keras does not know it takes class ids.
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return (1.0 - tf.exp(-ce)) ** 2 * ce

    with pytest.raises(mtl.UsageError, match=r"label 'a' of shape \(8,\) does not fit its head's "
                                             r"output of shape \(None, 3\).*declare it: "
                                             r"mtl.Task\('a', loss=\.\.\., sparse=True\)"):
        _trainer(tasks=[mtl.Task("a", loss=focal), mtl.Task("b", loss="mse")]).evaluate(
            _dataset(_labels()))
    trainer = _trainer(tasks=[mtl.Task("a", loss=focal, sparse=True, metrics=["accuracy"]),
                              mtl.Task("b", loss="mse")])
    results = trainer.evaluate(_dataset(_labels()))
    logits = trainer.model(_dataset(_labels()).get_single_element()[0])["a"]
    expected = float(tf.reduce_mean(focal(tf.constant(_labels()["a"]), logits)))
    assert results["a"]["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- model, heads and task names
def test_model_with_list_outputs():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(hidden), keras.layers.Dense(1)(hidden)])
    with pytest.raises(mtl.UsageError, match=r"The model's outputs must be a dict "
                                             r"\{task_name: output\} .*got 2 unnamed outputs of "
                                             r"shapes \[\(None, 3\), \(None, 1\)\]"):
        mtl.Trainer(model, _tasks(), optimizer="sgd")


def test_task_name_with_a_slash():
    with pytest.raises(mtl.UsageError, match=r"Task name must not contain '/' .*got 'depth/left'"):
        mtl.Task("depth/left", loss="mse")
    with pytest.raises(mtl.UsageError, match=r"heads: a key \(a task name\) must not contain '/'"
                                             r".*got 'a/b'"):
        mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                           {"a/b": mtl.heads.regression(1)})
