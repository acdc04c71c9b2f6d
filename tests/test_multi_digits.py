import hashlib
import itertools
import os
import random
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import mtl  # noqa: F401  (registers multi_digits)
from mtl.data import multi_digits, pipeline


def _take(split, n, variant="side_by_side"):
    """The first `n` examples of `split` of `variant`."""
    return [ex for _, ex in itertools.islice(multi_digits.generate(split, variant=variant), n)]


_FIELDS = ("image", "left", "right", "sum", "source_ids")
# sha256 of every example of `generate(split, variant=...)`. The side-by-side train and test
# digests were computed with multi_digits 1.0.0 (before the validation split and the overlap
# config): the data that earlier results were measured on. The others are those of 1.1.0, which
# the overlap measurements in the README used.
_GENERATED = {
    ("side_by_side", "train"): "3e4980a4d4b120da5fecef6034264904eee60adfbb0cfba514e990c3fc059892",
    ("side_by_side", "test"): "f14f5e4cda6d37e923b8bf6493d108e16fa980a3aaaed6648fb8da88d3752dbe",
    ("side_by_side", "validation"):
        "7783fa764ebb01decd1f14c5b2776c757b2c5416ecb10d0eaf3e64a844844437",
    ("overlap", "train"): "c44fd3bda1584055f0c511dc3db938663f9590db06d3285d71bee89d424dfad8",
    ("overlap", "validation"): "d077e89b88476ae1d2009b83228f5c36ace562e0fd3b4370f3047734f1945e01",
    ("overlap", "test"): "eea2f383f76400abd81737f4f357b9251af226b5d2eb05e109171d35e7b4ed7a"}
# The same for the prepared side-by-side splits in their file order (1.0.0).
_PREPARED_1_0_0 = {
    "train": "6e5a817a8c83f586f90e6298363b633a5ec75b34877964f21e8507793f04c9e9",
    "test": "78926d4d7e12cea2cae8201904f3d08b3081802803a7c06d782dc2cdc3857bdd"}


def _generated_digest(split, variant):
    digest = hashlib.sha256()
    for index, ex in multi_digits.generate(split, variant=variant):
        digest.update(np.int64(index).tobytes())
        for key in _FIELDS:
            digest.update(np.asarray(ex[key]).tobytes())
    return digest.hexdigest()


def _prepared(split, data_dir, name="multi_digits"):
    return tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False,
                                   batch_size=-1))


def _prepared_digest(split, data_dir):
    features = _prepared(split, data_dir)
    digest = hashlib.sha256()
    for key in _FIELDS:
        digest.update(np.ascontiguousarray(features[key]).tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("variant", multi_digits.VARIANTS)
@pytest.mark.parametrize("split", multi_digits.SPLITS)
def test_generation_is_deterministic(variant, split):
    a, b = _take(split, 50, variant), _take(split, 50, variant)
    for ea, eb in zip(a, b):
        for key in _FIELDS:
            np.testing.assert_array_equal(ea[key], eb[key])


@pytest.mark.parametrize("variant,split", sorted(_GENERATED))
def test_examples_are_those_pinned(variant, split):
    # Side by side, train and test are the examples of version 1.0.0.
    assert _generated_digest(split, variant) == _GENERATED[variant, split]


def test_labels_match_the_digits_drawn():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for ex in _take("test", 100):
        left, right = ex["source_ids"]
        assert ex["left"] == targets[left] and ex["right"] == targets[right]
        assert ex["sum"] == ex["left"] + ex["right"]
        assert ex["image"].shape == (16, 32, 1) and ex["image"].max() > 0
        # The left digit lies in the left half, the right digit in the right half.
        assert ex["image"][:, :16].max() > 0 and ex["image"][:, 16:].max() > 0


@pytest.mark.parametrize("variant", multi_digits.VARIANTS)
def test_test_source_images_are_apart_from_train_and_validation(variant):
    pools = multi_digits.source_indices(1797)
    assert not set(pools["train"]) & set(pools["test"])
    assert len(pools["train"]) + len(pools["test"]) == 1797
    ids = {split: {int(i) for ex in _take(split, 2000, variant) for i in ex["source_ids"]}
           for split in multi_digits.SPLITS}
    assert ids["train"] <= set(pools["train"]) and ids["validation"] <= set(pools["train"])
    assert ids["test"] <= set(pools["test"]) and ids["test"] and ids["validation"]
    # Validation has its own seed: its pairs and placements are not train's.
    train = {(tuple(ex["source_ids"]), ex["image"].tobytes())
             for ex in _take("train", 12_000, variant)}
    validation = [(tuple(ex["source_ids"]), ex["image"].tobytes())
                  for ex in _take("validation", 2000, variant)]
    assert len(validation) == 2000 and not [v for v in validation if v in train]


def test_tfds_load_works_offline(digits_data_dir):
    ds = tfds.load("multi_digits", split="test", data_dir=digits_data_dir)
    assert ds.cardinality().numpy() == 2000
    example = next(iter(tfds.as_numpy(ds.take(1))))
    assert example["image"].dtype == np.uint8 and example["image"].shape == (16, 32, 1)
    assert 0 <= example["left"] <= 9
    builder = tfds.builder("multi_digits", data_dir=digits_data_dir)
    assert builder.builder_config.name == "side_by_side" and str(builder.version) == "1.1.0"
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
        "train": 12_000, "validation": 2000, "test": 2000}


def test_the_default_config_holds_the_train_and_test_files_of_version_1_0_0(digits_data_dir):
    # What the experiments read, in the order they read it (file order, then a seeded shuffle).
    for split, expected in _PREPARED_1_0_0.items():
        assert _prepared_digest(split, digits_data_dir) == expected, split
    validation = _prepared("validation", digits_data_dir, "multi_digits/side_by_side")
    generated = {ex["image"].tobytes() + ex["source_ids"].tobytes()
                 for ex in _take("validation", 2000)}
    assert {image.tobytes() + ids.tobytes() for image, ids in
            zip(validation["image"], validation["source_ids"])} == generated


def _overlap_layouts(example, images):
    """Every placement that redraws `example`'s image as the pixel-wise maximum of its two
    source digits upscaled 2x, the left one's top-left corner at 0..4 px from the canvas's
    top-left corner per axis and the right one's bottom-right corner at 0..4 px from the
    bottom-right corner: [(left corner, right corner, left layer, right layer)]."""
    def layers(image, corners):
        digit = np.kron(image, np.ones((2, 2), np.uint8))
        canvases = np.zeros((len(corners), 24, 24), np.uint8)
        for k, (y, x) in enumerate(corners):
            canvases[k, y:y + 16, x:x + 16] = digit
        return canvases

    left_corners = list(itertools.product(range(5), repeat=2))
    right_corners = list(itertools.product(range(4, 9), repeat=2))
    lefts = layers(images[example["source_ids"][0]], left_corners)
    rights = layers(images[example["source_ids"][1]], right_corners)
    redrawn = np.maximum(lefts[:, None], rights[None])
    match = (redrawn == example["image"][..., 0]).all(axis=(2, 3))
    return [(left_corners[i], right_corners[j], lefts[i], rights[j])
            for i, j in zip(*np.nonzero(match))]


def test_overlap_draws_the_two_labelled_digits_crossing_on_one_canvas():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    shares_ink, covered = [], []
    for ex in _take("test", 200, "overlap"):
        left, right = ex["source_ids"]
        assert ex["left"] == digits.target[left] and ex["right"] == digits.target[right]
        assert ex["sum"] == ex["left"] + ex["right"]
        assert ex["image"].shape == (24, 24, 1) and ex["image"].dtype == np.uint8
        layouts = _overlap_layouts(ex, images)
        assert len(layouts) == 1, layouts  # One placement, never both digits at one place.
        left_corner, right_corner, left_ink, right_ink = layouts[0]
        assert left_corner != right_corner
        both = (left_ink > 0) & (right_ink > 0)
        shares_ink.append(both.any())
        covered.append(both.sum() / min((left_ink > 0).sum(), (right_ink > 0).sum()))
    # Side by side the two digits share no pixel (0 and 0 here). Overlapping, their strokes
    # cross in 199 of these 200 examples and cover on average 0.37 of the smaller digit's ink
    # (measured); a layout whose digits only touched at the edges would fail both bounds.
    assert np.mean(shares_ink) >= 0.95
    assert np.mean(covered) >= 0.3


def test_overlap_config_loads_offline(overlap_data_dir):
    builder = tfds.builder("multi_digits/overlap", data_dir=overlap_data_dir)
    assert builder.info.features["image"].shape == (24, 24, 1)
    assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
        "train": 12_000, "validation": 2000, "test": 2000}
    test = _prepared("test", overlap_data_dir, "multi_digits/overlap")
    generated = {ex["image"].tobytes() + ex["source_ids"].tobytes()
                 for ex in _take("test", 2000, "overlap")}
    assert {image.tobytes() + ids.tobytes()
            for image, ids in zip(test["image"], test["source_ids"])} == generated
    image, labels = next(iter(multi_digits.load("validation", batch_size=8, training=False,
                                                 tasks=("right",), data_dir=overlap_data_dir,
                                                 variant="overlap")))
    assert image.shape == (8, 24, 24, 1) and set(labels) == {"right"}
    validation = _prepared("validation", overlap_data_dir, "multi_digits/overlap")
    np.testing.assert_array_equal(image.numpy(),
                                  validation["image"][:8].astype(np.float32) / np.float32(255))


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
    with pytest.raises(ValueError, match=r"no split 'valid'; its splits are \['train', "
                                         r"'validation', 'test'\]"):
        multi_digits.load("valid", batch_size=8, training=False)
    with pytest.raises(ValueError, match=r"no variant 'stacked'; its variants are "
                                         r"\['side_by_side', 'overlap'\]"):
        multi_digits.load("train", batch_size=8, training=False, variant="stacked")
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


def test_processes_preparing_the_dataset_at_once_take_turns(tmp_path):
    """Runs of a sweep started together (scripts/compare.py --parallel=2) prepare the dataset
    at once: each would write its own temporary folder, and all but the first fail when the
    first renames its own into place. They take turns on a lock in the data folder."""
    data_dir = str(tmp_path / "data")
    code = ("import mtl; from mtl.data import multi_digits; "
            f"multi_digits.load('test', batch_size=8, training=False, data_dir={data_dir!r}, "
            "variant='overlap'); print('loaded')")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "loaded" in stdout, stderr[-3000:]
    builder = tfds.builder("multi_digits/overlap", data_dir=data_dir)
    assert builder.is_prepared()
    # The lock is exclusive across processes while one holds it.
    with pipeline.preparation_lock(builder):
        lock = os.path.join(data_dir, ".multi_digits.overlap.lock")
        probe_code = ("import fcntl, sys; f = open(sys.argv[1], 'a')\n"
                      "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                      "except OSError:\n    print('held')")
        probe = subprocess.run([sys.executable, "-c", probe_code, lock], capture_output=True,
                               text=True, timeout=60)
        assert probe.stdout.strip() == "held", probe.stderr
        with pipeline.preparation_lock(builder):  # Re-entered in the same process: no wait.
            pass
