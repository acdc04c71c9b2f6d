"""`smallnorb` through TFDS: object category and three pose/lighting tasks on toy photographs.

TFDS features: `image`, `image2` (the two cameras of a stereo pair, uint8 [96, 96, 1]),
`label_category` (5), `label_elevation` (9), `label_azimuth` (18), `label_lighting` (6),
`instance` (10). Splits: `train` and `test` (24,300 each; the test set shows other object
instances of the same categories). Tasks (all classification, int64 labels):
`category` (5), `elevation` (9), `azimuth` (18), `lighting` (6).

Examples: `(image float32 [s, s, c] in [0, 1], {task: int64})` with `s = image_size` (default
96, the native size) and `c` = 1, or 2 with `stereo=True` (both cameras as channels). Training
shifts the image at random (zero padding of s/16 pixels and a random crop); there is no flip,
which would change the azimuth.

The first `load` downloads about 250 MB through TFDS into `data_dir`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from mtl.data import pipeline, task_specs
from mtl.data.task_specs import TaskSpec
from mtl.errors import UsageError

NAME = "smallnorb"
TASKS = ("category", "elevation", "azimuth", "lighting")
SPLITS = ("train", "test")
TASK_SPECS = {"category": TaskSpec("classification", 5),
              "elevation": TaskSpec("classification", 9),
              "azimuth": TaskSpec("classification", 18),
              "lighting": TaskSpec("classification", 6)}
SOURCE_SIZE = 96
_LABEL_KEYS = {task: f"label_{task}" for task in TASKS}


def image_shape(image_size: int | None = None, stereo: bool = False) -> tuple[int, int, int]:
    size = image_size or SOURCE_SIZE
    return (size, size, 2 if stereo else 1)


def tasks(names: Sequence[str] | None = None, *, weights: Mapping[str, float] | None = None):
    """`mtl.Task`s (sparse categorical cross-entropy on logits, accuracy) for `names` (all)."""
    return task_specs.build_tasks(TASK_SPECS, names, weights=weights, dataset=NAME)


def heads(names: Sequence[str] | None = None, **head_options) -> dict:
    return task_specs.build_heads(TASK_SPECS, names, dataset=NAME, **head_options)


def to_example(features: dict, tasks: Sequence[str] = TASKS, image_size: int | None = None,
               stereo: bool = False):
    """TFDS features -> (image uint8 [s, s, 1 or 2], {task: int64 class id})."""
    image = features["image"]
    if stereo:
        image = tf.concat([image, features["image2"]], axis=-1)
    if image_size and image_size != SOURCE_SIZE:
        image = pipeline.resize_uint8(image, (image_size, image_size))
    return image, {t: features[_LABEL_KEYS[t]] for t in tasks}


def _preprocess(element):
    image, labels = element
    return pipeline.to_float_image(image), labels


def examples(split: str, *, training: bool, tasks: Sequence[str] = TASKS,
             data_dir: str | None = None, seed: int | None = None, image_size: int | None = None,
             stereo: bool = False, augment: bool = True, cache: bool = True,
             download: bool = True, input_context: tf.distribute.InputContext | None = None
             ) -> tf.data.Dataset:
    """One epoch of unbatched `(image, {task: label})` (shuffled and augmented when training);
    with `input_context`, of this input pipeline's part of the split (`pipeline.input_part`)."""
    tasks = pipeline.check_tasks(NAME, tasks, TASKS)
    pipeline.check_split(NAME, split, SPLITS)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise UsageError(f"{NAME}: image_size must be None (96) or an int >= 8; got "
                         f"{image_size!r}.")
    padding = max(1, image_shape(image_size)[0] // 16)
    shift = pipeline.on_features(
        lambda image, seed: pipeline.random_crop_with_padding(image, seed, padding))
    ds = pipeline.load_tfds(NAME, split, data_dir=data_dir, shuffle_files=training, seed=seed,
                            download=download, input_context=input_context)
    ds = ds.map(lambda f: to_example(f, tasks, image_size, stereo),
                num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.prepare_examples(ds, training=training, seed=seed, cache=cache,
                                     augment=shift if augment else None, preprocess=_preprocess)


def load(split: str, *, batch_size: int, training: bool, tasks: Sequence[str] = TASKS,
         data_dir: str | None = None, seed: int | None = None, **options) -> tf.data.Dataset:
    """Batches of `(image float32 [b, s, s, c], {task: int64 [b]})`.

    training=True: endless, shuffled and augmented with `seed`, fixed-size batches; False: one
    pass. `options`: `image_size`, `stereo`, `augment`, `cache`, `download`, `input_context`
    of `examples`.
    """
    pipeline.check_batch_size(batch_size)
    ds = examples(split, training=training, tasks=tasks, data_dir=data_dir, seed=seed, **options)
    return pipeline.batch_examples(ds, batch_size=batch_size, training=training)
