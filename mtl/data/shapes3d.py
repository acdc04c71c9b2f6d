"""`shapes3d` through TFDS: six independent factors of procedurally rendered 3D scenes.

TFDS features: `image` uint8 [64, 64, 3]; for each factor F of `FACTORS`, `label_F` (class id)
and `value_F` (the factor's value). 480,000 images, every combination of the factors once; one
split, `train` (TFDS stores it in shuffled order, so `TRAIN_SPLIT` / `EVAL_SPLIT`, a 90/10 cut,
are random, disjoint subsets).

Two modes (`mode=`):
  - "classification": task F predicts `label_F`, int64 [] (`NUM_VALUES[F]` classes);
  - "regression": task F predicts `value_F`, float32 [], mapped linearly to about [0, 1] by
    `VALUE_RANGES` (hues 0..0.9 in steps of 0.1, scale 0.75..1.25, shape 0..3, orientation
    -30..30 degrees), so that no factor's squared error dominates because of its unit.
Images are scaled to [0, 1]; there is no augmentation (a flip or shift would change the
orientation and the scene).

The first `load` downloads about 255 MB through TFDS into `data_dir`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from mtl.data import pipeline, task_specs
from mtl.data.task_specs import TaskSpec
from mtl.errors import UsageError

NAME = "shapes3d"
IMAGE_SHAPE = (64, 64, 3)
FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
TASKS = FACTORS
NUM_VALUES = {"floor_hue": 10, "wall_hue": 10, "object_hue": 10, "scale": 8, "shape": 4,
              "orientation": 15}
VALUE_RANGES = {"floor_hue": (0.0, 1.0), "wall_hue": (0.0, 1.0), "object_hue": (0.0, 1.0),
                "scale": (0.75, 1.25), "shape": (0.0, 3.0), "orientation": (-30.0, 30.0)}
MODES = ("classification", "regression")
SPLITS = ("train",)
TRAIN_SPLIT = "train[:90%]"
EVAL_SPLIT = "train[90%:]"


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"{NAME}: mode must be one of {list(MODES)}; got {mode!r}.")
    return mode


def task_specs_for(mode: str = "classification") -> dict:
    """`{factor: TaskSpec}` of `mode`."""
    if _check_mode(mode) == "classification":
        return {f: TaskSpec("classification", NUM_VALUES[f]) for f in FACTORS}
    return {f: TaskSpec("regression", 1) for f in FACTORS}


TASK_SPECS = task_specs_for("classification")


def tasks(names: Sequence[str] | None = None, *, mode: str = "classification",
          weights: Mapping[str, float] | None = None):
    """`mtl.Task`s: cross-entropy with accuracy, or MSE with MAE (regression mode)."""
    return task_specs.build_tasks(task_specs_for(mode), names, weights=weights, dataset=NAME)


def heads(names: Sequence[str] | None = None, *, mode: str = "classification",
          **head_options) -> dict:
    return task_specs.build_heads(task_specs_for(mode), names, dataset=NAME, **head_options)


def _normalised_value(features: dict, factor: str) -> tf.Tensor:
    low, high = VALUE_RANGES[factor]
    return (tf.cast(features[f"value_{factor}"], tf.float32) - low) / (high - low)


def to_example(features: dict, tasks: Sequence[str] = TASKS, mode: str = "classification"):
    """TFDS features -> (image uint8 [64, 64, 3], {factor: label of `mode`})."""
    if mode == "classification":
        labels = {t: features[f"label_{t}"] for t in tasks}
    else:
        labels = {t: _normalised_value(features, t) for t in tasks}
    return features["image"], labels


def _preprocess(element):
    image, labels = element
    return pipeline.to_float_image(image), labels


def examples(split: str, *, training: bool, tasks: Sequence[str] = TASKS,
             mode: str = "classification", data_dir: str | None = None,
             seed: int | None = None, cache: bool = False, download: bool = True,
             input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """One epoch of unbatched `(image float32 [64, 64, 3], {factor: label})` (shuffled when
    training). `cache=True` keeps the uint8 images in memory (about 5.3 GB for TRAIN_SPLIT).
    With `input_context`, of this input pipeline's part of the split (`pipeline.input_part`)."""
    _check_mode(mode)
    tasks = pipeline.check_tasks(NAME, tasks, TASKS)
    pipeline.check_split(NAME, split, SPLITS)
    ds = pipeline.load_tfds(NAME, split, data_dir=data_dir, shuffle_files=training, seed=seed,
                            download=download, input_context=input_context)
    ds = ds.map(lambda f: to_example(f, tasks, mode), num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.prepare_examples(ds, training=training, seed=seed, cache=cache,
                                     preprocess=_preprocess)


def load(split: str, *, batch_size: int, training: bool, tasks: Sequence[str] = TASKS,
         data_dir: str | None = None, seed: int | None = None, **options) -> tf.data.Dataset:
    """Batches of `(image float32 [b, 64, 64, 3], {factor: label [b]})`.

    training=True: endless, shuffled with `seed`, fixed-size batches; False: one pass.
    `options`: `mode`, `cache`, `download`, `input_context` of `examples`.
    """
    pipeline.check_batch_size(batch_size)
    ds = examples(split, training=training, tasks=tasks, data_dir=data_dir, seed=seed, **options)
    return pipeline.batch_examples(ds, batch_size=batch_size, training=training)
