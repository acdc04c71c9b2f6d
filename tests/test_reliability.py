"""Crashes, signals, corrupt or foreign checkpoints, full disks: the run's work survives."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import mtl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "multi_digits.py")
STEPS = 30


def _command(model_dir, data_dir, *extra):
    return [sys.executable, SCRIPT, f"--model_dir={model_dir}", f"--data_dir={data_dir}",
            f"--train_steps={STEPS}", "--checkpoint_every=5", f"--eval_every={STEPS}",
            "--eval_steps=1", "--batch_size=32", "--deterministic", "--log_every=5", *extra]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _final_tensors(model_dir):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{STEPS}"))
    return {name: reader.get_tensor(name)
            for name, dtype in reader.get_variable_to_dtype_map().items()
            if dtype != tf.variant and not name.startswith(("save_counter", "_CHECKPOINTABLE"))}


def _any_readable_checkpoint(model_dir) -> bool:
    folder = os.path.join(model_dir, "checkpoints")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".index"):
            try:
                reader = tf.train.load_checkpoint(os.path.join(folder, name[:-len(".index")]))
                for tensor, dtype in reader.get_variable_to_dtype_map().items():
                    if dtype != tf.variant:
                        reader.get_tensor(tensor)
                return True
            except Exception:  # noqa: BLE001 — a truncated or half-written checkpoint
                continue
    return False


def _wait_for(path, proc, timeout=240):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_data_dir):
    model_dir = str(tmp_path_factory.mktemp("straight"))
    run = subprocess.run(_command(model_dir, digits_data_dir), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return _final_tensors(model_dir)


@pytest.mark.parametrize("kill_after", [
    "ckpt-5.index",  # during the first checkpoint write: its index exists, its record not yet
    "ckpt-15.index",
])
def test_sigkill_then_rerun_gives_bitwise_the_same_weights(tmp_path, digits_data_dir,
                                                           reference, kill_after):
    model_dir = str(tmp_path / "run")
    proc = subprocess.Popen(_command(model_dir, digits_data_dir), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(os.path.join(model_dir, "checkpoints", kill_after), proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=30)
    state = os.path.join(model_dir, "checkpoints", "checkpoint")
    completed = open(state).read() if os.path.exists(state) else ""
    # A checkpoint is complete when its index lists it, or (killed after its files were
    # written but before the index was) when every tensor of it reads back.
    complete = "ckpt-" in completed or _any_readable_checkpoint(model_dir)
    rerun = subprocess.run(_command(model_dir, digits_data_dir), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Resumed from the last complete checkpoint, or started afresh if none was complete.
    assert ("Restored" in rerun.stderr) == complete
    resumed = _final_tensors(model_dir)
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


@pytest.mark.parametrize("method", ["moco"])
def test_sigkill_with_a_stateful_weighting_method(tmp_path, digits_data_dir, method):
    """MoCo's tracked gradients (a [T, P] buffer created empty) and weights: resumed exactly
    after a kill -9 too. FAMO and Nash-MTL resume in process, cheaper:
    tests/test_weighting_training.py."""
    # The uninterrupted run trains at the same time, on the other core.
    straight = str(tmp_path / "straight")
    model_dir = str(tmp_path / "run")
    command = _command(model_dir, digits_data_dir, f"--weighting={method}")
    with open(tmp_path / "straight.log", "w") as straight_log:  # not a pipe: nobody reads it yet
        straight_proc = subprocess.Popen(
            _command(straight, digits_data_dir, f"--weighting={method}"), env=_env(),
            stdout=straight_log, stderr=subprocess.STDOUT)
        try:
            proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            _wait_for(os.path.join(model_dir, "checkpoints", "ckpt-10.index"), proc)
            time.sleep(0.5)  # past the checkpoint, into the next steps
            proc.kill()
            proc.communicate(timeout=30)
            straight_proc.wait(timeout=300)
        finally:
            if straight_proc.poll() is None:
                straight_proc.kill()
    assert straight_proc.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reference, resumed = _final_tensors(straight), _final_tensors(model_dir)
    assert any(name.startswith("weighting/") for name in reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_sigterm_saves_and_the_rerun_resumes(tmp_path, digits_data_dir):
    model_dir = str(tmp_path / "run")
    command = _command(model_dir, digits_data_dir)
    command[command.index(f"--train_steps={STEPS}")] = "--train_steps=100000"
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(os.path.join(model_dir, "checkpoints", "ckpt-5.index"), proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 143, stderr[-3000:]
    assert "Stopped by SIGTERM at step" in stderr and "Run the same command again" in stderr
    step = int(stderr.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert os.path.exists(os.path.join(model_dir, "checkpoints", f"ckpt-{step}.index"))
    command[command.index("--train_steps=100000")] = f"--train_steps={step + 2}"
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {step}." in rerun.stderr
    assert f"Results at step {step + 2}:" in rerun.stdout


# ------------------------------------------------------------------------------ in-process
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    return mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                              {"a": mtl.heads.classification(classes),
                               "b": mtl.heads.regression(1)})


def _tasks():
    return [mtl.Task("a", loss=CE), mtl.Task("b", loss="mse")]


def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(32, 6).astype(np.float32)
    y = {"a": (x[:, 0] > 0).astype(np.int64), "b": x[:, 1].copy()}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True).repeat()


def _trainer(model_dir, model=None, **kwargs):
    return mtl.Trainer(model or _model(), _tasks(), optimizer=keras.optimizers.Adam(0.01),
                       model_dir=str(model_dir), checkpoint_every=2, **kwargs)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    trainer.fit(_data(), steps=4)
    data_file = tmp_path / "checkpoints" / "ckpt-4.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        resumed = _trainer(tmp_path)
    assert resumed.global_step == 2
    assert "ckpt-4 is unreadable" in caplog.text
    resumed.fit(_data(), steps=4)  # and training goes on from there
    assert resumed.global_step == 4


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    _trainer(tmp_path, max_to_keep=1).fit(_data(), steps=2)
    data_file = tmp_path / "checkpoints" / "ckpt-2.data-00000-of-00001"
    data_file.write_bytes(b"")
    with pytest.raises(mtl.CheckpointReadError, match="No readable checkpoint"):
        _trainer(tmp_path)


def test_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    _trainer(tmp_path).fit(_data(), steps=2)
    other = _model(classes=5, seed=1)
    before = [v.numpy() for v in other.weights]
    with pytest.raises(mtl.CheckpointReadError, match=r"holds a different model: variable \d+ "
                                                      r"is .* of shape \(8, 3\) there"):
        _trainer(tmp_path, model=other)
    for got, want in zip([v.numpy() for v in other.weights], before):
        np.testing.assert_array_equal(got, want)


def test_checkpoint_of_other_tasks_is_refused(tmp_path):
    _trainer(tmp_path).fit(_data(), steps=2)
    keras.utils.set_random_seed(0)
    model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(8,)),
                               {"a": mtl.heads.classification(3), "c": mtl.heads.regression(1)})
    with pytest.raises(mtl.CheckpointReadError, match=r"tasks \['a', 'b'\], but this model has "
                                                      r"tasks \['a', 'c'\]"):
        mtl.Trainer(model, [mtl.Task("a", loss=CE), mtl.Task("c", loss="mse")],
                    optimizer="adam", model_dir=str(tmp_path))


def test_unwritable_model_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(mtl.CheckpointWriteError, match="is not writable"):
        _trainer(blocker / "run")


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    trainer.fit(_data(), steps=2)

    def no_space(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", no_space)
    with pytest.raises(mtl.CheckpointWriteError, match=r"Could not write the checkpoint of "
                                                       r"step 4 .*No space left on device.*"
                                                       r"previous checkpoint .*ckpt-2 is intact"):
        trainer.fit(_data(), steps=4)
    monkeypatch.undo()
    assert _trainer(tmp_path).global_step == 2
