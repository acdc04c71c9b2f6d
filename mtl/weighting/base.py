"""The interface every task-weighting method implements.

The train step calls a method without knowing which one runs. Two families:

  * `LossWeighting`: turns the task losses into one scalar; one backward pass follows.
  * `GradientWeighting`: combines per-task gradients of the shared variables (a Jacobian
    `[num_tasks, num_params]`, or only its Gramian `J J^T` when that suffices) into one update
    direction `[num_params]`. Heads' own variables always get their task's plain gradient.

Methods are `tf.Module`s: every variable a method keeps across steps is an attribute, so it is
saved in the trainer's checkpoint and a resumed run continues with the same state. `build` is
called once, under the strategy scope, before the first step.

Distribution. Under a multi-replica strategy the step calls a method in the *replica* context,
with inputs that are the same on every replica (all-reduced before the call), so every replica
computes the same weights. State variables are created with
`aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA` so that assigning them in the replica
context is allowed. Random methods draw with stateless ops seeded from their own step counter, so
all replicas draw the same numbers and a resumed run draws what the uninterrupted run would.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import numbers
from typing import Sequence

import tensorflow as tf
from mtl.errors import UsageError


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the step tells a method besides the losses.

    Attributes:
      global_losses: [num_tasks] float32, each task's loss over the global batch (the same on
        every replica).
      num_replicas: replicas in sync; a term added to the total loss that is not a task loss
        share must be divided by it (the replicas' gradients are summed).
    """

    global_losses: tf.Tensor
    num_replicas: int = 1


def check_option(ok: bool, method: str, option: str, value, expected: str) -> None:
    """Raises a ValueError naming the option, the value given and what was expected."""
    if not ok:
        raise UsageError(f"Weighting method {method!r}: option {option}={value!r} is invalid; "
                         f"expected {expected}.")


def is_number(value) -> bool:
    """True for an int or float option value (a bool is not a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def state_variable(initial_value, name: str, dtype=tf.float32) -> tf.Variable:
    """A non-trainable variable that a method assigns inside the step (in the replica context).

    `ONLY_FIRST_REPLICA`: every replica computes the same value (inputs are all-reduced before
    the method is called), and the first replica's assignment is the one kept.
    """
    return tf.Variable(tf.cast(initial_value, dtype), trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def global_losses(losses: tf.Tensor, context: StepContext | None) -> tf.Tensor:
    """The losses of the global batch, without gradient: `context.global_losses` when given,
    else `losses` (one device, where a replica's share is the loss itself)."""
    source = losses if context is None else context.global_losses
    return tf.stop_gradient(tf.convert_to_tensor(source, tf.float32))


class SeededDraws:
    """Mixin for methods that draw random numbers: stateless draws seeded by (`seed`, the
    method's own call counter), so every replica draws the same numbers and a resumed run draws
    what the uninterrupted run would (the counter is in the checkpoint). List it before the
    method's base class."""

    def __init__(self, seed: int = 0):
        super().__init__()
        check_option(is_int(seed), self.name, "seed", seed, "an integer")
        self.seed = int(seed)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.calls = state_variable(0, "calls", tf.int64)

    def _next_seed(self) -> tf.Tensor:
        """This call's stateless seed [2]; advances the counter."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.convert_to_tensor(self.calls)])
        self.calls.assign_add(1)
        return seed


#: What a method consumes (`Weighting.consumes`): the task losses (one weighted sum, one
#: backward pass), the per-task gradients of the shared variables (a Jacobian [T, P]), or only
#: their Gramian J J^T [T, T]. The step's plan (`mtl.step.plan`) is the one reader of it.
LOSSES, JACOBIAN, GRAMIAN = "losses", "jacobian", "gramian"


class Weighting(tf.Module, metaclass=abc.ABCMeta):
    """Base class of all weighting methods."""

    #: Registry name, e.g. "equal".
    name: str = ""
    #: `LOSSES`, `JACOBIAN` or `GRAMIAN`: set by the family's base class.
    consumes: str = ""

    def __init__(self):
        super().__init__(name=type(self).__name__)
        self.task_names: tuple[str, ...] = ()
        self._task_weights = None
        #: Weights on the raw task-loss gradients used by the last call (a state variable that
        #: `build` creates for methods whose weights change), read by `weights()`.
        self.last_weights = None

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        """Creates the method's state for these tasks. Called under the strategy scope."""
        self.task_names = tuple(task_names)
        self._task_weights = tf.constant(list(task_weights), tf.float32)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def task_weights(self) -> tf.Tensor:
        """The tasks' fixed weights (`Task.weight`), shape [num_tasks]."""
        if self._task_weights is None:
            raise RuntimeError(f"Weighting {self.name!r} used before build().")
        return self._task_weights

    @classmethod
    def options(cls) -> list[str]:
        """Names of the options the constructor takes."""
        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p != "self"]

    def weights(self) -> tf.Tensor:
        """The weight each task's raw loss gradient got in the last call, [num_tasks] (for
        summaries); `Task.weight` included. Before the first call: the fixed task weights."""
        if self.last_weights is None:
            return self.task_weights
        return tf.convert_to_tensor(self.last_weights)

    def _create_last_weights(self) -> None:
        """For methods whose weights change: creates the variable `weights()` reads."""
        self.last_weights = state_variable(self.task_weights, "last_weights")

    def _record_weights(self, weights: tf.Tensor) -> tf.Tensor:
        """Stores the weights on the raw task-loss gradients used by this call; returns them."""
        self.last_weights.assign(weights)
        return weights


class LossWeighting(Weighting):
    """A method that combines task losses into one scalar before a single backward pass."""

    consumes = LOSSES

    #: True when `combine` reads `context.global_losses` (the step then all-reduces the task
    #: losses before calling it); False for methods whose weights do not depend on the losses.
    needs_global_losses: bool = True

    @abc.abstractmethod
    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        """Total loss from task losses.

        Args:
          losses: [num_tasks] float32, this replica's share of each task loss (the shares of all
            replicas sum to the task's mean over the global batch; on one device, the mean).
          context: global losses and replica count, for methods whose weights depend on them.
        Returns:
          A scalar whose gradient, summed across replicas, is the update direction.
        """


class GradientWeighting(Weighting):
    """A method that combines per-task gradients of the shared variables.

    Subclasses implement `aggregate`; when only inner products of task gradients matter they
    derive from `GramianWeighting` and implement `weights_from_gramian` instead.

    Contract with the step:
      * Row t of the Jacobian is the gradient of the *weighted* task loss `Task.weight * L_t`
        (so the fixed weights act before the method), over the global batch: the same on every
        replica. The Gramian is that Jacobian's `J J^T`.
      * `context` carries the global task losses (raw, unweighted). Methods with
        `needs_losses = True` (gradnorm; mgda with a loss normalisation) require it; the others
        ignore it, so `aggregate(jacobian)` alone is enough for them.
      * Every call records the coefficient of each row, times `Task.weight`, in `last_weights`
        (read by `weights()`); for methods whose output is not a combination of the rows
        (graddrop) it is the least-squares combination of the rows closest to the output.
    """

    #: Where "rep" mode (the rows are gradients w.r.t. the shared representation, not the
    #: shared parameters) is defined: the paper or official code that defines it. None: not
    #: offered, for the reason in `no_rep_reason`. `supports_rep` is derived from it.
    consumes = JACOBIAN
    rep_mode: str | None = None
    no_rep_reason: str = "its paper and official code apply it to the shared parameters"
    #: What rep mode computes from the representation's gradients: "gramian" (their Gramian,
    #: for `weights_from_gramian`) or "masks" (their sign-corrected batch sums, for
    #: `masks_from_rep`: GradDrop).
    rep_form: str = "gramian"
    #: True when `weights_from_gramian` defines the method (the direction is `w @ J`).
    uses_gramian: bool = False
    #: True when the method needs `context.global_losses`.
    needs_losses: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.supports_rep = cls.rep_mode is not None
        for name in ("aggregate", "weights_from_gramian"):
            function = cls.__dict__.get(name)
            if function is not None and not getattr(function, "_checks_input", False):
                setattr(cls, name, _standalone(function, name))

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self._create_last_weights()

    @abc.abstractmethod
    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        """[num_tasks, num_params] per-task gradients -> [num_params] update direction."""

    def _record_gradient_weights(self, row_weights: tf.Tensor) -> tf.Tensor:
        """Records `row_weights * Task.weight` (weights on the raw loss gradients); returns
        `row_weights` (the weights of the Jacobian's rows)."""
        self._record_weights(row_weights * self.task_weights)
        return row_weights

    def _losses(self, context: StepContext | None) -> tf.Tensor:
        if context is None:
            raise UsageError(f"Weighting method {self.name!r} needs the task losses: call it "
                             "with context=StepContext(global_losses=...).")
        return tf.stop_gradient(tf.convert_to_tensor(context.global_losses, tf.float32))


def _standalone(function, what: str):
    """Wraps `aggregate` / `weights_from_gramian` so a method also works alone: it builds itself
    from the first input's task count (as a Keras layer builds on its first call), and a matrix
    that is not rank 2, has another task count, or (eagerly) holds NaN/inf gets a clear error."""

    @functools.wraps(function)
    def checked(self, matrix, context=None):
        matrix = tf.convert_to_tensor(matrix)
        if not matrix.dtype.is_floating:
            matrix = tf.cast(matrix, tf.float32)
        expected = ("a [tasks, params] Jacobian" if what == "aggregate"
                    else "a [tasks, tasks] Gramian")
        if matrix.shape.rank != 2:
            raise UsageError(f"Weighting {self.name!r}: {what} takes {expected}; got shape "
                             f"{matrix.shape}.")
        tasks = matrix.shape[0]
        if what == "weights_from_gramian" and tasks is not None and matrix.shape[1] != tasks:
            raise UsageError(f"Weighting {self.name!r}: {what} takes {expected}; got shape "
                             f"{matrix.shape}.")
        if self._task_weights is None:
            if tasks is None:
                raise UsageError(f"Weighting {self.name!r}: the task count of the first input "
                                 "must be known to build the method; call build() first.")
            self.build([f"task_{i}" for i in range(tasks)], [1.0] * tasks)
        elif tasks is not None and tasks != self.num_tasks:
            raise UsageError(f"Weighting {self.name!r} was built for {self.num_tasks} tasks "
                             f"{list(self.task_names)}; {what} got {tasks} rows.")
        if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(matrix))):
            raise UsageError(f"Weighting {self.name!r}: the {expected.split(' ', 1)[1]} holds "
                             "NaN or inf; a method cannot combine non-finite gradients.")
        if what == "weights_from_gramian":
            matrix = tf.cast(matrix, self.gramian_dtype)
        return function(self, matrix, context)

    checked._checks_input = True
    return checked


class GramianWeighting(GradientWeighting):
    """A gradient method defined by weights of the task gradients computed from their Gramian
    `J J^T` alone; the direction is `w @ J`. Only these can run in "rep" mode, where the step
    sums the replicas' Gramians of gradients w.r.t. the shared representation.

    The weights w come from G = J J^T ([T, T]) alone, so the step may pass the Gramian
    (`weights_from_gramian`); `aggregate(J)` forms it (T^2 P) and returns `J^T w`. The weights
    a method returns are the ones applied, so `weights()` is exact. Cost beyond `equal`: T
    backward passes (the Jacobian) and the Gramian; the T x T solve is negligible for T up to
    tens.
    """

    consumes = GRAMIAN
    uses_gramian = True
    #: The dtype `weights_from_gramian` receives its Gramian in. float64 for the methods whose
    #: formulas cancel (IMTL-G's differences of inner products, Aligned-MTL's smallest
    #: eigenvalue, the exact QPs): a float32 Gramian loses them on nearly collinear gradients.
    gramian_dtype = tf.float32

    @abc.abstractmethod
    def weights_from_gramian(self, gramian: tf.Tensor,
                             context: StepContext | None = None) -> tf.Tensor:
        """[num_tasks, num_tasks] Gramian J J^T -> [num_tasks] weights of the task gradients.

        Implementations end with `return self._record_gradient_weights(w)`.
        """

    def aggregate(self, jacobian: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        w = self.weights_from_gramian(gramian(jacobian), context)
        return combine_rows(jacobian, w)


#: Entries of a column block of the Jacobian that `gramian` and `combine_rows` convert at once:
#: a wide Jacobian (a large backbone, many tasks) is never copied whole into another precision.
BLOCK_ENTRIES = 2 ** 24


def _column_blocks(jacobian: tf.Tensor) -> list[tf.Tensor]:
    tasks, params = jacobian.shape
    width = max(1, BLOCK_ENTRIES // max(int(tasks or 1), 1))
    if params is None or params <= width:
        return [jacobian]
    sizes = [width] * (params // width) + ([params % width] if params % width else [])
    return tf.split(jacobian, sizes, axis=1)


def gramian(jacobian: tf.Tensor) -> tf.Tensor:
    """`J J^T` [T, T] in float64: products of float32 (or bfloat16) entries are exact in float64
    and the sums lose ~1e-16 instead of ~1e-7, so inner products of nearly collinear gradients
    keep their differences. Cost: T^2 P multiply-adds; converted a column block at a time."""
    blocks = [tf.cast(b, tf.float64) for b in _column_blocks(jacobian)]
    return tf.add_n([tf.matmul(b, b, transpose_b=True) for b in blocks])


def combine_rows(jacobian: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """J^T w [P] in float32 (J float32 or bfloat16), converted a column block at a time."""
    weights = tf.cast(weights, tf.float32)
    pieces = [tf.linalg.matvec(tf.cast(b, tf.float32), weights, transpose_a=True)
              for b in _column_blocks(jacobian)]
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)
