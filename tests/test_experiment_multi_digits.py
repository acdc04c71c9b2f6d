"""End to end: the default experiment as users run it, on a few steps."""

import json
import os
import re
import subprocess
import sys

import pytest

import numpy as np
import tensorflow_datasets as tfds

from mtl import experiment, flags, runs
from mtl.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "multi_digits.py")
OVERLAP_SCRIPT = os.path.join(ROOT, "experiments", "multi_digits_overlap.py")


def _load_experiment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("multi_digits_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPERIMENT


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def test_script_trains_evaluates_and_resumes(tmp_path, digits_data_dir):
    model_dir = tmp_path / "run"
    flagfile = tmp_path / "run.flags"
    flagfile.write_text(f"--model_dir={model_dir}\n--data_dir={digits_data_dir}\n"
                        "--train_steps=20\n--eval_every=10\n--checkpoint_every=10\n"
                        "--batch_size=32\n--eval_steps=2\n")
    run = subprocess.run([sys.executable, SCRIPT, f"--flagfile={flagfile}"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Results at step 20:" in run.stdout
    for task in ("left", "right", "sum"):
        assert task in run.stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["step"] == 20 and set(results["results"]) == {"left", "right", "sum"}
    assert set(results["results"]["left"]) == {"loss", "accuracy"}
    assert json.loads((model_dir / "config.json").read_text())["train_steps"] == 20
    assert {"checkpoints", "config.json", "trainer.json", "eval", "results.json",
            "train"} <= set(os.listdir(model_dir))
    assert "config_history.json" not in os.listdir(model_dir)  # nothing changed yet

    # The same command with more steps continues from step 20.
    again = subprocess.run([sys.executable, SCRIPT, f"--flagfile={flagfile}",
                            "--train_steps=25"], env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restored" in again.stderr and "at step 20" in again.stderr
    assert "Results at step 25:" in again.stdout
    history = json.loads((model_dir / "config_history.json").read_text())
    assert history[-1]["changes"] == {"train_steps": {"from": 20, "to": 25}}
    assert json.loads((model_dir / "config.json").read_text())["train_steps"] == 20

    # A setting that shapes the run's state is refused before anything is loaded...
    before = sorted(os.listdir(model_dir / "checkpoints"))
    refused = subprocess.run([sys.executable, SCRIPT, f"--flagfile={flagfile}",
                              "--train_steps=27", "--learning_rate=0.01"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "error: " in refused.stderr and "learning_rate: 0.001 in the run, 0.01 now" in \
        refused.stderr and "--allow_config_change=learning_rate" in refused.stderr
    assert sorted(os.listdir(model_dir / "checkpoints")) == before
    # ...and allowed when the user says so, recorded in the history.
    allowed = subprocess.run([sys.executable, SCRIPT, f"--flagfile={flagfile}",
                              "--train_steps=27", "--learning_rate=0.01",
                              "--allow_config_change=learning_rate"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "Results at step 27:" in allowed.stdout
    changes = [entry["changes"] for entry in
               json.loads((model_dir / "config_history.json").read_text())]
    assert {"from": 0.001, "to": 0.01} in [c.get("learning_rate") for c in changes]
    assert json.loads((model_dir / "config.json").read_text())["learning_rate"] == 0.001


def test_a_refused_model_dir_and_a_bad_enum_flag_exit_2_with_a_message(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, message in (([f"--model_dir={a_file}/run"], "is not writable"),
                          (["--mixed_precision=float8", f"--model_dir={tmp_path}/r"],
                           "flag --mixed_precision=float8: value should be one of")):
        run = subprocess.run([sys.executable, SCRIPT, *args], env=_env(), capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "error: " in run.stderr and message in run.stderr
        assert "Traceback" not in run.stderr and "FATAL" not in run.stderr


def test_bad_flag_value_fails_with_a_message_and_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--batch_size=0",
                          f"--model_dir={tmp_path}"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "error: --batch_size must be an int >= 1; got 0" in run.stderr
    assert "Traceback" not in run.stderr


def test_single_task_baseline_in_process(tmp_path, digits_data_dir):
    config = flags.Config(model_dir=str(tmp_path), data_dir=digits_data_dir, train_steps=4,
                          eval_every=4, checkpoint_every=4, batch_size=16, eval_steps=1,
                          tasks=("left",))
    results = experiment.train_and_evaluate(_load_experiment(), config)
    assert set(results) == {"left"}
    # The overlap variant is another experiment: it does not resume this run.
    with pytest.raises(UsageError, match=r"holds a run of experiment 'multi_digits', not "
                                         r"'multi_digits_overlap'; use another --model_dir"):
        experiment.train_and_evaluate(runs.load_experiment("multi_digits_overlap"), config)
    with pytest.raises(ValueError, match=r"--tasks names 'middle', which this experiment does "
                                         r"not have; its tasks are \['left', 'right', 'sum'\]"):
        experiment.train_and_evaluate(
            _load_experiment(), flags.Config(model_dir=str(tmp_path / "x"), tasks=("middle",),
                                             data_dir=digits_data_dir))


def test_an_experiments_own_settings_are_recorded_and_a_changed_one_is_refused(
        tmp_path, digits_data_dir):
    """Settings of an experiment's own (its script's flags) are recorded in config.json; a
    resume with one changed is refused before anything is loaded, one marked free (which split
    to evaluate on) goes into the run's history; a run recorded before they were resumes."""
    import dataclasses

    base = _load_experiment()
    made = dataclasses.replace(base, settings={"image_size": 32, "eval_split": "validation"},
                               free_settings=("eval_split",))
    config = flags.Config(model_dir=str(tmp_path), data_dir=digits_data_dir, train_steps=2,
                          eval_every=2, checkpoint_every=2, batch_size=16, eval_steps=1,
                          tasks=("left",))
    experiment.train_and_evaluate(made, config)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["experiment_settings"] == {"image_size": 32, "eval_split": "validation"}
    resumed = dataclasses.replace(config, train_steps=3)
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(UsageError, match=re.escape(
            f"{tmp_path} holds a run of experiment 'multi_digits' made with other settings of "
            "its own (--image_size: 32 in the run, 48 now). These shape its tasks, model or "
            "data, so resuming with them changed is refused (nothing was loaded).")):
        experiment.train_and_evaluate(dataclasses.replace(
            made, settings={"image_size": 48, "eval_split": "validation"}), resumed)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    experiment.train_and_evaluate(dataclasses.replace(
        made, settings={"image_size": 32, "eval_split": "test"}), resumed)
    history = json.loads((tmp_path / "config_history.json").read_text())
    assert history[-1]["changes"]["eval_split"] == {"from": "validation", "to": "test"}
    # A record without experiment settings (an older run) resumes whatever they are.
    del record["experiment_settings"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    experiment.train_and_evaluate(dataclasses.replace(
        made, settings={"image_size": 64, "eval_split": "test"}),
        dataclasses.replace(config, train_steps=4))


def _first_images(ds, n):
    return np.concatenate([image.numpy() for image, _ in ds])[:n]


def test_eval_data_reads_test_by_default_and_validation_on_request(digits_data_dir):
    config = flags.Config(data_dir=digits_data_dir, eval_batch_size=500)
    for split in ("test", "validation"):
        images = tfds.as_numpy(tfds.load("multi_digits", split=split, data_dir=digits_data_dir,
                                         batch_size=-1))["image"]
        eval_ds = (_load_experiment().eval_data(config, ["left"]) if split == "test" else
                   _load_experiment().eval_data(config, ["left"], split="validation"))
        np.testing.assert_array_equal(_first_images(eval_ds, 2000),
                                      images.astype(np.float32) / np.float32(255))


def test_overlap_script_trains_and_its_run_is_not_resumed_as_side_by_side(tmp_path,
                                                                          overlap_data_dir):
    model_dir = tmp_path / "run"
    args = [f"--model_dir={model_dir}", f"--data_dir={overlap_data_dir}", "--train_steps=4",
            "--eval_every=4", "--checkpoint_every=4", "--batch_size=16", "--eval_steps=1"]
    run = subprocess.run([sys.executable, OVERLAP_SCRIPT, *args], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Results at step 4:" in run.stdout
    assert json.loads((model_dir / "config.json").read_text())["experiment"] == \
        "multi_digits_overlap"
    # Scripts that read the run (export, predict) get its own data: 24x24 overlapping digits.
    features, labels = runs.eval_batch(str(model_dir), 3)
    assert features.shape == (3, 24, 24, 1) and set(labels) == {"left", "right", "sum"}
    test = tfds.as_numpy(tfds.load("multi_digits/overlap", split="test",
                                   data_dir=overlap_data_dir, batch_size=-1))
    np.testing.assert_array_equal(features.numpy(),
                                  test["image"][:3].astype(np.float32) / np.float32(255))
    with pytest.raises(UsageError, match=r"holds a run of experiment 'multi_digits_overlap', "
                                         r"not 'multi_digits'; use another --model_dir"):
        experiment.train_and_evaluate(_load_experiment(), flags.Config.from_json(
            {**json.loads((model_dir / "config.json").read_text()), "train_steps": 6}))
    with pytest.raises(UsageError, match=r"no variant 'stacked'; its variants are "
                                         r"\['side_by_side', 'overlap'\]"):
        runs.experiment_script("multi_digits").make_experiment("stacked")
