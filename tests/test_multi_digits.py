import random

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import mtl  # noqa: F401  (registers multi_digits)
from mtl.data import multi_digits


def _take(split, n):
    return [ex for _, ex in zip(range(n), multi_digits.generate(split))]


def test_generation_is_deterministic():
    a, b = _take("train", 50), _take("train", 50)
    for (ia, ea), (ib, eb) in zip(a, b):
        assert ia == ib
        np.testing.assert_array_equal(ea["image"], eb["image"])
        assert ea["left"] == eb["left"] and ea["sum"] == eb["sum"]


def test_labels_match_the_digits_drawn():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for _, ex in _take("test", 100):
        left, right = ex["source_ids"]
        assert ex["left"] == targets[left] and ex["right"] == targets[right]
        assert ex["sum"] == ex["left"] + ex["right"]
        assert ex["image"].shape == (16, 32, 1) and ex["image"].max() > 0
        # The left digit lies in the left half, the right digit in the right half.
        assert ex["image"][:, :16].max() > 0 and ex["image"][:, 16:].max() > 0


def test_train_and_test_come_from_disjoint_source_images():
    pools = multi_digits.source_indices(1797)
    assert not set(pools["train"]) & set(pools["test"])
    assert len(pools["train"]) + len(pools["test"]) == 1797
    train_ids = {int(i) for _, ex in _take("train", 2000) for i in ex["source_ids"]}
    test_ids = {int(i) for _, ex in _take("test", 500) for i in ex["source_ids"]}
    assert train_ids and test_ids and not train_ids & test_ids


def test_tfds_load_works_offline(digits_data_dir):
    ds = tfds.load("multi_digits", split="test", data_dir=digits_data_dir)
    assert ds.cardinality().numpy() == 2000
    example = next(iter(tfds.as_numpy(ds.take(1))))
    assert example["image"].dtype == np.uint8 and example["image"].shape == (16, 32, 1)
    assert 0 <= example["left"] <= 9
    builder = tfds.builder("multi_digits", data_dir=digits_data_dir)
    assert builder.info.splits["train"].num_examples == 12_000


def test_load_gives_the_trainer_format(digits_data_dir):
    ds = multi_digits.load("train", batch_size=8, training=True, tasks=("left", "sum"),
                           data_dir=digits_data_dir, seed=0)
    image, labels = next(iter(ds))
    assert image.shape == (8, 16, 32, 1) and image.dtype.name == "float32"
    assert float(image.numpy().max()) <= 1.0
    assert set(labels) == {"left", "sum"}
    assert labels["left"].dtype.name == "int64" and labels["sum"].dtype.name == "float32"
    again = next(iter(multi_digits.load("train", batch_size=8, training=True, tasks=("left",),
                                        data_dir=digits_data_dir, seed=0)))
    np.testing.assert_array_equal(again[0].numpy(), image.numpy())  # seeded shuffle


def test_load_errors(digits_data_dir):
    with pytest.raises(ValueError, match=r"no task 'middle'; its tasks are \['left', 'right', "
                                         r"'sum'\]"):
        multi_digits.load("train", batch_size=8, training=True, tasks=("middle",))
    with pytest.raises(ValueError, match=r"no split 'validation'"):
        multi_digits.load("validation", batch_size=8, training=False)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        multi_digits.load("train", batch_size=0, training=True, data_dir=digits_data_dir)


def _random_state_after(prepare):
    """Global random state, and what seeded Keras/TF draw next, after `prepare()` under seed 1."""
    keras.utils.set_random_seed(1)
    prepare()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    dense = keras.layers.Dense(4)  # Its initialiser draws its seed from Python's `random`.
    dense.build((None, 3))
    return python_state, numpy_state, dense.kernel.numpy(), tf.random.uniform([3]).numpy()


def test_preparing_the_dataset_leaves_the_random_state_untouched(tmp_path):
    # The first run of an experiment prepares the dataset; a second one only reads it. Both must
    # start from the same random state, hence the same initial weights.
    def prepare():
        multi_digits.load("train", batch_size=8, training=True, data_dir=str(tmp_path), seed=0)

    prepared = _random_state_after(prepare)
    assert (tmp_path / "multi_digits").is_dir()  # The data was generated in this call.
    untouched = _random_state_after(lambda: None)
    assert prepared[0] == untouched[0]  # random.getstate()
    name, keys, *position = prepared[1]  # np.random.get_state()
    assert name == untouched[1][0] and position == list(untouched[1][2:])
    np.testing.assert_array_equal(keys, untouched[1][1])
    np.testing.assert_array_equal(prepared[2], untouched[2])
    np.testing.assert_array_equal(prepared[3], untouched[3])
