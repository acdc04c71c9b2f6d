"""Bad input to the Python API stops before any graph is built, naming what was given and what
was expected: label values against their loss and head (first batch), the loss against its
head, empty datasets, model and head structure, task names."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl.training import validation

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


def _with(values, index, value):
    values = np.array(values)
    values[index] = value
    return values


# ------------------------------------------------------------------- label values, first batch
def test_class_id_out_of_range_names_task_value_example_and_range():
    trainer = _trainer()
    data = _dataset(_labels(a=_with(_labels()["a"], 5, 3))).repeat()
    with pytest.raises(mtl.UsageError, match=r"train data: task 'a': label 'a' is 3 at example 5 "
                                             r"of the first batch \(1 example\(s\) of 8 "
                                             r"affected\); expected a class id in \[0, 3\)"):
        trainer.fit(data, steps=1)
    _assert_not_traced(trainer)
    assert trainer.global_step == 0


def test_negative_class_id_is_an_error_unless_its_weight_is_zero():
    trainer = _trainer()
    labels = _labels(a=_with(_labels()["a"], 2, -1))
    with pytest.raises(mtl.UsageError, match=r"task 'a': label 'a' is -1 at example 2"):
        trainer.evaluate(_dataset(labels))
    _assert_not_traced(trainer)
    # Weight 0: "no label"; the placeholder -1 is never read, and the other examples count.
    weights = {"a": _with(np.ones(8, np.float32), 2, 0.0)}
    results = trainer.evaluate(_dataset(labels, weights))
    x = _dataset(labels).get_single_element()[0]
    per_example = keras.losses.sparse_categorical_crossentropy(
        _labels()["a"], trainer.model(x)["a"], from_logits=True).numpy()
    assert results["a"]["loss"] == pytest.approx(np.delete(per_example, 2).mean(), rel=1e-5)


def test_ignore_class_of_the_loss_is_accepted():
    tasks = [mtl.Task("a", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1)), mtl.Task("b", loss="mse")]
    trainer = _trainer(tasks=tasks)
    results = trainer.evaluate(_dataset(_labels(a=_with(_labels()["a"], 2, -1))))
    assert np.isfinite(results["a"]["loss"])
    with pytest.raises(mtl.UsageError, match=r"label 'a' is 7 at example 0 .* expected a class "
                                             r"id in \[0, 3\) or -1 \(ignore_class\)"):
        trainer.evaluate(_dataset(_labels(a=_with(_labels()["a"], 0, 7))))


def test_binary_head_takes_labels_zero_or_one():
    trainer = _trainer(_model(c=mtl.heads.binary(1)), _tasks(c=BCE))
    good = np.array([0, 1, 1, 0, 0, 1, 0, 1], np.float32)
    assert trainer.evaluate(_dataset(_labels(c=good)))["c"]["loss"] > 0.0
    with pytest.raises(mtl.UsageError, match=r"task 'c': label 'c' is 7\.0 at example 3 of the "
                                             r"first batch .*expected 0 or 1"):
        trainer.evaluate(_dataset(_labels(c=_with(good, 3, 7.0))))


def test_multi_label_head_names_the_position_of_the_bad_label():
    trainer = _trainer(_model(c=mtl.heads.multi_label(4)), _tasks(c=BCE))
    labels = np.zeros((8, 4), np.float32)
    labels[6, 2] = 0.5
    with pytest.raises(mtl.UsageError, match=r"label 'c' is 0\.5 at example 6, position \(2,\)"):
        trainer.evaluate(_dataset(_labels(c=labels)))


def test_binary_cross_entropy_on_another_head_takes_labels_in_zero_one():
    head = keras.Sequential([keras.layers.Dense(1)])  # Not an mtl head: soft labels are fine.
    trainer = _trainer(_model(c=head), _tasks(c=BCE))
    soft = np.full(8, 0.25, np.float32)
    assert np.isfinite(trainer.evaluate(_dataset(_labels(c=soft)))["c"]["loss"])
    with pytest.raises(mtl.UsageError, match=r"label 'c' is -1\.0 at example 1 .*expected a value "
                                             r"in \[0, 1\] \(binary cross-entropy\)"):
        trainer.evaluate(_dataset(_labels(c=_with(soft, 1, -1.0))))


def test_non_finite_regression_target_is_an_error_unless_its_weight_is_zero():
    trainer = _trainer()
    labels = _labels(b=_with(_labels()["b"], 4, np.nan))
    with pytest.raises(mtl.UsageError, match=r"eval data: task 'b': label 'b' is nan at example 4 "
                                             r".*expected a finite number"):
        trainer.evaluate(_dataset(labels))
    weights = {"b": _with(np.ones(8, np.float32), 4, 0.0)}
    assert np.isfinite(trainer.evaluate(_dataset(labels, weights))["b"]["loss"])


def test_a_loss_of_your_own_may_read_nan_as_missing():
    def masked_mse(y_true, y_pred):  # NaN marks a missing target.
        known = tf.math.is_finite(y_true)
        return tf.where(known, tf.square(tf.where(known, y_true, 0.0) - y_pred), 0.0)

    trainer = _trainer(tasks=[mtl.Task("a", loss=CE), mtl.Task("b", loss=masked_mse)])
    results = trainer.evaluate(_dataset(_labels(b=_with(_labels()["b"], 4, np.nan))))
    assert np.isfinite(results["b"]["loss"])


@pytest.mark.parametrize("value, shown", [(-0.5, r"-0\.5"), (np.inf, "inf"), (np.nan, "nan")])
def test_sample_weights_must_be_finite_and_non_negative(value, shown):
    trainer = _trainer()
    weights = {"b": _with(np.ones(8, np.float32), 6, value)}
    with pytest.raises(mtl.UsageError, match=rf"train data: task 'b': sample weight is {shown} at "
                                             rf"example 6 .*expected a finite weight >= 0"):
        trainer.fit(_dataset(_labels(), weights).repeat(), steps=1)
    _assert_not_traced(trainer)


def test_eval_data_is_checked_before_training():
    trainer = _trainer()
    bad_eval = _dataset(_labels(a=_with(_labels()["a"], 1, 5)))
    with pytest.raises(mtl.UsageError, match=r"eval data: task 'a': label 'a' is 5 at example 1"):
        trainer.fit(_dataset(_labels()).repeat(), steps=1, eval_data=bad_eval)
    _assert_not_traced(trainer)


def test_the_check_reads_its_own_iterator_not_the_training_stream():
    """The first batch is good and the second has a class id out of range: one step trains on
    the first batch (had the check taken it from the stream, step 1 would read the second)."""
    trainer = _trainer()
    good, bad = _labels(), _labels(a=_with(_labels()["a"], 0, 9))
    data = _dataset(good).concatenate(_dataset(bad)).repeat()
    trainer.fit(data, steps=1)
    assert trainer.global_step == 1


def test_per_replica_batches_from_a_function_are_checked():
    trainer = _trainer()
    bad = _dataset(_labels(a=_with(_labels()["a"], 7, 4))).repeat()
    with pytest.raises(mtl.UsageError, match=r"label 'a' is 4 at example 7"):
        trainer.fit(lambda context: bad, steps=1)
    _assert_not_traced(trainer)


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
    with pytest.raises(mtl.UsageError, match=r"label 'a' is 3 at example 0 .*\[0, 3\)"):
        trainer.evaluate(_dataset(_labels(a=_with(_labels()["a"], 0, 3))))


def test_check_batch_values_alone():
    model, tasks = _model(), _tasks()
    validation.check_batch_values((None, _labels()), tasks, model)
    with pytest.raises(mtl.UsageError, match=r"data: task 'b': label 'b' is inf at example 0"):
        validation.check_batch_values((None, _labels(b=_with(_labels()["b"], 0, np.inf))),
                                      tasks, model)
    column = _with(_labels()["a"], 5, 3)[:, None]  # [batch, 1]: one id per example, no position.
    with pytest.raises(mtl.UsageError, match=r"label 'a' is 3 at example 5 of the first batch"):
        validation.check_batch_values((None, _labels(a=column)), tasks, model)
    with pytest.raises(mtl.UsageError, match=r"task 'a': the first batch has 7 sample weights for "
                                             r"8 labels; expected one weight per example"):
        validation.check_batch_values((None, _labels(), {"a": np.ones(7)}), tasks, model)


# --------------------------------------------------------------------------- empty datasets
def test_empty_training_dataset():
    trainer = _trainer()
    empty = _dataset(_labels()).take(0).repeat()
    with pytest.raises(mtl.UsageError, match=r"train data: the dataset is empty \(it yields no "
                                             r"batch\); expected batches of \(features, labels"):
        trainer.fit(empty, steps=3)
    _assert_not_traced(trainer)


def test_evaluate_on_an_empty_dataset_is_an_error_not_zeros():
    trainer = _trainer()
    with pytest.raises(mtl.UsageError, match=r"eval data: the dataset is empty"):
        trainer.evaluate(_dataset(_labels()).filter(lambda x, y: False))
    with pytest.raises(mtl.UsageError, match=r"evaluate: steps must be None \(the whole "
                                             r"dataset\) or an int >= 1; got 0"):
        trainer.evaluate(_dataset(_labels()), steps=0)
    _assert_not_traced(trainer)


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


class _TwoReplicas:
    """What `_check_optimizer_clipping` reads of a strategy with two replicas."""
    num_replicas_in_sync = 2


@pytest.mark.parametrize("setting", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_keras_clipping_is_refused_under_several_replicas_with_the_fix(setting):
    """Keras clips each replica's part of the gradient before the sum (inside
    `apply_gradients`, before the cross-replica sum)."""
    from mtl.training.validation import check_optimizer_clipping as _check_optimizer_clipping
    optimizer = keras.optimizers.SGD(0.1, **{setting: 1.0})
    with pytest.raises(mtl.UsageError, match=rf"{setting}=1.0.*2 replicas.*clip_norm"):
        _check_optimizer_clipping(optimizer, _TwoReplicas())
    _check_optimizer_clipping(optimizer, tf.distribute.get_strategy())  # one device: as Keras
    _check_optimizer_clipping(keras.optimizers.SGD(0.1), _TwoReplicas())


def test_clip_norm_must_be_positive():
    with pytest.raises(mtl.UsageError, match="clip_norm"):
        mtl.TrainerOptions(clip_norm=0.0)
    with pytest.raises(mtl.UsageError, match="clip_norm"):
        mtl.TrainerOptions(clip_norm=-1.0)
