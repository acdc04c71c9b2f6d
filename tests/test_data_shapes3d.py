"""shapes3d pipeline on TFDS mock data: both modes, value normalisation, errors, experiment."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import experiment_scripts  # noqa: E402
from mtl.data import shapes3d  # noqa: E402


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("mode, dtype", [("classification", tf.int64),
                                         ("regression", tf.float32)])
def test_batches_have_the_label_formats_the_heads_expect(mock_tfds, mode, dtype):
    images, labels = next(iter(shapes3d.load(shapes3d.TRAIN_SPLIT, batch_size=4, training=True,
                                             seed=0, mode=mode)))
    assert images.shape == (4, 64, 64, 3) and images.dtype == tf.float32
    assert tuple(labels) == shapes3d.FACTORS
    for task, spec in shapes3d.task_specs_for(mode).items():
        assert labels[task].shape == (4,) and labels[task].dtype == spec.label_dtype == dtype
    heads = shapes3d.heads(mode=mode)
    units = {t: h(tf.zeros([2, 8])).shape[-1] for t, h in heads.items()}
    if mode == "classification":
        assert units == shapes3d.NUM_VALUES
    else:
        assert set(units.values()) == {1}
        assert {t.loss.name for t in shapes3d.tasks(mode=mode)} == {"mean_squared_error"}


def test_regression_values_are_mapped_to_0_1():
    features = {"image": tf.zeros([64, 64, 3], tf.uint8),
                "value_floor_hue": 0.9, "value_wall_hue": 0.0, "value_object_hue": 0.5,
                "value_scale": 1.25, "value_shape": 1.0, "value_orientation": 0.0}
    features = {k: tf.constant(v) for k, v in features.items()}
    _, labels = shapes3d.to_example(features, mode="regression")
    got = {k: float(v) for k, v in labels.items()}
    expected = {"floor_hue": 0.9, "wall_hue": 0.0, "object_hue": 0.5, "scale": 1.0,
                "shape": 1 / 3, "orientation": 0.5}
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)


def test_unknown_split_task_and_mode_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"shapes3d has no split 'test' .*\['train'\] \(slices "
                                         r"such as 'train\[:90%\]' work too\)"):
        shapes3d.load("test", batch_size=4, training=False)
    with pytest.raises(ValueError, match=r"shapes3d has no task 'hue'; its tasks are "
                                         r"\['floor_hue', 'wall_hue', 'object_hue', 'scale', "
                                         r"'shape', 'orientation'\]"):
        shapes3d.load("train", batch_size=4, training=True, tasks=["hue"])
    with pytest.raises(ValueError, match=r"mode must be one of \['classification', "
                                         r"'regression'\]; got 'values'"):
        shapes3d.load("train", batch_size=4, training=True, mode="values")


@pytest.mark.parametrize("mode", shapes3d.MODES)
def test_experiment_trains_two_steps_and_evaluates(tmp_path, mode):
    script = experiment_scripts.load("shapes3d")
    results = experiment_scripts.run_on_mock_data(script.make_experiment(mode=mode), tmp_path)
    assert set(results) == set(shapes3d.FACTORS)
    metric = "accuracy" if mode == "classification" else "mae"
    assert all(metric in values for values in results.values())
    assert all(math.isfinite(v) for values in results.values() for v in values.values())
