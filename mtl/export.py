"""SavedModels for serving: one per task, and one joint model with a signature per task.

    export(model, "exported")                 # in memory: a MultiTaskModel
    export_run("runs/multi_digits", "exported", tasks=["left"])   # a finished run folder

writes

    exported/<task>/   serving_default: inputs -> {task: output}; only that task's variables
                       (the backbone and that task's head)
    exported/joint/    serving_default: inputs -> {task: output for every task};
                       <task>: inputs -> {task: output}; one copy of the backbone's weights
    exported/export.json   what was exported (tasks, input signature, source run and step)

Archives are written with `keras.export.ExportArchive` (Keras 3's SavedModel writer): it tracks
the model's variables once however many endpoints use them. Reload them with
`tf.saved_model.load(path).signatures[name](**inputs)`, with TF Serving, or with
`scripts/predict.py`; no mtl or Keras code is needed to run them. Outputs are computed in
inference mode (`training=False`: BatchNorm uses its moving statistics, Dropout is off).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from mtl import model as model_lib
from mtl.config import UsageError, UsageTypeError

JOINT = "joint"
SERVING_DEFAULT = "serving_default"
# Attributes the archive's root object already has; an endpoint cannot take these names.
_RESERVED = {SERVING_DEFAULT, JOINT, "variables", "trainable_variables",
             "non_trainable_variables", "signatures"}


def input_signature(model: keras.Model) -> list:
    """The model's input as `tf.TensorSpec`s with a free batch axis, in a one-element list (the
    single positional argument of the serving functions): a spec, or a dict of specs."""
    structure = model_lib.input_structure(model)
    if isinstance(structure, (list, tuple)):
        raise UsageError(f"Model {model.name!r} takes a list of {len(structure)} inputs; export "
                         "needs one input tensor or a dict of named inputs.")

    def spec(tensor, name):
        return tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype, name=name)

    if isinstance(structure, Mapping):
        return [{key: spec(t, key) for key, t in structure.items()}]
    return [spec(structure, "inputs")]


def check_tasks(model: keras.Model, tasks: Sequence[str] | None) -> list[str]:
    """`tasks` (all of the model's when None), checked against the model's tasks."""
    available = list(getattr(model, "task_names", ()) or ())
    if not available:
        raise UsageTypeError(f"export needs an mtl.MultiTaskModel (outputs keyed by task); got "
                        f"{type(model).__name__} {getattr(model, 'name', '')!r}.")
    if tasks is None:
        return available
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise UsageError(f"No task to export; the model's tasks are {available}.")
    for task in tasks:
        if task not in available:
            raise UsageError(f"Cannot export task {task!r}: the model has no such task; its "
                             f"tasks are {available}.")
    return tasks


def _check_endpoint_names(tasks: Sequence[str]) -> None:
    for task in tasks:
        if task in _RESERVED or not task.isidentifier():
            raise UsageError(
                f"Task {task!r} cannot name an exported signature or folder (names must be "
                f"Python identifiers other than {sorted(_RESERVED)}).")


def _task_function(task_model: keras.Model, task: str):
    def serve(inputs):
        return {task: task_model(inputs, training=False)}

    return serve


def _joint_function(model: keras.Model, tasks: Sequence[str]):
    def serve(inputs):
        outputs = model(inputs, training=False)
        return {task: outputs[task] for task in tasks}

    return serve


def export_task(model: keras.Model, task: str, path: str) -> str:
    """One task's SavedModel at `path` (serving_default: inputs -> {task: output})."""
    check_tasks(model, [task])
    _check_endpoint_names([task])
    archive = keras.export.ExportArchive()
    task_model = model.task_model(task)
    archive.track(task_model)
    archive.add_endpoint(SERVING_DEFAULT, _task_function(task_model, task),
                         input_signature=input_signature(model))
    archive.write_out(path, verbose=False)
    return path


def export_joint(model: keras.Model, path: str, tasks: Sequence[str] | None = None) -> str:
    """The joint SavedModel at `path`: serving_default returns every task's output, and one
    signature per task (named by the task) returns that task's."""
    tasks = check_tasks(model, tasks)
    _check_endpoint_names(tasks)
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = input_signature(model)
    archive.add_endpoint(SERVING_DEFAULT, _joint_function(model, tasks),
                         input_signature=signature)
    for task in tasks:
        archive.add_endpoint(task, _task_function(model.task_model(task), task),
                             input_signature=signature)
    archive.write_out(path, verbose=False)
    return path


def export(model: keras.Model, export_dir: str, tasks: Sequence[str] | None = None, *,
           joint: bool = True, info: dict | None = None) -> dict[str, str]:
    """Writes `<export_dir>/<task>/` per task and `<export_dir>/joint/`; returns {name: path}.

    `tasks`: the tasks to export (default: all of the model's); an unknown task raises
    ValueError listing the model's tasks, before anything is written. `info` is added to
    `<export_dir>/export.json`.
    """
    tasks = check_tasks(model, tasks)
    _check_endpoint_names(tasks)
    signature = input_signature(model)
    tf.io.gfile.makedirs(export_dir)
    paths = {task: export_task(model, task, os.path.join(export_dir, task)) for task in tasks}
    if joint:
        paths[JOINT] = export_joint(model, os.path.join(export_dir, JOINT), tasks)
    record = {"tasks": tasks, "archives": {k: os.path.basename(v) for k, v in paths.items()},
              "inputs": tf.nest.map_structure(
                  lambda s: {"shape": list(s.shape), "dtype": s.dtype.name}, signature[0]),
              **(info or {})}
    with tf.io.gfile.GFile(os.path.join(export_dir, "export.json"), "w") as f:
        json.dump(record, f, indent=2)
    return paths


def export_run(model_dir: str, export_dir: str, tasks: Sequence[str] | None = None, *,
               experiments_dir: str | None = None, joint: bool = True) -> dict[str, str]:
    """Rebuilds a run's model, restores its latest checkpoint and `export`s it."""
    from mtl import runs

    run = runs.restore_model(model_dir, experiments_dir=experiments_dir)
    tasks = check_tasks(run.model, tasks)  # Fail before writing anything.
    return export(run.model, export_dir, tasks, joint=joint,
                  info={"model_dir": os.path.abspath(model_dir), "checkpoint": run.checkpoint,
                        "step": run.step})


def load(path: str):
    """`tf.saved_model.load(path)`, with a clear error when `path` holds no SavedModel."""
    if not tf.saved_model.contains_saved_model(path):
        raise FileNotFoundError(f"{path!r} holds no SavedModel (expected <export_dir>/<task> or "
                                f"<export_dir>/{JOINT}).")
    return tf.saved_model.load(path)


def predict(loaded, inputs, signature: str = SERVING_DEFAULT) -> dict[str, np.ndarray]:
    """Runs signature `signature` of a loaded SavedModel; returns {output name: array}.

    `inputs`: an array (single-input models) or a dict {input name: array}.
    """
    if signature not in loaded.signatures:
        raise UsageError(f"No signature {signature!r}; this SavedModel has "
                         f"{sorted(loaded.signatures)}.")
    function = loaded.signatures[signature]
    specs = function.structured_input_signature[1]
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise UsageError(f"Signature {signature!r} takes inputs {sorted(specs)}; pass a dict.")
        inputs = {next(iter(specs)): inputs}
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise UsageError(f"Signature {signature!r} needs inputs {sorted(specs)}; missing "
                         f"{missing}.")
    feed = {name: tf.convert_to_tensor(np.asarray(inputs[name]), dtype=spec.dtype)
            for name, spec in specs.items()}
    return {name: value.numpy() for name, value in function(**feed).items()}
