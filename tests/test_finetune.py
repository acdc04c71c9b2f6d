"""Freezing, scheduled unfreezing and a separate backbone learning rate."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model():
    keras.utils.set_random_seed(0)
    backbone = mtl.backbones.small_cnn((8, 8, 1), filters=(4, 4), dense=8, batch_norm=True)
    return mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                         "b": mtl.heads.regression(1)})


def _tasks():
    return [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse")]


def _data():
    rng = np.random.RandomState(0)
    x = rng.rand(32, 8, 8, 1).astype(np.float32) * 3 + 1  # far from BN's initial statistics
    y = {"a": rng.randint(0, 3, 32).astype(np.int64), "b": rng.randn(32).astype(np.float32)}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True).repeat()


def _values(variables):
    return {v.path: v.numpy().copy() for v in variables}


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics():
    model = _model()
    backbone_before = _values(model.backbone.weights)  # includes BN moving mean/variance
    heads_before = _values(model.heads["a"].weights)
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          fine_tuning=mtl.FineTuning(freeze_backbone=True))
    trainer.fit(_data(), steps=5)
    assert any("moving_mean" in p for p in backbone_before)
    for path, value in _values(model.backbone.weights).items():
        np.testing.assert_array_equal(value, backbone_before[path], err_msg=path)
    assert any(not np.array_equal(v, heads_before[p])
               for p, v in _values(model.heads["a"].weights).items())


def test_unfreezing_at_step_k_trains_exactly_the_top_layers_from_k():
    model = _model()
    layers = mtl.training.finetune.weighted_layers(model.backbone)
    top = layers[-2:]  # the last BatchNorm + the features Dense, say
    trainer = mtl.Trainer(model, _tasks(), optimizer=keras.optimizers.Adam(0.01),
                          steps_per_loop=4,
                          fine_tuning=mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=3,
                                                     unfreeze_top_layers=2))
    snapshot = _values(model.backbone.weights)
    trainer.fit(_data(), steps=3)
    for path, value in _values(model.backbone.weights).items():
        np.testing.assert_array_equal(value, snapshot[path], err_msg=path)  # frozen until 3
    trainer.fit(_data(), steps=6)
    top_paths = {v.path for layer in top for v in layer.trainable_weights}
    assert top_paths
    after = _values(model.backbone.weights)
    for path in top_paths:
        assert not np.array_equal(after[path], snapshot[path]), path
    for layer in layers[:-2]:
        for v in layer.weights:
            np.testing.assert_array_equal(after[v.path], snapshot[v.path], err_msg=v.path)


def test_backbone_learning_rate_multiplier_scales_its_sgd_step():
    plain, scaled = _model(), _model()
    mtl.Trainer(plain, _tasks(), optimizer=keras.optimizers.SGD(0.1)).fit(_data(), steps=1)
    mtl.Trainer(scaled, _tasks(), optimizer=keras.optimizers.SGD(0.1),
                fine_tuning=mtl.FineTuning(backbone_lr_multiplier=0.25)).fit(_data(), steps=1)
    start = [v.numpy() for v in _model().backbone.trainable_weights]
    moved = 0
    for a, b, s0 in zip(plain.backbone.trainable_weights, scaled.backbone.trainable_weights,
                        start):
        np.testing.assert_allclose(b.numpy() - s0, 0.25 * (a.numpy() - s0), rtol=1e-4,
                                   atol=1e-7)
        moved += int(np.any(a.numpy() != s0))
    assert moved > 0
    for a, b in zip(plain.heads["a"].trainable_weights, scaled.heads["a"].trainable_weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5)


def test_resume_after_the_unfreeze_step_keeps_the_layers_unfrozen(tmp_path):
    fine = mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=2, unfreeze_top_layers=1)
    trainer = mtl.Trainer(_model(), _tasks(), optimizer="adam", model_dir=str(tmp_path),
                          checkpoint_every=2, fine_tuning=fine)
    trainer.fit(_data(), steps=4)
    resumed = mtl.Trainer(_model(), _tasks(), optimizer="adam", model_dir=str(tmp_path),
                          fine_tuning=fine)
    assert resumed.global_step == 4
    assert len(resumed.variables) == len(trainer.variables)


def test_errors():
    with pytest.raises(ValueError, match=r"unfreeze_top_layers=99, but the backbone .* has only "
                                         r"\d+ layers with weights"):
        mtl.Trainer(_model(), _tasks(), optimizer="adam",
                    fine_tuning=mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=1,
                                               unfreeze_top_layers=99))
    with pytest.raises(ValueError, match="unfreeze_at_step needs freeze_backbone=True"):
        mtl.FineTuning(unfreeze_at_step=3)
    with pytest.raises(ValueError, match="backbone_lr_multiplier must be > 0"):
        mtl.FineTuning(backbone_lr_multiplier=0.0)
