"""Checkpoint safety: writability, integrity, and refusing another model's checkpoint.

`Trainer` saves with `tf.train.CheckpointManager` (write to a temporary name, then rename: a crash
mid-write leaves the previous checkpoint the latest). Before restoring, every tensor of a
checkpoint is read (`read_all`), so a truncated file is found before anything is assigned, and
`model_signature.json` (task names and the shapes of all the model's weights) is compared
(`check_signature`), so a run folder of another model is refused instead of half-loaded.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous one is left intact)."""


class CheckpointReadError(OSError):
    """No checkpoint in model_dir can be read, or it belongs to a different model."""


def check_writable(model_dir: str) -> None:
    try:
        tf.io.gfile.makedirs(model_dir)
        probe = os.path.join(model_dir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        raise CheckpointWriteError(
            f"model_dir {model_dir!r} is not writable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e}); choose a folder you can write to."
        ) from None


def read_all(path: str) -> None:
    """Reads every tensor of a checkpoint (raises on a truncated or corrupt file)."""
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype != tf.variant:  # The input pipeline's state has no numpy form.
            reader.get_tensor(name)


def has_input(path: str) -> bool:
    return any(name.startswith("input/") for name, _ in tf.train.list_variables(path))


SIGNATURE_FILE = "model_signature.json"


def write_signature(directory: str, signature: dict) -> None:
    path = os.path.join(directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(signature, f)


def check_signature(directory: str, signature: dict) -> None:
    """Refuses to resume a run of another model: other tasks or other variable shapes."""
    path = os.path.join(directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    if saved["tasks"] != signature["tasks"]:
        raise CheckpointReadError(
            f"{directory} holds a run with tasks {saved['tasks']}, but this model has tasks "
            f"{signature['tasks']}; use another model_dir (nothing was loaded).")
    ours, theirs = signature["variables"], saved["variables"]
    for i, (mine, old) in enumerate(zip(ours, theirs)):
        if mine[1] != old[1]:
            raise CheckpointReadError(
                f"{directory} holds a different model: variable {i} is {old[0]} of shape "
                f"{tuple(old[1])} there, but {mine[0]} of shape {tuple(mine[1])} here; use "
                "another model_dir (nothing was loaded).")
    if len(ours) != len(theirs):
        raise CheckpointReadError(
            f"{directory} holds a different model: {len(theirs)} variables there, "
            f"{len(ours)} here; use another model_dir (nothing was loaded).")
