"""Shared pipeline parts: split and task checks, TFDS availability errors, seeded augmentation,
task specs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import random  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from mtl.data import cifar100, pipeline, shapes3d, smallnorb  # noqa: E402
from mtl.data.task_specs import TaskSpec, build_tasks  # noqa: E402


@pytest.mark.parametrize("split, names", [("train", ["train"]), ("train[:90%]", ["train"]),
                                          ("train[10:20]+test", ["train", "test"]),
                                          (" test [ :5% ] ", ["test"])])
def test_split_names(split, names):
    assert pipeline.split_names(split) == names


@pytest.mark.parametrize("split", ["", "train[:90%", "[:5]", None])
def test_malformed_split_is_rejected(split):
    with pytest.raises(ValueError, match="split"):
        pipeline.split_names(split)


def test_tasks_must_be_a_list_of_names():
    with pytest.raises(ValueError, match=r"tasks must be a non-empty list of task names, a "
                                         r"subset of \['a', 'b'\]; got 'a'"):
        pipeline.check_tasks("data", "a", ["a", "b"])
    with pytest.raises(ValueError, match="task 'a' is requested more than once"):
        pipeline.check_tasks("data", ["a", "a"], ["a", "b"])


@pytest.mark.parametrize("module", [cifar100, smallnorb, shapes3d])
def test_failed_download_names_dataset_folder_and_remedy(tmp_path, monkeypatch, module):
    def offline(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='example.org', port=443): Max retries exceeded")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(pipeline.DatasetUnavailableError) as raised:
        module.load(module.SPLITS[0], batch_size=4, training=True, data_dir=str(tmp_path))
    message = str(raised.value)
    assert f"Dataset '{module.NAME}' is not prepared in data_dir '{tmp_path}'" in message
    assert "ConnectionError: HTTPSConnectionPool" in message
    assert "on a machine with network access run" in message
    assert "download_and_prepare()" in message and f"{tmp_path}/{module.NAME}" in message
    assert "manual" not in message  # Only CelebA needs a manual download.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert isinstance(raised.value, ValueError)  # An experiment's main ends with the message.


def test_preparing_a_dataset_leaves_the_global_random_state_untouched(tmp_path, monkeypatch):
    def prepare_drawing_random_numbers(self, *args, **kwargs):
        random.random()  # TFDS names its temporary folder with Python's global `random`.
        np.random.random()

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        prepare_drawing_random_numbers)
    random.seed(1)
    np.random.seed(1)
    with pytest.raises(pipeline.DatasetUnavailableError):  # Nothing was written to read back.
        pipeline.load_tfds("cifar100", "train", data_dir=str(tmp_path))
    after = random.random(), np.random.random()
    random.seed(1)
    np.random.seed(1)
    assert after == (random.random(), np.random.random())


def test_download_false_fails_at_once_when_the_data_is_missing(tmp_path):
    start = time.perf_counter()
    with pytest.raises(pipeline.DatasetUnavailableError,
                       match=r"Dataset 'cifar100' is not prepared in data_dir"):
        cifar100.load("train", batch_size=4, training=True, data_dir=str(tmp_path),
                      download=False)
    assert time.perf_counter() - start < 30


def test_a_replaced_downloader_is_not_probed(tmp_path, monkeypatch):
    def prepare(self, *args, **kwargs):
        raise RuntimeError("the replaced downloader ran")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
    builder = tfds.builder("cifar100", data_dir=str(tmp_path))
    assert not pipeline.downloads_for_real(builder)
    with pytest.raises(pipeline.DatasetUnavailableError, match="the replaced downloader ran"):
        pipeline.load_tfds("cifar100", "train", data_dir=str(tmp_path))


def test_unreachable_download_source_fails_fast_without_the_retry_loop(tmp_path, monkeypatch):
    import socket

    def no_route(address, timeout=None):
        raise OSError(f"no route to {address[0]}")

    def must_not_download(self, *args, **kwargs):
        raise AssertionError("the downloader was started")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
    monkeypatch.setattr(pipeline, "downloads_for_real", lambda builder: True)
    start = time.perf_counter()
    with pytest.raises(pipeline.DatasetUnavailableError,
                       match=r"(?s)Dataset 'cifar100' is not prepared.*cannot reach "
                             r"www\.cs\.toronto\.edu.*on a machine with network access"):
        cifar100.load("train", batch_size=4, training=True, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 30


def _noise(element, seed):
    image, labels = element
    return image + tf.random.stateless_uniform(tf.shape(image), seed), labels


def _pipeline(seed):
    ds = tf.data.Dataset.from_tensor_slices((tf.zeros([6, 2]), {"t": tf.range(6)}))
    ds = pipeline.prepare_examples(ds, training=True, seed=seed, augment=_noise)
    return [x.numpy() for x, _ in pipeline.batch_examples(ds, batch_size=3,
                                                          training=True).take(4)]


def test_augmentation_is_seeded_and_fresh_each_epoch():
    first, again, other = _pipeline(1), _pipeline(1), _pipeline(2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    # Epoch 2 (batches 3-4) draws new noise for the same six examples.
    epoch1, epoch2 = np.sort(np.concatenate(first[:2]), 0), np.sort(np.concatenate(first[2:]), 0)
    assert not np.allclose(epoch1, epoch2)


def test_train_pipeline_keeps_its_signature():
    ds = tf.data.Dataset.from_tensor_slices((tf.zeros([5, 2]), {"t": tf.range(5)}))
    batches = pipeline.train_pipeline(ds, batch_size=2, seed=0).take(5)
    assert [int(x.shape[0]) for x, _ in batches] == [2] * 5
    assert [int(x.shape[0]) for x, _ in pipeline.eval_pipeline(ds, batch_size=2)] == [2, 2, 1]


@pytest.mark.parametrize("kind, units, loss, shape, dtype", [
    ("classification", 7, keras.losses.SparseCategoricalCrossentropy, (), tf.int64),
    ("binary", 1, keras.losses.BinaryCrossentropy, (), tf.float32),
    ("binary", 40, keras.losses.BinaryCrossentropy, (40,), tf.float32),
    ("regression", 10, keras.losses.MeanSquaredError, (10,), tf.float32)])
def test_task_spec(kind, units, loss, shape, dtype):
    spec = TaskSpec(kind, units)
    assert isinstance(spec.loss(), loss)
    assert spec.label_shape == shape and spec.label_dtype == dtype
    assert spec.head()(tf.zeros([3, 4])).shape == (3, units)
    task = spec.task("t", weight=0.5)
    assert task.name == "t" and task.weight == 0.5


def test_task_spec_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \['classification', 'binary', "
                                         r"'regression'\]; got 'ranking'"):
        TaskSpec("ranking", 3)
    with pytest.raises(ValueError, match="units must be an int >= 1; got 0"):
        TaskSpec("binary", 0)
    with pytest.raises(ValueError, match=r"weights names task 'coarse', which is not among the "
                                         r"tasks built \(\['fine'\]\)"):
        build_tasks(cifar100.TASK_SPECS, ["fine"], weights={"coarse": 2.0}, dataset="cifar100")
