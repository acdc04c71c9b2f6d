"""Training on tasks whose labels come from different datasets.

Two ways, both producing batches in the one format the train step reads,
`(features, {every task: label}, {every task: sample_weight})`, where an example carries a
weight of 1 for the task whose dataset it came from and 0 (label zeros) for every other task.
The step averages each task's loss over the examples that carry its label (`mtl.step.task_losses`),
so a task absent from a batch contributes 0.

1. Mixture batches, `mix(...)`: every batch mixes examples of all tasks, each drawn from task
   t's dataset with probability `rates[t]` (`tf.data.Dataset.sample_from_datasets`, seeded).
   Works with the plain `Trainer.fit(mix(...), steps)`.

2. Task sampling, a `TaskSchedule` (`task_schedule(...)`) + `task_datasets(...)`: each step
   trains one task on a batch from that task's dataset; the schedule says which task at each
   step. The draw for a step depends only on `(seed, step)`, so a resumed run continues with
   the same tasks from its restored global step, and each task's input where it stopped (its
   iterator is saved in the checkpoint on one replica; otherwise the batches the schedule
   already drew for it are skipped). `Trainer.fit` takes both:

       schedule = mtl.data.mixing.task_schedule("annealed", sizes, num_epochs=10,
                                                steps_per_epoch=1000, seed=0)
       datasets = mtl.data.mixing.task_datasets(per_task_examples, batch_size=64, seed=0)
       trainer.fit(datasets, steps, task_schedule=schedule)

   The trainer has one iterator per task and one compiled train loop for every task (all
   per-task batches have the same structure, so nothing retraces). Between compiled calls it
   asks the schedule for the tasks of the next steps (`task_indices(step, n)`) and runs the
   steps up to the next change of task in one call, on that task's iterator: which task trains
   is decided in Python, never inside the compiled loop. A loop of one's own can do the same
   with `schedule.task(step)` and `next(iterators[task])` over `task_iterators(...)`.

Rates (`rates=` of `mix`, see `mixing_rates`): "proportional" (r_t = N_t / sum N), "uniform"
(1 / T), `{"temperature": T}` (r_t proportional to N_t ** (1 / T), as in T5: T=1 is
proportional, large T approaches uniform), or an explicit `{task: rate}` (normalised to sum 1).
Sizes N_t come from the datasets' cardinality or an explicit `sizes` dict.
"""

from __future__ import annotations

import abc
import math
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from mtl.data import pipeline
from mtl.errors import UsageError

RATE_NAMES = ("proportional", "uniform")
SCHEDULE_KINDS = ("uniform", "proportional", "annealed")


# ------------------------------------------------------------------------- sizes and rates
def dataset_sizes(datasets: Mapping[str, tf.data.Dataset],
                  sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """`{task: number of examples}`: `sizes` if given (checked), else each dataset's cardinality.

    Raises a ValueError naming the dataset whose size is unknown (after `filter`) or infinite
    (after `repeat`) when `sizes` is None.
    """
    tasks = list(datasets)
    if sizes is not None:
        _check_same_tasks("sizes", sizes, tasks)
        for task, size in sizes.items():
            if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
                raise UsageError(f"sizes[{task!r}] must be an int >= 1; got {size!r}.")
        return {t: int(sizes[t]) for t in tasks}
    result = {}
    for task, ds in datasets.items():
        cardinality = int(ds.cardinality())
        if cardinality < 0:
            what = "infinite" if cardinality == tf.data.INFINITE_CARDINALITY else "unknown"
            raise UsageError(
                f"The size of task {task!r}'s dataset is {what} (cardinality {cardinality}); "
                "pass sizes={task: number of examples, ...} or explicit rates, or give the "
                "dataset before repeat() / with tf.data.experimental.assert_cardinality(n).")
        if cardinality == 0:
            raise UsageError(f"Task {task!r}'s dataset is empty.")
        result[task] = cardinality
    return result


def _check_same_tasks(what: str, given: Mapping, tasks: Sequence[str]) -> None:
    if not isinstance(given, Mapping):
        raise UsageError(f"{what} must be a dict {{task: value}} over the tasks {list(tasks)}; "
                         f"got {given!r}.")
    missing = [t for t in tasks if t not in given]
    extra = [t for t in given if t not in tasks]
    if missing or extra:
        raise UsageError(f"{what} must name exactly the tasks {list(tasks)}; "
                         f"missing {missing}, extra {extra} (got {dict(given)}).")


def mixing_rates(rates, sizes: Mapping[str, int] | None = None, *,
                 tasks: Sequence[str] | None = None) -> dict[str, float]:
    """`{task: probability}` summing to 1.

    `rates`: "proportional" | "uniform" | {"temperature": T} | {task: rate >= 0}. `sizes`
    (`{task: N}`) is needed for "proportional" and temperature; `tasks` names the tasks when
    `sizes` is not given.
    """
    if tasks is None:
        if sizes is None:
            raise UsageError("mixing_rates needs the task names: pass sizes or tasks.")
        tasks = list(sizes)
    tasks = list(tasks)

    def need_sizes(kind):
        if sizes is None:
            raise UsageError(f"rates={kind!r} needs the size of every task's dataset; pass "
                             "sizes={task: N} or datasets of known cardinality.")
        return np.array([float(sizes[t]) for t in tasks])

    if isinstance(rates, str):
        if rates == "uniform":
            values = np.ones(len(tasks))
        elif rates == "proportional":
            values = need_sizes(rates)
        else:
            raise UsageError(f"Unknown rates {rates!r}; expected one of {list(RATE_NAMES)}, "
                             "{'temperature': T} or a dict {task: rate}.")
    elif isinstance(rates, Mapping) and set(rates) == {"temperature"} \
            and "temperature" not in tasks:
        temperature = rates["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0 or math.isinf(temperature):
            raise UsageError(f"rates temperature must be a finite number > 0; got "
                             f"{temperature!r}.")
        values = need_sizes(rates) ** (1.0 / temperature)
    elif isinstance(rates, Mapping):
        _check_same_tasks("rates", rates, tasks)
        values = []
        for task in tasks:
            rate = rates[task]
            if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) \
                    or not rate >= 0 or math.isinf(rate):
                raise UsageError(f"rates[{task!r}] must be a finite number >= 0; got {rate!r}.")
            values.append(float(rate))
        values = np.array(values)
        if values.sum() <= 0:
            raise UsageError(f"rates are all zero ({dict(rates)}); at least one task needs a "
                             "rate > 0.")
    else:
        raise UsageError(f"rates must be 'proportional', 'uniform', {{'temperature': T}} or a "
                         f"dict {{task: rate}}; got {rates!r}.")
    values = values / values.sum()
    return {t: float(v) for t, v in zip(tasks, values)}


def rates_from_string(text: str):
    """Parses a command-line rates value: "proportional", "uniform", "temperature=2" or
    "left=0.7,sum=0.3" (for `mix(rates=...)`)."""
    text = text.strip()
    if text in RATE_NAMES:
        return text
    try:
        pairs = dict(item.split("=", 1) for item in text.split(","))
        pairs = {k.strip(): float(v) for k, v in pairs.items()}
    except ValueError:
        raise UsageError(f"Cannot read rates {text!r}; expected 'proportional', 'uniform', "
                         "'temperature=T' or 'task=rate,task=rate'.") from None
    return pairs


def is_rates_string(text: str) -> bool:
    """True when `rates_from_string` can read `text` (a flag validator)."""
    try:
        rates_from_string(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------- element structure
def _check_inputs(datasets: Mapping[str, tf.data.Dataset]) -> dict:
    """Checks the datasets' elements; returns `{task: label TensorSpec}`."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise UsageError(f"datasets must be a non-empty dict {{task: tf.data.Dataset}}; got "
                         f"{datasets!r}.")
    label_specs, first = {}, None
    for task, ds in datasets.items():
        if not isinstance(ds, tf.data.Dataset):
            raise UsageError(f"datasets[{task!r}] must be a tf.data.Dataset; got {type(ds)}.")
        spec = ds.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3) \
                or not isinstance(spec[1], dict):
            raise UsageError(f"Task {task!r}'s dataset must yield unbatched (features, {{task: "
                             f"label}}) examples; its elements are {spec}.")
        if task not in spec[1]:
            raise UsageError(f"Task {task!r}'s dataset has no label {task!r}; its labels are "
                             f"{sorted(spec[1])}.")
        label = spec[1][task]
        if not isinstance(label, tf.TensorSpec) or not label.shape.is_fully_defined():
            raise UsageError(f"Task {task!r}'s label must be a tensor of fully known shape per "
                             f"example (unbatched data); got {label}.")
        label_specs[task] = label
        features = tf.nest.map_structure(lambda s: (tuple(s.shape.as_list()), s.dtype.name),
                                         spec[0])
        if first is None:
            first = (task, features)
        elif features != first[1]:
            raise UsageError(
                f"Every mixed dataset must have features of one shape and dtype: task {task!r}'s "
                f"features are {features} but task {first[0]!r}'s are {first[1]} (shape, dtype). "
                "Map them to one shape and dtype before mixing (e.g. tf.image.resize, tf.cast "
                "to float32).")
    return label_specs


def _fill_labels(task: str, label_specs: dict):
    """Element fn: keeps `task`'s label (weight 1, or its own sample weight), zeros elsewhere."""
    def fill(features, labels, weights=None):
        out_labels, out_weights = {}, {}
        for other, spec in label_specs.items():
            if other == task:
                out_labels[other] = labels[task]
                own = 1.0 if weights is None or task not in weights else weights[task]
                out_weights[other] = tf.reshape(tf.cast(own, tf.float32), [])
            else:
                out_labels[other] = tf.zeros(spec.shape, spec.dtype)
                out_weights[other] = tf.constant(0.0, tf.float32)
        return features, out_labels, out_weights
    return fill


def _with_all_labels(datasets: Mapping[str, tf.data.Dataset], shuffle_buffer: int | None,
                     seed: int | None, repeat: bool) -> dict:
    label_specs = _check_inputs(datasets)
    result = {}
    for index, (task, ds) in enumerate(datasets.items()):
        if shuffle_buffer:
            task_seed = None if seed is None else seed + index
            ds = ds.shuffle(shuffle_buffer, seed=task_seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        result[task] = ds.map(_fill_labels(task, label_specs),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return result


# ------------------------------------------------------------------------- mixture batches
def mix(datasets: Mapping[str, tf.data.Dataset], *, batch_size: int, rates="proportional",
        seed: int | None = None, sizes: Mapping[str, int] | None = None,
        shuffle_buffer: int | None = None, repeat: bool = True) -> tf.data.Dataset:
    """Mixture batches of `(features, {task: label}, {task: sample_weight [b]})`.

    Args:
      datasets: `{task: dataset of unbatched (features, {task: label}) examples}` (a third
        element `{task: weight}` is honoured for the own task); labels of other tasks that a
        dataset carries are dropped. All features must have one structure, shape and dtype.
      batch_size: examples per batch; batches keep a fixed size (`drop_remainder=True`).
      rates: how often each task's dataset is drawn from (module docstring, `mixing_rates`).
      seed: seeds the draws (and the shuffles); the same seed gives the same batches.
      sizes: `{task: N}` when cardinality is unknown or infinite (needed by "proportional" and
        temperature rates only).
      shuffle_buffer: shuffles each dataset (reshuffled each epoch) when set.
      repeat: repeat each dataset forever (the default, for training). With False the mixture
        ends when all datasets are exhausted, and the rates drift as datasets run out.
    """
    pipeline.check_batch_size(batch_size)
    _check_inputs(datasets)
    needs_sizes = rates == "proportional" or (isinstance(rates, Mapping)
                                              and set(rates) == {"temperature"})
    task_sizes = dataset_sizes(datasets, sizes) if needs_sizes or sizes is not None else None
    probabilities = mixing_rates(rates, task_sizes, tasks=list(datasets))
    filled = _with_all_labels(datasets, shuffle_buffer, seed, repeat)
    active = [t for t in filled if probabilities[t] > 0]
    mixture = tf.data.Dataset.sample_from_datasets(
        [filled[t] for t in active], weights=[probabilities[t] for t in active], seed=seed)
    return mixture.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- task sampling
def task_datasets(datasets: Mapping[str, tf.data.Dataset], *, batch_size: int,
                  seed: int | None = None, shuffle_buffer: int | None = None,
                  repeat: bool = True) -> dict[str, tf.data.Dataset]:
    """`{task: endless batches of that task alone}` for task sampling.

    Every batch has the structure of `mix`'s: `(features, {every task: label}, {every task:
    weight [b]})` with weight 1 for its own task and 0 for the others, so one compiled step
    serves every task (`Trainer.fit` feeds it from one task's iterator at a time). Batches keep
    a fixed size.
    """
    pipeline.check_batch_size(batch_size)
    filled = _with_all_labels(datasets, shuffle_buffer, seed, repeat)
    return {task: ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            for task, ds in filled.items()}


def task_iterators(datasets: Mapping[str, tf.data.Dataset], *, batch_size: int,
                   seed: int | None = None, shuffle_buffer: int | None = None) -> dict:
    """`{task: iterator}` over `task_datasets(...)`; the iterators can be saved in a
    `tf.train.Checkpoint` for an exact resume."""
    return {task: iter(ds) for task, ds in task_datasets(
        datasets, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer).items()}


class TaskSchedule(abc.ABC):
    """Which task trains at each step: a draw from `probabilities(step)` keyed by (seed, step).

    The draw for step s is `numpy.random.default_rng([seed, s]).random()` mapped through the
    cumulative probabilities: it depends on nothing else, so a schedule rebuilt after a restart
    gives the same task for every step.
    """

    def __init__(self, tasks: Sequence[str], *, seed: int = 0):
        tasks = tuple(tasks)
        if not tasks or any(not isinstance(t, str) or not t for t in tasks):
            raise UsageError(f"A task schedule needs a non-empty list of task names; got "
                             f"{list(tasks)!r}.")
        if len(set(tasks)) != len(tasks):
            raise UsageError(f"Task names repeat in {list(tasks)}.")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise UsageError(f"seed must be an int >= 0; got {seed!r}.")
        self.tasks = tasks
        self.seed = int(seed)

    @abc.abstractmethod
    def probabilities(self, step: int) -> np.ndarray:
        """The probability of each task (in `self.tasks` order) at `step`; float64 [T]."""

    def task_index(self, step: int) -> int:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise UsageError(f"step must be an int >= 0; got {step!r}.")
        cumulative = np.cumsum(self.probabilities(step))
        draw = np.random.default_rng([self.seed, int(step)]).random() * cumulative[-1]
        return int(min(np.searchsorted(cumulative, draw, side="right"), len(self.tasks) - 1))

    def task(self, step: int) -> str:
        """The name of the task that trains at `step`."""
        return self.tasks[self.task_index(step)]

    def task_indices(self, start: int, num_steps: int) -> np.ndarray:
        """Task indices for steps `start .. start + num_steps - 1`, int32 [num_steps]
        (`Trainer.fit` reads them to run the steps up to the next change of task at once)."""
        return np.array([self.task_index(s) for s in range(start, start + num_steps)], np.int32)


class UniformSchedule(TaskSchedule):
    """Every task with probability 1 / T at every step."""

    def probabilities(self, step: int) -> np.ndarray:
        del step
        return np.full(len(self.tasks), 1.0 / len(self.tasks))


class ProportionalSchedule(TaskSchedule):
    """Task t with probability N_t / sum_u N_u (its dataset's share of all examples)."""

    def __init__(self, sizes: Mapping[str, int], *, seed: int = 0):
        super().__init__(list(sizes), seed=seed)
        self.sizes = _check_sizes(sizes)

    def probabilities(self, step: int) -> np.ndarray:
        del step
        sizes = np.array([self.sizes[t] for t in self.tasks], np.float64)
        return sizes / sizes.sum()


class AnnealedSchedule(TaskSchedule):
    """Annealed sampling (Stickland & Murray 2019, "BERT and PALs"): p_t proportional to
    N_t ** alpha, alpha = 1 - 0.8 * (e - 1) / (E - 1), with e = 1..E the current epoch.

    Epoch e covers steps `(e - 1) * steps_per_epoch .. e * steps_per_epoch - 1`; training
    starts proportional (alpha = 1) and ends close to uniform (alpha = 0.2), which stays after
    epoch E. With E = 1, alpha = 1 throughout.
    """

    def __init__(self, sizes: Mapping[str, int], *, num_epochs: int, steps_per_epoch: int,
                 seed: int = 0):
        super().__init__(list(sizes), seed=seed)
        self.sizes = _check_sizes(sizes)
        for name, value in (("num_epochs", num_epochs), ("steps_per_epoch", steps_per_epoch)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be an int >= 1; got {value!r}.")
        self.num_epochs = int(num_epochs)
        self.steps_per_epoch = int(steps_per_epoch)

    def epoch(self, step: int) -> int:
        """The 1-based epoch e of `step`, at most E."""
        return min(step // self.steps_per_epoch + 1, self.num_epochs)

    def alpha(self, step: int) -> float:
        if self.num_epochs == 1:
            return 1.0
        return 1.0 - 0.8 * (self.epoch(step) - 1) / (self.num_epochs - 1)

    def probabilities(self, step: int) -> np.ndarray:
        sizes = np.array([self.sizes[t] for t in self.tasks], np.float64)
        weights = sizes ** self.alpha(step)
        return weights / weights.sum()


def _check_sizes(sizes: Mapping[str, int]) -> dict:
    if not isinstance(sizes, Mapping) or not sizes:
        raise UsageError(f"sizes must be a non-empty dict {{task: number of examples}}; got "
                         f"{sizes!r}.")
    return dataset_sizes({t: None for t in sizes}, sizes)


def task_schedule(kind: str, tasks_or_sizes, *, seed: int = 0, num_epochs: int | None = None,
                  steps_per_epoch: int | None = None) -> TaskSchedule:
    """A schedule by name: "uniform" (task names or sizes), "proportional" or "annealed"
    (sizes `{task: N}`; annealed also needs `num_epochs` and `steps_per_epoch`)."""
    if kind not in SCHEDULE_KINDS:
        raise UsageError(f"Unknown task schedule {kind!r}; expected one of "
                         f"{list(SCHEDULE_KINDS)}.")
    if kind == "uniform":
        return UniformSchedule(list(tasks_or_sizes), seed=seed)
    if not isinstance(tasks_or_sizes, Mapping):
        raise UsageError(f"A {kind} schedule needs sizes {{task: number of examples}}; got "
                         f"{tasks_or_sizes!r}.")
    if kind == "proportional":
        return ProportionalSchedule(tasks_or_sizes, seed=seed)
    if num_epochs is None or steps_per_epoch is None:
        raise UsageError("An annealed schedule needs num_epochs and steps_per_epoch.")
    return AnnealedSchedule(tasks_or_sizes, num_epochs=num_epochs,
                            steps_per_epoch=steps_per_epoch, seed=seed)
