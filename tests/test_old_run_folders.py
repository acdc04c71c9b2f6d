"""A run folder written by mtl 0.1.0 resumes, bitwise, and today's records of the same run are
the ones 0.1.0 wrote.

`tests/fixtures/run_0_1_0/` was written by mtl 0.1.0 (the flat-module release) running
`tests/comparison_experiments/two_tasks.py` with `RUN_FLAGS` for 2 steps: config.json,
trainer.json, model.json (an mmoe architecture) and the step-2 checkpoint with its input
position (event files and results.json left out). Resuming it to step 4 must give, bit for bit,
the weights, optimizer slots and method state of a run trained straight to step 4 by today's
code.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "run_0_1_0")
SCRIPT = os.path.join(HERE, "comparison_experiments", "two_tasks.py")
RUN_FLAGS = ["--backbone=mlp", "--architecture=mmoe", "--architecture_options=num_experts=2",
             "--weighting=cagrad", "--weighting_options=c=0.4", "--optimizer=sgd",
             "--learning_rate=0.05", "--grad_accum_steps=2", "--batch_size=16", "--clip_norm=1",
             "--deterministic", "--eval_every=2", "--checkpoint_every=2", "--steps_per_loop=1",
             "--log_every=1", "--diagnostics_every=0"]


def _start(model_dir: str, steps: int) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, SCRIPT, f"--model_dir={model_dir}",
                             f"--train_steps={steps}", *RUN_FLAGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def _variables(checkpoint: str) -> dict:
    """Every tensor of a checkpoint but the input pipeline's state (a variant, with no numpy
    form: the resumed run's input position shows in the weights it trained on)."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name)
            for name, dtype in reader.get_variable_to_dtype_map().items()
            if dtype != tf.variant and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the 0.1.0 folder resumed to step 4, a folder trained straight to step 4), both by
    today's code, run at once."""
    root = tmp_path_factory.mktemp("old_runs")
    resumed, straight = str(root / "resumed"), str(root / "straight")
    shutil.copytree(FIXTURE, resumed)
    processes = [_start(resumed, 4), _start(straight, 4)]
    for process in processes:
        _finish(process)
    return resumed, straight


def test_a_run_folder_of_0_1_0_resumes_bitwise(runs):
    resumed, straight = runs
    got = _variables(os.path.join(resumed, "checkpoints", "ckpt-4"))
    want = _variables(os.path.join(straight, "checkpoints", "ckpt-4"))
    assert sorted(got) == sorted(want)
    assert any("weighting" in name for name in want)  # the method's state is compared too
    different = [name for name in want if not np.array_equal(got[name], want[name])]
    assert different == []


def test_the_records_of_0_1_0_resume_without_a_change_and_are_written_alike(runs):
    resumed, straight = runs
    # Only the free settings of the resume differ from the record (nothing shaped the state).
    history = _json(resumed, "config_history.json")
    assert [sorted(entry["changes"]) for entry in history] == [["model_dir", "train_steps"]]
    old_config, new_config = _json(FIXTURE, "config.json"), _json(straight, "config.json")
    assert sorted(old_config) == sorted(new_config)
    assert {k: v for k, v in old_config.items() if old_config[k] != new_config[k]} == {
        "model_dir": old_config["model_dir"], "train_steps": 2}
    assert _json(FIXTURE, "trainer.json") == _json(straight, "trainer.json")
    assert _json(FIXTURE, "model.json") == _json(straight, "model.json")
