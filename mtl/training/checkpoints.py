"""Checkpoints: what goes into a run's checkpoint, saving and restoring it safely, and the one
search of a checkpoint folder (with its fallback to an older checkpoint).

`Trainer` saves with `tf.train.CheckpointManager` (write to a temporary name, then rename: a crash
mid-write leaves the previous checkpoint the latest). Before restoring, every tensor of a
checkpoint is read (`read_all`), so a truncated file is found before anything is assigned, and
`model_signature.json` (task names and the shapes of all the model's weights) is compared
(`check_signature`), so a run folder of another model is refused instead of half-loaded.
`checkpoint_candidates` (newest first: the index's entries and every `<prefix>-<N>.index` of the
folder) and `first_readable` (the newest candidate whose every tensor reads back, with a warning
for each one skipped) are the search that resuming a run and reading a run folder
(`mtl.runs.restore_model`) both use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from mtl.errors import UsageError
from mtl.training import run_record


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous one is left intact)."""


class CheckpointReadError(OSError):
    """No checkpoint in model_dir can be read, or it belongs to a different model."""


class ModelDirError(CheckpointWriteError, UsageError):
    """`model_dir` cannot be used: not writable (the user's to fix: exit status 2)."""


class ForeignCheckpointError(CheckpointReadError, UsageError):
    """`model_dir` holds a run of another model (the user's to fix: exit status 2)."""


def check_writable(model_dir: str) -> None:
    try:
        tf.io.gfile.makedirs(model_dir)
        probe = os.path.join(model_dir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        raise ModelDirError(
            f"model_dir {model_dir!r} is not writable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e}); choose a folder you can write to."
        ) from None


def read_all(path: str) -> None:
    """Reads every tensor of a checkpoint (raises on a truncated or corrupt file)."""
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype != tf.variant:  # The input pipeline's state has no numpy form.
            reader.get_tensor(name)


def _indexed_checkpoints(directory: str) -> list[str]:
    """The checkpoints the folder's index (`checkpoint`) lists ([] when it is missing or
    unreadable)."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # noqa: BLE001 — an unreadable index: the folder scan still works.
        state = None
    if state is None:
        return []
    return [path if os.path.isabs(path) else os.path.join(directory, path)
            for path in state.all_model_checkpoint_paths]


def _number(path: str) -> int:
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else -1


def checkpoint_candidates(directory: str) -> list[str]:
    """The checkpoints of `directory`, newest first (by their number): those the `checkpoint`
    index lists and every `<prefix>-<N>.index` found in the folder (the index may be stale,
    missing or unreadable)."""
    found = [os.path.normpath(path) for path in _indexed_checkpoints(directory)]
    if tf.io.gfile.isdir(directory):
        for index in tf.io.gfile.glob(os.path.join(directory, "*.index")):
            if re.fullmatch(r".+-\d+\.index", os.path.basename(index)):
                found.append(os.path.normpath(index[:-len(".index")]))
    paths = list(dict.fromkeys(found))
    return sorted(paths, key=lambda p: (_number(p), p), reverse=True)


def first_readable(candidates) -> tuple[str | None, list[str]]:
    """The first of `candidates` (newest first) whose every tensor can be read, and what is
    wrong with each one before it (`"<path>: <error>"`); None when none can be read. Each one
    skipped is logged as a warning, and so is the fallback to an older checkpoint."""
    problems = []
    for path in candidates:
        try:
            read_all(path)
        except (tf.errors.OpError, ValueError, OSError, IndexError, RuntimeError) as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            problems.append(f"{path}: {problem}")
            logging.warning("Checkpoint %s is unreadable (%s); trying the previous one.",
                            path, problem)
            continue
        if problems:
            logging.warning("Using %s because newer checkpoints are unreadable: %s", path,
                            "; ".join(problems))
        return path, problems
    return None, problems


def checkpoint_step(path: str) -> int | None:
    """The global step saved in a Trainer checkpoint (None if it holds none)."""
    reader = tf.train.load_checkpoint(path)
    key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


def has_input(path: str) -> bool:
    return any(name.startswith("input/") for name, _ in tf.train.list_variables(path))


SIGNATURE_FILE = "model_signature.json"


def model_signature(tasks, model) -> dict:
    """What `model_signature.json` holds: the task names and every weight's path and shape
    (all the model's weights, trainable or not, so that freezing does not change it)."""
    return {"tasks": [t.name for t in tasks],
            "variables": [[v.path, list(v.shape)] for v in model.weights]}


def write_signature(directory: str, signature: dict) -> None:
    path = os.path.join(directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
        run_record.write_json(path, signature)


def check_signature(directory: str, signature: dict) -> None:
    """Refuses to resume a run of another model: other tasks or other variable shapes."""
    path = os.path.join(directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    if saved["tasks"] != signature["tasks"]:
        raise ForeignCheckpointError(
            f"{directory} holds a run with tasks {saved['tasks']}, but this model has tasks "
            f"{signature['tasks']}; use another model_dir (nothing was loaded).")
    ours, theirs = signature["variables"], saved["variables"]
    for i, (mine, old) in enumerate(zip(ours, theirs)):
        if mine[1] != old[1]:
            raise ForeignCheckpointError(
                f"{directory} holds a different model: variable {i} is {old[0]} of shape "
                f"{tuple(old[1])} there, but {mine[0]} of shape {tuple(mine[1])} here; use "
                "another model_dir (nothing was loaded).")
    if len(ours) != len(theirs):
        raise ForeignCheckpointError(
            f"{directory} holds a different model: {len(theirs)} variables there, "
            f"{len(ours)} here; use another model_dir (nothing was loaded).")


class Checkpointer:
    """What goes into a run's checkpoint, and saving and restoring it safely.

    `objects` are the trackables saved (`Trainer`: the optimizers, the per-group weighting
    methods, the model, the step, the weighting method, the skipped-step count, the RNG states
    and float16's loss scale); `track` adds one later (the input iterators, once `fit` creates
    them). Only the chief writes to `model_dir`; under multi-worker training the other workers take part in every save by
    writing to a temporary folder that is removed right after (the `tf.distribute` pattern).
    """

    def __init__(self, objects: dict, *, model_dir: str | None, max_to_keep: int,
                 signature: dict, is_chief: bool):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.signature = signature
        self.is_chief = is_chief
        #: The checkpoint the run was restored from (None: a fresh run).
        self.restored_path = None
        self._max_to_keep = max_to_keep
        self._manager = None
        if model_dir:
            if is_chief:
                check_writable(model_dir)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, os.path.join(model_dir, "checkpoints"),
                max_to_keep=self._max_to_keep)

    @property
    def enabled(self) -> bool:
        return self._manager is not None

    @property
    def latest(self) -> str | None:
        return self._manager.latest_checkpoint if self._manager else None

    def check_model(self) -> None:
        """Refuses a `model_dir` that holds checkpoints of another model (other tasks or
        variable shapes), before anything is loaded."""
        if self._manager is not None and self._candidates():
            check_signature(self._manager.directory, self.signature)

    def track(self, name: str, trackable) -> None:
        setattr(self.checkpoint, name, trackable)

    def save(self, step: int) -> str | None:
        """Writes a checkpoint of `step`; returns its path (None off the chief or without a
        model_dir)."""
        if self._manager is None:
            return None
        if not self.is_chief:
            scratch = tempfile.mkdtemp(prefix="mtl_worker_checkpoint_")
            try:
                tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                    checkpoint_number=step)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return None
        previous = self._manager.latest_checkpoint
        try:
            path = self._manager.save(checkpoint_number=step)
            write_signature(self._manager.directory, self.signature)
        except (tf.errors.OpError, OSError) as e:
            raise CheckpointWriteError(
                f"Could not write the checkpoint of step {step} to {self._manager.directory} "
                f"({type(e).__name__}: {e}). The previous checkpoint {previous or '(none)'} is "
                "intact.") from None
        logging.info("Saved checkpoint %s", path)
        return path

    def restore(self, *, strict: bool = True) -> bool:
        """Restores the newest readable checkpoint; False when there is none.

        Every tensor of a checkpoint is read before anything is assigned, so a truncated or
        corrupt newest checkpoint is detected: the previous one is used instead, with a warning.
        The candidates are the index's entries and the numbered checkpoints found in the folder
        (`checkpoint_candidates`): the index file (`checkpoint`) is metadata as precious as the
        data, and when it is missing or unreadable it is rewritten from the folder. A
        checkpoint of a different model (other tasks or variable shapes) is refused before
        anything is loaded. `strict=False` restores what matches and leaves the rest as it is
        (a resumed run whose configuration change was allowed).
        """
        if self._manager is None:
            return False
        candidates = self._candidates()
        if not candidates:
            return False
        check_signature(self._manager.directory, self.signature)
        path, problems = first_readable(candidates)
        if path is None:
            raise CheckpointReadError(
                f"No readable checkpoint in {self._manager.directory}: " + "; ".join(problems)
                + ". Move the folder away to start afresh.")
        status = self.checkpoint.restore(path).expect_partial()
        if strict:
            status.assert_existing_objects_matched()
        self.restored_path = path
        logging.info("Restored %s.", path)
        return True

    def _candidates(self) -> list[str]:
        """The checkpoints to try, newest first (`checkpoint_candidates`). When the index does
        not list every one of them (missing, unreadable, or stale: a run stopped between
        writing a checkpoint and updating the index), it is rewritten, so that `max_to_keep`
        prunes every checkpoint of the folder."""
        directory = self._manager.directory
        paths = checkpoint_candidates(directory)
        indexed = {os.path.normpath(p) for p in self._manager.checkpoints}
        if not paths or set(paths) <= indexed:
            return paths
        logging.warning("The checkpoint index %s is missing, unreadable or stale; found %d "
                        "checkpoint(s) in the folder (newest: %s) and rewrote the index.",
                        os.path.join(directory, "checkpoint"), len(paths), paths[0])
        tf.compat.v1.train.update_checkpoint_state(
            directory, paths[0], all_model_checkpoint_paths=list(reversed(paths)))
        self._manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                   max_to_keep=self._max_to_keep)
        return paths

    def restore_input(self, iterators) -> bool:
        """Restores the saved input position into `iterators`; False when the checkpoint
        holds none."""
        if self.restored_path is None or not has_input(self.restored_path):
            return False
        tf.train.Checkpoint(input=iterators).restore(self.restored_path).expect_partial()
        return True
