"""celeb_a pipeline: both modes on TFDS mock data, landmark normalisation and mirroring by hand,
manual-download message, experiment."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import experiment_scripts  # noqa: E402
from mtl.data import celeb_a, pipeline  # noqa: E402


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("mode", celeb_a.MODES)
def test_batches_have_the_label_formats_the_heads_expect(mock_tfds, mode):
    images, labels = next(iter(celeb_a.load("train", batch_size=4, training=True, seed=0,
                                            mode=mode, image_size=32)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    specs = celeb_a.task_specs_for(mode)
    assert tuple(labels) == celeb_a.task_names(mode) == tuple(specs)
    for task, spec in specs.items():
        assert labels[task].shape == (4,) + spec.label_shape, task
        assert labels[task].dtype == spec.label_dtype == tf.float32
    if mode == "tasks":
        assert len(labels) == 41 and specs["Smiling"].kind == "binary"
        assert set(np.unique(labels["Smiling"].numpy())) <= {0.0, 1.0}
    else:
        assert labels["attributes"].shape == (4, 40)
    assert labels["landmarks"].shape == (4, 10)
    heads = celeb_a.heads(["landmarks"], mode=mode)
    assert heads["landmarks"](tf.zeros([2, 8])).shape == (2, 10)


def _features(landmarks, attributes=("Smiling",)):
    return {"image": tf.zeros([218, 178, 3], tf.uint8),
            "landmarks": {k: tf.constant(v, tf.int64) for k, v in landmarks.items()},
            "attributes": {a: tf.constant(a in attributes) for a in celeb_a.ATTRIBUTES}}


LANDMARKS = {"lefteye_x": 69, "lefteye_y": 111, "righteye_x": 108, "righteye_y": 112,
             "nose_x": 88, "nose_y": 134, "leftmouth_x": 72, "leftmouth_y": 152,
             "rightmouth_x": 105, "rightmouth_y": 152}


def test_landmarks_are_normalised_by_image_size_and_attributes_are_0_1():
    image, labels = celeb_a.to_example(_features(LANDMARKS), ("landmarks", "Smiling", "Male"),
                                       image_size=16)
    assert image.shape == (16, 16, 3) and image.dtype == tf.uint8
    expected = [(69 + 0.5) / 178, (111 + 0.5) / 218, (108 + 0.5) / 178, (112 + 0.5) / 218,
                (88 + 0.5) / 178, (134 + 0.5) / 218, (72 + 0.5) / 178, (152 + 0.5) / 218,
                (105 + 0.5) / 178, (152 + 0.5) / 218]
    np.testing.assert_allclose(labels["landmarks"].numpy(), expected, rtol=1e-6)
    assert float(labels["Smiling"]) == 1.0 and float(labels["Male"]) == 0.0
    _, multi = celeb_a.to_example(_features(LANDMARKS), ("attributes",), image_size=16)
    vector = multi["attributes"].numpy()
    assert vector.shape == (40,) and vector[celeb_a.ATTRIBUTES.index("Smiling")] == 1.0
    assert vector.sum() == 1.0


def test_a_flip_mirrors_the_landmarks_with_the_image():
    image = tf.reshape(tf.range(4 * 6 * 3, dtype=tf.float32), [4, 6, 3])
    _, labels = celeb_a.to_example(_features(LANDMARKS), ("landmarks",), image_size=8)
    points = labels["landmarks"].numpy()
    mirrored = points.copy()
    for i, name in enumerate(celeb_a.LANDMARKS):  # Left and right swap, x -> 1 - x.
        partner = name.replace("left", "@").replace("right", "left").replace("@", "right")
        j = celeb_a.LANDMARKS.index(partner)
        mirrored[i] = 1.0 - points[j] if name.endswith("_x") else points[j]
    flips = 0
    for s in range(20):
        out_image, out = celeb_a._random_mirror((image, labels), tf.constant([s, 7], tf.int64))
        if np.array_equal(out_image.numpy(), image.numpy()):
            np.testing.assert_allclose(out["landmarks"].numpy(), points)
        else:
            flips += 1
            np.testing.assert_array_equal(out_image.numpy(), image.numpy()[:, ::-1])
            np.testing.assert_allclose(out["landmarks"].numpy(), mirrored, rtol=1e-6)
    assert 0 < flips < 20  # 20 draws with p = 1/2: both outcomes (fails with p = 2e-6).


def test_unknown_split_task_and_mode_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"celeb_a has no split 'valid' .*\['train', "
                                         r"'validation', 'test'\]"):
        celeb_a.load("valid", batch_size=4, training=False)
    with pytest.raises(ValueError, match=r"celeb_a has no task 'Smile'; its tasks are "
                                         r"\['5_o_Clock_Shadow', .*'landmarks'\]"):
        celeb_a.load("train", batch_size=4, training=True, tasks=["Smiling", "Smile"])
    with pytest.raises(ValueError, match=r"no task 'Smiling'; its tasks are \['attributes', "
                                         r"'landmarks'\]"):
        celeb_a.load("train", batch_size=4, training=True, tasks=["Smiling"], mode="multilabel")
    with pytest.raises(ValueError, match=r"mode must be one of \['tasks', 'multilabel'\]; "
                                         r"got 'binary'"):
        celeb_a.tasks(mode="binary")


def test_failed_download_says_how_to_provide_the_data(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(pipeline.DatasetUnavailableError) as raised:
        celeb_a.load("train", batch_size=4, training=True, data_dir=str(tmp_path))
    message = str(raised.value)
    assert "Dataset 'celeb_a' is not prepared in data_dir" in message
    assert str(tmp_path) in message and "ConnectionError" in message
    assert "machine with network access" in message
    assert f"{tmp_path}/downloads/manual/" in message and "img_align_celeba.zip" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize("mode", celeb_a.MODES)
def test_experiment_trains_two_steps_and_evaluates(tmp_path, mode):
    script = experiment_scripts.load("celeb_a")
    exp = script.make_experiment(mode=mode, image_size=16)
    tasks = ("Smiling", "landmarks") if mode == "tasks" else None
    results = experiment_scripts.run_on_mock_data(exp, tmp_path, tasks=tasks)
    assert set(results) == set(tasks or celeb_a.MULTILABEL_TASKS)
    assert all(math.isfinite(v) for values in results.values() for v in values.values())


def test_default_experiment_has_all_41_tasks(tmp_path):
    script = experiment_scripts.load("celeb_a")
    results = experiment_scripts.run_on_mock_data(script.EXPERIMENT, tmp_path, train_steps=1,
                                                  eval_every=1, checkpoint_every=1)
    assert set(results) == set(celeb_a.TASKS) and len(results) == 41
