"""Checks that run before any graph is built, with errors that say what was given and expected.

`check_fit` checks what `Trainer.fit` is given (steps, cadences, the task schedule) and lists the
data to check; `check_input` checks one data object: `check_data` reads a dataset's element
spec (structure, shapes, dtypes, and the loss against its head), `check_first_batch` reads the
values of one batch from an iterator of its own (never the one training reads): class ids,
binary labels, finite targets, sample weights, and whether the dataset yields anything at all.
`check_tasks` (with `check_tasks_match_heads`), `check_built_in_scope` and
`check_optimizer_clipping` check what the `Trainer` is built from.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from mtl import heads as heads_lib
from mtl.errors import UsageError, UsageTypeError, check_int
from mtl.model import input_structure
from mtl.tasks import Task, keras_loss_function
from mtl.training.input_state import input_context


# -------------------------------------------------------------- what the Trainer is built from
def check_tasks(tasks: Sequence[Task], model) -> list[Task]:
    """Checks that `tasks` are `mtl.Task` objects, one per head of `model` (its `task_names`,
    or the keys of its dict outputs); returns them in the model's head order."""
    tasks = list(tasks)
    for task in tasks:
        if not isinstance(task, Task):
            raise UsageTypeError(f"tasks must be mtl.Task objects; got {task!r}.")
    task_names = getattr(model, "task_names", None)
    if task_names is None:
        outputs = getattr(model, "output", None)
        # Not a dict: check_tasks_match_heads says what is expected, with the output shapes.
        task_names = list(outputs) if isinstance(outputs, dict) else list(model.outputs)
    check_tasks_match_heads(tasks, task_names)
    by_name = {t.name: t for t in tasks}
    return [by_name[name] for name in task_names]


def check_tasks_match_heads(tasks: Sequence[Task], task_names: Sequence[str]) -> None:
    odd = [n for n in task_names if not isinstance(n, str)]
    if odd:
        shapes = [tuple(getattr(n, "shape", ())) for n in task_names]
        raise UsageError(
            f"The model's outputs must be a dict {{task_name: output}} (a MultiTaskModel, or "
            f"a Functional model built with outputs={{...}}); got {len(task_names)} unnamed "
            f"outputs of shapes {shapes}.")
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"Task {duplicates[0]!r} is given more than once; task names: {names}.")
    for name in names:
        if name not in task_names:
            raise UsageError(f"Task {name!r} has no matching head; the model's heads are "
                             f"{list(task_names)}.")
    for name in task_names:
        if name not in names:
            raise UsageError(f"The model's head {name!r} has no matching mtl.Task; the tasks "
                             f"given are {names}. Give a Task for every head (or build the model "
                             "with only the heads you train).")


def check_built_in_scope(strategy: tf.distribute.Strategy, model, optimizer) -> None:
    """The model's and the optimizer's variables must belong to the trainer's strategy."""
    extended = strategy.extended
    name = type(strategy).__name__
    for what, variable in (("model", next(iter(model.variables), None)),
                           ("optimizer", getattr(optimizer, "iterations", None))):
        if variable is None:
            continue
        if not extended.variable_created_in_scope(getattr(variable, "value", variable)):
            raise UsageError(
                f"The {what} was created outside the scope of the trainer's strategy ({name}); "
                "create the model, the optimizer and the Trainer inside "
                "`with strategy.scope():`.")


def check_optimizer_clipping(optimizer, strategy) -> None:
    """Keras 3 clips inside `apply_gradients`, on each replica's part of the gradient before the
    cross-replica sum: under several replicas that is not the clipping one device does. Refused
    there, pointing to the trainer's own `clip_norm`."""
    if strategy.num_replicas_in_sync == 1:
        return
    for name in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(optimizer, name, None)
        if value:
            raise UsageError(
                f"The optimizer has {name}={value}; under {type(strategy).__name__} with "
                f"{strategy.num_replicas_in_sync} replicas Keras would clip each replica's part "
                "of the gradient before the sum, not the gradient. Leave it unset; the "
                "Trainer's clip_norm (--clip_norm) clips the global norm of the whole update's "
                "gradient.")


# ------------------------------------------------------------------------ what fit is given
def check_fit(data, steps, *, eval_every, eval_steps, task_schedule, eval_data,
              validation_data) -> list[tuple[object, str]]:
    """Checks `fit`'s arguments before anything trains; returns `(data, where)` for each data
    object to check with `check_input`, in order (train data, eval data, validation data)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UsageError(f"steps must be an int >= 0 (the global step to train to); got "
                         f"{steps!r}.")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise UsageError(f"eval_every must be None or an int >= 1; got {eval_every!r}.")
    check_int("eval_steps", eval_steps, 1, optional=True)
    if isinstance(data, dict):
        if task_schedule is None:
            raise UsageError("fit: data is a dict of per-task datasets; pass task_schedule= "
                             "(mtl.data.mixing.task_schedule) to say which task trains when.")
        names = list(getattr(task_schedule, "tasks", data))
        if sorted(data) != sorted(names):
            raise UsageError(f"fit: the per-task datasets are for tasks {sorted(data)}, but "
                             f"the task schedule draws from {sorted(names)}.")
        inputs = [(dataset, f"train data of task {task!r}") for task, dataset in data.items()]
    else:
        if task_schedule is not None:
            raise UsageError("fit: task_schedule needs data as {task: dataset}.")
        inputs = [(data, "train data")]
    if eval_data is not None:
        inputs.append((eval_data, "eval data"))
    if validation_data is not None:
        inputs.append((validation_data, "validation data"))
    return inputs


def check_input(data, where: str, *, strategy: tf.distribute.Strategy, tasks: Sequence[Task],
                model, checked: list) -> None:
    """Checks structure, shapes, batch split and the first batch's label values of `data` (a
    dataset of global batches or a function `(InputContext) -> dataset`) before any graph is
    built. `checked` holds the data objects whose first batch was read already (by identity);
    `data` is added to it."""
    replicas = strategy.num_replicas_in_sync
    if isinstance(data, tf.data.Dataset):
        dataset = data
        spec = data.element_spec
        batch = tf.nest.flatten(spec)[0].shape[0] if isinstance(spec, tuple) else None
        if batch is not None and batch % replicas:
            raise UsageError(
                f"{where}: the global batch size {batch} cannot be split evenly over "
                f"{replicas} replicas; use a multiple of {replicas}.")
    elif callable(data):
        # This worker's own context: under several workers a function that reads a part
        # of the data (`--input_sharding=shard`) is checked on that part, not the whole.
        dataset = data(input_context(strategy))
        spec = dataset.element_spec
    else:
        raise UsageTypeError(f"{where} must be a tf.data.Dataset or a function (InputContext) -> "
                             f"tf.data.Dataset; got {type(data).__name__}.")
    check_data(spec, tasks, model, where=where)
    if any(data is seen for seen in checked):
        return  # Its first batch was read already (a later fit, another evaluation).
    # Its own iterator: the stream `fit` trains on is not touched.
    check_first_batch(dataset, tasks, model, where=where)
    checked.append(data)


# ------------------------------------------------------------------------- a dataset's spec
def _shape(spec) -> tf.TensorShape:
    return tf.TensorShape(spec.shape)


def check_data(element_spec, tasks: Sequence[Task], model, where: str = "data") -> None:
    """Checks a dataset's element spec against the tasks and the model's inputs and outputs."""
    if not isinstance(element_spec, tuple) or len(element_spec) not in (2, 3):
        raise UsageError(
            f"{where}: elements must be (features, labels) or (features, labels, sample_weights) "
            f"with labels a dict {{task: label}}; got elements of structure {element_spec}.")
    features, labels = element_spec[0], element_spec[1]
    weights = element_spec[2] if len(element_spec) == 3 else {}
    if not isinstance(labels, dict):
        raise UsageError(f"{where}: labels must be a dict {{label_key: tensor}}; got {labels}.")
    if not isinstance(weights, dict):
        raise UsageError(f"{where}: sample_weights must be a dict {{task_name: float [batch]}}; "
                         f"got {weights}.")
    _check_features(features, model, where)
    outputs = model.output
    task_names = [t.name for t in tasks]
    for key in weights:
        if key not in task_names:
            raise UsageError(f"{where}: sample_weights has key {key!r}, which is not a task; "
                             f"the tasks are {task_names}.")
    for task in tasks:
        if task.label_key not in labels:
            raise UsageError(f"{where}: task {task.name!r} reads label key {task.label_key!r}, "
                             f"but the data's labels have keys {sorted(labels)}.")
        _check_loss_fits_head(task, model, where)
        _check_label(task, labels[task.label_key], outputs[task.name].shape, where)
        if task.name in weights:
            shape = _shape(weights[task.name])
            if shape.rank is not None and (shape.rank > 2 or (
                    shape.rank == 2 and shape[1] not in (None, 1))):
                raise UsageError(f"{where}: the sample weight of task {task.name!r} has shape "
                                 f"{shape}; expected one weight per example, [batch].")


def _check_features(features, model, where: str) -> None:
    expected = input_structure(model)
    try:
        tf.nest.assert_same_structure(features, expected, check_types=False)
    except (ValueError, TypeError):
        raise UsageError(f"{where}: features have structure {features}, but the model takes "
                         f"{tf.nest.map_structure(lambda t: t.shape, expected)}.") from None
    for spec, inp in zip(tf.nest.flatten(features), tf.nest.flatten(expected)):
        got, want = _shape(spec), tf.TensorShape(inp.shape)
        if not got[1:].is_compatible_with(want[1:]):
            raise UsageError(f"{where}: features of shape {got} do not fit the model's input "
                             f"of shape {want} (batch axis first).")


def _check_label(task: Task, spec, output_shape, where: str) -> None:
    label = _shape(spec)
    output = tf.TensorShape(output_shape)
    if label.rank is None or output.rank is None:
        return
    if task.sparse_labels:
        ok = label[1:].as_list() in ([], [1]) and (spec.dtype.is_integer or spec.dtype.is_floating)
        if not spec.dtype.is_integer:
            raise UsageError(f"{where}: task {task.name!r} uses a sparse loss, which takes integer "
                             f"class ids; its label {task.label_key!r} has dtype {spec.dtype.name}.")
        if not ok:
            raise UsageError(
                f"{where}: task {task.name!r}: label {task.label_key!r} has shape {label}, but a "
                f"sparse loss on a head of output shape {output} takes integer class ids of shape "
                "(batch,) or (batch, 1).")
        return
    comparable = label if label.rank == output.rank else (
        label.concatenate([1]) if label.rank == output.rank - 1 else None)
    if comparable is None or not comparable[1:].is_compatible_with(output[1:]):
        hint = ""
        if (spec.dtype.is_integer and label.rank == output.rank - 1 and task.label_kind is None
                and not task.is_keras_loss):
            hint = (" If the loss takes integer class ids, declare it: "
                    f"mtl.Task({task.name!r}, loss=..., sparse=True).")
        raise UsageError(
            f"{where}: task {task.name!r}: label {task.label_key!r} of shape {label} does not fit "
            f"its head's output of shape {output}; expected a label of shape "
            f"{output} (or {output[:-1]} when the head has one output unit).{hint}")


def _head_of(model, task_name: str):
    return (getattr(model, "heads", None) or {}).get(task_name)


#: The Keras loss class of each Keras loss function that has a `from_logits` argument.
_LOSS_CLASS = {
    keras.losses.sparse_categorical_crossentropy: "SparseCategoricalCrossentropy",
    keras.losses.categorical_crossentropy: "CategoricalCrossentropy",
    keras.losses.categorical_focal_crossentropy: "CategoricalFocalCrossentropy",
    keras.losses.binary_crossentropy: "BinaryCrossentropy",
    keras.losses.binary_focal_crossentropy: "BinaryFocalCrossentropy",
}


def _check_loss_fits_head(task: Task, model, where: str) -> None:
    """A loss that takes probabilities must not read a head's logits."""
    head = _head_of(model, task.name)
    if not (task.takes_probabilities and heads_lib.outputs_logits(head)):
        return
    given = task.loss if isinstance(task.loss, str) else getattr(
        task.loss, "__name__", type(task.loss).__name__)
    fix = f"keras.losses.{_LOSS_CLASS[keras_loss_function(task.loss_fn)]}(from_logits=True)"
    if isinstance(task.loss, keras.losses.Loss):
        if not type(task.loss).__module__.startswith("keras."):  # A subclass of your own.
            fix = f"{type(task.loss).__name__}(from_logits=True)"
        fix += " (its other arguments as before)"
    raise UsageError(
        f"{where}: task {task.name!r}: the loss {given!r} takes probabilities (from_logits=False), "
        f"but its head (mtl.heads.{heads_lib.kind_of(head)}) outputs logits; expected a loss "
        f"on logits: use {fix}.")


# ------------------------------------------------------------------------- one batch's values
def first_batch(dataset: tf.data.Dataset, where: str):
    """The first element of `dataset`, read by an iterator of its own (the iterator training
    reads is not touched). Raises UsageError when the dataset yields nothing."""
    for element in dataset.take(1):
        return element
    raise UsageError(f"{where}: the dataset is empty (it yields no batch); expected batches of "
                     "(features, labels[, sample_weights]).")


def check_first_batch(dataset: tf.data.Dataset, tasks: Sequence[Task], model,
                      where: str = "data") -> None:
    """Reads one batch of `dataset` and checks its label and sample-weight values (see
    `check_batch_values`); an empty dataset is an error."""
    check_batch_values(first_batch(dataset, where), tasks, model, where)


def check_batch_values(batch, tasks: Sequence[Task], model, where: str = "data") -> None:
    """Checks the values of one batch `(features, labels[, sample_weights])` against each
    task's loss and head. Only examples whose sample weight is > 0 count: a weight of 0 means
    "no label", and the placeholder label there (-1, NaN) is never read.

      * sample weights: finite and >= 0;
      * a sparse loss: integer class ids in [0, num_classes) (num_classes: the head's last
        axis), or the loss's `ignore_class`;
      * a binary head (`mtl.heads.binary` / `multi_label`): labels 0 or 1; a binary
        cross-entropy on another head: labels in [0, 1];
      * a Keras loss (whose value a NaN or infinite label turns into NaN): finite labels. A
        loss of your own may read NaN as "missing" itself, so its labels are not checked.

    The error names the task, the value, the example's index in the batch and what was
    expected.
    """
    labels = batch[1]
    weights = batch[2] if len(batch) == 3 else {}
    outputs = model.output
    for task in tasks:
        label = np.asarray(labels[task.label_key])
        if label.ndim == 0:
            continue
        labelled = np.ones(label.shape[0], bool)
        if task.name in weights:
            weight = np.asarray(weights[task.name], np.float64).reshape(-1)
            if weight.shape[0] != label.shape[0]:
                raise UsageError(f"{where}: task {task.name!r}: the first batch has "
                                 f"{weight.shape[0]} sample weights for {label.shape[0]} labels; "
                                 "expected one weight per example.")
            _first_bad(where, task, "sample weight", weight,
                       ~(np.isfinite(weight) & (weight >= 0)),
                       "a finite weight >= 0 (0: the example has no label for this task)")
            labelled = weight > 0
        _check_label_values(task, label, labelled, outputs[task.name].shape[-1],
                            _head_of(model, task.name), where)


def _check_label_values(task: Task, label: np.ndarray, labelled: np.ndarray, units, head,
                        where: str) -> None:
    mask = labelled.reshape((-1,) + (1,) * (label.ndim - 1))
    what = f"label {task.label_key!r}"
    if task.sparse_labels and np.issubdtype(label.dtype, np.integer):
        ignored = task.ignored_class_id
        bad = (label < 0) | (label >= units if units is not None else False)
        if ignored is not None:
            bad &= label != ignored
        expected = (f"a class id in [0, {units})" if units is not None else "a class id >= 0")
        if ignored is not None:
            expected += f" or {ignored} (ignore_class)"
        _first_bad(where, task, what, label, bad & mask, expected)
        return
    if np.issubdtype(label.dtype, np.floating) and task.is_keras_loss:
        _first_bad(where, task, what, label, ~np.isfinite(label) & mask,
                   "a finite number (NaN or inf makes the loss NaN)")
    if heads_lib.kind_of(head) == "binary":
        _first_bad(where, task, what, label, ~((label == 0) | (label == 1)) & mask,
                   "0 or 1 (a binary head predicts one logit per binary label)")
    elif task.label_kind == "binary":
        _first_bad(where, task, what, label, ~((label >= 0) & (label <= 1)) & mask,
                   "a value in [0, 1] (binary cross-entropy)")


def _first_bad(where: str, task: Task, what: str, values: np.ndarray, bad: np.ndarray,
               expected: str) -> None:
    """Raises naming the first value where `bad` (shaped like `values`) is set."""
    if not np.any(bad):
        return
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    position = f"example {index[0]}"
    if int(np.prod(bad.shape[1:])) > 1:  # Several labels per example: which one.
        position += f", position {index[1:]}"
    count = int(np.sum(np.any(bad.reshape(bad.shape[0], -1), axis=1)))
    raise UsageError(
        f"{where}: task {task.name!r}: {what} is {values[index].item()!r} at {position} of the "
        f"first batch ({count} example(s) of {bad.shape[0]} affected); expected {expected}.")
