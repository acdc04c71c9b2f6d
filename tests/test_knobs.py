"""Speed and memory knobs give the results they promise: accumulation, XLA, mixed precision,
steps per loop (see test_trainer), and the non-finite guard."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(seed=0, hidden=16):
    keras.utils.set_random_seed(seed)
    return mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(hidden,)),
                              {"a": mtl.heads.classification(3), "b": mtl.heads.regression(1)})


def _tasks():
    return [mtl.Task("a", loss=CE, metrics=["accuracy"]), mtl.Task("b", loss="mse", weight=0.5)]


def _arrays(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 6).astype(np.float32)
    return x, {"a": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0),
               "b": (x[:, 2] * 2 + x[:, 3]).astype(np.float32)}


def _batches(batch, n=64):
    return tf.data.Dataset.from_tensor_slices(_arrays(n)).batch(batch, drop_remainder=True)


def _weights(model):
    return [v.numpy() for v in model.weights]


def _train(model, data, steps, **kwargs):
    trainer = mtl.Trainer(model, _tasks(), optimizer=kwargs.pop("optimizer", None)
                          or keras.optimizers.Adam(0.01), **kwargs)
    trainer.fit(data.repeat(), steps=steps)
    return trainer


def test_accumulation_equals_one_big_batch_step():
    big, accumulated = _model(), _model()
    _train(big, _batches(32), steps=4)
    trainer = _train(accumulated, _batches(8), steps=4, grad_accum_steps=4)
    assert trainer.global_step == 4
    assert int(trainer.optimizer.iterations.numpy()) == 4  # one apply per 4 micro-batches
    for got, want in zip(_weights(accumulated), _weights(big)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_accumulation_with_steps_per_loop():
    a, b = _model(), _model()
    _train(a, _batches(16), steps=4, grad_accum_steps=2)
    _train(b, _batches(16), steps=4, grad_accum_steps=2, steps_per_loop=4)
    for got, want in zip(_weights(a), _weights(b)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_jit_compile_matches_no_xla():
    plain, xla = _model(), _model()
    _train(plain, _batches(16), steps=5)
    trainer = _train(xla, _batches(16), steps=5, jit_compile=True)
    assert trainer.global_step == 5
    for got, want in zip(_weights(xla), _weights(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _data_with_bad_batch(bad_batch, batch=16, n=64):
    x, y = _arrays(n)
    y["b"] = y["b"].copy()
    y["b"][bad_batch * batch] = np.inf
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


def test_nonfinite_loss_stops_before_the_update_and_names_the_task(tmp_path):
    model = _model()
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          model_dir=str(tmp_path), checkpoint_every=1, steps_per_loop=4)
    reference = _model()
    _train(reference, _batches(16), steps=2)
    with pytest.raises(mtl.NonFiniteError, match=r"stopped at step 3: non-finite loss in task\(s\) "
                                                 r"\['b'\].*Last good checkpoint: .*ckpt-2"):
        trainer.fit(_data_with_bad_batch(2).repeat(), steps=4)
    assert trainer.global_step == 2
    for got, want in zip(_weights(model), _weights(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # step 3's update was not applied


def test_nonfinite_skip_policy_drops_the_step_and_counts_it():
    model = _model()
    trainer = _train(model, _data_with_bad_batch(1), steps=8, on_nonfinite="skip")
    assert trainer.global_step == 8
    assert int(trainer.skipped_steps.numpy()) == 2  # batch 1 comes round twice in 8 steps
    assert all(np.all(np.isfinite(w)) for w in _weights(model))
    assert int(trainer.optimizer.iterations.numpy()) == 6


def test_float16_recovers_from_an_overflow():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(0.01))
        assert float(trainer.loss_scale.scale.numpy()) == 2.0 ** 15  # float16 -> loss scaling
        x, y = _arrays(32)
        y["b"] = y["b"].copy()
        y["b"][:16] = 3e4  # squared error ~1e9, times the loss scale: overflows float16
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
        trainer.fit(data.take(1), steps=1)
        assert float(trainer.loss_scale.scale.numpy()) == 2.0 ** 14
        assert int(trainer.skipped_steps.numpy()) == 1
        assert all(np.all(np.isfinite(w)) for w in _weights(model))
        trainer.fit(_batches(16).repeat(), steps=3)
        assert int(trainer.skipped_steps.numpy()) == 1
        assert all(np.all(np.isfinite(w)) for w in _weights(model))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_float16_reaches_the_float32_accuracy_band():
    results = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = _model(hidden=32)
            trainer = _train(model, _batches(32, n=512), steps=150)
            results[policy] = trainer.evaluate(_batches(64, n=512))["a"]["accuracy"]
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert results["float32"] > 0.85
    assert abs(results["mixed_float16"] - results["float32"]) < 0.05, results


def test_knob_errors():
    with pytest.raises(ValueError, match="grad_accum_steps must be an int >= 1; got 0"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", grad_accum_steps=0)
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \['stop', 'skip'\]"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", on_nonfinite="ignore")
    with pytest.raises(ValueError, match="gradient_mode='rep' applies to gradient-based"):
        mtl.Trainer(_model(), _tasks(), optimizer="sgd", gradient_mode="rep")


def test_accumulation_with_missing_labels_equals_the_big_batch():
    x, y = _arrays(64)
    weights = {"a": (np.arange(64) % 3 != 0).astype(np.float32) * (np.arange(64) < 40)}
    examples = tf.data.Dataset.from_tensor_slices((x, y, weights))
    big, accumulated = _model(), _model()
    _train(big, examples.batch(32, drop_remainder=True), steps=4)
    _train(accumulated, examples.batch(8, drop_remainder=True), steps=4, grad_accum_steps=4)
    for got, want in zip(_weights(accumulated), _weights(big)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
