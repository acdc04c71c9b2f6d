"""The training input: iterators that continue where the run left off.

Three ways a run goes on, one rule each:
  * a resumed run (restored from a checkpoint): on one replica the iterator's position is
    restored from the checkpoint (`checkpoint_input`); otherwise (several replicas, whose
    distributed iterators TF cannot save, or `checkpoint_input=False`) the batches already
    consumed are skipped, exact for a deterministic pipeline;
  * a later `fit` call in the same process on the same data object: the stream goes on from
    where the previous call stopped, so `fit(data, 4); fit(data, 8)` trains on the batches that
    `fit(data, 8)` does;
  * a different data object: it is read from its start.

With a task schedule, `data` is `{task: dataset}` and each task has its own iterator.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import tensorflow as tf
from absl import logging

#: What `fit` and `evaluate` take: a dataset of *global* batches, or a function
#: `(tf.distribute.InputContext) -> dataset of per-replica batches` for
#: `strategy.distribute_datasets_from_function` (each input pipeline reads its own shard).
Data = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]


def distribute(strategy: tf.distribute.Strategy, data: Data):
    """`data` as the strategy reads it."""
    if not isinstance(data, tf.data.Dataset):
        return strategy.distribute_datasets_from_function(data)
    if strategy.num_replicas_in_sync == 1:
        return data
    return strategy.experimental_distribute_dataset(data)


class InputState:
    """Creates, saves and restores the position of the training input's iterators."""

    def __init__(self, strategy, checkpointer, *, micro_batches: int, checkpoint_input: bool):
        self.strategy = strategy
        self.checkpointer = checkpointer
        self.micro_batches = micro_batches
        self.checkpoint_input = checkpoint_input
        self._data = None
        self._iterators = None
        self._resume_pending = True  # The first stream of a restored run continues it.

    def iterators(self, data, task_schedule, global_step: int):
        """An iterator over `data` (`{task: iterator}` with a task schedule) positioned at
        `global_step`, by the rules above."""
        if data is self._data:
            return self._iterators
        if self._data is not None:
            logging.info("fit was given other data than before: reading it from its start.")
        resume = self._resume_pending and self.checkpointer.restored_path is not None
        self._resume_pending = False
        consumed = self._consumed(data, task_schedule, global_step) if resume else None
        tasks = list(data) if isinstance(data, dict) else [None]
        datasets = data if isinstance(data, dict) else {None: data}
        saves = all(self._saves(ds) for ds in datasets.values())
        if saves:
            iterators = {t: iter(distribute(self.strategy, datasets[t])) for t in tasks}
            tracked = iterators if isinstance(data, dict) else iterators[None]
            if resume and self.checkpointer.restore_input(tracked):
                logging.info("Input pipeline restored to step %d.", global_step)
            elif consumed and any(consumed.values()):
                iterators = {t: self._skipping(datasets[t], consumed[t]) for t in tasks}
            tracked = iterators if isinstance(data, dict) else iterators[None]
            self.checkpointer.track("input", tracked)  # Saved with every checkpoint from now on.
        else:
            iterators = {t: self._skipping(datasets[t], (consumed or {}).get(t, 0))
                         for t in tasks}
        self._data = data
        self._iterators = iterators if isinstance(data, dict) else iterators[None]
        return self._iterators

    def _saves(self, dataset) -> bool:
        return (isinstance(dataset, tf.data.Dataset) and self.checkpoint_input
                and self.strategy.num_replicas_in_sync == 1)

    def _consumed(self, data, task_schedule, global_step: int) -> dict:
        """Micro-batches each iterator has given up to `global_step`."""
        k = self.micro_batches
        if not isinstance(data, dict):
            return {None: global_step * k}
        drawn = np.asarray(task_schedule.task_indices(0, global_step)) if global_step else []
        return {task: int(np.sum(np.asarray(drawn) == i)) * k
                for i, task in enumerate(task_schedule.tasks)}

    def _skipping(self, data, skip: int):
        if skip:
            logging.info("Skipping %d batches already trained on.", skip)
            if isinstance(data, tf.data.Dataset):
                data = data.skip(skip)
            else:
                make = data
                data = lambda context: make(context).skip(skip)  # noqa: E731
        return iter(distribute(self.strategy, data))
