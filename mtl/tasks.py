"""`Task`: what one head learns (its loss, metrics, fixed weight and label key)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

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
            raise ValueError(
                f"Task {task_name!r}: unknown loss {loss!r}; expected a Keras loss name such as "
                "'mse', 'mae', 'huber', 'binary_crossentropy', 'sparse_categorical_crossentropy', "
                "or a keras.losses.Loss object.") from None
    if isinstance(loss, keras.losses.Loss):
        # Rebuild without reduction: the train step reduces over the *global* batch itself.
        config = loss.get_config()
        config["reduction"] = None
        return type(loss).from_config(config)
    if callable(loss):
        return loss
    raise TypeError(f"Task {task_name!r}: loss must be a Keras loss name, a keras.losses.Loss or a "
                    f"callable(y_true, y_pred); got {loss!r} of type {type(loss).__name__}.")


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
        examples of the global batch that carry this task's label.
      metrics: Keras metric objects or names ("accuracy" picks the accuracy that fits the loss).
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
            raise ValueError(f"Task name must be a non-empty string; got {self.name!r}.")
        if isinstance(self.metrics, (str, keras.metrics.Metric)):
            object.__setattr__(self, "metrics", (self.metrics,))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValueError(f"Task {self.name!r}: weight must be a number; got {self.weight!r}."
                             ) from None
        if not weight >= 0.0 or weight == float("inf"):
            raise ValueError(f"Task {self.name!r}: weight must be a finite number >= 0; "
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
        """Fresh metric objects; call under the strategy scope that will update them."""
        return [self._new_metric(m) for m in self.metrics]

    def _new_metric(self, metric: MetricLike) -> keras.metrics.Metric:
        if isinstance(metric, keras.metrics.Metric):
            return type(metric).from_config(metric.get_config())
        if isinstance(metric, str):
            if metric in _ACCURACY_NAMES:
                return self._accuracy_metric()
            try:
                resolved = keras.metrics.get(metric)
            except ValueError:
                raise ValueError(
                    f"Task {self.name!r}: unknown metric {metric!r}; expected a Keras metric name "
                    "such as 'accuracy', 'mae', 'mse', 'auc', or a keras.metrics.Metric object."
                ) from None
            if isinstance(resolved, keras.metrics.Metric):
                # Keep the name the user wrote ("mae", not "mean_absolute_error") in results.
                return type(resolved).from_config({**resolved.get_config(), "name": metric})
            return keras.metrics.MeanMetricWrapper(resolved, name=metric)
        raise TypeError(f"Task {self.name!r}: a metric must be a Keras metric name or a "
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
