import json
import os
import subprocess
import sys

import pytest

import mtl
import worker_processes

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mirrored_on_two_cpus_matches_one_device():
    """20 Adam steps with unevenly missing labels: the weights agree to float32 round-off."""
    run = subprocess.run([sys.executable, os.path.join(HERE, "workers", "mirrored_equivalence.py"),
                          "20"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["max_abs_weight"] > 0.1
    assert result["max_abs_diff"] < 1e-5  # float32 summation order differs between replicas
    # The same through distribute_datasets_from_function (per-replica batches).
    assert result["fn_max_abs_diff"] < 1e-5
    assert "global batch size 15 cannot be split evenly over 2 replicas" in result["split_error"]
    # Accumulating 2 micro-batches per replica equals the 16-example step.
    assert result["accum_max_abs_diff"] < 1e-5
    # An overflow on the second replica only still skips the step everywhere.
    assert result["fp16_finite"] and result["fp16_skipped"] == 1
    assert result["fp16_scale"] == 2.0 ** 14
    assert result["multi_eval"]["a"]["accuracy"] == pytest.approx(
        result["single_eval"]["a"]["accuracy"])


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"Unknown strategy 'horovod'; expected one of"):
        mtl.distribute.get_strategy("horovod")


def test_mirrored_without_gpu_says_so():
    with pytest.raises(ValueError, match="found no GPU on this machine.*cpu_replicas=N"):
        mtl.distribute.get_strategy("mirrored")


@pytest.mark.parametrize("text, message", [
    ("", "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "field 'cluster'"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "field 'cluster.worker'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "field 'task.type' is 'chief'"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     r"field 'task.index' is 3; expected an int in \[0, 1\)"),
])
def test_malformed_tf_config_names_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        mtl.distribute.parse_tf_config(text)


def test_tpu_without_a_tpu_says_so():
    with pytest.raises(RuntimeError, match="strategy 'tpu': no TPU found"):
        mtl.distribute.get_strategy("tpu")


def test_every_experiment_runs_under_mirrored_on_two_cpus(digits_data_dir):
    # Two processes, half of the experiments each, to use both cores.
    halves = ["multi_digits,digits_mixture,celeb_a,shapes3d",
              "multi_digits_overlap,cifar100,smallnorb"]
    lines = worker_processes.json_lines("experiments_mirrored.py",
                                        [[digits_data_dir, half] for half in halves],
                                        timeout=600)
    scripts = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(HERE),
                                                             "experiments"))
                     if f.endswith(".py"))
    assert sorted(line["experiment"] for line in lines) == scripts
    assert all(line["step"] == 2 and line["tasks"] for line in lines), lines
