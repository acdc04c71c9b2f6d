"""Loads experiment scripts in-process (once each: they define absl flags) and runs them small."""

import importlib.util
import os
import sys

import tensorflow_datasets as tfds

from mtl import experiment, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
    """The module of experiments/<name>.py, imported once per process."""
    module_name = f"experiment_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, os.path.join(ROOT, "experiments", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def small_config(model_dir, **overrides) -> flags.Config:
    """Two train steps, one eval batch, a tiny MLP backbone."""
    values = dict(model_dir=str(model_dir), backbone="mlp", train_steps=2, batch_size=4,
                  eval_batch_size=4, eval_every=2, checkpoint_every=2, log_every=1,
                  eval_steps=1)
    values.update(overrides)
    return flags.Config(**values)


def run_on_mock_data(exp: experiment.Experiment, model_dir, num_examples: int = 8,
                     **overrides) -> dict:
    """`train_and_evaluate` on TFDS mock data (random examples from the feature spec)."""
    with tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        return experiment.train_and_evaluate(exp, small_config(model_dir, **overrides))
