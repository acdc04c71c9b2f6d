import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl


@pytest.mark.parametrize("name, shape, config, out", [
    ("mlp", (6,), {"widths": (8, 4)}, (None, 4)),
    ("mlp", (4, 4, 1), {"widths": (5,), "dropout": 0.1}, (None, 5)),
    ("small_cnn", (16, 32, 1), {"filters": (4, 8), "dense": 12}, (None, 12)),
    ("small_cnn", (8, 8, 3), {"filters": (4,), "batch_norm": True, "dense": 6}, (None, 6)),
    ("resnet", (16, 16, 3), {"widths": (4, 8), "blocks_per_stage": 1}, (None, 8)),
    ("resnet", (8, 8, 1), {"widths": (4,), "pooling": "flatten"}, (None, 8 * 8 * 4)),
])
def test_builders_make_functional_models(name, shape, config, out):
    model = mtl.backbones.get(name, shape, **config)
    assert isinstance(model, keras.Model) and model.output.shape == out
    y = model(tf.zeros((2,) + shape))
    assert y.shape[0] == 2


def test_resnet_downsamples_per_stage():
    model = mtl.backbones.resnet((16, 16, 1), widths=(4, 8, 16), blocks_per_stage=1,
                                 pooling="flatten")
    assert model.output.shape == (None, 4 * 4 * 16)


def test_mobilenet_v2_random_and_local_weights(tmp_path):
    a = mtl.backbones.mobilenet_v2((32, 32, 3), alpha=0.35)
    path = str(tmp_path / "mnv2.weights.h5")
    a.layers[-1].save_weights(path)  # the keras.applications model, as users save it
    b = mtl.backbones.mobilenet_v2((32, 32, 3), alpha=0.35, weights=path)
    x = tf.random.normal((1, 32, 32, 3), seed=0)
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="would download"):
        mtl.backbones.mobilenet_v2((32, 32, 3), weights="imagenet")


def test_backbone_errors():
    with pytest.raises(ValueError, match=r"Unknown backbone 'vgg'; expected one of"):
        mtl.backbones.get("vgg", (8, 8, 1))
    with pytest.raises(ValueError, match=r"small_cnn: input_shape must be \(height, width, "):
        mtl.backbones.small_cnn((8,))
    with pytest.raises(ValueError, match=r"positive sizes"):
        mtl.backbones.mlp((0, 3))


def test_heads_output_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = mtl.heads.classification(4, hidden=(8,))
        out = head(tf.zeros((2, 3)))
        assert out.dtype == tf.float32 and out.shape == (2, 4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match=">= 1"):
        mtl.heads.regression(0)
