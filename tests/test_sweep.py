"""mtl.evidence.sweep: which GPUs runs get, running N at once, which runs are complete, flag
checks."""

import json
import os
import sys
import time

import pytest

from mtl import flags
from mtl.evidence import sweep
from mtl.errors import UsageError


@pytest.mark.parametrize("value, gpus", [("0,1,2", ["0", "1", "2"]), ("", []), ("-1", []),
                                         ("3, 1", ["3", "1"]), ("2,-1,3", ["2"]),
                                         ("GPU-5f1c", ["GPU-5f1c"])])
def test_visible_gpus_from_cuda_visible_devices(value, gpus):
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == gpus


def test_visible_gpus_from_nvidia_smi(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
                    "echo 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    env = {"PATH": str(tmp_path)}
    old = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)
    try:
        assert sweep.visible_gpus(env) == ["0", "1"]
        fake.write_text("#!/bin/sh\nexit 9\n")  # A driver that does not answer: no GPU.
        assert sweep.visible_gpus(env) == []
        os.environ["PATH"] = str(tmp_path / "empty")
        assert sweep.visible_gpus(env) == []  # Not installed.
    finally:
        os.environ["PATH"] = old


def _printing_run(name, code):
    return sweep.Run(name, (sys.executable, "-c", code))


def test_runs_at_once_get_one_gpu_each_round_robin(tmp_path):
    code = "import os; print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), " \
           "os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'))"
    runs = [_printing_run(f"r{i}", code) for i in range(4)]
    said = []
    assert sweep.run_all(runs, parallel=2, log_dir=str(tmp_path), gpus=["4", "7"], env={},
                         say=said.append) == []
    seen = [open(tmp_path / f"r{i}.log").read().splitlines()[-1] for i in range(4)]
    # Two slots on two GPUs: every run alone on its slot's GPU, no memory growth needed.
    assert sorted(seen) == ["gpu 4 None"] * 2 + ["gpu 7 None"] * 2
    assert seen[:2] == ["gpu 4 None", "gpu 7 None"]
    assert said[0].startswith("==> [1/4] r0 on GPU 4: ") and sum(
        s.startswith("<== ") and "done" in s for s in said) == 4

    # Three slots on two GPUs: slot 2 shares GPU 4, so memory grows instead of being taken.
    assert sweep.run_all(runs[:3], parallel=3, log_dir=str(tmp_path / "3"), gpus=["4", "7"],
                         env={}) == []
    assert [open(tmp_path / "3" / f"r{i}.log").read().splitlines()[-1] for i in range(3)] == [
        "gpu 4 true", "gpu 7 true", "gpu 4 true"]
    # One at a time, or no GPU: the environment as it is.
    assert sweep.run_all(runs[:1], parallel=1, log_dir=str(tmp_path / "1"), gpus=["4"],
                         env={"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert open(tmp_path / "1" / "r0.log").read().splitlines()[-1] == "gpu 0,1 None"


def test_failures_are_reported_and_stop_new_runs_unless_keep_going(tmp_path):
    runs = [_printing_run("bad", "import sys; print('broken'); sys.exit(3)"),
            _printing_run("good", "print('fine')")]
    said = []
    failures = sweep.run_all(runs, log_dir=str(tmp_path), say=said.append)
    assert failures == [sweep.Failure("bad", 3, str(tmp_path / "bad.log"))]
    assert not (tmp_path / "good.log").exists()  # Not started after the failure.
    assert any("FAILED with exit status 3" in s and "broken" in s for s in said)
    assert [f.name for f in sweep.run_all(runs, log_dir=str(tmp_path), keep_going=True,
                                          say=said.append)] == ["bad"]
    assert (tmp_path / "good.log").read_text().endswith("fine\n")
    # Logs are appended: the first attempt's output is still there.
    assert (tmp_path / "bad.log").read_text().count("\nbroken\n") == 2
    with pytest.raises(UsageError, match="--parallel=0: expected an int >= 1"):
        sweep.run_all(runs, parallel=0, log_dir=str(tmp_path))


def test_an_interrupted_sweep_stops_its_runs_with_sigterm(tmp_path):
    # On SIGTERM an experiment saves a checkpoint and stops; this run says it got the signal.
    code = ("import signal, sys, time\n"
            "def stop(*_):\n    print('SIGTERM: saving and stopping', flush=True)\n"
            "    sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)")
    log = tmp_path / "long.log"

    def say(text):  # Ctrl-C once the first run is up, as the second one starts.
        if text.startswith("==> [2/2]"):
            for _ in range(200):
                if log.exists() and "\nready\n" in log.read_text():  # not the header
                    break
                time.sleep(0.05)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run_all([_printing_run("long", code), _printing_run("next", "pass")],
                      parallel=2, log_dir=str(tmp_path), say=say)
    assert log.read_text().endswith("ready\nSIGTERM: saving and stopping\n")
    assert not (tmp_path / "next.log").exists()


def test_a_run_is_complete_only_at_its_steps_with_its_settings(tmp_path):
    config = flags.Config(backbone="mlp", train_steps=4, model_dir=str(tmp_path))
    assert not sweep.is_complete(str(tmp_path), "two_tasks", config)  # Nothing there.
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "two_tasks",
                                                      **config.to_json()}))
    (tmp_path / "results.json").write_text(json.dumps({"step": 2, "results": {}}))
    assert not sweep.is_complete(str(tmp_path), "two_tasks", config)  # A partial run.
    (tmp_path / "results.json").write_text(json.dumps({"step": 4, "results": {}}))
    assert sweep.is_complete(str(tmp_path), "two_tasks", config)
    assert not sweep.is_complete(str(tmp_path), "two_tasks", config, validation=True)
    assert not sweep.is_complete(str(tmp_path), "other", config)
    # A setting that shapes the run differs: not this run (training it again says why).
    assert not sweep.is_complete(str(tmp_path), "two_tasks",
                                 flags.Config(backbone="mlp", train_steps=4, seed=1))
    # Free settings (cadence, folder) may differ.
    assert sweep.is_complete(str(tmp_path), "two_tasks",
                             flags.Config(backbone="mlp", train_steps=4, eval_every=7))


def test_check_extra_names_the_flag_and_what_to_use_instead():
    sweep.check_extra(["--train_steps=5", "positional"], ("--seed",), "prog", "(why).")
    for flag in ("--seed=3", "-seed=3", "--seed"):
        with pytest.raises(UsageError) as error:
            sweep.check_extra([flag], ("--seed", "--tasks"), "prog", "(use --seeds).")
        assert str(error.value) == (f"{flag!r} after `--`: prog sets --seed, --tasks for each "
                                    "run itself (use --seeds).")
