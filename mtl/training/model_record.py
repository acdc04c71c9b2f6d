"""`model.json`: a run's model architecture, written once when a `Trainer` with a `model_dir`
starts, so that the model can be rebuilt (export, prediction) without the code that built it.

A `MultiTaskModel` is recorded as its parts (backbone and heads, the task models of
`from_models`, or the call to `mtl.architectures.build` and its heads); any other Keras model
whole. Only the architecture is written (Keras configs); the weights are the checkpoints'.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Mapping

import keras
import tensorflow as tf
from absl import logging

from mtl import architectures
from mtl.errors import UsageError
from mtl.model import MultiTaskModel
from mtl.training import run_record

try:  # Marks layer objects shared between the recorded parts (Keras's own sharing scope).
    from keras.src.saving.serialization_lib import ObjectSharingScope
except ImportError:  # pragma: no cover - a Keras without it records shared layers unshared.
    ObjectSharingScope = None

MODEL_FILE = "model.json"
# What model.json holds: `kind` says how the objects make the model. The name is part of the
# format of every recorded run: it stays as written.
MODEL_FORMAT = "mtl.runs.record_model/1"


def record_model(model_dir: str, model: keras.Model) -> str | None:
    """Writes the model's architecture to `<model_dir>/model.json` unless the run already has a
    record; returns its path (None when the model cannot be recorded: a warning says why).

    The `Trainer` calls it on the chief when it has a `model_dir`, after restoring: a folder that
    holds checkpoints holds them of this model (the Trainer refuses another one). A record left
    by a run that never wrote a checkpoint is replaced. Only the architecture is written (Keras
    configs); the weights are the checkpoints'. Never raises: a model that cannot be recorded
    still trains.
    """
    path = os.path.join(model_dir, MODEL_FILE)
    try:
        if tf.io.gfile.exists(path) and _has_checkpoint(model_dir):
            return path
        record = model_record(model)
    except Exception as e:  # noqa: BLE001 — any layer's get_config may fail; training goes on.
        logging.warning("The model's architecture cannot be recorded in %s (%s: %s); "
                        "scripts/export.py will not be able to rebuild this run's model. "
                        "Export it from Python with mtl.export.export(model, ...).",
                        model_dir, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    try:
        run_record.write_json(path, record)
    except (OSError, tf.errors.OpError) as e:
        logging.warning("Could not write %s (%s: %s); scripts/export.py will not be able to "
                        "rebuild this run's model.", path, type(e).__name__, e)
        return None
    return path


def _has_checkpoint(model_dir: str) -> bool:
    return bool(tf.io.gfile.glob(os.path.join(model_dir, "checkpoints", "*.index")))


class ModelRecordError(UsageError):
    """A model whose architecture Keras cannot write down, or a record it cannot rebuild."""


def model_record(model: keras.Model) -> dict:
    """The JSON record of a model's architecture (see `rebuild_model`).

    A `MultiTaskModel` is recorded as its parts (backbone and heads, or the task models of
    `from_models`) and rebuilt through its constructor, so the rebuilt model tracks its variables
    exactly as the trained one did and restores from its checkpoints. Any other Keras model is
    recorded whole. Layer objects shared between parts (one `Conv2D` in two task models) stay
    shared. Raises `ModelRecordError` for classes Keras could not find when rebuilding
    (custom classes that are not `keras.saving.register_keras_serializable`).
    """
    build_args = getattr(model, "architecture_args", None)
    if isinstance(model, MultiTaskModel) and build_args is not None:
        # A soft-sharing architecture: its heads, and the call that builds the rest.
        kind, objects = "architecture", {f"task:{task}": head
                                         for task, head in model.architecture_heads.items()}
    elif isinstance(model, MultiTaskModel):
        if model.backbone is not None:
            kind, objects = "backbone_heads", {"backbone": model.backbone, **{
                f"task:{task}": head for task, head in model.heads.items()}}
        else:
            kind, objects = "task_models", {f"task:{task}": task_model
                                            for task, task_model in model.heads.items()}
    else:
        kind, objects = "keras", {"model": model}
    configs = _serialize(objects)
    missing = sorted(set(_unresolvable_classes(configs)))
    if missing:
        raise ModelRecordError(
            f"Keras cannot rebuild the classes {missing} from their names; register them with "
            "@keras.saving.register_keras_serializable() in a module that is imported before "
            "the model is rebuilt.")
    record = {"format": MODEL_FORMAT, "kind": kind, "name": model.name,
              "keras_version": keras.__version__, "objects": configs}
    if kind == "architecture":
        record["architecture"] = build_args
    json.dumps(record)  # Fails here, not after a partial write, on a value JSON cannot hold.
    return record


def _serialize(objects: Mapping[str, object]) -> dict:
    """`{key: Keras config}`, with layer objects shared between the objects marked as shared.

    Keras marks a shared object (`shared_object_id`) inside an `ObjectSharingScope` only from its
    second appearance on; serialising everything twice in one scope marks every appearance. Only
    layers that really appear in several objects keep the mark (their ids are unique: they are
    alive throughout)."""
    if ObjectSharingScope is None:  # A Keras without it: shared layers are not recorded as shared.
        return {key: keras.saving.serialize_keras_object(obj) for key, obj in objects.items()}
    seen: dict[int, int] = {}
    for obj in objects.values():
        for layer_id in {id(layer) for layer in _layers(obj)}:
            seen[layer_id] = seen.get(layer_id, 0) + 1
    shared = {layer_id for layer_id, count in seen.items() if count > 1}
    with ObjectSharingScope():
        for obj in objects.values():
            keras.saving.serialize_keras_object(obj)
        configs = {key: keras.saving.serialize_keras_object(obj) for key, obj in objects.items()}
    _keep_shared_marks(configs, shared)
    return configs


def _layers(obj) -> list:
    flatten = getattr(obj, "_flatten_layers", None)
    return list(flatten(include_self=True, recursive=True)) if flatten else [obj]


def _keep_shared_marks(value, shared: set) -> None:
    if isinstance(value, dict):
        if value.get("shared_object_id") is not None and value["shared_object_id"] not in shared:
            del value["shared_object_id"]
        for item in value.values():
            _keep_shared_marks(item, shared)
    elif isinstance(value, list):
        for item in value:
            _keep_shared_marks(item, shared)


def _unresolvable_classes(value) -> list[str]:
    """Classes in a Keras config that deserialisation would not find: neither Keras's own nor
    registered (Keras does not import other modules when it rebuilds)."""
    found = []
    if isinstance(value, dict):
        module, registered = value.get("module"), value.get("registered_name")
        if "class_name" in value and "config" in value and not (
                module in ("keras", "builtins") or (module or "").startswith("keras.")):
            if keras.saving.get_registered_object(registered or value["class_name"]) is None:
                found.append(f"{module or '__main__'}.{value['class_name']}")
        for item in value.values():
            found.extend(_unresolvable_classes(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_unresolvable_classes(item))
    return found


def read_model_record(model_dir: str) -> dict | None:
    """`<model_dir>/model.json`, or None when the run has none."""
    path = os.path.join(model_dir, MODEL_FILE)
    if not tf.io.gfile.exists(path):
        return None
    record = run_record.read(path)
    if record.get("format") != MODEL_FORMAT:
        raise UsageError(f"{path} is not a model record this version of mtl reads (format "
                         f"{record.get('format')!r}, expected {MODEL_FORMAT!r}).")
    return record


def rebuild_model(record: dict, where: str = MODEL_FILE) -> keras.Model:
    """The model `model_record` recorded, with fresh weights."""
    if ObjectSharingScope is not None:
        scope = ObjectSharingScope()
    else:
        scope = contextlib.nullcontext()
    try:
        with scope:
            objects = {key: keras.saving.deserialize_keras_object(config)
                       for key, config in record["objects"].items()}
    except (TypeError, ValueError, KeyError) as e:
        raise ModelRecordError(f"Cannot rebuild the model recorded in {where}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    tasks = {key[len("task:"):]: obj for key, obj in objects.items() if key.startswith("task:")}
    if record["kind"] == "backbone_heads":
        return MultiTaskModel(objects["backbone"], tasks, name=record["name"])
    if record["kind"] == "task_models":
        return MultiTaskModel.from_models(tasks, name=record["name"])
    if record["kind"] == "architecture":
        args = dict(record["architecture"])
        return architectures.build(args.pop("architecture"), args.pop("input_shape"), tasks,
                                   backbone=args["backbone"],
                                   backbone_config=args["backbone_config"], **args["options"])
    return objects["model"]
