"""cifar100 pipeline on TFDS mock data: label formats, augmentation, errors, experiment."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import experiment_scripts  # noqa: E402
from mtl.data import cifar100  # noqa: E402


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_batches_have_the_label_formats_the_heads_expect(mock_tfds):
    images, labels = next(iter(cifar100.load("train", batch_size=4, training=True, seed=0)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert set(labels) == {"fine", "coarse"}
    for task, spec in cifar100.TASK_SPECS.items():
        assert labels[task].shape == (4,) + spec.label_shape
        assert labels[task].dtype == spec.label_dtype == tf.int64
        assert 0 <= int(tf.reduce_min(labels[task])) <= int(tf.reduce_max(labels[task])) \
            < spec.units
    heads = cifar100.heads()
    assert {t: h(tf.zeros([2, 8])).shape[-1] for t, h in heads.items()} == {"fine": 100,
                                                                           "coarse": 20}
    assert [t.name for t in cifar100.tasks(["coarse"])] == ["coarse"]


def test_eval_is_one_pass_and_training_batches_are_full_and_seeded(mock_tfds):
    eval_sizes = [int(x.shape[0]) for x, _ in cifar100.load("test", batch_size=4,
                                                             training=False)]
    assert eval_sizes == [4, 2]
    first = [x.numpy() for x, _ in cifar100.load("train", batch_size=4, training=True,
                                                 seed=3).take(3)]
    again = [x.numpy() for x, _ in cifar100.load("train", batch_size=4, training=True,
                                                 seed=3).take(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_images_are_standardised_and_augmentation_is_train_only(mock_tfds):
    plain = next(iter(cifar100.examples("test", training=False)))[0]
    raw = next(iter(tfds.load("cifar100", split="test")))["image"]
    expected = (raw.numpy() / 255.0 - np.array(cifar100.MEAN)) / np.array(cifar100.STD)
    np.testing.assert_allclose(plain.numpy(), expected, atol=1e-5)
    # Training shifts and flips: with 6 examples and 2 epochs at least one image differs from
    # its unaugmented self (pad-4 crop keeps the offset 0 with probability 1/81 per example).
    augmented = cifar100.examples("train", training=True, seed=0, cache=False)
    plain_by_label = {}
    for image, labels in cifar100.examples("train", training=False):
        plain_by_label.setdefault(int(labels["fine"]), []).append(image.numpy())
    changed = 0
    for image, labels in augmented.repeat(2):
        same = any(np.allclose(image.numpy(), p) for p in plain_by_label[int(labels["fine"])])
        changed += not same
    assert changed > 0


def test_unknown_split_and_task_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"cifar100 has no split 'validation' .*\['train', "
                                         r"'test'\]"):
        cifar100.load("validation", batch_size=4, training=False)
    with pytest.raises(ValueError, match=r"cifar100 has no task 'superclass'; its tasks are "
                                         r"\['fine', 'coarse'\]"):
        cifar100.load("train", batch_size=4, training=True, tasks=["fine", "superclass"])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        cifar100.load("train", batch_size=0, training=True)


def test_experiment_trains_two_steps_and_evaluates(tmp_path):
    script = experiment_scripts.load("cifar100")
    results = experiment_scripts.run_on_mock_data(script.EXPERIMENT, tmp_path)
    assert set(results) == {"fine", "coarse"}
    assert all(math.isfinite(v) for values in results.values() for v in values.values())
    assert (tmp_path / "results.json").exists()
