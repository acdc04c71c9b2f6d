"""The training input: iterators that continue where the run left off.

Three ways a run goes on, one rule each:
  * a resumed run (restored from a checkpoint): on one replica the iterator's position is
    restored from the checkpoint (`checkpoint_input`); otherwise (several replicas, whose
    distributed iterators TF cannot save, or `checkpoint_input=False`) the batches already
    consumed are skipped, exact for a deterministic pipeline (a dataset of global batches skips
    global batches; each pipeline of a per-replica function skips the batches its own replicas
    took);
  * a later `fit` call in the same process on the same data object: the stream goes on from
    where the previous call stopped, so `fit(data, 4); fit(data, 8)` trains on the batches that
    `fit(data, 8)` does;
  * a different data object: it is read from its start.

With a task schedule, `data` is `{task: dataset}` and each task has its own iterator, and
`next_run` says which iterator the next compiled call reads and for how many steps.
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
    """`data` as the strategy reads it.

    A dataset of global batches is split across the replicas: each replica gets its part of
    every global batch (a last batch that is smaller than the others, or smaller than the number
    of replicas, is split as evenly as it goes; a replica may get an empty part). Across
    workers this is tf.data's DATA auto-sharding, chosen here unless the dataset sets a policy
    of its own: TF's default (AUTO) shards by *file* when the pipeline reads files, which fails
    on a split stored in fewer files than there are workers ("Could not apply FILE based
    sharding") and, where it works, gives workers different numbers of batches. With DATA
    every worker reads the whole pipeline and keeps its part of each batch, so an evaluation
    sees every example once and the metrics, summed across replicas (totals and counts), are
    those of one process evaluating the whole dataset.
    """
    if not isinstance(data, tf.data.Dataset):
        return strategy.distribute_datasets_from_function(data)
    if strategy.num_replicas_in_sync == 1:
        return data
    return strategy.experimental_distribute_dataset(shard_by_data(data))


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with DATA auto-sharding, unless its options already name a policy."""
    policy = dataset.options().experimental_distribute.auto_shard_policy
    if policy != tf.data.experimental.AutoShardPolicy.AUTO:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """The `InputContext` that `strategy` gives this worker's input pipeline (pipelines, this
    one's id, replicas), as `distribute_datasets_from_function` passes it."""
    contexts = []
    strategy.distribute_datasets_from_function(
        lambda context: contexts.append(context) or tf.data.Dataset.range(1))
    return contexts[0]


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
        datasets = {t: self._one_pipeline(d) for t, d in
                    (data if isinstance(data, dict) else {None: data}).items()}
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

    def _one_pipeline(self, data):
        """On one replica a function is built here, into a dataset whose position can be saved
        (a fresh one: it starts its seeded stream, whatever read another built dataset)."""
        if self.strategy.num_replicas_in_sync == 1 and not isinstance(data, tf.data.Dataset):
            return data(input_context(self.strategy))
        return data

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
                data = lambda context: make(context).skip(  # noqa: E731
                    skip * local_replicas(context))
        return iter(distribute(self.strategy, data))


def next_run(iterators, task_schedule, step: int, n: int, steps_per_loop: int):
    """The iterator and number of steps of the next compiled call from `step`: at most `n` and
    `steps_per_loop`; with a task schedule (`iterators` is `{task: iterator}`), up to the next
    change of task, on that task's iterator."""
    n = min(steps_per_loop, n)
    if task_schedule is None:
        return iterators, n
    drawn = np.asarray(task_schedule.task_indices(step, n))
    changes = np.nonzero(drawn != drawn[0])[0]
    if changes.size:
        n = int(changes[0])
    return iterators[task_schedule.tasks[int(drawn[0])]], n


def local_replicas(context: tf.distribute.InputContext) -> int:
    """Replicas fed by one input pipeline: each step takes that many of its per-replica
    batches (2 mirrored replicas on one worker take 2 batches of its one pipeline a step)."""
    return context.num_replicas_in_sync // context.num_input_pipelines
