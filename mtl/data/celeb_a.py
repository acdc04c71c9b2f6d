"""`celeb_a` through TFDS: 40 binary face attributes and 5 facial landmarks.

TFDS features: `image` uint8 [218, 178, 3] (aligned and cropped faces), `attributes` (40 bools),
`landmarks` (10 ints: x and y pixel coordinates of both eyes, the nose and both mouth corners).
Splits: `train` (162,770), `validation` (19,867), `test` (19,962).

Two modes (`mode=`):
  - "tasks": every attribute is its own binary task, named as in CelebA ("Smiling", "Male",
    "5_o_Clock_Shadow", ...), label float32 0/1 [] (40 one-unit logit heads), plus `landmarks`;
  - "multilabel": one task `attributes`, label float32 0/1 [40] in `ATTRIBUTES` order (one
    40-unit logit head), plus `landmarks`.
`landmarks` is a regression task, float32 [10] in `LANDMARKS` order, each coordinate normalised
by the image size at pixel centres, (x + 0.5) / 178 and (y + 0.5) / 218, so values lie in (0, 1)
whatever `image_size` the image is resized to (the resize is not aspect-preserving, so the
normalised coordinates stay exact). Images are resized to `image_size` x `image_size` (default
64, as in Sener & Koltun 2018) and scaled to [0, 1]. Training flips images left-right at random
and mirrors the landmarks with them (x -> 1 - x, left <-> right).

The first `load` downloads about 1.4 GB through TFDS from Google Drive, which often refuses
automated downloads (quota). Manual download: get `img_align_celeba.zip`,
`list_eval_partition.txt`, `list_attr_celeba.txt`, `list_landmarks_align_celeba.txt` and
`identity_CelebA.txt` from the CelebA site and put them in `<data_dir>/downloads/manual/`; TFDS
then prepares the dataset from those files without network.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from mtl.data import pipeline, task_specs
from mtl.data.task_specs import TaskSpec
from mtl.errors import UsageError

NAME = "celeb_a"
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
LANDMARKS = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
             "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")
MODES = ("tasks", "multilabel")
TASKS = ATTRIBUTES + ("landmarks",)  # mode="tasks"
MULTILABEL_TASKS = ("attributes", "landmarks")  # mode="multilabel"
SPLITS = ("train", "validation", "test")
SOURCE_SIZE = (218, 178)  # (height, width) of the TFDS images.
DEFAULT_IMAGE_SIZE = 64
# Where each landmark coordinate goes when the image is mirrored: left eye <-> right eye, ...
_MIRRORED = ("righteye_x", "righteye_y", "lefteye_x", "lefteye_y", "nose_x", "nose_y",
             "rightmouth_x", "rightmouth_y", "leftmouth_x", "leftmouth_y")
_MIRROR_INDEX = [LANDMARKS.index(name) for name in _MIRRORED]
_IS_X = [name.endswith("_x") for name in LANDMARKS]
_MANUAL = ("CelebA's Google Drive links often refuse automated downloads. Manual download: "
           "get img_align_celeba.zip, list_eval_partition.txt, list_attr_celeba.txt, "
           "list_landmarks_align_celeba.txt and identity_CelebA.txt from "
           "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and put them in "
           "{data_dir}/downloads/manual/, then run again.")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"{NAME}: mode must be one of {list(MODES)}; got {mode!r}.")
    return mode


def task_names(mode: str = "tasks") -> tuple[str, ...]:
    """The tasks of `mode`: 40 attributes + landmarks, or `attributes` + `landmarks`."""
    return TASKS if _check_mode(mode) == "tasks" else MULTILABEL_TASKS


def task_specs_for(mode: str = "tasks") -> dict:
    """`{task: TaskSpec}` of `mode`."""
    specs = {"landmarks": TaskSpec("regression", len(LANDMARKS))}
    if _check_mode(mode) == "tasks":
        return {**{a: TaskSpec("binary", 1) for a in ATTRIBUTES}, **specs}
    return {"attributes": TaskSpec("binary", len(ATTRIBUTES)), **specs}


TASK_SPECS = task_specs_for("tasks")


def image_shape(image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[int, int, int]:
    return (image_size, image_size, 3)


def tasks(names: Sequence[str] | None = None, *, mode: str = "tasks",
          weights: Mapping[str, float] | None = None):
    """`mtl.Task`s: binary cross-entropy on logits with accuracy for attributes, MSE with MAE
    for landmarks."""
    return task_specs.build_tasks(task_specs_for(mode), names, weights=weights, dataset=NAME)


def heads(names: Sequence[str] | None = None, *, mode: str = "tasks", **head_options) -> dict:
    return task_specs.build_heads(task_specs_for(mode), names, dataset=NAME, **head_options)


def _landmarks(features: dict) -> tf.Tensor:
    height, width = SOURCE_SIZE
    values = [(tf.cast(features["landmarks"][name], tf.float32) + 0.5)
              / (width if name.endswith("_x") else height) for name in LANDMARKS]
    return tf.stack(values)  # [10]


def _attribute(features: dict, name: str) -> tf.Tensor:
    return tf.cast(features["attributes"][name], tf.float32)


def to_example(features: dict, tasks: Sequence[str] = TASKS,
               image_size: int = DEFAULT_IMAGE_SIZE):
    """TFDS features -> (image uint8 [size, size, 3], {task: label}) (labels as documented)."""
    labels = {}
    for task in tasks:
        if task == "landmarks":
            labels[task] = _landmarks(features)
        elif task == "attributes":
            labels[task] = tf.stack([_attribute(features, a) for a in ATTRIBUTES])
        else:
            labels[task] = _attribute(features, task)
    return pipeline.resize_uint8(features["image"], (image_size, image_size)), labels


def _random_mirror(element, seed):
    """Flips the image left-right with probability 1/2, mirroring the landmarks with it."""
    image, labels = element
    flip = tf.random.stateless_uniform([], seed=seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[-2]), lambda: image)
    if "landmarks" in labels:
        points = labels["landmarks"]
        mirrored = tf.gather(points, _MIRROR_INDEX)
        mirrored = tf.where(tf.constant(_IS_X), 1.0 - mirrored, mirrored)
        labels = {**labels, "landmarks": tf.where(flip, mirrored, points)}
    return image, labels


def _preprocess(element):
    image, labels = element
    return pipeline.to_float_image(image), labels


def examples(split: str, *, training: bool, tasks: Sequence[str] | None = None,
             mode: str = "tasks", data_dir: str | None = None, seed: int | None = None,
             image_size: int = DEFAULT_IMAGE_SIZE, augment: bool = True, cache: bool = False,
             download: bool = True, input_context: tf.distribute.InputContext | None = None
             ) -> tf.data.Dataset:
    """One epoch of unbatched `(image float32 [s, s, 3] in [0, 1], {task: label})`; with
    `input_context`, of this input pipeline's part of the split (`pipeline.input_part`).

    `tasks`: a subset of `task_names(mode)` (all when None). `cache=True` keeps the resized
    uint8 images in memory (about 2 GB for `train` at 64x64).
    """
    available = task_names(mode)
    tasks = pipeline.check_tasks(NAME, available if tasks is None else tasks, available)
    pipeline.check_split(NAME, split, SPLITS)
    if not isinstance(image_size, int) or image_size < 1:
        raise UsageError(f"{NAME}: image_size must be an int >= 1; got {image_size!r}.")
    ds = pipeline.load_tfds(NAME, split, data_dir=data_dir, shuffle_files=training, seed=seed,
                            download=download, how_to_provide=_MANUAL,
                            input_context=input_context)
    ds = ds.map(lambda f: to_example(f, tasks, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.prepare_examples(ds, training=training, seed=seed, cache=cache,
                                     augment=_random_mirror if augment else None,
                                     preprocess=_preprocess)


def load(split: str, *, batch_size: int, training: bool, tasks: Sequence[str] | None = None,
         data_dir: str | None = None, seed: int | None = None, **options) -> tf.data.Dataset:
    """Batches of `(image float32 [b, s, s, 3], {task: label [b, ...]})`.

    training=True: endless, shuffled and augmented with `seed`, fixed-size batches; False: one
    pass. `options`: `mode`, `image_size`, `augment`, `cache`, `download`, `input_context`
    of `examples`.
    """
    pipeline.check_batch_size(batch_size)
    ds = examples(split, training=training, tasks=tasks, data_dir=data_dir, seed=seed, **options)
    return pipeline.batch_examples(ds, batch_size=batch_size, training=training)
