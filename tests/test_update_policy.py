"""Whether an update is applied: the policy's table, float16 overflow vs a real non-finite, and
"a dropped update changes nothing" (weights, method state, metrics, logged means)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl
from mtl.step.update_policy import LossScale, UpdatePolicy

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
POISON = 777.0  # a regression label whose gradient is NaN (the loss stays finite)


def poison_mse(y_true, y_pred):
    """MSE whose gradient is NaN on examples labelled POISON."""
    @tf.custom_gradient
    def identity(p):
        def grad(upstream):
            return tf.where(tf.equal(y_true, POISON), tf.fill(tf.shape(upstream), np.nan),
                            upstream)
        return tf.identity(p), grad
    return tf.reduce_mean(tf.square(y_true - identity(y_pred)), axis=-1)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(16,)),
                              {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})


def _tasks(b_loss="mse"):
    return [mtl.Task("a", loss=CE, metrics=["accuracy"]), mtl.Task("b", loss=b_loss, weight=0.5)]


def _arrays(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 6).astype(np.float32)
    return x, {"a": ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)),
               "b": (x[:, 2] * 2 + x[:, 3]).astype(np.float32)}


def _data(bad_batches=(), value=np.inf, batch=16, n=64):
    """Batches of 16; in each batch of `bad_batches`, task b's first label is `value`."""
    x, y = _arrays(n)
    y["b"] = y["b"].copy()
    for index in bad_batches:
        y["b"][index * batch] = value
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


def _without(batches_to_drop, batch=16, n=64):
    x, y = _arrays(n)
    keep = np.concatenate([np.arange(i * batch, (i + 1) * batch) for i in range(n // batch)
                           if i not in batches_to_drop])
    return tf.data.Dataset.from_tensor_slices((x[keep], {k: v[keep] for k, v in y.items()})
                                              ).batch(batch, drop_remainder=True)


def _weights(model):
    return [v.numpy() for v in model.weights]


@pytest.fixture
def float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------------------- the policy table
@pytest.mark.parametrize("policy,losses_finite,gradients_finite,scale", list(itertools.product(
    ("stop", "skip"), (True, False), (True, False), (None, 2.0 ** 15, 1.0))))
def test_verdict_table(policy, losses_finite, gradients_finite, scale):
    loss_scale = None
    if scale is not None:
        loss_scale = LossScale(initial_scale=scale)
    verdict = UpdatePolicy(policy, loss_scale).judge(tf.constant(losses_finite),
                                                    tf.constant(gradients_finite))
    overflow = bool(scale is not None and scale > 1 and losses_finite and not gradients_finite)
    real_bad = not (losses_finite and gradients_finite) and not overflow
    assert bool(verdict.overflow) == overflow
    assert bool(verdict.apply) == (losses_finite and gradients_finite)
    assert bool(verdict.stop) == (real_bad and policy == "stop")


def test_loss_scale_halves_on_overflow_to_its_minimum_and_grows_after_good_steps():
    scale = LossScale(initial_scale=4.0, growth_interval=2)
    for expected in (2.0, 1.0, 1.0):
        scale.update(tf.constant(True), tf.constant(False))
        assert float(scale.scale.numpy()) == expected
    for _ in range(2):
        scale.update(tf.constant(False), tf.constant(True))
    assert float(scale.scale.numpy()) == 2.0
    # A dropped update that was not an overflow leaves the scale and the count alone.
    scale.update(tf.constant(False), tf.constant(False))
    assert float(scale.scale.numpy()) == 2.0 and int(scale.good_steps.numpy()) == 0


# ------------------------------------------------------------------------------ float16
def test_float16_nan_gradient_stops_once_the_scale_cannot_shrink(float16):
    trainer = mtl.Trainer(_model(), _tasks(poison_mse), optimizer=keras.optimizers.Adam(0.01),
                          steps_per_loop=4)
    trainer.loss_scale.scale.assign(2.0)  # one halving left before the minimum
    with pytest.raises(mtl.NonFiniteError, match=r"stopped at step 2: non-finite gradient"):
        trainer.fit(_data(bad_batches=(0, 1, 2, 3), value=POISON), steps=4)
    assert float(trainer.loss_scale.scale.numpy()) == 1.0
    assert int(trainer.skipped_steps.numpy()) == 1  # step 1: taken for an overflow


def test_float16_overflow_changes_nothing_but_the_scale(float16):
    # rlw draws from its own counter, uncertainty learns log-variances: both must be as if the
    # overflowing update had never been tried. (famo would not overflow here: its weights
    # divide by the losses.)
    for method in ("rlw", "uncertainty"):
        model, clean_model = _model(), _model()
        trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.05),
                              weighting=method, steps_per_loop=4)
        x, y = _arrays()
        y["b"] = y["b"].copy()
        y["b"][16:32] = 3e4  # squared error ~1e9 times the loss scale overflows float16
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), steps=4)
        clean = mtl.Trainer(clean_model, _tasks(), optimizer=keras.optimizers.SGD(0.05),
                            weighting=method, steps_per_loop=3)
        clean.fit(_without({1}), steps=3)
        assert int(trainer.skipped_steps.numpy()) == 1
        assert float(trainer.loss_scale.scale.numpy()) == 2.0 ** 14
        assert int(trainer.optimizer.iterations.numpy()) == 3
        # Scaling by a power of two is exact: the same float16 arithmetic as without the batch.
        for got, want in zip(_weights(model), _weights(clean_model)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        for got, want in zip(trainer.weighting.variables, clean.weighting.variables):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, err_msg=method)


def test_float16_rep_mode_with_mgda_trains(float16):
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          weighting="mgda", gradient_mode="rep", steps_per_loop=4)
    before = _weights(model)
    trainer.fit(_data().repeat(), steps=4)
    assert int(trainer.skipped_steps.numpy()) == 0
    assert all(np.all(np.isfinite(w)) for w in _weights(model))
    assert max(np.max(np.abs(a - b)) for a, b in zip(_weights(model), before)) > 1e-3


# ---------------------------------------------------------------------- skip in float32
def test_skipped_update_leaves_weights_state_metrics_and_logged_means_alone():
    model, clean_model = _model(), _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.05),
                          weighting="famo", on_nonfinite="skip", steps_per_loop=4, log_every=4)
    history = trainer.fit(_data(bad_batches=(2,)), steps=4)
    clean = mtl.Trainer(clean_model, _tasks(), optimizer=keras.optimizers.SGD(0.05),
                        weighting="famo", steps_per_loop=3, log_every=3)
    clean_history = clean.fit(_without({2}), steps=3)
    assert int(trainer.skipped_steps.numpy()) == 1
    for got, want in zip(_weights(model), _weights(clean_model)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(trainer.weighting.variables, clean.weighting.variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    record, clean_record = history.train[-1], clean_history.train[-1]
    assert record["skipped_steps"] == 1
    for key in ("loss", "a/loss", "b/loss", "a/accuracy"):
        assert np.isfinite(record[key]), key
        assert record[key] == pytest.approx(clean_record[key], rel=1e-5), key


def test_a_single_task_with_a_gradient_method_trains_on_its_plain_gradient():
    # Nothing is shared between tasks: the method has nothing to combine.
    results = {}
    for method in ("equal", "pcgrad", "mgda"):
        keras.utils.set_random_seed(0)
        model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(16,)),
                                   {"b": mtl.heads.regression(1)})
        trainer = mtl.Trainer(model, [mtl.Task("b", loss="mse")], weighting=method,
                              optimizer=keras.optimizers.SGD(0.05), steps_per_loop=4)
        x, y = _arrays()
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, {"b": y["b"]})).batch(16), steps=4)
        results[method] = _weights(model)
    for method in ("pcgrad", "mgda"):
        for got, want in zip(results[method], results["equal"]):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------- layer state of a dropped update
def _batch_norm_model():
    """An mlp with BatchNormalization and Dropout: a forward pass in training mode moves the
    moving statistics and the dropout RNG before the update is judged."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.3, seed=3, name="dropout")(x)
    return mtl.MultiTaskModel(keras.Model(inputs, x),
                              {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})


def _twin_models():
    model, clean_model = _batch_norm_model(), _batch_norm_model()
    for source, target in zip(model.weights, clean_model.weights):
        target.assign(source)
    return model, clean_model


def _moving_statistics(model):
    layer = model.backbone.get_layer("batch_norm")
    return [layer.moving_mean.numpy(), layer.moving_variance.numpy()]


def test_a_dropped_nan_batch_leaves_batch_norm_and_dropout_state_as_if_never_seen():
    model, clean_model = _twin_models()
    x, y = _arrays()
    x = x.copy()
    x[16:32] = np.nan  # batch 1: the forward pass would write NaN into the moving statistics
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                          weighting="equal", on_nonfinite="skip", steps_per_loop=4)
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), steps=4)
    clean = mtl.Trainer(clean_model, _tasks(), optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                        weighting="equal", steps_per_loop=3)
    clean.fit(_without({1}), steps=3)
    assert int(trainer.skipped_steps.numpy()) == 1
    assert all(np.all(np.isfinite(s)) for s in _moving_statistics(model))
    # Bitwise: weights, moving statistics and the dropout RNG state of the run without the batch.
    for got, want in zip(model.weights, clean_model.weights):
        assert np.array_equal(got.numpy(), want.numpy()), got.path
    clean_x = _arrays(seed=1)[0]
    outputs, clean_outputs = model(clean_x, training=False), clean_model(clean_x, training=False)
    for task in ("a", "b"):
        assert np.all(np.isfinite(outputs[task].numpy()))
        assert np.array_equal(outputs[task].numpy(), clean_outputs[task].numpy())


def test_a_float16_overflow_leaves_batch_norm_statistics_and_weights_as_they_were(float16):
    model = _batch_norm_model()
    x, y = _arrays()
    y["b"] = y["b"].copy()
    y["b"][16:32] = 3e4  # batch 1 overflows float16 (see the tests above)
    x[16:32] *= 50.0  # and its activations would move the moving statistics far
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.SGD(0.05),
                          steps_per_loop=1)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    trainer.fit(data, steps=1)
    before, skipped = _weights(model), int(trainer.skipped_steps.numpy())
    seeds = [v.numpy() for v in mtl.model.seed_states(model)]
    assert seeds  # the dropout RNG state is compared too
    trainer.fit(data, steps=2)  # batch 1
    assert int(trainer.skipped_steps.numpy()) == skipped + 1
    for got, want in zip(_weights(model), before):
        assert np.array_equal(got, want)
    for got, want in zip(mtl.model.seed_states(model), seeds):
        assert np.array_equal(got.numpy(), want)
