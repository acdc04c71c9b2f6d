"""Two local workers under MultiWorkerMirroredStrategy give the single-process result: training,
evaluation (partial and empty parts of the last batch), the README's command, and
`--input_sharding=shard` (each worker reads only its half; an update is still the mean over its
global batch; a resumed run goes on as the uninterrupted one)."""

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mtl import experiment
from mtl.config import Config, UsageError
from mtl.training import input_state

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "workers", "multi_worker_train.py")
LAUNCHER = os.path.join(ROOT, "scripts", "launch_local_workers.py")
STEPS = 10
README_STEPS, README_EVAL_EVERY = 10, 5

sys.path.insert(0, os.path.dirname(WORKER))
import multi_worker_train as worker  # noqa: E402

sys.path.pop(0)


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _env(digits_data_dir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT,
           "TFDS_DATA_DIR": digits_data_dir}
    env.pop("TF_CONFIG", None)
    return env


def _failure(run) -> str:
    """The end of each worker's output (the first failure is often not the last lines)."""
    lines = run.stdout.splitlines()
    parts = [f"exit status {run.returncode}; stderr: {run.stderr[-1000:]}"]
    for i in (0, 1):
        own = [line for line in lines if line.startswith(f"[worker {i}]")
               and "Collective all_reduce" not in line and "eagerly has" not in line]
        parts.append("\n".join(own)[-2500:])
    return "\n".join(parts)


def _reports(stdout) -> dict:
    """{worker index: its JSON report} from the launcher's prefixed output."""
    reports = [json.loads(line.split("] ", 1)[1]) for line in stdout.splitlines()
               if line.startswith("[worker") and '"step"' in line]
    return {r["worker"]: r for r in reports}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data_dir):
    out = tmp_path_factory.mktemp("multi_worker")
    env = _env(digits_data_dir)
    # `timeout -k`: a worker whose peer died can hang in collectives and ignore SIGTERM.
    multi = subprocess.run(["timeout", "-k", "10", "300", sys.executable, LAUNCHER,
                            "--num_workers=2", "--timeout=280", "--", sys.executable, WORKER,
                            str(out), str(STEPS)], capture_output=True, text=True, env=env)
    assert multi.returncode == 0, _failure(multi)
    single = subprocess.run([sys.executable, WORKER, str(out), str(STEPS)], capture_output=True,
                            text=True, env=env, timeout=200)
    assert single.returncode == 0, single.stderr[-3000:]
    reports = _reports(multi.stdout)
    reports["single"] = json.loads(single.stdout.strip().splitlines()[-1])
    return out, reports


def test_workers_end_equal_to_each_other_and_to_one_process(runs):
    out, reports = runs
    assert sorted(k for k in reports if k != "single") == [0, 1]
    assert all(reports[i]["step"] == STEPS for i in (0, 1))
    assert [reports[i]["chief"] for i in (0, 1)] == [True, False]
    w0, w1, ref = (_weights(out / f"weights_{i}.npz") for i in (0, 1, "single"))
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(w0, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(a).max()) for a in ref) > 0.1


def test_only_the_chief_writes_to_model_dir_and_its_checkpoint_restores(runs):
    out, _ = runs
    checkpoints = sorted(os.listdir(out / "run" / "checkpoints"))
    assert checkpoints == ["checkpoint", "ckpt-10.data-00000-of-00001", "ckpt-10.index",
                           "ckpt-5.data-00000-of-00001", "ckpt-5.index", "model_signature.json"]
    model, trainer = worker.build(tf.distribute.get_strategy(), str(out / "run"))
    assert trainer.global_step == STEPS
    for a, b in zip([v.numpy() for v in model.weights], _weights(out / "weights_0.npz")):
        np.testing.assert_array_equal(a, b)


def test_evaluation_on_two_workers_is_one_process_evaluating_the_whole_file(runs):
    """A file-based eval pipeline (TF's default would shard it by file and fail on one file),
    whose last batch splits 3 + 2 or 1 + 0 between the workers: the metrics, summed across
    workers, are those of one process evaluating every example with the same weights."""
    _, reports = runs
    single = reports["single"]["eval"]
    assert sorted(single) == sorted(worker.EVAL_CASES)
    for i in (0, 1):
        evaluated = reports[i]["eval"]
        assert evaluated == reports[0]["eval"]  # every worker reports the reduced values
        for case, tasks in single.items():
            for task, metrics in tasks.items():
                for name, value in metrics.items():
                    assert evaluated[case][task][name] == pytest.approx(value, rel=1e-6), \
                        (case, task, name)
    # Not a vacuous comparison: the two cases give different numbers.
    assert single["uneven_last_batch"]["a"]["loss"] != single["empty_part"]["a"]["loss"]


# ---------------------------------------------------------------------- --input_sharding
def _split_ids(digits_data_dir):
    import tensorflow_datasets as tfds

    split = tfds.as_numpy(tfds.load("multi_digits", split="train", data_dir=digits_data_dir,
                                    batch_size=-1))
    return worker.fingerprints(split["image"], split["source_ids"]).numpy()


def test_with_shard_each_worker_reads_and_decodes_only_its_half(runs, digits_data_dir):
    out, reports = runs
    everything = _split_ids(digits_data_dir)
    assert len(np.unique(everything)) == len(everything) == 12_000  # ids tell examples apart
    read = [np.load(out / f"read_{i}.npy") for i in (0, 1)]
    # Everything either worker decoded while training 4 steps and resuming (the first-batch
    # check of the train data included): 6,000 examples each, no example on both.
    assert [len(r) for r in read] == [6_000, 6_000]
    assert [reports[i]["input_sharding"]["read"] for i in (0, 1)] == [6_000, 6_000]
    assert not np.intersect1d(read[0], read[1]).size
    np.testing.assert_array_equal(np.union1d(read[0], read[1]), np.unique(everything))


def test_with_shard_an_update_is_the_mean_over_the_union_of_the_workers_batches(runs):
    """README, How a step works: each task's loss is the mean over the global batch, here the
    first per-replica batch of worker 0 and of worker 1 (disjoint halves of the data)."""
    from experiment_scripts import load

    out, _ = runs
    first = [np.load(out / f"first_step_{i}.npz") for i in (0, 1)]
    config = dataclasses.replace(worker.shard_config(), strategy="default")
    exp = load("multi_digits").EXPERIMENT
    names = [t.name for t in exp.tasks(config)]
    model = exp.model(config, names)
    model.set_weights([first[0][f"initial_{i}"] for i in range(len(model.weights))])
    features = np.concatenate([f["features"] for f in first])
    assert len(features) == worker.SHARD_BATCH
    assert not np.array_equal(first[0]["features"], first[1]["features"])
    outputs = {k: np.asarray(v, np.float64) for k, v in model(features).items()}
    expected = {}
    for task in ("left", "right"):
        label = np.concatenate([f[f"label_{task}"] for f in first])
        logits = outputs[task]
        log_norm = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        expected[task] = np.mean(log_norm - logits[np.arange(len(label)), label])
    label = np.concatenate([f["label_sum"] for f in first])
    expected["sum"] = np.mean((outputs["sum"][:, 0] - label) ** 2)
    for task in names:
        assert float(first[0][f"loss_{task}"]) == float(first[1][f"loss_{task}"])
        assert float(first[0][f"loss_{task}"]) == pytest.approx(expected[task], rel=1e-5), task


def test_with_shard_a_resumed_run_goes_on_as_the_uninterrupted_one(runs):
    """2 steps, a new Trainer restored from the checkpoint (each worker skips the batches its
    replica read), 2 more: the weights of 4 steps straight."""
    out, reports = runs
    assert [reports[i]["input_sharding"]["resumed_from"] for i in (0, 1)] == [2, 2]
    for i in (0, 1):
        with np.load(out / f"resume_{i}.npz") as f:
            count = len(f.files) // 2
            for k in range(count):
                np.testing.assert_array_equal(f[f"resumed_{k}"], f[f"straight_{k}"])


class _Strategy:
    """What `distributed_train_data` and `InputState._skipping` read of a strategy, for
    `replicas` replicas fed by one input pipeline (mirrored devices on one machine)."""

    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas

    def distribute_datasets_from_function(self, make):
        return make(tf.distribute.InputContext(1, 0, self.num_replicas_in_sync))


def test_on_one_input_pipeline_shard_is_exact():
    """One worker (here with 2 replicas) reads everything either way: the experiment's
    train_data is called alike, for the whole stream; with 2 workers, shard asks for a part."""
    calls = []

    def train_data(config, task_names, input_context=None):
        calls.append((config.input_sharding, config.batch_size, input_context))
        return tf.data.Dataset.range(8).batch(config.batch_size)

    exp = experiment.Experiment(name="e", tasks=None, model=None, eval_data=None,
                                train_data=train_data)
    for sharding in ("exact", "shard"):
        make = experiment.distributed_train_data(exp, Config(batch_size=8,
                                                             input_sharding=sharding),
                                                 ["a"], _Strategy(2))
        make(tf.distribute.InputContext(1, 0, 2))
    assert calls == [("exact", 4, None), ("shard", 4, None)]
    two_workers = tf.distribute.InputContext(2, 1, 2)
    make(two_workers)
    assert calls[-1] == ("shard", 4, two_workers)


def test_a_tfds_split_is_cut_into_disjoint_parts_before_decoding(digits_data_dir):
    """`pipeline.load_tfds` with an input context (what the TFDS experiments read through)."""
    from mtl.data import pipeline

    parts = []
    for i in (0, 1):
        ds = pipeline.load_tfds("multi_digits", "test[:11]", data_dir=digits_data_dir,
                                input_context=tf.distribute.InputContext(2, i, 2))
        examples = next(iter(ds.batch(100)))
        parts.append(worker.fingerprints(examples["image"], examples["source_ids"]).numpy())
    whole = next(iter(pipeline.load_tfds("multi_digits", "test[:11]",
                                         data_dir=digits_data_dir).batch(100)))
    assert [len(p) for p in parts] == [6, 5]
    np.testing.assert_array_equal(np.concatenate(parts),
                                  worker.fingerprints(whole["image"], whole["source_ids"]))


def test_a_resumed_pipeline_skips_what_all_its_replicas_read():
    """2 replicas fed by one pipeline take 2 of its batches a step: after 3 steps it skips 6."""
    state = input_state.InputState(_Strategy(2), checkpointer=None, micro_batches=1,
                                   checkpoint_input=False)
    skipped = state._skipping(lambda context: tf.data.Dataset.range(100).batch(1), 3)
    assert int(next(iter(skipped))[0]) == 6


def test_shard_is_refused_for_an_experiment_that_cannot_read_a_part():
    exp = experiment.Experiment(name="whole", tasks=None, model=None, eval_data=None,
                                train_data=lambda config, task_names: None)
    with pytest.raises(UsageError, match=r"--input_sharding=shard: experiment 'whole' cannot "
                                         r"read a part .* use --input_sharding=exact"):
        experiment.distributed_train_data(exp, Config(input_sharding="shard"), ["a"],
                                          _Strategy(2))
    with pytest.raises(UsageError, match=r"--input_sharding='parts' is unknown; expected one "
                                         r"of \['exact', 'shard'\]"):
        Config(input_sharding="parts")


def test_a_resume_may_change_input_sharding_only_when_allowed(tmp_path):
    exp = experiment.Experiment(name="e", tasks=None, model=None, train_data=None,
                                eval_data=None)
    record = {"experiment": "e", **Config(model_dir=str(tmp_path)).to_json()}
    (tmp_path / experiment.CONFIG_RECORD).write_text(json.dumps(record))
    with pytest.raises(UsageError, match=r'input_sharding: "exact" in the run, "shard" now'):
        experiment.check_run_record(exp, Config(model_dir=str(tmp_path),
                                                input_sharding="shard"), str(tmp_path))
    changes = experiment.check_run_record(
        exp, Config(model_dir=str(tmp_path), input_sharding="shard",
                    allow_config_change=("input_sharding",)), str(tmp_path))
    assert changes["input_sharding"] == ("exact", "shard")
    del record["input_sharding"]  # a run recorded before the setting existed: exact
    (tmp_path / experiment.CONFIG_RECORD).write_text(json.dumps(record))
    assert experiment.check_run_record(exp, Config(model_dir=str(tmp_path)),
                                       str(tmp_path)) == {}


# ------------------------------------------------------------------ the README's command
def readme_command() -> list[str]:
    """The README's local multi-worker command (Distributed training), as written."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    [block] = [b for b in blocks if "launch_local_workers.py" in b and "experiments/" in b]
    return shlex.split(block.replace("\\\n", " "))


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, digits_data_dir):
    """The README's command run from a folder that has the repository's scripts and
    experiments (so its relative paths and `--model_dir=runs/mw` work as written), with a
    short run's step counts added to the experiment's flags."""
    cwd = tmp_path_factory.mktemp("readme_multi_worker")
    for folder in ("scripts", "experiments"):
        os.symlink(os.path.join(ROOT, folder), cwd / folder)
    command = [sys.executable if word == "python" else word for word in readme_command()]
    command += [f"--train_steps={README_STEPS}", f"--eval_every={README_EVAL_EVERY}"]
    run = subprocess.run(["timeout", "-k", "10", "300", *command], cwd=cwd, capture_output=True,
                         text=True, env=_env(digits_data_dir))
    assert run.returncode == 0, _failure(run)
    model_dir = cwd / dict(w.split("=", 1) for w in command if w.startswith("--model_dir="))[
        "--model_dir"]
    return model_dir, run.stdout


def test_readme_command_is_the_documented_multi_worker_run():
    command = readme_command()
    assert command[:4] == ["python", "scripts/launch_local_workers.py", "--num_workers=2", "--"]
    assert command[4:7] == ["python", "experiments/multi_digits.py", "--strategy=multi_worker"]


def test_readme_command_trains_evaluates_on_both_workers_and_writes_results(readme_run):
    model_dir, stdout = readme_run
    for i in (0, 1):
        assert re.search(rf"\[worker {i}\] .*step {README_EVAL_EVERY} eval: left: loss=", stdout)
        assert f"[worker {i}] Results at step {README_STEPS}:" in stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["step"] == README_STEPS and sorted(results["results"]) == [
        "left", "right", "sum"]


def test_readme_command_evaluates_as_one_process_with_the_same_weights(readme_run, tmp_path):
    """One process, restored from a copy of the run folder (already at --train_steps: it only
    evaluates), gives the results the two workers wrote."""
    from experiment_scripts import load

    model_dir, _ = readme_run
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    os.remove(copy / "results.json")
    config = Config.from_json({**json.loads((model_dir / "config.json").read_text()),
                               "model_dir": str(copy), "strategy": "default"})
    single = experiment.train_and_evaluate(load("multi_digits").EXPERIMENT, config)
    written = json.loads((model_dir / "results.json").read_text())["results"]
    for task, metrics in single.items():
        for name, value in metrics.items():
            assert written[task][name] == pytest.approx(value, rel=1e-6), (task, name)


def test_readme_command_trains_the_weights_of_one_process(readme_run, tmp_path):
    """The chief's final checkpoint against the same run in one process (both workers hold
    the same weights: the evaluation above runs half the data on each)."""
    from experiment_scripts import load

    model_dir, _ = readme_run
    config = Config.from_json({**json.loads((model_dir / "config.json").read_text()),
                               "model_dir": str(tmp_path / "single"), "strategy": "default",
                               "eval_every": README_STEPS})  # evaluations do not train
    experiment.train_and_evaluate(load("multi_digits").EXPERIMENT, config)
    multi = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    single = tf.train.load_checkpoint(str(tmp_path / "single" / "checkpoints"))
    # The model's weights are saved where the object graph reaches them first: as the
    # optimizer's trainable variables (the 14 kernels and biases of backbone and heads).
    names = [n for n in multi.get_variable_to_shape_map()
             if n.startswith("optimizer/_trainable_variables/")]
    assert len(names) == 14
    # One replica saves its input position; several skip what they read when resumed.
    assert "input/.ATTRIBUTES/ITERATOR_STATE" in single.get_variable_to_shape_map()
    assert "input/.ATTRIBUTES/ITERATOR_STATE" not in multi.get_variable_to_shape_map()
    for name in names:
        np.testing.assert_allclose(multi.get_tensor(name), single.get_tensor(name), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_launcher_stops_all_workers_when_one_fails():
    code = ("import json, os, sys, time\n"
            "i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
            "print('worker', i, 'up', flush=True)\n"
            "sys.exit(3) if i == 1 else time.sleep(120)\n")
    run = subprocess.run([sys.executable, LAUNCHER, "--num_workers=2", "--", sys.executable,
                          "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert "[worker 0] worker 0 up" in run.stdout and "[worker 1] worker 1 up" in run.stdout


def test_launcher_gives_each_worker_its_own_free_port():
    sys.path.insert(0, os.path.dirname(LAUNCHER))
    try:
        import launch_local_workers as launcher
    finally:
        sys.path.pop(0)
    configs = [json.loads(c) for c in launcher.tf_configs(3, launcher.free_ports(3))]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"]["index"] for c in configs] == [0, 1, 2]
