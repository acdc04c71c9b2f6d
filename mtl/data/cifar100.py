"""`cifar100` through TFDS: tasks `fine` (100 classes) and `coarse` (20 superclasses).

TFDS features: `image` uint8 [32, 32, 3], `label` (100 classes), `coarse_label` (20). Splits:
`train` (50,000) and `test` (10,000). Examples: `(image float32 [32, 32, 3], {"fine": int64,
"coarse": int64})`, the image standardised with CIFAR-100's channel mean and std. Training adds
the standard augmentation (4-pixel zero padding, random 32x32 crop, random left-right flip).

The first `load` downloads about 160 MB through TFDS into `data_dir` (then reads it from there).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from mtl.data import pipeline, task_specs
from mtl.data.task_specs import TaskSpec

NAME = "cifar100"
IMAGE_SHAPE = (32, 32, 3)
TASKS = ("fine", "coarse")
SPLITS = ("train", "test")
TASK_SPECS = {"fine": TaskSpec("classification", 100), "coarse": TaskSpec("classification", 20)}
MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100 train set, per channel, images in [0, 1].
STD = (0.2673, 0.2564, 0.2762)
_LABEL_KEYS = {"fine": "label", "coarse": "coarse_label"}


def tasks(names: Sequence[str] | None = None, *, weights: Mapping[str, float] | None = None):
    """`mtl.Task`s (sparse categorical cross-entropy on logits, accuracy) for `names` (all)."""
    return task_specs.build_tasks(TASK_SPECS, names, weights=weights, dataset=NAME)


def heads(names: Sequence[str] | None = None, **head_options) -> dict:
    """`{task: classification head}` for `names` (all when None)."""
    return task_specs.build_heads(TASK_SPECS, names, dataset=NAME, **head_options)


def to_example(features: dict, tasks: Sequence[str] = TASKS):
    """TFDS features -> (image uint8 [32, 32, 3], {task: int64 class id})."""
    return features["image"], {t: features[_LABEL_KEYS[t]] for t in tasks}


def _preprocess(element):
    image, labels = element
    return pipeline.standardize(image, MEAN, STD), labels


def examples(split: str, *, training: bool, tasks: Sequence[str] = TASKS,
             data_dir: str | None = None, seed: int | None = None, augment: bool = True,
             cache: bool = True, download: bool = True,
             input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """One epoch of unbatched `(image, {task: label})` (shuffled and augmented when training);
    with `input_context`, of this input pipeline's part of the split (`pipeline.input_part`)."""
    tasks = pipeline.check_tasks(NAME, tasks, TASKS)
    pipeline.check_split(NAME, split, SPLITS)
    ds = pipeline.load_tfds(NAME, split, data_dir=data_dir, shuffle_files=training, seed=seed,
                            download=download, input_context=input_context)
    ds = ds.map(lambda f: to_example(f, tasks), num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.prepare_examples(
        ds, training=training, seed=seed, cache=cache,
        augment=pipeline.on_features(pipeline.flip_and_crop) if augment else None,
        preprocess=_preprocess)


def load(split: str, *, batch_size: int, training: bool, tasks: Sequence[str] = TASKS,
         data_dir: str | None = None, seed: int | None = None, **options) -> tf.data.Dataset:
    """Batches of `(image float32 [b, 32, 32, 3], {task: int64 [b]})`.

    training=True: endless, shuffled and augmented with `seed`, fixed-size batches; False: one
    pass. `options`: `augment`, `cache`, `download`, `input_context` of `examples`.
    """
    pipeline.check_batch_size(batch_size)
    ds = examples(split, training=training, tasks=tasks, data_dir=data_dir, seed=seed, **options)
    return pipeline.batch_examples(ds, batch_size=batch_size, training=training)
