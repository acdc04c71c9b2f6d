"""mtl.export and scripts/export.py, scripts/predict.py: SavedModels per task and joint."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import mtl
import small_runs
from mtl import export, runs
from mtl.data import multi_digits
from mtl.training import model_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["left", "right", "sum"]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def _script(name, *args, timeout=180):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_data_dir):
    return small_runs.multi_digits_run(tmp_path_factory, digits_data_dir)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).random((5, *multi_digits.IMAGE_SHAPE), dtype=np.float32)


# A fresh interpreter: nothing of the exporting process (Keras objects, traced functions) helps.
RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    export_dir, batch_path, out_path = sys.argv[1:]
    x = tf.constant(np.load(batch_path))
    outputs = {}
    for archive in json.load(open(export_dir + "/export.json"))["archives"].values():
        loaded = tf.saved_model.load(export_dir + "/" + archive)
        outputs[archive + ":variables"] = np.array(len(loaded.variables))
        for signature, function in loaded.signatures.items():
            for name, value in function(inputs=x).items():
                outputs[f"{archive}:{signature}:{name}"] = value.numpy()
    np.savez(out_path, **outputs)
    """)


def test_exported_run_reloads_in_a_fresh_process(run_dir, batch, tmp_path):
    export_dir = str(tmp_path / "exported")
    paths = export.export_run(run_dir, export_dir)
    assert set(paths) == {*TASKS, "joint"}
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert info["tasks"] == TASKS and info["step"] == 4
    assert info["inputs"] == {"shape": [None, 16, 32, 1], "dtype": "float32"}
    # multi_digits feeds uint8 images / 255: read off the run's eval data and recorded.
    assert info["image_scaling"] == {"inputs": "unit_interval"}
    assert export.read_info(paths["left"]) == info  # A copy inside each archive.

    model = runs.restore_model(run_dir).model  # The in-memory reference.
    expected = {k: v.numpy() for k, v in model(batch, training=False).items()}
    np.save(tmp_path / "batch.npy", batch)
    reload = subprocess.run([sys.executable, "-c", RELOAD, export_dir, str(tmp_path / "batch.npy"),
                             str(tmp_path / "out.npz")], env=_env(), capture_output=True,
                            text=True, timeout=180)
    assert reload.returncode == 0, reload.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))

    for task in TASKS:
        # Per-task archive: serving_default -> {task: output}, nothing else.
        assert sorted(k for k in got if k.startswith(f"{task}:") and "variables" not in k) == [
            f"{task}:serving_default:{task}"]
        np.testing.assert_allclose(got[f"{task}:serving_default:{task}"], expected[task],
                                   rtol=1e-5, atol=1e-5)
        # Joint archive: a signature per task, and serving_default with every output.
        np.testing.assert_allclose(got[f"joint:{task}:{task}"], expected[task], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(got[f"joint:serving_default:{task}"], expected[task],
                                   rtol=1e-5, atol=1e-5)
    # One copy of the backbone in the joint archive: exactly the model's variables.
    assert int(got["joint:variables"]) == len(model.variables)
    assert int(got["left:variables"]) == len(model.task_model("left").variables)
    assert int(got["left:variables"]) < len(model.variables)


def test_a_run_without_model_json_is_rebuilt_from_its_experiment(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    os.remove(copy / "model.json")  # As a run of an older mtl.
    from_experiment = runs.restore_model(str(copy))
    from_record = runs.restore_model(run_dir)
    assert from_experiment.experiment.name == "multi_digits" and from_record.experiment is None
    assert from_experiment.config == from_record.config and from_record.step == 4
    assert len(from_experiment.model.variables) == len(from_record.model.variables)
    for mine, theirs in zip(from_experiment.model.variables, from_record.model.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_export_in_memory_model_built_from_models(tmp_path, batch):
    shared = keras.layers.Conv2D(4, 3, activation="relu")
    models = {task: keras.Sequential([keras.Input(multi_digits.IMAGE_SHAPE), shared,
                                      keras.layers.Flatten(), keras.layers.Dense(units)])
              for task, units in (("left", 10), ("sum", 1))}
    model = mtl.MultiTaskModel.from_models(models)
    paths = export.export(model, str(tmp_path), tasks=["sum"])
    assert sorted(paths) == ["joint", "sum"]
    assert sorted(os.listdir(tmp_path)) == ["export.json", "joint", "sum"]
    joint = export.load(paths["joint"])
    assert sorted(joint.signatures) == ["serving_default", "sum"]
    np.testing.assert_allclose(export.predict(joint, batch)["sum"], models["sum"](batch),
                               rtol=1e-5, atol=1e-5)


def test_unknown_task_is_an_error_listing_the_tasks(run_dir, tmp_path):
    model = runs.restore_model(run_dir).model
    with pytest.raises(ValueError, match=r"Cannot export task 'middle': the model has no such "
                                         r"task; its tasks are \['left', 'right', 'sum'\]"):
        export.export(model, str(tmp_path / "out"), tasks=["left", "middle"])
    assert not (tmp_path / "out").exists()  # Checked before anything is written.
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"Cannot export to '.*file/out': .*file is a file, not "
                                         r"a folder"):
        export.export(model, str(tmp_path / "file" / "out"))
    with pytest.raises(TypeError, match="export needs an mtl.MultiTaskModel"):
        export.export(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                      str(tmp_path / "out"))


def test_predict_rejects_unknown_signatures(tmp_path, batch):
    model = mtl.MultiTaskModel(mtl.backbones.mlp(multi_digits.IMAGE_SHAPE, widths=(4,)),
                               {"left": mtl.heads.classification(10)})
    export.export(model, str(tmp_path))
    with pytest.raises(ValueError, match=r"No signature 'right'; this SavedModel has "
                                         r"\['left', 'serving_default'\]"):
        export.predict(export.load(str(tmp_path / "joint")), batch, signature="right")
    with pytest.raises(FileNotFoundError, match="holds no SavedModel"):
        export.load(str(tmp_path))


def test_export_and_predict_scripts(run_dir, batch, tmp_path):
    export_dir = tmp_path / "exported"
    run = _script("export.py", f"--model_dir={run_dir}", f"--export_dir={export_dir}",
                  "--tasks=left,sum")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(export_dir)) == ["export.json", "joint", "left", "sum"]

    np.save(tmp_path / "batch.npy", batch)
    predicted = _script("predict.py", f"--export_dir={export_dir / 'joint'}", "--signature=sum",
                        f"--input={tmp_path / 'batch.npy'}")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert predicted.stdout.startswith("sum: shape (5, 1)\n  [0] [")



def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scripts_in_process(run_dir, tmp_path, capsys):
    exporter = _load_script("export")
    assert exporter.main([f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'x'}",
                          "--tasks=middle"]) == 2
    assert "error: Cannot export task 'middle'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert exporter.main([f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'out'}",
                          "--tasks=left", "--no_joint"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["export.json", "left"]
    capsys.readouterr()

    predictor = _load_script("predict")
    assert predictor.main([f"--export_dir={tmp_path / 'out' / 'left'}", f"--model_dir={run_dir}",
                           "--num_examples=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "left: shape (3, 10)" and len(lines) == 4
    assert all("label" in line for line in lines[1:])
    assert predictor.main([f"--export_dir={tmp_path / 'out' / 'left'}",
                           f"--input={tmp_path / 'none.npy'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------- a run of the Python API
IMAGE = multi_digits.IMAGE_SHAPE
API_TASKS = [("left", 10), ("sum", 1)]


def _api_tasks():
    return [mtl.Task("left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
            mtl.Task("sum", loss="mse")]


def _random_data(seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.random((32, *IMAGE), dtype=np.float32)
    y = {"left": rng.integers(0, 10, 32), "sum": rng.random((32, 1), dtype=np.float32)}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """A run folder written through mtl.Trainer (no config.json): 4 steps, checkpoints at 2, 4.
    Returns (model_dir, [trained value of each of model.variables])."""
    model_dir = str(tmp_path_factory.mktemp("api_run"))
    keras.utils.set_random_seed(1)
    model = mtl.MultiTaskModel(mtl.backbones.mlp(IMAGE, widths=(8,)),
                               {"left": mtl.heads.classification(10),
                                "sum": mtl.heads.regression(1, hidden=(4,))})
    trainer = mtl.Trainer(model, _api_tasks(), optimizer=keras.optimizers.Adam(1e-2),
                          model_dir=model_dir, log_every=2, checkpoint_every=2)
    trainer.fit(_random_data(), steps=4)
    return model_dir, [v.numpy() for v in model.variables]


def test_api_run_records_its_model_and_restores_bitwise(api_run):
    import tensorflow as tf

    model_dir, trained = api_run
    assert sorted(os.listdir(model_dir)) >= ["checkpoints", "model.json"]
    assert not os.path.exists(os.path.join(model_dir, "config.json"))
    record = json.load(open(os.path.join(model_dir, "model.json")))
    assert record["kind"] == "backbone_heads" and sorted(record["objects"]) == [
        "backbone", "task:left", "task:sum"]

    run = runs.restore_model(model_dir)
    assert run.step == 4 and run.checkpoint.endswith("ckpt-4") and run.config is None
    assert run.model.task_names == ("left", "sum")
    # The same variables in the same order (names differ: Keras numbers layers per process).
    assert len(run.model.variables) == len(trained) == 8
    for variable, value in zip(run.model.variables, trained):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    # The rebuilt model is one the Trainer's checkpoint restores into, every variable matched.
    rebuilt = model_record.rebuild_model(model_record.read_model_record(model_dir))
    status = tf.train.Checkpoint(model=rebuilt).restore(run.checkpoint).expect_partial()
    status.assert_existing_objects_matched()
    assert len(rebuilt.variables) == len(trained)
    for variable, value in zip(rebuilt.variables, trained):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_recorded_from_models_keep_their_shared_layer(tmp_path):
    import tensorflow as tf

    shared = keras.layers.Conv2D(4, 3, activation="relu")
    models = {task: keras.Sequential([keras.Input(IMAGE), shared, keras.layers.Flatten(),
                                      keras.layers.Dense(units)]) for task, units in API_TASKS}
    model = mtl.MultiTaskModel.from_models(models)
    for i, variable in enumerate(model.variables):  # Weights no initialiser would give.
        variable.assign(np.full(variable.shape, 0.01 * (i + 1), np.float32))
    assert model_record.record_model(str(tmp_path), model) == str(tmp_path / "model.json")
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "checkpoints" / "ckpt"))

    rebuilt = model_record.rebuild_model(model_record.read_model_record(str(tmp_path)))
    assert rebuilt.heads["left"].layers[0] is rebuilt.heads["sum"].layers[0]  # Still shared.
    assert len(rebuilt.variables) == len(model.variables) == 6
    tf.train.Checkpoint(model=rebuilt).restore(path).expect_partial() \
        .assert_existing_objects_matched()
    for mine, theirs in zip(rebuilt.variables, model.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


@keras.saving.register_keras_serializable(package="test_export")
class _Registered(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


class _Unregistered(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def _custom_model(layer):
    inputs = keras.Input((4,))
    backbone = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    return mtl.MultiTaskModel(backbone, {"sum": mtl.heads.regression(1)})


def test_a_model_that_cannot_be_rebuilt_is_not_recorded_and_export_says_why(tmp_path, caplog):
    # A registered custom layer is recorded; an unregistered one (Keras could not find its
    # class when rebuilding) gets a warning and no file.
    recorded = model_record.record_model(str(tmp_path / "ok"), _custom_model(_Registered()))
    assert recorded and os.path.isfile(recorded)
    assert type(_Registered()).__name__ in open(recorded).read()
    with caplog.at_level("WARNING"):
        trainer = mtl.Trainer(_custom_model(_Unregistered()), [mtl.Task("sum", loss="mse")],
                              optimizer="adam", model_dir=str(tmp_path / "run"))
    assert trainer.global_step == 0
    assert not (tmp_path / "run" / "model.json").exists()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "cannot be recorded" in warning and "_Unregistered" in warning
    with pytest.raises(mtl.UsageError, match=r"neither config.json .* nor model.json"):
        export.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_script_on_an_api_run_matches_the_trained_model(api_run, tmp_path, capsys):
    model_dir, _ = api_run
    assert _load_script("export").main([f"--model_dir={model_dir}",
                                        f"--export_dir={tmp_path}"]) == 0
    assert "exported step 4 from " in capsys.readouterr().out
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["step"] == 4 and info["tasks"] == ["left", "sum"]
    assert info["image_scaling"] == {}  # Nothing to read it off: integers will be refused.
    x = np.random.default_rng(3).random((3, *IMAGE), dtype=np.float32)
    expected = runs.restore_model(model_dir).model(x, training=False)
    got = export.predict(export.load(str(tmp_path / "joint")), x)
    for task in ("left", "sum"):
        np.testing.assert_allclose(got[task], expected[task], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- unreadable checkpoints
def _truncate(prefix):
    data = [f for f in os.listdir(os.path.dirname(prefix))
            if f.startswith(os.path.basename(prefix) + ".data-")]
    assert data, prefix
    path = os.path.join(os.path.dirname(prefix), data[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def test_export_of_a_truncated_newest_checkpoint_falls_back_or_names_the_file(api_run, tmp_path,
                                                                              capsys, caplog):
    import shutil

    run_copy = tmp_path / "run"
    shutil.copytree(api_run[0], run_copy)
    checkpoints = run_copy / "checkpoints"
    assert sorted(f for f in os.listdir(checkpoints) if f.endswith(".index")) == [
        "ckpt-2.index", "ckpt-4.index"]
    truncated = _truncate(str(checkpoints / "ckpt-4"))
    exporter = _load_script("export")

    # The newest is truncated: the previous one is exported, with a warning naming the file.
    with caplog.at_level("WARNING"):
        assert exporter.main([f"--model_dir={run_copy}",
                              f"--export_dir={tmp_path / 'out'}"]) == 0
    assert f"exported step 2 from {checkpoints / 'ckpt-2'}" in capsys.readouterr().out
    assert f"Checkpoint {checkpoints / 'ckpt-4'} is unreadable" in caplog.text
    assert json.loads((tmp_path / "out" / "export.json").read_text())["step"] == 2

    # Asked for by name, the truncated checkpoint is an error naming it; nothing is written.
    assert exporter.main([f"--model_dir={run_copy}", f"--export_dir={tmp_path / 'named'}",
                          f"--checkpoint={checkpoints / 'ckpt-4'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No readable checkpoint: ") and "ckpt-4" in err
    assert not (tmp_path / "named").exists()

    # None readable: an error naming every checkpoint, exit status 2.
    _truncate(str(checkpoints / "ckpt-2"))
    assert exporter.main([f"--model_dir={run_copy}", f"--export_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "error: No readable checkpoint: " in err
    assert f"{checkpoints / 'ckpt-4'}: " in err and f"{checkpoints / 'ckpt-2'}: " in err
    assert not (tmp_path / "none").exists() and os.path.exists(truncated)


# ---------------------------------------------------------------------- predict's checks
@pytest.fixture(scope="module")
def small_exports(tmp_path_factory):
    """One untrained model exported twice: with the [0, 1] image scaling, and without."""
    keras.utils.set_random_seed(2)
    model = mtl.MultiTaskModel(mtl.backbones.mlp(IMAGE, widths=(6,)),
                               {"left": mtl.heads.classification(10)})
    root = tmp_path_factory.mktemp("small_exports")
    export.export(model, str(root / "scaled"), image_scaling="unit_interval")
    export.export(model, str(root / "plain"))
    return model, root


def test_predict_refuses_inputs_that_do_not_fit_the_signature(small_exports):
    model, root = small_exports
    loaded = export.load(str(root / "scaled" / "left"))
    scaling = export.read_info(str(root / "scaled" / "left"))["image_scaling"]
    assert scaling == {"inputs": "unit_interval"}
    expected = r"expected float32 of shape \(None, 16, 32, 1\); got "
    with pytest.raises(mtl.UsageError, match=expected + r"float32 of shape \(5, 32, 16, 1\): "
                       r"the dimensions after the batch axis differ\. .*transposed"):
        export.predict(loaded, np.zeros((5, 32, 16, 1), np.float32), image_scaling=scaling)
    with pytest.raises(mtl.UsageError, match=expected + r"float32 of shape \(16, 32, 1\): rank 3, "
                       r"expected rank 4 .* add the batch axis: x\[None\]"):
        export.predict(loaded, np.zeros((16, 32, 1), np.float32))
    with pytest.raises(mtl.UsageError, match=expected + r"<U1 of shape \(2, 16, 32, 1\): not "
                                                        r"numbers"):
        export.predict(loaded, np.full((2, 16, 32, 1), "a"))
    with pytest.raises(mtl.UsageError, match=r"values in \[0, 255\], but the model was trained "
                                             r"on images in \[0, 1\]"):
        export.predict(loaded, np.linspace(0.0, 255.0, 2 * 512).reshape(2, *IMAGE),
                       image_scaling=scaling)
    with pytest.raises(mtl.UsageError, match=r"integer pixels must lie in 0\.\.255; these lie "
                                             r"in 0\.\.300"):
        export.predict(loaded, np.arange(2 * 512).reshape(2, *IMAGE) % 301,
                       image_scaling=scaling)
    with pytest.raises(mtl.UsageError, match=r"takes inputs \['inputs'\]; got \['image'\]"):
        export.predict(loaded, {"image": np.zeros((1, *IMAGE), np.float32)})


def test_predict_scales_integer_pixels_only_where_the_export_says_how(small_exports):
    model, root = small_exports
    pixels = np.random.default_rng(4).integers(0, 256, (3, *IMAGE)).astype(np.uint8)
    floats = pixels.astype(np.float32) / 255.0
    expected = model(floats, training=False)["left"].numpy()
    scaled = export.load(str(root / "scaled" / "left"))
    scaling = export.read_info(str(root / "scaled" / "left"))["image_scaling"]
    for given in (pixels, pixels.astype(np.int64)):
        np.testing.assert_array_equal(
            export.predict(scaled, given, image_scaling=scaling)["left"],
            export.predict(scaled, floats, image_scaling=scaling)["left"])
    np.testing.assert_allclose(export.predict(scaled, pixels, image_scaling=scaling)["left"],
                               expected, rtol=1e-5, atol=1e-6)
    # float64 is narrowed to the signature's float32.
    np.testing.assert_array_equal(export.predict(scaled, floats.astype(np.float64))["left"],
                                  export.predict(scaled, floats)["left"])
    # Without a recorded scaling, integer pixels are refused with the way to convert them.
    plain = export.load(str(root / "plain" / "left"))
    assert export.read_info(str(root / "plain" / "left"))["image_scaling"] == {}
    with pytest.raises(mtl.UsageError, match=r"got int64 of shape \(3, 16, 32, 1\): integers for "
                       r"a float input, .* x\.astype\('float32'\) / 255"):
        export.predict(plain, pixels.astype(np.int64))


def test_predict_script_refuses_bad_input_files(small_exports, tmp_path, capsys):
    _, root = small_exports
    predictor = _load_script("predict")
    archive = f"--export_dir={root / 'scaled' / 'joint'}"

    (tmp_path / "text.npy").write_text("1 2 3\n4 5 6\n")
    assert predictor.main([archive, f"--input={tmp_path / 'text.npy'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --input {str(tmp_path / 'text.npy')!r} cannot be read as a "
                          "NumPy file") and "b'1 2 3\\n4 5 6\\n'" in err

    np.save(tmp_path / "rank3.npy", np.zeros((16, 32, 1), np.float32))
    assert predictor.main([archive, f"--input={tmp_path / 'rank3.npy'}"]) == 2
    assert ("error: Input 'inputs': expected float32 of shape (None, 16, 32, 1); got float32 of "
            "shape (16, 32, 1): rank 3, expected rank 4") in capsys.readouterr().err

    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    assert predictor.main([archive, f"--input={tmp_path / 'strings.npy'}"]) == 2
    assert "got <U1 of shape (1, 2): not numbers" in capsys.readouterr().err

    np.save(tmp_path / "pixels.npy", np.full((2, *IMAGE), 255, np.uint8))
    assert predictor.main([archive, "--signature=left", f"--input={tmp_path / 'pixels.npy'}"]) == 0
    assert capsys.readouterr().out.startswith("left: shape (2, 10)\n")
    assert predictor.main([f"--export_dir={root / 'plain' / 'joint'}",
                           f"--input={tmp_path / 'pixels.npy'}"]) == 2
    assert "integers for a float input" in capsys.readouterr().err

    assert predictor.main([archive]) == 2  # Neither --input nor --num_examples.
    assert capsys.readouterr().err.startswith("error: give either --input=FILE or "
                                              "--num_examples=N")


def test_mtl_export_and_transfer_are_attributes_of_the_package():
    code = ("import mtl; print(mtl.export.export.__module__, mtl.transfer.init_backbone.__name__, "
            "mtl.export.predict.__name__)")
    run = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["mtl.export", "init_backbone", "predict"]
