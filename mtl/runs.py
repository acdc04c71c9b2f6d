"""Reading a run folder written by `mtl.experiment.train_and_evaluate`.

    runs/multi_digits/
      config.json      {"experiment": name, <every Config field>}
      checkpoints/     the Trainer's checkpoints
      results.json     {"step": N, "results": {task: {metric: value}}}

`restore_model(model_dir)` rebuilds the experiment's model from config.json (the experiment script
is `experiments/<name>.py`, exposing `EXPERIMENT`) and loads the latest checkpoint into it.
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
from mtl.experiment import Experiment, select_tasks
from mtl.config import Config, UsageError

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")


@dataclasses.dataclass
class RestoredRun:
    """A run's model with its latest checkpoint loaded."""

    model: keras.Model
    config: Config
    experiment: Experiment
    checkpoint: str
    step: int | None


def read_config(model_dir: str) -> tuple[str, Config]:
    """The experiment name and the `Config` recorded in `<model_dir>/config.json`."""
    path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {model_dir!r} is not an mtl run folder "
                                "(train_and_evaluate writes config.json there).")
    with tf.io.gfile.GFile(path) as f:
        saved = json.load(f)
    name = saved.pop("experiment", None)
    if not name:
        raise UsageError(f"{path} does not say which experiment wrote it (no 'experiment' key).")
    return name, config_from_dict(saved)


def config_from_dict(values: dict) -> Config:
    """A `Config` from config.json's values; keys that `Config` no longer has are ignored."""
    fields = {f.name for f in dataclasses.fields(Config)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    if kwargs.get("tasks") is not None:
        kwargs["tasks"] = tuple(kwargs["tasks"])
    return Config(**kwargs)


def load_experiment(name: str, experiments_dir: str | None = None) -> Experiment:
    """`EXPERIMENT` of `<experiments_dir>/<name>.py` (default: the repository's experiments/)."""
    directory = experiments_dir or EXPERIMENTS_DIR
    path = os.path.join(directory, f"{name}.py")
    if not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(directory) if f.endswith(".py")) \
            if os.path.isdir(directory) else []
        raise FileNotFoundError(f"No experiment script {path}; experiments in {directory}: "
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
    experiment = getattr(sys.modules[module_name], "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise UsageError(f"{path} defines no EXPERIMENT (an mtl.experiment.Experiment).")
    return experiment


def task_names(experiment: Experiment, config: Config) -> list[str]:
    """The tasks a run of `experiment` with `config` trained (its `--tasks`, or all)."""
    return [t.name for t in select_tasks(experiment.tasks(config), config.tasks)]


def restore_model(model_dir: str, *, experiments_dir: str | None = None,
                  checkpoint: str | None = None) -> RestoredRun:
    """Rebuilds the run's model and loads its latest checkpoint (or `checkpoint`).

    Only the model is read (`expect_partial`: optimizer and loop state are skipped); every model
    variable must be found in the checkpoint. The model is built under the run's precision policy
    (the global policy is put back afterwards).
    """
    name, config = read_config(model_dir)
    experiment = load_experiment(name, experiments_dir)
    path = transfer.resolve_checkpoint(checkpoint or model_dir)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(
        {"none": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[
            config.mixed_precision])
    try:
        model = experiment.model(config, task_names(experiment, config))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    tf.train.Checkpoint(model=model).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    return RestoredRun(model=model, config=config, experiment=experiment, checkpoint=path,
                       step=checkpoint_step(path))


def checkpoint_step(path: str) -> int | None:
    """The global step saved in a Trainer checkpoint (None if it holds none)."""
    reader = tf.train.load_checkpoint(path)
    key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


def read_results(model_dir: str) -> dict:
    """`<model_dir>/results.json`: {"step": N, "results": {task: {metric: value}}}."""
    path = os.path.join(model_dir, "results.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run in {model_dir!r} has not "
                                "finished (train_and_evaluate writes results.json at the end).")
    with tf.io.gfile.GFile(path) as f:
        results = json.load(f)
    if not isinstance(results.get("results"), dict):
        raise UsageError(f"{path} has no 'results' dict {{task: {{metric: value}}}}.")
    return results


def eval_batch(model_dir: str, num_examples: int, *, experiments_dir: str | None = None,
               tasks: Sequence[str] | None = None):
    """The first `num_examples` examples of the run's eval data: (features, labels)."""
    name, config = read_config(model_dir)
    experiment = load_experiment(name, experiments_dir)
    config = dataclasses.replace(config, eval_batch_size=num_examples)
    names = list(tasks) if tasks else task_names(experiment, config)
    element = next(iter(experiment.eval_data(config, names)))
    return element[0], element[1]
