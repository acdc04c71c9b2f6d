"""Two local workers under MultiWorkerMirroredStrategy give the single-process result."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "workers", "multi_worker_train.py")
LAUNCHER = os.path.join(ROOT, "scripts", "launch_local_workers.py")
STEPS = 10


def _weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_worker")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    # `timeout -k`: a worker whose peer died can hang in collectives and ignore SIGTERM.
    multi = subprocess.run(["timeout", "-k", "10", "240", sys.executable, LAUNCHER,
                            "--num_workers=2", "--timeout=200", "--", sys.executable, WORKER,
                            str(out), str(STEPS)], capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stdout[-4000:] + multi.stderr[-2000:]
    single = subprocess.run([sys.executable, WORKER, str(out), str(STEPS)], capture_output=True,
                            text=True, env=env, timeout=200)
    assert single.returncode == 0, single.stderr[-3000:]
    return out, multi.stdout


def test_workers_end_equal_to_each_other_and_to_one_process(runs):
    out, stdout = runs
    reports = [json.loads(line.split("] ", 1)[1]) for line in stdout.splitlines()
               if line.startswith("[worker") and '"step"' in line]
    assert sorted(r["worker"] for r in reports) == [0, 1]
    assert all(r["step"] == STEPS for r in reports)
    assert [r["chief"] for r in sorted(reports, key=lambda r: r["worker"])] == [True, False]
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
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import multi_worker_train
        import tensorflow as tf

        model, trainer = multi_worker_train.build(tf.distribute.get_strategy(),
                                                  str(out / "run"))
    finally:
        sys.path.pop(0)
    assert trainer.global_step == STEPS
    for a, b in zip([v.numpy() for v in model.weights], _weights(out / "weights_0.npz")):
        np.testing.assert_array_equal(a, b)


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
