"""SavedModels for serving: one per task, and one joint model with a signature per task.

    export(model, "exported")                 # in memory: a MultiTaskModel
    export_run("runs/multi_digits", "exported", tasks=["left"])   # a run folder

writes

    exported/<task>/   serving_default: inputs -> {task: output}; only that task's variables
                       (the backbone and that task's head)
    exported/joint/    serving_default: inputs -> {task: output for every task};
                       <task>: inputs -> {task: output}; one copy of the backbone's weights
    exported/export.json   what was exported (tasks, input signature, image scaling, source run
                       and step); each archive holds a copy in assets.extra/export.json

Archives are written with `keras.export.ExportArchive` (Keras 3's SavedModel writer): it tracks
the model's variables once however many endpoints use them. Reload them with
`tf.saved_model.load(path).signatures[name](**inputs)`, with TF Serving, or with
`scripts/predict.py`; no mtl or Keras code is needed to run them. Outputs are computed in
inference mode (`training=False`: BatchNorm uses its moving statistics, Dropout is off).

`predict` checks its inputs against the signature (rank, shape, dtype) before running it. Integer
pixels (uint8 0..255) are converted only where the export records how training scaled its
images: `"unit_interval"`, float32 x / 255 in [0, 1] (what `mtl.data.pipeline.to_float_image`
gives the models of every `mtl.data` dataset but cifar100, which is standardised). `export_run`
reads that off the run's own eval data; `export(..., image_scaling=...)` states it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mtl import model as model_lib
from mtl import runs
from mtl.errors import UsageError, UsageTypeError

JOINT = "joint"
SERVING_DEFAULT = "serving_default"
INFO_FILE = "export.json"
#: The name of the one input of a single-input model's signatures.
SINGLE_INPUT = "inputs"
#: Integer pixels p in 0..255 are fed as float p / 255, in [0, 1].
UNIT_INTERVAL = "unit_interval"
IMAGE_SCALINGS = {UNIT_INTERVAL: "integer pixels 0..255 are fed as float x / 255, in [0, 1]"}
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
    return [spec(structure, SINGLE_INPUT)]


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
           joint: bool = True, image_scaling: str | Mapping[str, str] | None = None,
           info: dict | None = None) -> dict[str, str]:
    """Writes `<export_dir>/<task>/` per task and `<export_dir>/joint/`; returns {name: path}.

    `tasks`: the tasks to export (default: all of the model's); an unknown task raises
    ValueError listing the model's tasks, before anything is written. `image_scaling`: how the
    model's training data turned integer pixels into its float inputs, `"unit_interval"` (x / 255)
    for every float input or `{input name: "unit_interval"}`; None: not known (`predict` then
    refuses integer inputs for float ones). `info` is added to `<export_dir>/export.json`.
    """
    tasks = check_tasks(model, tasks)
    _check_endpoint_names(tasks)
    signature = input_signature(model)
    scaling = _check_image_scaling(image_scaling, signature[0])
    _check_export_dir(export_dir)
    tf.io.gfile.makedirs(export_dir)
    paths = {task: export_task(model, task, os.path.join(export_dir, task)) for task in tasks}
    if joint:
        paths[JOINT] = export_joint(model, os.path.join(export_dir, JOINT), tasks)
    record = {"tasks": tasks, "archives": {k: os.path.basename(v) for k, v in paths.items()},
              "inputs": tf.nest.map_structure(
                  lambda s: {"shape": list(s.shape), "dtype": s.dtype.name}, signature[0]),
              "image_scaling": scaling, **(info or {})}
    for directory in [export_dir, *(os.path.join(p, "assets.extra") for p in paths.values())]:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(os.path.join(directory, INFO_FILE), "w") as f:
            json.dump(record, f, indent=2)
    return paths


def _check_export_dir(export_dir: str) -> None:
    """Refuses an export folder under (or at) an existing file, before anything is written."""
    path = os.path.abspath(export_dir)
    while path and not tf.io.gfile.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
        raise UsageError(f"Cannot export to {export_dir!r}: {path} is a file, not a folder.")


def _check_image_scaling(image_scaling, signature) -> dict[str, str]:
    """`{input name: scaling}` for the float inputs that `image_scaling` covers."""
    specs = signature if isinstance(signature, Mapping) else {SINGLE_INPUT: signature}
    if image_scaling is None:
        return {}
    if isinstance(image_scaling, str):
        image_scaling = {name: image_scaling for name, spec in specs.items()
                         if spec.dtype.is_floating}
    if not isinstance(image_scaling, Mapping):
        raise UsageTypeError(f"image_scaling must be None, one of {sorted(IMAGE_SCALINGS)} or "
                             f"{{input name: scaling}}; got {image_scaling!r}.")
    for name, scaling in image_scaling.items():
        if name not in specs:
            raise UsageError(f"image_scaling names input {name!r}; the model's inputs are "
                             f"{sorted(specs)}.")
        if scaling not in IMAGE_SCALINGS:
            raise UsageError(f"image_scaling of input {name!r} must be one of "
                             f"{sorted(IMAGE_SCALINGS)}; got {scaling!r}.")
        if not specs[name].dtype.is_floating:
            raise UsageError(f"image_scaling names input {name!r}, which takes "
                             f"{specs[name].dtype.name}, not floats.")
    return dict(image_scaling)


AUTO = "auto"


def export_run(model_dir: str, export_dir: str, tasks: Sequence[str] | None = None, *,
               experiments_dir: str | None = None, joint: bool = True,
               image_scaling: str | Mapping[str, str] | None = AUTO,
               checkpoint: str | None = None) -> dict[str, str]:
    """Rebuilds a run's model (see `mtl.runs.restore_model`), restores its newest readable
    checkpoint (or `checkpoint`) and `export`s it.

    `image_scaling="auto"`: read off the run's eval data (`detect_image_scaling`; a run
    made with the Python API has none to read: nothing is recorded). None or a value as for
    `export` states it.
    """
    _check_export_dir(export_dir)
    run = runs.restore_model(model_dir, experiments_dir=experiments_dir, checkpoint=checkpoint)
    tasks = check_tasks(run.model, tasks)  # Fail before writing anything.
    if image_scaling == AUTO:
        image_scaling = detect_image_scaling(model_dir, experiments_dir=experiments_dir)
    return export(run.model, export_dir, tasks, joint=joint, image_scaling=image_scaling,
                  info={"model_dir": os.path.abspath(model_dir), "checkpoint": run.checkpoint,
                        "step": run.step})


class ExportNotFoundError(FileNotFoundError, UsageError):
    """A path that holds no exported SavedModel."""


def load(path: str):
    """`tf.saved_model.load(path)`, with a clear error when `path` holds no SavedModel."""
    if not tf.saved_model.contains_saved_model(path):
        raise ExportNotFoundError(f"{path!r} holds no SavedModel (expected <export_dir>/<task> "
                                  f"or <export_dir>/{JOINT}).")
    return tf.saved_model.load(path)


def read_info(path: str) -> dict:
    """What `export` recorded about the SavedModel at `path` (its own assets.extra/export.json,
    else the export folder's export.json); {} for a SavedModel written otherwise."""
    for candidate in (os.path.join(path, "assets.extra", INFO_FILE),
                      os.path.join(os.path.dirname(os.path.normpath(path)), INFO_FILE)):
        if tf.io.gfile.exists(candidate):
            with tf.io.gfile.GFile(candidate) as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{candidate} is not readable JSON ({e}).") from None
    return {}


def predict(loaded, inputs, signature: str = SERVING_DEFAULT, *,
            image_scaling: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Runs signature `signature` of a loaded SavedModel; returns {output name: array}.

    `inputs`: an array (single-input models) or a dict {input name: array}, each checked
    against the signature by `check_inputs` before anything runs. `image_scaling`: what the
    export recorded (`read_info(path)["image_scaling"]`).
    """
    if signature not in loaded.signatures:
        raise UsageError(f"No signature {signature!r}; this SavedModel has "
                         f"{sorted(loaded.signatures)}.")
    function = loaded.signatures[signature]
    feed = check_inputs(function.structured_input_signature[1], inputs, image_scaling,
                        signature=signature)
    return {name: value.numpy() for name, value in function(**feed).items()}


# ------------------------------------------------------------------------- input checks
def describe_spec(spec: tf.TensorSpec) -> str:
    """`float32 of shape (None, 16, 32, 1)`: None is the free batch axis."""
    return f"{spec.dtype.name} of shape {tuple(spec.shape.as_list())}"


def check_inputs(specs: Mapping[str, tf.TensorSpec], inputs,
                 image_scaling: Mapping[str, str] | None = None, *,
                 signature: str = SERVING_DEFAULT) -> dict[str, tf.Tensor]:
    """The tensors to feed a signature with input specs `specs`, from `inputs` (an array, or a
    dict {input name: array}).

    Each input must have the spec's rank and every known dimension. Conversions, the only ones:
    floats of another width to the spec's float type; integers to a wider integer type; integer
    pixels 0..255 to a float input whose `image_scaling` is "unit_interval" (x / 255). With
    that scaling, float values outside [0, 1] are refused too (pixels 0..255 as floats). All
    else (strings for numbers, floats for integers, integer pixels for a float input of unknown
    scaling) raises `UsageError` showing the expected and the given dtype and shape.
    """
    image_scaling = image_scaling or {}
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise UsageError(f"Signature {signature!r} takes inputs {sorted(specs)}; pass a dict "
                             "{input name: array} (a .npz file with one array per name).")
        inputs = {next(iter(specs)): inputs}
    missing = sorted(set(specs) - set(inputs))
    unknown = sorted(set(inputs) - set(specs))
    if missing or unknown:
        raise UsageError(f"Signature {signature!r} takes inputs {sorted(specs)}; got "
                         f"{sorted(inputs)}" + (f" (missing {missing})" if missing else "")
                         + (f" (unknown {unknown})" if unknown else "") + ".")
    return {name: _check_input(name, spec, inputs[name], image_scaling.get(name))
            for name, spec in specs.items()}


def _check_input(name: str, spec: tf.TensorSpec, value, scaling: str | None) -> tf.Tensor:
    array = value.numpy() if isinstance(value, tf.Tensor) else np.asarray(value)
    expected = describe_spec(spec)
    given = f"{array.dtype} of shape {array.shape}"

    def refuse(why: str, fix: str = "") -> UsageError:
        return UsageError(f"Input {name!r}: expected {expected}; got {given}: {why}"
                          + (f" {fix}" if fix else ""))

    if array.dtype.kind in "OUSV" and spec.dtype != tf.string:
        raise refuse("not numbers.")
    want = spec.shape.as_list()
    if array.ndim != len(want):
        fix = ""
        if array.ndim == len(want) - 1 and _dims_fit(want[1:], array.shape):
            fix = "For a single example, add the batch axis: x[None] (shape (1, ...))."
        raise refuse(f"rank {array.ndim}, expected rank {len(want)} (a batch: the first axis "
                     "counts the examples).", fix)
    if not _dims_fit(want[1:], array.shape[1:]):
        fix = ""
        if sorted(d for d in want[1:] if d is not None) == sorted(
                d for d, w in zip(array.shape[1:], want[1:]) if w is not None):
            fix = "Its axes are in another order (transposed?): reorder them to the expected one."
        raise refuse("the dimensions after the batch axis differ.", fix)
    return tf.convert_to_tensor(_converted(array, spec, scaling, refuse))


def _dims_fit(want, got) -> bool:
    return len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got))


def _converted(array: np.ndarray, spec: tf.TensorSpec, scaling: str | None, refuse):
    """`array` as the spec's dtype, where that is safe (see `check_inputs`)."""
    target = spec.dtype
    kind = array.dtype.kind
    if target == tf.string:
        if kind not in "OUS":
            raise refuse("numbers for a string input.")
        return array.astype(object)
    if array.dtype == target.as_numpy_dtype:
        if target.is_floating:
            _check_unit_interval(array, scaling, refuse)
        return array
    if target.is_floating:
        if kind == "f":
            _check_unit_interval(array, scaling, refuse)
            return array.astype(target.as_numpy_dtype)
        if kind in "iu":
            if scaling != UNIT_INTERVAL:
                raise refuse(
                    "integers for a float input, and the export does not record how training "
                    "scaled integer pixels.",
                    "Convert them as the training data was, e.g. x.astype('float32') / 255 for "
                    "images in [0, 1] (mtl.data's datasets but cifar100), or export with "
                    "image_scaling='unit_interval' (scripts/export.py --image_scaling="
                    "unit_interval) if that is how the model was trained.")
            if array.size and (array.min() < 0 or array.max() > 255):
                raise refuse(f"integer pixels must lie in 0..255; these lie in "
                             f"{array.min()}..{array.max()}.")
            return (array.astype(np.float64) / 255.0).astype(target.as_numpy_dtype)
        raise refuse(f"{array.dtype} values for a float input.")
    if target.is_integer:
        if kind not in "iu":
            raise refuse(f"{array.dtype} values for an integer input.")
        info = np.iinfo(target.as_numpy_dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise refuse(f"values {array.min()}..{array.max()} do not fit {target.name}.")
        return array.astype(target.as_numpy_dtype)
    raise refuse(f"{array.dtype} values for a {target.name} input.")


def _check_unit_interval(array: np.ndarray, scaling: str | None, refuse) -> None:
    if scaling == UNIT_INTERVAL and array.size:
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if low < 0.0 or high > 1.0:
            raise refuse(f"values in [{low:g}, {high:g}], but the model was trained on images "
                         "in [0, 1].", "Pixels 0..255 go in as integers (uint8), converted "
                         "to x / 255, or as floats divided by 255.")


def detect_image_scaling(model_dir: str, *, experiments_dir: str | None = None,
                         num_examples: int = 32) -> dict[str, str]:
    """How the run's data pipeline turned integer pixels into its float images, read off its
    own eval data: `{input name: "unit_interval"}` for every float image input (rank >= 3 with
    the batch axis) whose values are all k / 255 for integers k in 0..255 (what
    `mtl.data.pipeline.to_float_image` makes of uint8 images). Inputs scaled otherwise
    (standardised with a mean and std, for instance) are left out; so is everything when the run
    has no config.json or its data cannot be read (with a warning)."""
    if not runs.has_config(model_dir):
        return {}
    try:
        features, _ = runs.eval_batch(model_dir, num_examples, experiments_dir=experiments_dir)
    except Exception as e:  # noqa: BLE001 — an export does not need the data; say why.
        logging.warning("Could not read the eval data of %s to tell how it scaled images (%s: "
                        "%s); the export records no image scaling, and predict refuses integer "
                        "pixels.", model_dir, type(e).__name__, str(e).splitlines()[0])
        return {}
    named = features if isinstance(features, Mapping) else {SINGLE_INPUT: features}
    found = {}
    for name, value in named.items():
        values = np.asarray(value)
        if values.dtype.kind != "f" or values.ndim < 3 or not values.size:
            continue
        levels = values.astype(np.float64) * 255.0
        if values.min() >= 0.0 and values.max() <= 1.0 and \
                np.abs(levels - np.round(levels)).max() < 1e-3:
            found[name] = UNIT_INTERVAL
    return found
