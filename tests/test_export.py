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
