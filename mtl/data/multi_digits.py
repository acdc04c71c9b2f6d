"""`multi_digits`: two handwritten digits on one canvas, for three tasks, with no download.

Built from scikit-learn's bundled handwritten digits (1,797 real 8x8 images, values 0..16), in
two variants, the builder configs of one TFDS builder:

- `side_by_side` (the default, `tfds.load("multi_digits")`): a 16x32 canvas, one digit in the
  left 16x16 half and one in the right, each at a random offset (0..8 px in each direction).
  The two digit tasks read disjoint pixels.
- `overlap` (`tfds.load("multi_digits/overlap")`): MultiMNIST in miniature, where the two
  tasks compete for the same pixels. Each digit is upscaled 2x (each pixel a 2x2 block) to
  16x16 and drawn on a 24x24 canvas (16 + 2 x 4, as MultiMNIST's 36 = 28 + 2 x 4): the left
  digit's top-left corner up to 4 px from the canvas's top-left corner, the right digit's
  bottom-right corner up to 4 px from the canvas's bottom-right corner (each offset uniform in
  0..4, per axis); where both land on the same place (both at (4, 4)) the offsets are drawn
  again, since which digit is "left" would be undefined. The digits are combined by the
  pixel-wise maximum. The right digit thus sits 0..8 px (0..4 source pixels, up to half a
  digit) right of and below the left one per axis: the two 16x16 boxes always share at least
  8x8 px, and in practice the strokes cross in almost every example (tests/test_multi_digits.py
  measures it). After MultiMNIST (Sabour et al. 2017, "Dynamic routing between capsules": two
  MNIST digits of different classes, each shifted up to 4 px in each direction on a 36x36
  canvas) as used for multi-task learning: Sener & Koltun 2018's loader puts the left digit at
  the top-left and the right one 6 px lower and further right on a 36x36 canvas, merges them by
  maximum and resizes to 28x28; the Pareto MTL line of work (Lin et al. 2019; the loader of Ma
  et al. 2020's Continuous Pareto MTL) shifts each digit at random by up to 4 px from its
  corner. Here, as in Sener & Koltun's loader, the two digits may show the same class, and
  nothing is resized (24x24 is already small). With the defaults of
  experiments/multi_digits_overlap.py (small_cnn, 3,000 steps), a single-task model reaches a
  test accuracy of 0.93 on `left` and 0.91 on `right` (0.97 and 0.99 side by side), the
  multi-task model with equal weighting 0.90 on both (one run each; README, "The multi_digits
  dataset").

Labels (both variants): `left` (0..9), `right` (0..9) and `sum` (left + right, 0..18, for
regression); `source_ids` are the two source images' indices. Splits: `train` (12,000),
`validation` (2,000) and `test` (2,000). The source images are split once (fixed permutation)
into a test pool (20%) and a training pool: train and validation examples are pairs of
training-pool images, test examples pairs of test-pool images, so that test never shares a
source image with train or validation. Validation draws its own pairs and offsets (its own
seed) from the training images: it shows handwriting the model has seen in new combinations and
places, so it reads somewhat higher than test; it is for choosing models, test for reporting.
Generation is deterministic: it draws only from its own seeded `np.random.RandomState`s,
and preparing the dataset leaves the process's global random state (Python's `random`, NumPy's)
as it was, so the run that prepares it and a run that only reads it build the same initial
weights under the same seed.

`import mtl` registers the TFDS builder, so `tfds.load("multi_digits", split="train")` works.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mtl.data import pipeline
from mtl.errors import UsageError

NAME = "multi_digits"
VARIANTS = ("side_by_side", "overlap")  # The builder configs; the first is the default.
IMAGE_SHAPES = {"side_by_side": (16, 32, 1), "overlap": (24, 24, 1)}
IMAGE_SHAPE = IMAGE_SHAPES["side_by_side"]
TASKS = ("left", "right", "sum")
SPLITS = ("train", "validation", "test")
_SOURCE_TEST_FRACTION = 0.2
_SPLIT_SIZES = {"train": 12_000, "validation": 2_000, "test": 2_000}
_SPLIT_POOLS = {"train": "train", "validation": "train", "test": "test"}  # Source images.
_SPLIT_SEEDS = {"side_by_side": {"train": 1, "test": 2, "validation": 3},
                "overlap": {"train": 4, "test": 5, "validation": 6}}
_OVERLAP_SCALE = 2  # Each 8x8 source digit becomes 16x16.
_OVERLAP_SHIFT = 4  # Largest offset of a digit from its corner, in canvas pixels.


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise UsageError(f"multi_digits has no variant {variant!r}; its variants are "
                         f"{list(VARIANTS)}.")
    return variant


def source_indices(num_images: int) -> dict:
    """Disjoint indices of the source images of the test split (`test`) and of the train and
    validation splits (`train`)."""
    order = np.random.RandomState(0).permutation(num_images)
    num_test = int(round(num_images * _SOURCE_TEST_FRACTION))
    return {"train": np.sort(order[num_test:]), "test": np.sort(order[:num_test])}


def _side_by_side(left: np.ndarray, right: np.ndarray, rng) -> np.ndarray:
    canvas = np.zeros(IMAGE_SHAPES["side_by_side"], np.uint8)
    for half, image in enumerate((left, right)):
        dy, dx = rng.randint(0, 9, size=2)  # 8x8 digit inside a 16x16 half.
        canvas[dy:dy + 8, half * 16 + dx: half * 16 + dx + 8, 0] = image
    return canvas


def _overlap(left: np.ndarray, right: np.ndarray, rng) -> np.ndarray:
    canvas = np.zeros(IMAGE_SHAPES["overlap"], np.uint8)
    size = 8 * _OVERLAP_SCALE
    while True:
        # Offsets (y, x) of the left digit from the top-left corner and of the right one from
        # the bottom-right corner; the top-left corner of each digit on the canvas.
        left_offset, right_offset = rng.randint(0, _OVERLAP_SHIFT + 1, size=(2, 2))
        left_at, right_at = left_offset, canvas.shape[0] - size - right_offset
        if tuple(left_at) != tuple(right_at):
            break
    for image, (y, x) in ((left, left_at), (right, right_at)):
        digit = image.repeat(_OVERLAP_SCALE, axis=0).repeat(_OVERLAP_SCALE, axis=1)
        np.maximum(canvas[y:y + size, x:x + size, 0], digit, out=canvas[y:y + size, x:x + size, 0])
    return canvas


_DRAW = {"side_by_side": _side_by_side, "overlap": _overlap}


def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images uint8 [1797, 8, 8] in 0..255 and targets int64 [1797]."""
    from sklearn.datasets import load_digits  # Needed only to build the dataset once.

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def generate(split: str, num_examples: int | None = None, *, variant: str = "side_by_side"):
    """Yields (index, example) for `split` of `variant`, the same every time."""
    images, targets = source_digits()
    pool = source_indices(len(images))[_SPLIT_POOLS[split]]
    rng = np.random.RandomState(_SPLIT_SEEDS[variant][split])
    draw = _DRAW[variant]
    for index in range(num_examples or _SPLIT_SIZES[split]):
        left, right = rng.choice(pool, size=2)
        yield index, {
            "image": draw(images[left], images[right], rng),
            "left": targets[left],
            "right": targets[right],
            "sum": np.float32(targets[left] + targets[right]),
            "source_ids": np.array([left, right], np.int64),
        }


class MultiDigits(tfds.core.GeneratorBasedBuilder):
    """Two scikit-learn digits on one canvas, side by side (the default config) or overlapping:
    tasks left, right (10 classes) and sum (0..18)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "A validation split (2,000 pairs of training source images, its own seed) and "
                 "the `overlap` config; the train and test examples of the default config "
                 "(`side_by_side`) are those of 1.0.0.",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="side_by_side",
                                description="A 16x32 canvas, one digit in each 16x16 half."),
        tfds.core.BuilderConfig(name="overlap",
                                description="A 24x24 canvas, the two digits upscaled to 16x16 "
                                            "and overlapping (MultiMNIST-style)."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "side_by_side"

    def download_and_prepare(self, *args, **kwargs):
        # TFDS draws from Python's global `random` while preparing (see preserved_random_state);
        # processes preparing it at once take turns (see preparation_lock).
        with pipeline.preparation_lock(self), pipeline.preserved_random_state():
            return super().download_and_prepare(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPES[self.builder_config.name],
                                              dtype=np.uint8),
                "left": tfds.features.ClassLabel(num_classes=10),
                "right": tfds.features.ClassLabel(num_classes=10),
                "sum": tfds.features.Scalar(dtype=np.float32),
                "source_ids": tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        yield from generate(split, variant=self.builder_config.name)


def to_example(features: dict, tasks=TASKS):
    """TFDS features -> (image float32 [height, width, 1] in [0, 1], {task: label})."""
    image = tf.cast(features["image"], tf.float32) / 255.0
    return image, {task: features[task] for task in tasks}


def load(split: str, *, batch_size: int, training: bool, tasks=TASKS, data_dir=None,
         seed: int | None = None, variant: str = "side_by_side",
         input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Batches of (image, {task: label}) of `variant` for the given tasks.

    training=True: endless, shuffled with `seed`, fixed-size batches; False: one pass.
    `input_context` (several input pipelines): only this pipeline's part of the split is read
    (`pipeline.input_part`).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"multi_digits has no task {unknown[0]!r}; its tasks are {list(TASKS)}.")
    if split not in SPLITS:
        raise UsageError(f"multi_digits has no split {split!r}; its splits are {list(SPLITS)}.")
    check_variant(variant)
    # The whole split (a few MB; or this pipeline's part) is read into memory once, in its file
    # order: the same stream a cached pipeline gives, without the cache's warning when a short
    # run stops mid-epoch.
    part = pipeline.input_part(split, input_context)
    pipeline.prepare(f"{NAME}/{variant}", data_dir)  # Processes at once take turns.
    features = tfds.as_numpy(tfds.load(f"{NAME}/{variant}", split=part, data_dir=data_dir,
                                       shuffle_files=False, batch_size=-1))
    ds = tf.data.Dataset.from_tensor_slices(features)
    ds = ds.map(lambda f: to_example(f, tuple(tasks)), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        return pipeline.train_pipeline(ds, batch_size=batch_size, seed=seed, cache=False)
    return pipeline.eval_pipeline(ds, batch_size=batch_size, cache=False)
