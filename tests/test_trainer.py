import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = mtl.backbones.mlp((6,), widths=(16,))
    return mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                         "b": mtl.heads.regression(1)})


def _tasks(weight_b=0.5):
    return [mtl.Task("a", loss=CE, metrics=["accuracy"]),
            mtl.Task("b", loss="mse", metrics=["mae"], weight=weight_b)]


def _arrays(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 6).astype(np.float32)
    return x, {"a": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0),
               "b": (x[:, 2] * 2 + x[:, 3]).astype(np.float32)}


def _data(batch=16, n=64, repeat=True):
    ds = tf.data.Dataset.from_tensor_slices(_arrays(n)).batch(batch, drop_remainder=True)
    return ds.repeat() if repeat else ds


def _weights(model):
    return [v.numpy() for v in model.weights]


def test_matches_keras_fit_with_the_same_loss_weights():
    steps, lr = 8, 0.05
    ours = _model()
    fit_model = _model()
    fit_model.set_weights(ours.get_weights())
    trainer = mtl.Trainer(ours, _tasks(), optimizer=keras.optimizers.SGD(lr))
    trainer.fit(_data(), steps=steps)
    fit_model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss={"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            "b": "mse"},
                      loss_weights={"a": 1.0, "b": 0.5})
    fit_model.fit(_data(), steps_per_epoch=steps, epochs=1, verbose=0)
    for got, want in zip(_weights(ours), _weights(fit_model)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(_weights(ours)[0], _weights(_model())[0])  # it did train


def test_steps_per_loop_gives_the_same_weights_as_single_steps():
    one, many = _model(), _model()
    mtl.Trainer(one, _tasks(), optimizer=keras.optimizers.Adam(0.01)).fit(_data(), steps=6)
    trainer = mtl.Trainer(many, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          steps_per_loop=3)
    trainer.fit(_data(), steps=6)
    assert trainer.global_step == 6
    for got, want in zip(_weights(many), _weights(one)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resume_continues_at_the_saved_step(tmp_path):
    # One repeated batch, so the data is the same whatever step training restarts at.
    x, y = _arrays(16)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    straight = _model()
    mtl.Trainer(straight, _tasks(), optimizer=keras.optimizers.Adam(0.01)).fit(data, steps=6)

    first = mtl.Trainer(_model(), _tasks(), optimizer=keras.optimizers.Adam(0.01),
                        model_dir=str(tmp_path), checkpoint_every=2)
    first.fit(data, steps=4)
    resumed_model = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed = mtl.Trainer(resumed_model, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          model_dir=str(tmp_path), checkpoint_every=2)
    assert resumed.global_step == 4
    assert int(resumed.optimizer.iterations.numpy()) == 4
    history = resumed.fit(data, steps=6, )
    assert resumed.global_step == 6
    assert [r["step"] for r in history.train] == [6]
    for got, want in zip(_weights(resumed_model), _weights(straight)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / "checkpoints"))[0] == "checkpoint"
    assert resumed.fit(data, steps=6).train == []  # already there: nothing to do


def test_history_summaries_and_evaluate(tmp_path):
    trainer = mtl.Trainer(_model(), _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          model_dir=str(tmp_path), log_every=5)
    history = trainer.fit(_data(), steps=10, eval_data=_data(repeat=False), eval_every=5)
    assert [r["step"] for r in history.train] == [5, 10]
    assert [r["step"] for r in history.eval] == [5, 10]
    assert set(history.train[0]) >= {"loss", "a/loss", "a/accuracy", "b/loss", "b/mae",
                                     "learning_rate", "examples_per_sec"}
    assert history.series("a/loss")[-1] < history.series("a/loss")[0] * 1.5
    results = trainer.evaluate(_data(repeat=False))
    assert set(results) == {"a", "b"} and set(results["a"]) == {"loss", "accuracy"}
    assert set(results["b"]) == {"loss", "mae"}
    tags = set()
    for path in glob.glob(str(tmp_path / "train" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"loss/total", "a/loss", "b/mae", "learning_rate", "examples_per_sec"} <= tags
    eval_tags = set()
    for path in glob.glob(str(tmp_path / "eval" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            eval_tags.update(v.tag for v in event.summary.value)
    assert {"a/accuracy", "b/loss"} <= eval_tags


def _event_tables(log_dir):
    """{step: {tag: value}} of a TensorBoard folder."""
    tables = {}
    for path in glob.glob(os.path.join(log_dir, "events*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                tables.setdefault(event.step, {})[v.tag] = float(tf.make_ndarray(v.tensor))
    return tables


def test_validation_data_is_evaluated_with_the_eval_data_and_logged_apart(tmp_path):
    test_ds = tf.data.Dataset.from_tensor_slices(_arrays(32, seed=1)).batch(16)
    validation_ds = tf.data.Dataset.from_tensor_slices(_arrays(32, seed=2)).batch(16)
    trainer = mtl.Trainer(_model(), _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          model_dir=str(tmp_path), log_every=5)
    history = trainer.fit(_data(), steps=10, eval_data=test_ds, eval_every=5,
                          validation_data=validation_ds)
    assert [r["step"] for r in history.validation] == [5, 10] == [r["step"] for r in history.eval]
    final_validation = trainer.evaluate(validation_ds, split="validation")
    final_test = trainer.evaluate(test_ds)
    assert history.validation[-1]["a/accuracy"] == pytest.approx(final_validation["a"]["accuracy"])
    assert history.eval[-1]["b/mae"] == pytest.approx(final_test["b"]["mae"])
    assert final_validation["b"]["mae"] != pytest.approx(final_test["b"]["mae"])
    # Each split in its own TensorBoard folder: eval/ holds the test values only.
    validation_logs = _event_tables(tmp_path / "validation")
    eval_logs = _event_tables(tmp_path / "eval")
    assert sorted(validation_logs) == sorted(eval_logs) == [5, 10]
    assert validation_logs[10]["b/mae"] == pytest.approx(final_validation["b"]["mae"])
    assert eval_logs[10]["b/mae"] == pytest.approx(final_test["b"]["mae"])
    # Validation data alone evaluates too.
    alone = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    history = alone.fit(_data(), steps=2, eval_every=1, validation_data=validation_ds)
    assert [r["step"] for r in history.validation] == [1, 2] and history.eval == []


def test_evaluate_counts_only_labelled_examples():
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer="sgd")
    x, y = _arrays(32)
    mask = np.arange(32) % 2 == 0
    weights = {"a": mask.astype(np.float32)}
    masked = trainer.evaluate(tf.data.Dataset.from_tensors((x, y, weights)))
    half = trainer.evaluate(tf.data.Dataset.from_tensors(
        (x[mask], {k: v[mask] for k, v in y.items()})))
    assert masked["a"]["accuracy"] == pytest.approx(half["a"]["accuracy"])
    assert masked["a"]["loss"] == pytest.approx(half["a"]["loss"], rel=1e-5)
    full = trainer.evaluate(tf.data.Dataset.from_tensors((x, y)))
    assert masked["b"]["loss"] == pytest.approx(full["b"]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- bad input
def _assert_not_traced(trainer):
    assert trainer._steps.train_loop.experimental_get_tracing_count() == 0


def test_task_without_head():
    with pytest.raises(ValueError, match=r"Task 'c' has no matching head; .*\['a', 'b'\]"):
        mtl.Trainer(_model(), _tasks() + [mtl.Task("c", loss="mse")], optimizer="sgd")


def test_head_without_task():
    with pytest.raises(ValueError, match=r"head 'b' has no matching mtl.Task"):
        mtl.Trainer(_model(), _tasks()[:1], optimizer="sgd")


def test_unknown_weighting_and_optimizer():
    with pytest.raises(ValueError, match=r"Unknown weighting method 'eqaul'"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", weighting="eqaul")
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamm'"):
        mtl.Trainer(_model(), _tasks(), optimizer="adamm")


def test_missing_label_key():
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    x, y = _arrays(16)
    data = tf.data.Dataset.from_tensors((x, {"a": y["a"]})).repeat()
    with pytest.raises(ValueError, match=r"task 'b' reads label key 'b', but the data's labels "
                                         r"have keys \['a'\]"):
        trainer.fit(data, steps=1)
    _assert_not_traced(trainer)


def test_label_key_maps_data_to_task():
    tasks = [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse", label_key="target")]
    trainer = mtl.Trainer(_model(), tasks, optimizer="sgd")
    x, y = _arrays(16)
    trainer.fit(tf.data.Dataset.from_tensors((x, {"a": y["a"], "target": y["b"]})).repeat(), 1)
    assert trainer.global_step == 1


@pytest.mark.parametrize("labels, message", [
    ({"a": np.zeros((16, 3), np.int64), "b": np.zeros(16, np.float32)},
     r"task 'a': label 'a' has shape \(16, 3\), but a sparse loss"),
    ({"a": np.zeros(16, np.float32), "b": np.zeros(16, np.float32)},
     r"task 'a' uses a sparse loss, which takes integer class ids; .* dtype float32"),
    ({"a": np.zeros(16, np.int64), "b": np.zeros((16, 4), np.float32)},
     r"task 'b': label 'b' of shape \(16, 4\) does not fit its head's output of shape "
     r"\(None, 1\)"),
])
def test_label_that_does_not_fit_its_head(labels, message):
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    x, _ = _arrays(16)
    with pytest.raises(ValueError, match=message):
        trainer.fit(tf.data.Dataset.from_tensors((x, labels)).repeat(), steps=1)
    _assert_not_traced(trainer)


def test_unknown_sample_weight_key_and_bad_features():
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    x, y = _arrays(16)
    with pytest.raises(ValueError, match=r"sample_weights has key 'c', which is not a task"):
        trainer.fit(tf.data.Dataset.from_tensors((x, y, {"c": np.ones(16, np.float32)})), 1)
    with pytest.raises(ValueError, match=r"features of shape \(16, 5\) do not fit the model's "
                                         r"input of shape \(None, 6\)"):
        trainer.fit(tf.data.Dataset.from_tensors((x[:, :5], y)), 1)
    with pytest.raises(ValueError, match=r"elements must be \(features, labels\)"):
        trainer.fit(tf.data.Dataset.from_tensors(x), 1)
    _assert_not_traced(trainer)


def test_bad_loop_arguments():
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        trainer.fit(_data(), steps=-1)
    with pytest.raises(ValueError, match="steps_per_loop must be an int >= 1; got 0"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", steps_per_loop=0)
    with pytest.raises(ValueError, match="repeats forever"):
        trainer.evaluate(_data())


def test_task_sampling_trains_one_task_per_step_on_its_own_batches():
    from mtl.data import mixing

    x, y = _arrays(64)
    per_task = {"a": tf.data.Dataset.from_tensor_slices((x, {"a": y["a"]})),
                "b": tf.data.Dataset.from_tensor_slices((x, {"b": y["b"]}))}
    datasets = mixing.task_datasets(per_task, batch_size=16, seed=0)
    schedule = mixing.task_schedule("uniform", ["a", "b"], seed=3)
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.1), steps_per_loop=4)
    head_b = model.heads["b"].trainable_variables
    drawn = [schedule.task(s) for s in range(8)]
    assert set(drawn) == {"a", "b"}  # both tasks drawn in 8 steps with this seed
    before = None
    for step in range(8):
        before = [v.numpy() for v in head_b]
        trainer.fit(datasets, steps=step + 1, task_schedule=schedule)
        moved = any(not np.array_equal(b, v.numpy()) for b, v in zip(before, head_b))
        # SGD without momentum: b's head moves exactly on the steps that train b.
        assert moved == (drawn[step] == "b"), (step, drawn[step])
    assert trainer._steps.train_loop.experimental_get_tracing_count() == 1


def test_task_sampling_errors():
    from mtl.data import mixing

    trainer = mtl.Trainer(_model(), _tasks(), optimizer="sgd")
    with pytest.raises(ValueError, match="pass task_schedule="):
        trainer.fit({"a": _data(), "b": _data()}, steps=1)
    with pytest.raises(ValueError, match=r"datasets are for tasks \['a', 'b'\], but the task "
                                         r"schedule draws from \['a', 'c'\]"):
        trainer.fit({"a": _data(), "b": _data()}, steps=1,
                    task_schedule=mixing.task_schedule("uniform", ["a", "c"]))
