"""Input pipeline parts shared by every dataset.

Loading from TFDS with errors that say what to do (`load_tfds`), split and task checks, image
helpers (normalise, resize, seeded augmentation), and the order every dataset module follows:

    TFDS examples -> to_example (select labels, small uint8 image)
      -> cache (when it fits) -> shuffle (seeded, train) -> augment (seeded, train)
      -> preprocess (float32, normalised)                      = `prepare_examples`: one epoch
      -> repeat (train) -> batch (drop_remainder for training) -> prefetch = `batch_examples`

Caching comes before augmentation and normalisation so that the cache holds compact uint8 images
and every epoch draws fresh augmentations. Random augmentation uses stateless ops whose seeds come
from `tf.data.Dataset.random(seed)`, so a seeded pipeline gives the same batches every run (and
under XLA, which ignores the seeds of stateful random ops).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import urllib.parse
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mtl.errors import UsageError


class DatasetUnavailableError(UsageError):
    """A TFDS dataset is not prepared in the data folder and could not be downloaded.

    A ValueError, as other bad input: an experiment's `main` ends with its message.
    """


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    return batch_size


# --------------------------------------------------------------------------------- checks
_SPLIT_PART = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(\[[^\]]*\])?\s*$")


def split_names(split: str) -> list[str]:
    """The base split names in a TFDS split string: `"train[:90%]+test"` -> `["train", "test"]`."""
    if not isinstance(split, str) or not split.strip():
        raise UsageError(f"split must be a TFDS split string such as 'train' or 'train[:90%]'; "
                         f"got {split!r}.")
    names = []
    for part in split.split("+"):
        match = _SPLIT_PART.match(part)
        if not match:
            raise UsageError(f"split {split!r} is not a TFDS split string; expected names such "
                             "as 'train', optionally sliced ('train[:90%]', 'test[10:20]') and "
                             "joined with '+'.")
        names.append(match.group(1))
    return names


def check_split(dataset: str, split: str, splits: Sequence[str]) -> str:
    """Raises a ValueError naming the dataset's splits when `split` uses another one."""
    for name in split_names(split):
        if name not in splits:
            raise UsageError(f"{dataset} has no split {name!r} (in split={split!r}); its splits "
                             f"are {list(splits)} (slices such as 'train[:90%]' work too).")
    return split


def check_tasks(dataset: str, tasks, available: Sequence[str]) -> tuple[str, ...]:
    """The requested task names as a tuple; a ValueError names the dataset's tasks otherwise."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise UsageError(f"{dataset}: tasks must be a non-empty list of task names, a subset of "
                         f"{list(available)}; got {tasks!r}.")
    for task in tasks:
        if task not in available:
            raise UsageError(f"{dataset} has no task {task!r}; its tasks are {list(available)}.")
    duplicates = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if duplicates:
        raise UsageError(f"{dataset}: task {duplicates[0]!r} is requested more than once in "
                         f"{list(tasks)}.")
    return tuple(tasks)


# ------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restores Python's and NumPy's global random state on exit.

    Preparing a TFDS dataset draws from Python's global `random` (TFDS names its temporary
    `incomplete.XXXXXX` folder with `random.choice`), and Keras initialisers without an explicit
    seed draw their seeds from that same state. Without this guard, the run that prepares a
    dataset and a later run that only reads it would start from different weights under the
    same `keras.utils.set_random_seed`.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def preparation_lock(builder) -> Iterator[None]:
    """Held while `builder`'s dataset is prepared, so that processes preparing the same dataset
    at once (runs of a sweep started together, local workers) take turns: the first prepares,
    the others then find it prepared. Without it, each writes its own temporary folder and all
    but the first fail when the first renames its own into place. An exclusive `flock` on
    `<data_dir>/<name>.<config>.lock` (a local folder; elsewhere, e.g. gs://, no lock)."""
    root = str(builder.data_dir_root)
    try:
        import fcntl
    except ImportError:  # Not on POSIX: no lock.
        fcntl = None
    if fcntl is None or "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    config = getattr(builder.builder_config, "name", None)
    path = os.path.join(root, f".{builder.name}{'.' + config if config else ''}.lock")
    if path in _HELD_LOCKS:  # Re-entered in this process (flock would wait on itself).
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(path)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


_HELD_LOCKS: set = set()


def prepare(name: str, data_dir=None):
    """The TFDS builder of `name` in `data_dir`, its dataset downloaded and prepared if it was
    not: under `preparation_lock`, with a builder made inside the lock (one made before would
    not see what another process prepared meanwhile), leaving the global random state as it was
    (`preserved_random_state`)."""
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with preparation_lock(builder):
        builder = tfds.builder(name, data_dir=data_dir)
        with preserved_random_state():
            builder.download_and_prepare()
    return builder


def input_part(split: str, input_context: tf.distribute.InputContext | None):
    """The part of the TFDS `split` that one input pipeline reads (`split` itself when there is
    one pipeline or no context).

    With N input pipelines (workers), pipeline i reads the i-th of N parts of the split's
    examples (`tfds.even_splits`: sizes differ by at most one; a split such as 'train[:90%]' or
    'train+test' is cut the same way). TFDS reads such a part from the records it holds,
    skipping the others before parsing or decoding, whatever the number of files. TFDS stores
    each split in a shuffled order, so a contiguous part is a random sample of the split.
    """
    if input_context is None or input_context.num_input_pipelines == 1:
        return split
    count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    logging.info("Input pipeline %d of %d reads its part of split %r (1/%d of the examples).",
                 index + 1, count, split, count)
    return tfds.even_splits(split, n=count)[index]


def load_tfds(name: str, split: str, *, data_dir: str | None = None, shuffle_files: bool = False,
              seed: int | None = None, download: bool = True, how_to_provide: str = "",
              input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """`tfds` examples (feature dicts) of `name`/`split`, downloading and preparing when needed.

    When the dataset is not in `data_dir` and cannot be downloaded (no network, a quota, a
    checksum), raises `DatasetUnavailableError` saying which dataset, which folder and how to
    provide it, instead of the downloader's long trace. `download=False` fails at once when the
    dataset is not prepared (TFDS's downloader retries for minutes without network).
    `how_to_provide` is added to that message (e.g. the manual-download steps of a dataset), with
    `{data_dir}` replaced by the data folder.
    `shuffle_files` with `seed` reads the files in a seeded order (for training).
    `input_context` (several input pipelines): only this pipeline's part (`input_part`).
    Preparing leaves the process's global random state as it was (`preserved_random_state`);
    processes preparing the same dataset at once take turns (`prepare`).
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if download and not builder.is_prepared() and downloads_for_real(builder):
        unreachable = unreachable_download_hosts(builder)
        if unreachable:
            # TFDS's downloader would retry for minutes before giving up.
            raise DatasetUnavailableError(_unavailable_message(
                builder, name, ConnectionError(
                    f"cannot reach {', '.join(unreachable)} (checked before downloading)"),
                how_to_provide, download))
    if download:
        try:
            builder = prepare(name, data_dir)
        except Exception as error:  # noqa: BLE001  Any failure here means "data not available".
            raise DatasetUnavailableError(
                _unavailable_message(builder, name, error, how_to_provide, download)) from None
    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle_files else None
    try:
        return builder.as_dataset(split=input_part(split, input_context),
                                  shuffle_files=shuffle_files, read_config=read_config)
    except AssertionError as error:  # TFDS asserts that the data was prepared.
        raise DatasetUnavailableError(
            _unavailable_message(builder, name, error, how_to_provide, download)) from None


def downloads_for_real(builder) -> bool:
    """False when TFDS's own downloader is replaced (e.g. by `tfds.testing.mock_data`), so
    that nothing is probed for data that will not be downloaded."""
    function = type(builder).download_and_prepare
    return getattr(function, "__module__", "").startswith("tensorflow_datasets.core")


def unreachable_download_hosts(builder, timeout: float = 3.0) -> list[str]:
    """The hosts the dataset downloads from, when none of them answers a TCP connection within
    `timeout` seconds (an empty list when one does, or when the builder declares no URLs)."""
    hosts = sorted({urllib.parse.urlparse(url).hostname for url in (builder.url_infos or {})}
                   - {None})
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return []
        except OSError:
            continue
    return hosts


def _unavailable_message(builder, name: str, error: Exception, how_to_provide: str,
                         download: bool) -> str:
    data_dir = str(builder.data_dir_root)
    cause = " ".join(str(error).split())
    if len(cause) > 300:
        cause = cause[:300] + " ..."
    what = "could not be downloaded" if download else "download=False was given"
    lines = [
        f"Dataset {name!r} is not prepared in data_dir {data_dir!r} and {what} "
        f"({type(error).__name__}: {cause}).",
        "To provide it, on a machine with network access run",
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"",
        f"(or `tfds build {name} --data_dir=DIR`), then copy DIR/{name} to "
        f"{data_dir}/{name} on this machine, or point --data_dir (TFDS_DATA_DIR) at a folder "
        "that holds it.",
    ]
    if how_to_provide:
        lines.append(how_to_provide.strip().replace("{data_dir}", data_dir))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- images
def to_float_image(image: tf.Tensor) -> tf.Tensor:
    """uint8 [.., H, W, C] in 0..255 -> float32 in [0, 1] (float input is only cast)."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def standardize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image in [0, 1] - mean) / std, per channel; float32."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (to_float_image(image) - mean) / std


def resize_uint8(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Resizes a uint8 image to `size` (height, width), antialiased, and keeps it uint8 (compact
    to cache)."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Left-right flip with probability 1/2 (stateless; `seed` int [2])."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def random_crop_with_padding(image: tf.Tensor, seed: tf.Tensor, padding: int = 4) -> tf.Tensor:
    """Zero-pads `padding` pixels on each side and crops back to the original size at a random
    offset (the standard CIFAR augmentation; stateless, `seed` int [2])."""
    height, width = image.shape[-3], image.shape[-2]
    padded = tf.image.pad_to_bounding_box(image, padding, padding, height + 2 * padding,
                                          width + 2 * padding)
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)


def flip_and_crop(image: tf.Tensor, seed: tf.Tensor, padding: int = 4) -> tf.Tensor:
    """`random_crop_with_padding` then `random_flip`, with independent seeds derived from one."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    return random_flip(random_crop_with_padding(image, seeds[0], padding), seeds[1])


def on_features(fn: Callable) -> Callable:
    """Lifts `fn(features, seed) -> features` to `(element, seed) -> element` for `augment`."""
    def apply(element, seed):
        return (fn(element[0], seed), *element[1:])
    return apply


# -------------------------------------------------------------------------------- pipeline
def prepare_examples(ds: tf.data.Dataset, *, training: bool, seed: int | None = None,
                     cache: bool = True, shuffle_buffer: int = 10_000,
                     augment: Callable | None = None, preprocess: Callable | None = None
                     ) -> tf.data.Dataset:
    """Examples -> one epoch of ready, unbatched examples (what `mtl.data.mix` takes).

    `ds` yields `(features, labels)` examples (uint8 images are fine). Training: cached, then
    shuffled with `seed` (a new order each epoch when repeated), then `augment(element, seed)`
    with a stateless seed int64 [2] per example (fresh per epoch, reproducible from `seed`).
    Always: `preprocess(element) -> element` last (e.g. uint8 -> float32). Not repeated.
    """
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment is not None:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(augment,
                                                      num_parallel_calls=tf.data.AUTOTUNE)
    if preprocess is not None:
        ds = ds.map(lambda *element: preprocess(element), num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def batch_examples(ds: tf.data.Dataset, *, batch_size: int, training: bool) -> tf.data.Dataset:
    """Training: repeat forever and batch with `drop_remainder=True` (equal per-replica batches;
    a compiled or XLA step never retraces on a ragged last batch). Eval: one pass, the last batch
    may be smaller. Prefetched either way."""
    check_batch_size(batch_size)
    if training:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


def train_pipeline(ds: tf.data.Dataset, *, batch_size: int, seed: int | None = None,
                   shuffle_buffer: int = 10_000, cache: bool = True,
                   augment: Callable | None = None, preprocess: Callable | None = None
                   ) -> tf.data.Dataset:
    """Examples -> endless shuffled batches of `batch_size`.

    `drop_remainder=True` keeps every batch the same size: per-replica batches stay equal under
    distribution and a compiled (or XLA) step never retraces on a ragged last batch. The shuffle
    is seeded and reshuffles each epoch, so a seeded run sees the same order every time.
    """
    check_batch_size(batch_size)
    ds = prepare_examples(ds, training=True, seed=seed, cache=cache,
                          shuffle_buffer=shuffle_buffer, augment=augment, preprocess=preprocess)
    return batch_examples(ds, batch_size=batch_size, training=True)


def eval_pipeline(ds: tf.data.Dataset, *, batch_size: int, cache: bool = True,
                  preprocess: Callable | None = None) -> tf.data.Dataset:
    """Examples -> one pass of batches (the last one may be smaller)."""
    check_batch_size(batch_size)
    ds = prepare_examples(ds, training=False, cache=cache, preprocess=preprocess)
    return batch_examples(ds, batch_size=batch_size, training=False)
