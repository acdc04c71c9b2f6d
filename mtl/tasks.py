"""`Task`: what one head learns (its loss, metrics, fixed weight and label key)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf
from keras.src.utils.tracking import Tracker  # Keras attribute tracker; copies need their own.
from mtl.config import UsageError, UsageTypeError

LossLike = Any  # a Keras loss object, a Keras loss name, or a callable(y_true, y_pred)
MetricLike = Any  # a Keras metric object or a Keras metric name

_ACCURACY_NAMES = ("accuracy", "acc")


def _loss_name(loss: Callable) -> str:
    if isinstance(loss, keras.losses.Loss):
        return type(loss).__name__
    return getattr(loss, "__name__", type(loss).__name__)


def _resolve_loss(task_name: str, loss: LossLike) -> Callable:
    """Returns a callable giving per-example losses (no reduction over the batch)."""
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise UsageError(
                f"Task {task_name!r}: unknown loss {loss!r}; expected a Keras loss name such as "
                "'mse', 'mae', 'huber', 'binary_crossentropy', 'sparse_categorical_crossentropy', "
                "or a keras.losses.Loss object.") from None
    if isinstance(loss, keras.losses.Loss):
        return _without_reduction(loss)
    if callable(loss):
        return loss
    raise UsageTypeError(f"Task {task_name!r}: loss must be a Keras loss name, a keras.losses.Loss or a "
                    f"callable(y_true, y_pred); got {loss!r} of type {type(loss).__name__}.")


def _without_reduction(loss: keras.losses.Loss) -> keras.losses.Loss:
    """The user's loss object with `reduction=None`: the train step reduces over the *global*
    batch itself.

    A shallow copy that shares every attribute of `loss` (so every constructor argument counts,
    whether or not `get_config` returns it) and runs its own `__call__`. Not `from_config`, which
    drops what `get_config` omits, nor `copy.copy`, which Keras routes through its saving code.
    """
    clone = object.__new__(type(loss))
    clone.__dict__.update(vars(loss))
    clone.reduction = None
    return clone


class _UncopiableState(Exception):
    """A metric holds a `tf.Variable`, which cannot be re-created for each split."""

    def __init__(self, variable: tf.Variable):
        super().__init__(variable.name)
        self.variable = variable


def _copy_with_fresh_state(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """A copy of `metric` with its own state variables, created in the current strategy scope.

    Everything but state is shared with `metric` (its attributes, whatever its constructor
    took, whether or not `get_config` returns it); the metric objects (`metric` and the
    metrics it holds) and their Keras variables are new, the variables zero, then
    `reset_state()` runs. Neither `from_config` (drops what `get_config` omits) nor
    `copy.deepcopy` (Keras routes it through its saving code, which rebuilds from the config;
    and a copied `tf.Variable` would bypass the strategy's variable creator) does this.
    """
    clone = _renew(metric, {})
    clone.reset_state()
    return clone


def _renew(value, memo: dict):
    """`value` with new metric objects, trackers, containers and Keras variables; anything else
    (functions, numbers, arrays, dtype policies, losses) is shared."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, keras.Variable):
        memo[id(value)] = _new_variable_like(value)
    elif isinstance(value, tf.Variable):
        raise _UncopiableState(value)
    elif isinstance(value, (keras.metrics.Metric, Tracker)):
        clone = object.__new__(type(value))
        memo[id(value)] = clone
        clone.__dict__.update({name: _renew(item, memo) for name, item in vars(value).items()})
        if isinstance(value, Tracker):  # Which objects it already tracks, by id.
            clone.stored_ids = {name: {id(item) for item in store}
                                for name, (_, store) in clone.config.items()}
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        memo[id(value)] = type(value)(*(_renew(item, memo) for item in value))
    elif isinstance(value, (list, tuple, set)):
        memo[id(value)] = _new_container(value, [_renew(item, memo) for item in value], memo)
    elif isinstance(value, dict):
        items = {key: _renew(item, memo) for key, item in value.items()}
        memo[id(value)] = _new_container(value, items, memo)
    else:
        return value
    return memo[id(value)]


def _new_container(value, items, memo: dict):
    # Keras's tracked containers take (values, tracker=None) and track nothing without a
    # tracker; their tracker attribute is set after.
    container = type(value)(items)
    if hasattr(value, "__dict__"):
        container.__dict__.update({name: _renew(item, memo)
                                   for name, item in vars(value).items()})
    return container


def _new_variable_like(variable: keras.Variable) -> keras.Variable:
    """A zero variable with `variable`'s shape, dtype, distribution settings and path."""
    with contextlib.ExitStack() as scopes:
        for part in variable.path.split("/")[:-1]:
            scopes.enter_context(keras.name_scope(part))
        return keras.Variable(initializer="zeros", shape=variable.shape, dtype=variable.dtype,
                              trainable=variable.trainable, aggregation=variable.aggregation,
                              synchronization=variable.synchronization, name=variable.name)


def _is_sparse_loss(loss: Callable) -> bool:
    return "sparse" in _loss_name(loss).lower()


def _from_logits(loss: Callable) -> bool:
    return bool(getattr(loss, "get_config", lambda: {})().get("from_logits", False))


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
      name: the task's name; the model's head for this task has the same key.
      loss: a Keras loss object or name. Per-example values are computed and averaged over the
        examples of the global batch that carry this task's label. A loss object is used as
        given, all its attributes included; only its reduction is set aside.
      metrics: Keras metric objects or names ("accuracy" picks the accuracy that fits the loss).
        A metric object is used as given, all its attributes included, with new state for
        each split (`build_metrics`).
      weight: fixed loss weight, as Keras `loss_weights`; adaptive weighting methods act on top.
      label_key: key of this task's label in the data's label dict; defaults to `name`.
    """

    name: str
    loss: LossLike
    metrics: Sequence[MetricLike] = ()
    weight: float = 1.0
    label_key: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"Task name must be a non-empty string; got {self.name!r}.")
        if isinstance(self.metrics, (str, keras.metrics.Metric)):
            object.__setattr__(self, "metrics", (self.metrics,))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise UsageError(f"Task {self.name!r}: weight must be a number; got {self.weight!r}."
                             ) from None
        if not weight >= 0.0 or weight == float("inf"):
            raise UsageError(f"Task {self.name!r}: weight must be a finite number >= 0; "
                             f"got {self.weight!r}.")
        object.__setattr__(self, "weight", weight)
        if self.label_key is None:
            object.__setattr__(self, "label_key", self.name)
        object.__setattr__(self, "_loss_fn", _resolve_loss(self.name, self.loss))
        # Resolve metric names now so that a typo fails at construction, not in the step.
        for metric in self.metrics:
            self._new_metric(metric)

    @property
    def loss_fn(self) -> Callable:
        """Per-example loss function `(y_true, y_pred) -> [batch, ...]` (no batch reduction)."""
        return self._loss_fn  # type: ignore[attr-defined]

    @property
    def sparse_labels(self) -> bool:
        """True when the loss takes integer class ids rather than one label per output unit."""
        return _is_sparse_loss(self.loss_fn)

    def per_example_loss(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Loss of each example, shape [batch] float32 (extra axes are averaged)."""
        y_pred = tf.cast(y_pred, tf.float32)
        if not self.sparse_labels:
            y_true = tf.cast(y_true, y_pred.dtype)
        values = tf.cast(self.loss_fn(y_true, y_pred), tf.float32)
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    def build_metrics(self) -> list[keras.metrics.Metric]:
        """Fresh metric objects; call under the strategy scope that will update them.

        A metric object given to the task is copied with its own state (see
        `_copy_with_fresh_state`): each call gives new state, never the given object's.
        """
        return [self._new_metric(m) for m in self.metrics]

    def _new_metric(self, metric: MetricLike) -> keras.metrics.Metric:
        if isinstance(metric, keras.metrics.Metric):
            try:
                return _copy_with_fresh_state(metric)
            except _UncopiableState as error:
                raise UsageTypeError(
                    f"Task {self.name!r}: metric {metric.name!r} keeps its state in the "
                    f"tf.Variable {error.variable.name!r}, which cannot be given anew to each of "
                    "the train and eval splits; expected state made with "
                    "`self.add_variable(...)` (a keras.Variable) in the metric's `__init__`."
                ) from None
        if isinstance(metric, str):
            if metric in _ACCURACY_NAMES:
                return self._accuracy_metric()
            try:
                resolved = keras.metrics.get(metric)
            except ValueError:
                raise UsageError(
                    f"Task {self.name!r}: unknown metric {metric!r}; expected a Keras metric name "
                    "such as 'accuracy', 'mae', 'mse', 'auc', or a keras.metrics.Metric object."
                ) from None
            if isinstance(resolved, keras.metrics.Metric):
                # Keep the name the user wrote ("mae", not "mean_absolute_error") in results.
                return type(resolved).from_config({**resolved.get_config(), "name": metric})
            return keras.metrics.MeanMetricWrapper(resolved, name=metric)
        raise UsageTypeError(f"Task {self.name!r}: a metric must be a Keras metric name or a "
                        f"keras.metrics.Metric; got {metric!r}.")

    def _accuracy_metric(self) -> keras.metrics.Metric:
        """The accuracy that fits the loss, as Keras `compile(metrics=["accuracy"])` picks it."""
        name = _loss_name(self.loss_fn).lower()
        if "sparse" in name:
            return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        if "categorical" in name:
            return keras.metrics.CategoricalAccuracy(name="accuracy")
        if "binary" in name:
            threshold = 0.0 if _from_logits(self.loss_fn) else 0.5
            return keras.metrics.BinaryAccuracy(name="accuracy", threshold=threshold)
        return keras.metrics.Accuracy(name="accuracy")
