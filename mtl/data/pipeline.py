"""Input pipeline parts shared by every dataset: shuffle, repeat, batch, prefetch."""

from __future__ import annotations

import tensorflow as tf


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    return batch_size


def train_pipeline(ds: tf.data.Dataset, *, batch_size: int, seed: int | None = None,
                   shuffle_buffer: int = 10_000, cache: bool = True) -> tf.data.Dataset:
    """Examples -> endless shuffled batches of `batch_size`.

    `drop_remainder=True` keeps every batch the same size: per-replica batches stay equal under
    distribution and a compiled (or XLA) step never retraces on a ragged last batch. The shuffle
    is seeded and reshuffles each epoch, so a seeded run sees the same order every time.
    """
    check_batch_size(batch_size)
    if cache:
        ds = ds.cache()
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(ds: tf.data.Dataset, *, batch_size: int, cache: bool = True
                  ) -> tf.data.Dataset:
    """Examples -> one pass of batches (the last one may be smaller)."""
    check_batch_size(batch_size)
    if cache:
        ds = ds.cache()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
