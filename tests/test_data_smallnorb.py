"""smallnorb pipeline on TFDS mock data: label formats, image options, errors, experiment."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import experiment_scripts  # noqa: E402
from mtl.data import smallnorb  # noqa: E402


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("image_size, stereo, shape", [(None, False, (96, 96, 1)),
                                                       (32, True, (32, 32, 2))])
def test_batches_have_the_label_formats_the_heads_expect(mock_tfds, image_size, stereo, shape):
    images, labels = next(iter(smallnorb.load("train", batch_size=4, training=True, seed=0,
                                              image_size=image_size, stereo=stereo)))
    assert images.shape == (4,) + shape == (4,) + smallnorb.image_shape(image_size, stereo)
    assert images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    assert tuple(labels) == smallnorb.TASKS == ("category", "elevation", "azimuth", "lighting")
    for task, spec in smallnorb.TASK_SPECS.items():
        assert labels[task].shape == (4,) and labels[task].dtype == spec.label_dtype == tf.int64
        assert int(tf.reduce_max(labels[task])) < spec.units
    assert {t: s.units for t, s in smallnorb.TASK_SPECS.items()} == {
        "category": 5, "elevation": 9, "azimuth": 18, "lighting": 6}


def test_stereo_stacks_both_cameras(mock_tfds):
    raw = next(iter(tfds.load("smallnorb", split="test")))
    image, _ = next(iter(smallnorb.examples("test", training=False, stereo=True)))
    tf.debugging.assert_equal(image[..., 0], tf.cast(raw["image"][..., 0], tf.float32) / 255)
    tf.debugging.assert_equal(image[..., 1], tf.cast(raw["image2"][..., 0], tf.float32) / 255)


def test_unknown_split_and_task_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"smallnorb has no split 'val' .*\['train', 'test'\]"):
        smallnorb.load("val", batch_size=4, training=False)
    with pytest.raises(ValueError, match=r"smallnorb has no task 'instance'; its tasks are "
                                         r"\['category', 'elevation', 'azimuth', 'lighting'\]"):
        smallnorb.load("train", batch_size=4, training=True, tasks=["instance"])


def test_experiment_trains_two_steps_and_evaluates(tmp_path):
    script = experiment_scripts.load("smallnorb")
    results = experiment_scripts.run_on_mock_data(script.EXPERIMENT, tmp_path)
    assert set(results) == set(smallnorb.TASKS)
    assert all(math.isfinite(v) for values in results.values() for v in values.values())
