"""`multi_digits`: two handwritten digits side by side, for three tasks, with no download.

Built from scikit-learn's bundled handwritten digits (1,797 real 8x8 images, values 0..16). Each
example is a 16x32 canvas: one digit in the left 16x16 half, one in the right, each at a random
offset. Labels: `left` (0..9), `right` (0..9) and `sum` (left + right, 0..18, for regression).
The source images are split once (fixed permutation) so that train and test examples never
share a source image; generation is deterministic. Generation draws only from its own seeded
`np.random.RandomState`s, and preparing the dataset leaves the process's global random state
(Python's `random`, NumPy's) as it was, so the run that prepares it and a run that only reads it
build the same initial weights under the same seed.

`import mtl` registers the TFDS builder, so `tfds.load("multi_digits", split="train")` works.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mtl.data import pipeline
from mtl.config import UsageError

IMAGE_SHAPE = (16, 32, 1)
TASKS = ("left", "right", "sum")
_SOURCE_TEST_FRACTION = 0.2
_SPLIT_SIZES = {"train": 12_000, "test": 2_000}
_SPLIT_SEEDS = {"train": 1, "test": 2}


def source_indices(num_images: int) -> dict:
    """Disjoint indices of the source images used by each split."""
    order = np.random.RandomState(0).permutation(num_images)
    num_test = int(round(num_images * _SOURCE_TEST_FRACTION))
    return {"train": np.sort(order[num_test:]), "test": np.sort(order[:num_test])}


def generate(split: str, num_examples: int | None = None):
    """Yields (index, example) for `split`, the same every time."""
    from sklearn.datasets import load_digits  # Needed only to build the dataset once.

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    targets = digits.target.astype(np.int64)
    pool = source_indices(len(images))[split]
    rng = np.random.RandomState(_SPLIT_SEEDS[split])
    for index in range(num_examples or _SPLIT_SIZES[split]):
        left, right = rng.choice(pool, size=2)
        canvas = np.zeros(IMAGE_SHAPE, np.uint8)
        for half, source in ((0, left), (1, right)):
            dy, dx = rng.randint(0, 9, size=2)  # 8x8 digit inside a 16x16 half.
            canvas[dy:dy + 8, half * 16 + dx: half * 16 + dx + 8, 0] = images[source]
        yield index, {
            "image": canvas,
            "left": targets[left],
            "right": targets[right],
            "sum": np.float32(targets[left] + targets[right]),
            "source_ids": np.array([left, right], np.int64),
        }


class MultiDigits(tfds.core.GeneratorBasedBuilder):
    """Two scikit-learn digits side by side: tasks left, right (10 classes) and sum (0..18)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def download_and_prepare(self, *args, **kwargs):
        # TFDS draws from Python's global `random` while preparing (see preserved_random_state).
        with pipeline.preserved_random_state():
            return super().download_and_prepare(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "left": tfds.features.ClassLabel(num_classes=10),
                "right": tfds.features.ClassLabel(num_classes=10),
                "sum": tfds.features.Scalar(dtype=np.float32),
                "source_ids": tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in _SPLIT_SIZES}

    def _generate_examples(self, split):
        yield from generate(split)


def to_example(features: dict, tasks=TASKS):
    """TFDS features -> (image float32 [16, 32, 1] in [0, 1], {task: label})."""
    image = tf.cast(features["image"], tf.float32) / 255.0
    return image, {task: features[task] for task in tasks}


def load(split: str, *, batch_size: int, training: bool, tasks=TASKS, data_dir=None,
         seed: int | None = None,
         input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Batches of (image, {task: label}) for the given tasks.

    training=True: endless, shuffled with `seed`, fixed-size batches; False: one pass.
    `input_context` (several input pipelines): only this pipeline's part of the split is read
    (`pipeline.input_part`).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"multi_digits has no task {unknown[0]!r}; its tasks are {list(TASKS)}.")
    if split not in _SPLIT_SIZES:
        raise UsageError(f"multi_digits has no split {split!r}; its splits are "
                         f"{sorted(_SPLIT_SIZES)}.")
    # The whole split (a few MB; or this pipeline's part) is read into memory once, in its file
    # order: the same stream a
    # cached pipeline gives, without the cache's warning when a short run stops mid-epoch.
    part = pipeline.input_part(split, input_context)
    features = tfds.as_numpy(tfds.load("multi_digits", split=part, data_dir=data_dir,
                                       shuffle_files=False, batch_size=-1))
    ds = tf.data.Dataset.from_tensor_slices(features)
    ds = ds.map(lambda f: to_example(f, tuple(tasks)), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        return pipeline.train_pipeline(ds, batch_size=batch_size, seed=seed, cache=False)
    return pipeline.eval_pipeline(ds, batch_size=batch_size, cache=False)
