"""`TaskSpec`: what a dataset's task needs from a model (head, loss, metrics, label format).

Each dataset module lists one `TaskSpec` per task it provides; `build_tasks` and `build_heads`
turn them into the `mtl.Task`s and heads of a `MultiTaskModel`, so that an experiment does not
restate class counts and losses. Label formats (per example, before batching):

    kind            head output         label                         loss
    classification  logits [units]      int64 class id []             sparse categorical CE
    binary          logits [units]      float32 0/1 [] or [units]     binary CE
    regression      values [units]      float32 [] or [units]         mean squared error
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import keras
import tensorflow as tf

from mtl import heads as heads_lib
from mtl.data import pipeline
from mtl.tasks import Task
from mtl.errors import UsageError

KINDS = ("classification", "binary", "regression")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task's output: `kind` (one of `KINDS`) and `units` (classes, binary labels or values).

    A single binary label or a single regression value is a scalar label per example (the head
    has one unit); several (`units > 1`) are a vector `[units]`.
    """

    kind: str
    units: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"TaskSpec kind must be one of {list(KINDS)}; got {self.kind!r}.")
        if not isinstance(self.units, int) or isinstance(self.units, bool) or self.units < 1:
            raise UsageError(f"TaskSpec units must be an int >= 1; got {self.units!r}.")

    @property
    def label_shape(self) -> tuple:
        """Shape of one example's label."""
        if self.kind == "classification" or self.units == 1:
            return ()
        return (self.units,)

    @property
    def label_dtype(self) -> tf.DType:
        return tf.int64 if self.kind == "classification" else tf.float32

    def loss(self) -> keras.losses.Loss:
        """A fresh loss object matching the head (logits for classification and binary)."""
        if self.kind == "classification":
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if self.kind == "binary":
            return keras.losses.BinaryCrossentropy(from_logits=True)
        return keras.losses.MeanSquaredError()

    def metrics(self) -> tuple[str, ...]:
        return ("mae",) if self.kind == "regression" else ("accuracy",)

    def head(self, **options) -> keras.Sequential:
        """The head for this task (`options`: `hidden`, `dropout`, `name` of `mtl.heads`)."""
        builder = {"classification": heads_lib.classification, "binary": heads_lib.binary,
                   "regression": heads_lib.regression}[self.kind]
        return builder(self.units, **options)

    def task(self, name: str, *, weight: float = 1.0) -> Task:
        return Task(name, loss=self.loss(), metrics=self.metrics(), weight=weight)


def _names(specs: Mapping[str, TaskSpec], names, dataset: str) -> list[str]:
    return list(pipeline.check_tasks(dataset, list(specs) if names is None else names, specs))


def build_tasks(specs: Mapping[str, TaskSpec], names: Sequence[str] | None = None, *,
                weights: Mapping[str, float] | None = None, dataset: str = "dataset"
                ) -> list[Task]:
    """One `mtl.Task` per name (all of `specs` when None); `weights`: fixed loss weights."""
    names = _names(specs, names, dataset)
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UsageError(f"{dataset}: weights names task {unknown[0]!r}, which is not among the "
                         f"tasks built ({names}).")
    return [specs[n].task(n, weight=weights.get(n, 1.0)) for n in names]


def build_heads(specs: Mapping[str, TaskSpec], names: Sequence[str] | None = None, *,
                dataset: str = "dataset", **head_options) -> dict:
    """`{name: head}` for a `MultiTaskModel` (all of `specs` when `names` is None)."""
    return {n: specs[n].head(**head_options) for n in _names(specs, names, dataset)}
