"""`Task`: what one head learns (its loss, metrics, fixed weight and label key)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf
from keras.src.utils.tracking import Tracker  # Keras attribute tracker; copies need their own.
from mtl.errors import UsageError, UsageTypeError

LossLike = Any  # a Keras loss object, a Keras loss name, or a callable(y_true, y_pred)
MetricLike = Any  # a Keras metric object or a Keras metric name

_ACCURACY_NAMES = ("accuracy", "acc")


def _loss_name(loss: Callable) -> str:
    if isinstance(loss, keras.losses.Loss):
        return type(loss).__name__
    return getattr(loss, "__name__", type(loss).__name__)


#: Keras's own loss functions (each built-in loss class computes one of them, as its `fn`).
_KERAS_LOSS_FUNCTIONS = frozenset(
    value for name, value in vars(keras.losses).items()
    if inspect.isfunction(value) and name not in ("get", "serialize", "deserialize"))
#: What the labels of a Keras loss function are, by the function itself (never by a name).
_LABELS_OF = {
    keras.losses.sparse_categorical_crossentropy: "class_ids",
    keras.losses.categorical_crossentropy: "one_hot",
    keras.losses.categorical_focal_crossentropy: "one_hot",
    keras.losses.binary_crossentropy: "binary",
    keras.losses.binary_focal_crossentropy: "binary",
}


def keras_loss_function(loss: Callable) -> Callable | None:
    """The Keras loss function that `loss` computes (`loss` itself, or the `fn` of a built-in
    loss class such as `SparseCategoricalCrossentropy`), or None for any other loss."""
    function = getattr(loss, "fn", None) if isinstance(loss, keras.losses.Loss) else loss
    try:
        return function if function in _KERAS_LOSS_FUNCTIONS else None
    except TypeError:  # An unhashable callable is not one of Keras's functions.
        return None


def _keras_loss_argument(loss: Callable, name: str):
    """The value `loss` gives argument `name` of its Keras loss function (the function's default
    when a loss class was not given it), or None when the function has no such argument."""
    function = keras_loss_function(loss)
    if function is None:
        return None
    parameter = inspect.signature(function).parameters.get(name)
    if parameter is None:
        return None
    if isinstance(loss, keras.losses.Loss):
        return loss.get_config().get(name, parameter.default)
    return parameter.default


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


def _from_logits(loss: Callable) -> bool:
    return bool(_keras_loss_argument(loss, "from_logits"))


def check_task_name(name, what: str) -> None:
    """A task name is a non-empty str without "/": it names summary tags ("left/loss") and
    export paths, where a "/" would make a folder."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what} must be a non-empty string; got {name!r}.")
    if "/" in name:
        raise UsageError(f"{what} must not contain '/' (task names make summary tags such as "
                         f"'{name}/loss' and export paths); got {name!r}.")


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
      sparse: whether the loss takes integer class ids (shape [batch] or [batch, 1], one id in
        [0, num_classes) per example, against a [batch, num_classes] output) rather than one
        label per output unit. Declare it for a loss that Keras does not define (a plain
        function or your own `keras.losses.Loss` subclass); None means False for those. For a
        Keras loss (object or name) it is known from the loss itself: the sparse ones are
        `SparseCategoricalCrossentropy` and `"sparse_categorical_crossentropy"`; leave it None
        (a contradicting value is an error).

    What a loss is comes from the loss itself, never from its name: a Keras loss class or
    function is looked up by identity (a class by the Keras function it computes), anything
    else by `sparse`. A Keras loss that takes probabilities (`from_logits=False`, the default
    of the cross-entropy names such as "sparse_categorical_crossentropy") on a head that
    outputs logits (`mtl.heads.classification`, `binary`, `multi_label`) is refused before
    training (`mtl.training.validation.check_data`).
    """

    name: str
    loss: LossLike
    metrics: Sequence[MetricLike] = ()
    weight: float = 1.0
    label_key: str | None = None
    sparse: bool | None = None

    def __post_init__(self):
        check_task_name(self.name, "Task name")
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
        self._check_sparse()
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
        return self.label_kind == "class_ids"

    @property
    def label_kind(self) -> str | None:
        """What the loss takes as labels: "class_ids" (sparse), "one_hot" (categorical),
        "binary" (binary cross-entropy: each label in [0, 1]), or None (one value per output
        unit, nothing more known)."""
        function = keras_loss_function(self.loss_fn)
        if function is not None:
            return _LABELS_OF.get(function)
        return "class_ids" if self.sparse else None

    @property
    def is_keras_loss(self) -> bool:
        """True for a loss Keras defines (its functions and built-in classes), whose value is
        NaN for a NaN or infinite label."""
        return keras_loss_function(self.loss_fn) is not None

    @property
    def takes_probabilities(self) -> bool:
        """True for a Keras cross-entropy with `from_logits=False`: it reads the output as
        probabilities (after a softmax or sigmoid), not as logits."""
        return _keras_loss_argument(self.loss_fn, "from_logits") is False

    @property
    def ignored_class_id(self) -> int | None:
        """The class id a sparse Keras loss skips (`ignore_class`), if it has one."""
        return _keras_loss_argument(self.loss_fn, "ignore_class")

    def _check_sparse(self) -> None:
        if self.sparse is not None and not isinstance(self.sparse, bool):
            raise UsageTypeError(f"Task {self.name!r}: sparse must be True, False or None; got "
                                 f"{self.sparse!r} of type {type(self.sparse).__name__}.")
        function = keras_loss_function(self.loss_fn)
        if self.sparse is None or function is None:
            return
        known = _LABELS_OF.get(function) == "class_ids"
        if self.sparse != known:
            takes = ("integer class ids" if known else "one label per output unit")
            raise UsageError(
                f"Task {self.name!r}: sparse={self.sparse!r} contradicts the loss "
                f"{_loss_name(self.loss_fn)!r}, a Keras loss that takes {takes}; expected "
                "sparse=None (known from a Keras loss) or a plain function for sparse=True.")

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
        kind = self.label_kind
        if kind == "class_ids":
            return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        if kind == "one_hot":
            return keras.metrics.CategoricalAccuracy(name="accuracy")
        if kind == "binary":
            threshold = 0.0 if _from_logits(self.loss_fn) else 0.5
            return keras.metrics.BinaryAccuracy(name="accuracy", threshold=threshold)
        return keras.metrics.Accuracy(name="accuracy")
