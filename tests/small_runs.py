"""Small finished multi_digits run folders for tests, trained once per test session."""

import experiment_scripts
from mtl import experiment, flags

_RUNS = {}


def multi_digits_run(tmp_path_factory, data_dir: str, name: str = "mtl", **overrides) -> str:
    """A run folder of experiments/multi_digits.py after 4 steps (config.json, checkpoints,
    train/ and eval/ logs, results.json). `overrides` are Config fields (e.g. tasks=("left",))."""
    key = (data_dir, name, tuple(sorted(overrides.items())))
    if key not in _RUNS:
        model_dir = str(tmp_path_factory.mktemp(f"run_{name}"))
        values = dict(model_dir=model_dir, data_dir=data_dir, train_steps=4, eval_every=4,
                      checkpoint_every=4, batch_size=16, eval_steps=1, log_every=2)
        values.update(overrides)
        experiment.train_and_evaluate(experiment_scripts.load("multi_digits").EXPERIMENT,
                                      flags.Config(**values))
        _RUNS[key] = model_dir
    return _RUNS[key]


def multi_digits_experiment():
    return experiment_scripts.load("multi_digits").EXPERIMENT
