"""Reading a run folder: rebuilding its model, loading its checkpoint, its results and data.

    runs/multi_digits/
      config.json      {"experiment": name, <every Config field>}   (experiment scripts)
      model.json       the model's architecture (every Trainer with a model_dir, when the model
                       can be serialized; written once, by
                       `mtl.training.model_record.record_model`)
      checkpoints/     the Trainer's checkpoints
      results.json     {"step": N, "results": {task: {metric: value}}}   (experiment scripts)

`restore_model(model_dir)` rebuilds the run's model, from model.json when the run has one (the
architecture exactly as it was trained), else from config.json's experiment (the experiment script
is `experiments/<name>.py`, exposing `EXPERIMENT`), and loads the newest readable checkpoint into
it. A run made with the Python API (`mtl.Trainer(model, tasks, optimizer=..., model_dir=...)`)
has no config.json; its model.json is what makes it exportable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from typing import Sequence

import keras
import tensorflow as tf

from mtl import transfer
from mtl.config import Config
from mtl.errors import UsageError
from mtl.experiment import Experiment, select_tasks
from mtl.options import PRECISION_POLICIES
from mtl.training import checkpoints
from mtl.training.model_record import MODEL_FILE, read_model_record, rebuild_model

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


class RunFolderError(FileNotFoundError, UsageError):
    """A run folder lacks what is asked of it (config.json, results.json, a checkpoint)."""


class UnreadableCheckpointError(checkpoints.CheckpointReadError, UsageError):
    """The checkpoint asked for, or every checkpoint of a run, cannot be read."""


@dataclasses.dataclass
class RestoredRun:
    """A run's model with a checkpoint loaded. `config` is None for a run made with the Python
    API (no config.json); `experiment` is the experiment that rebuilt the model (None when
    model.json did)."""

    model: keras.Model
    config: Config | None
    experiment: object | None  # mtl.experiment.Experiment
    checkpoint: str
    step: int | None


# ------------------------------------------------------------------------- config.json
def has_config(model_dir: str) -> bool:
    return tf.io.gfile.exists(os.path.join(model_dir, CONFIG_FILE))


def read_config(model_dir: str) -> tuple[str, Config]:
    """The experiment name and the `Config` recorded in `<model_dir>/config.json`."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise RunFolderError(f"{path} does not exist: {model_dir!r} is not the folder of an "
                             "experiment run (train_and_evaluate writes config.json there).")
    saved = _read_json(path)
    name = saved.pop("experiment", None)
    if not name:
        raise UsageError(f"{path} does not say which experiment wrote it (no 'experiment' key).")
    return name, Config.from_json(saved)


def _read_json(path: str) -> dict:
    try:
        with tf.io.gfile.GFile(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}; expected an object.")
    return value


def load_experiment(name: str, experiments_dir: str | None = None):
    """`EXPERIMENT` of `<experiments_dir>/<name>.py` (default: the repository's experiments/)."""
    directory = experiments_dir or EXPERIMENTS_DIR
    path = os.path.join(directory, f"{name}.py")
    experiment = getattr(experiment_script(name, directory), "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise UsageError(f"{path} defines no EXPERIMENT (an mtl.experiment.Experiment).")
    return experiment


def experiment_script(name: str, experiments_dir: str | None = None):
    """The module of `<experiments_dir>/<name>.py`, run once per process (an experiment script
    may build its experiment with another one's code)."""
    directory = experiments_dir or EXPERIMENTS_DIR
    path = os.path.join(directory, f"{name}.py")
    if not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(directory) if f.endswith(".py")) \
            if os.path.isdir(directory) else []
        raise RunFolderError(f"No experiment script {path}; experiments in {directory}: "
                             f"{available}.")
    module_name = f"mtl_experiment_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def task_names(experiment, config: Config) -> list[str]:
    """The tasks a run of `experiment` with `config` trained (its `--tasks`, or all)."""
    return [t.name for t in select_tasks(experiment.tasks(config), config.tasks)]


# ---------------------------------------------------------------------------- restoring
def restore_model(model_dir: str, *, experiments_dir: str | None = None,
                  checkpoint: str | None = None) -> RestoredRun:
    """Rebuilds the run's model and loads its newest readable checkpoint (or `checkpoint`).

    The model comes from model.json when the run has one, else from config.json's experiment
    (built under the run's precision policy; the global policy is put back afterwards). Only the
    model is read from the checkpoint (`expect_partial`: optimizer and loop state are skipped);
    every model variable must be found in it. A truncated or corrupt newest checkpoint is skipped
    with a warning, as a resumed run does; a named `checkpoint` that cannot be read is an error.
    """
    if not tf.io.gfile.isdir(model_dir):
        raise RunFolderError(f"Run folder {model_dir!r} does not exist.")
    record = read_model_record(model_dir)
    config = experiment = None
    if has_config(model_dir):
        name, config = read_config(model_dir)
        if record is None:  # The experiment script is needed only to rebuild the model.
            experiment = load_experiment(name, experiments_dir)
    elif record is None:
        raise RunFolderError(
            f"Cannot rebuild the model of {model_dir!r}: it has neither {CONFIG_FILE} (written "
            f"by experiment scripts) nor {MODEL_FILE} (written by mtl.Trainer(model_dir=...) "
            "when it starts, if Keras can serialize the model; when it cannot, training logged "
            "a warning saying why). Rebuild the model in Python, restore it with "
            "tf.train.Checkpoint(model=model).restore(path).expect_partial() and call "
            "mtl.export.export(model, ...).")
    path = _readable_checkpoint(checkpoint or model_dir)
    if record is not None:
        model = rebuild_model(record, os.path.join(model_dir, MODEL_FILE))
    else:
        model = _experiment_model(experiment, config)
    status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise UsageError(f"The model rebuilt for {model_dir!r} does not match checkpoint {path}: "
                         f"{str(e).splitlines()[0]}") from None
    return RestoredRun(model=model, config=config, experiment=experiment, checkpoint=path,
                       step=checkpoints.checkpoint_step(path))


def _experiment_model(experiment, config: Config) -> keras.Model:
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[config.mixed_precision])
    try:
        return experiment.model(config, task_names(experiment, config))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _readable_checkpoint(source: str) -> str:
    """The newest checkpoint of `source` (a run folder, a checkpoints folder or a checkpoint
    prefix) whose every tensor can be read (`mtl.training.checkpoints.first_readable`).

    Newer unreadable checkpoints of a folder are skipped with a warning naming them; a prefix
    that cannot be read, or a folder with no readable checkpoint, raises
    `UnreadableCheckpointError` naming each file and what is wrong with it.
    """
    source = os.fspath(source)
    if tf.io.gfile.isdir(source):
        directory = os.path.join(source, "checkpoints")
        directory = directory if tf.io.gfile.isdir(directory) else source
        candidates = checkpoints.checkpoint_candidates(directory)
        if not candidates:
            raise RunFolderError(f"No checkpoint in {source!r}: expected an mtl run folder (with "
                                 "checkpoints/ inside) or a folder of checkpoints.")
    else:
        candidates = [transfer.resolve_checkpoint(source)]
    path, problems = checkpoints.first_readable(candidates)
    if path is None:
        raise UnreadableCheckpointError("No readable checkpoint: " + "; ".join(problems) + ".")
    return path


# ----------------------------------------------------------------------- results, data
def read_results(model_dir: str) -> dict:
    """`<model_dir>/results.json`: {"step": N, "results": {task: {metric: value}}}."""
    path = os.path.join(model_dir, RESULTS_FILE)
    if not tf.io.gfile.exists(path):
        raise RunFolderError(f"{path} does not exist: the run in {model_dir!r} has not "
                             "finished (train_and_evaluate writes results.json at the end).")
    results = _read_json(path)
    if not isinstance(results.get("results"), dict):
        raise UsageError(f"{path} has no 'results' dict {{task: {{metric: value}}}}.")
    return results


def eval_batch(model_dir: str, num_examples: int, *, experiments_dir: str | None = None,
               tasks: Sequence[str] | None = None):
    """The first `num_examples` examples of the run's eval data: (features, labels)."""
    if not has_config(model_dir):
        raise RunFolderError(f"{model_dir!r} has no {CONFIG_FILE}: only the runs of experiment "
                             "scripts say which data they were trained and evaluated on. Pass "
                             "inputs of your own instead.")
    name, config = read_config(model_dir)
    experiment = load_experiment(name, experiments_dir)
    config = dataclasses.replace(config, eval_batch_size=num_examples)
    names = list(tasks) if tasks else task_names(experiment, config)
    element = next(iter(experiment.eval_data(config, names)))
    return element[0], element[1]
