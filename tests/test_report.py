"""mtl.evidence.report, scripts/report.py and scripts/run_baselines.py."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

import small_runs
from mtl.evidence import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MTL = {"left": {"loss": 0.5, "accuracy": 0.9}, "sum": {"loss": 2.0, "mae": 1.0}}
STL = {"left": {"loss": 0.4, "accuracy": 0.8}, "sum": {"loss": 2.5, "mae": 1.25}}


def test_delta_m_on_hand_made_tables():
    # left accuracy (higher is better): +(0.9 - 0.8) / 0.8 = +12.5 %
    # sum mae (lower is better):        -(1.0 - 1.25) / 1.25 = +20 %
    delta = report.delta_m(MTL, STL)
    assert delta.per_task == pytest.approx({"left": 12.5, "sum": 20.0})
    assert delta.value == pytest.approx(16.25)
    assert [(r.task, r.metric, r.lower_is_better) for r in delta.rows] == [
        ("left", "accuracy", False), ("sum", "mae", True)]

    # The left loss (lower is better) got worse: -(0.5 - 0.4) / 0.4 = -25 %.
    delta = report.delta_m(MTL, STL, metrics={"left": ["loss"], "sum": ["mae"]})
    assert delta.value == pytest.approx((-25.0 + 20.0) / 2)
    # Several metrics of a task are averaged first: every task weighs the same.
    delta = report.delta_m(MTL, STL, metrics={"left": ["accuracy", "loss"]})
    assert delta.per_task["left"] == pytest.approx((12.5 - 25.0) / 2)
    assert delta.value == pytest.approx(((12.5 - 25.0) / 2 + 20.0) / 2)


def test_tasks_without_a_usable_baseline_are_left_out_with_a_note():
    delta = report.delta_m({**MTL, "right": {"accuracy": 0.5}},
                           {"left": {"accuracy": 0.0}, "sum": STL["sum"]})
    assert delta.per_task == pytest.approx({"sum": 20.0})
    notes = {r.task: r.note for r in delta.rows}
    assert notes == {"left": "STL value is 0: no relative difference", "sum": "",
                     "right": "no single-task run"}
    assert report.delta_m({"a": {"accuracy": 1.0}}, {}).value is None
    text = report.markdown(delta)
    assert "| sum | mae | lower | 1.0000 | 1.2500 | 20.00 |" in text
    assert "| right | accuracy | higher | 0.5000 | – | – (no single-task run) |" in text
    assert "**Δm = +20.00%** over 1 task (sum +20.00%)" in text


@pytest.mark.parametrize("name, lower", [
    ("loss", True), ("mae", True), ("mse", True), ("rmse", True), ("error", True),
    ("mean_absolute_error", True), ("root_mean_squared_error", True), ("accuracy", False),
    ("sparse_categorical_accuracy", False), ("auc", False), ("precision", False),
    ("recall", False), ("f1_score", False), ("mean_io_u", False)])
def test_direction_from_the_metric_name(name, lower):
    assert report.lower_is_better(name) is lower


def test_unknown_direction_is_an_error_unless_given():
    with pytest.raises(ValueError, match=r"Cannot tell whether lower or higher is better for "
                                         r"metric 'psnr'"):
        report.lower_is_better("psnr")
    assert report.lower_is_better("psnr", {"psnr": "higher"}) is False
    delta = report.delta_m({"a": {"psnr": 30.0}}, {"a": {"psnr": 25.0}},
                           directions={"psnr": "higher"})
    assert delta.value == pytest.approx(20.0)


def _write_events(path, events):
    with tf.io.TFRecordWriter(path) as writer:
        for wall_time, step, tag, value in events:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, simple_value=value)])
            writer.write(event_pb2.Event(wall_time=wall_time, step=step,
                                         summary=summary).SerializeToString())


def test_read_scalars_v1_and_v2_values(tmp_path):
    # Summary v1 (simple_value), as other tools write them; a resumed run logs step 2 again.
    _write_events(str(tmp_path / "events.out.tfevents.1.a"),
                  [(1.0, 1, "left/loss", 3.0), (2.0, 2, "left/loss", 2.0)])
    _write_events(str(tmp_path / "events.out.tfevents.2.b"), [(3.0, 2, "left/loss", 1.5)])
    # Summary v2 (tensor values), as mtl's Trainer writes them.
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        tf.summary.scalar("loss/total", 4.0, step=3)
        tf.summary.text("note", "not a scalar", step=3)
    writer.close()
    scalars = report.read_scalars(str(tmp_path))
    assert scalars["left/loss"] == [(1, 3.0), (2, 1.5)]
    assert scalars["loss/total"] == [(3, 4.0)]
    assert "note" not in scalars


@pytest.fixture(scope="module")
def runs_dirs(tmp_path_factory, digits_data_dir):
    mtl_dir = small_runs.multi_digits_run(tmp_path_factory, digits_data_dir)
    stl_dir = small_runs.multi_digits_run(tmp_path_factory, digits_data_dir, name="stl_left",
                                          tasks=("left",))
    return mtl_dir, stl_dir


def test_write_report_on_real_runs(runs_dirs, tmp_path):
    mtl_dir, stl_dir = runs_dirs
    result = report.write_report(mtl_dir, {"left": stl_dir}, str(tmp_path), plots=False)
    mtl_acc = json.load(open(os.path.join(mtl_dir, "results.json")))["results"]["left"]["accuracy"]
    stl_acc = json.load(open(os.path.join(stl_dir, "results.json")))["results"]["left"]["accuracy"]
    assert result.delta.value == pytest.approx((mtl_acc - stl_acc) / stl_acc * 100)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["delta_m"] == pytest.approx(result.delta.value)
    text = (tmp_path / "report.md").read_text()
    assert text == result.markdown
    assert f"| left | accuracy | higher | {mtl_acc:.4f} | {stl_acc:.4f} |" in text
    assert "| sum | mae | lower |" in text and "Δm = " in text
    # The logs the curves are drawn from.
    logs = report.read_run(mtl_dir, "MTL")
    assert [step for step, _ in logs.train["left/loss"]] == [2, 4]
    assert [step for step, _ in logs.eval["left/accuracy"]] == [4]
    assert logs.eval["left/accuracy"][0][1] == pytest.approx(mtl_acc)

    with pytest.raises(ValueError, match=r"that run has no results for task 'sum'; its tasks "
                                         r"are \['left'\]"):
        report.write_report(mtl_dir, {"sum": stl_dir}, str(tmp_path))


def test_png_curves(runs_dirs, tmp_path, monkeypatch):
    mtl_dir, stl_dir = runs_dirs
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = report.write_report(mtl_dir, {"left": stl_dir}, str(tmp_path))
        assert result.notes == ["PNG curves skipped: matplotlib is not installed (pip install "
                                "matplotlib, or pip install -e '.[report]')."]
        assert not any(f.endswith(".png") for f in os.listdir(tmp_path))
        return
    result = report.write_report(mtl_dir, {"left": stl_dir}, str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".png")) == [
        "curves_left.png", "curves_right.png", "curves_sum.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # As if it were not installed.
    result = report.write_report(mtl_dir, {"left": stl_dir}, str(tmp_path / "again"))
    assert "matplotlib is not installed" in result.notes[0]


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_script(runs_dirs, tmp_path, capsys):
    mtl_dir, stl_dir = runs_dirs
    script = _load_script("report")
    assert script.main([f"--mtl={mtl_dir}", f"--stl=left:{stl_dir}", f"--out={tmp_path}",
                        "--metric=left:loss", "--no_plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Multi-task report") and "| left | loss | lower |" in out
    assert "Δm = " in out
    assert script.main([f"--mtl={mtl_dir}", f"--stl={stl_dir}", f"--out={tmp_path}"]) == 2
    assert "expected TASK:RUN_FOLDER" in capsys.readouterr().err


def test_report_refuses_runs_that_cannot_be_compared(runs_dirs, tmp_path, capsys):
    import shutil

    mtl_dir, stl_dir = runs_dirs
    script = _load_script("report")
    out = tmp_path / "report"

    # A "single-task" baseline that trained three tasks.
    assert script.main([f"--mtl={mtl_dir}", f"--stl=left:{mtl_dir}", f"--out={out}"]) == 2
    assert capsys.readouterr().err == (
        f"error: --stl=left:{mtl_dir} is not a single-task run: it trained 3 tasks ['left', "
        "'right', 'sum']. A baseline trains one task (e.g. --tasks=left).\n")

    # A baseline trained for 8 steps against the MTL run's 4.
    longer = tmp_path / "stl_longer"
    shutil.copytree(stl_dir, longer)
    results = json.loads((longer / "results.json").read_text())
    (longer / "results.json").write_text(json.dumps({**results, "step": 8}))
    assert script.main([f"--mtl={mtl_dir}", f"--stl=left:{longer}", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Runs trained for different numbers of steps cannot be "
                          f"compared: the MTL run {mtl_dir} ended at step 4, the single-task "
                          f"run of 'left' {longer} at step 8.")
    with pytest.raises(ValueError, match="different numbers of steps"):  # The API too.
        report.write_report(mtl_dir, {"left": str(longer)}, str(out))

    # --out under a file: refused before any run is read.
    (tmp_path / "notes.txt").write_text("x")
    assert script.main([f"--mtl={mtl_dir}", f"--stl=left:{stl_dir}",
                        f"--out={tmp_path / 'notes.txt' / 'report'}"]) == 2
    assert capsys.readouterr().err == (
        f"error: The report folder {str(tmp_path / 'notes.txt' / 'report')!r} lies under the "
        f"file {tmp_path / 'notes.txt'}; choose a folder.\n")
    assert not out.exists()  # Nothing was written by a refused report.

    # A folder that is not a finished run.
    assert script.main([f"--mtl={tmp_path}", f"--stl=left:{stl_dir}", f"--out={out}"]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


def test_run_baselines_plans_one_run_per_task_then_the_multi_task_run():
    script = _load_script("run_baselines")
    assert script.experiment_tasks("multi_digits", script.parse_args(
        ["--experiment=multi_digits", "--out=x"]).experiments_dir) == ["left", "right", "sum"]
    plan = script.plan("multi_digits", "out", ["left", "sum"], ["--train_steps=5"], "exps")
    assert plan == [
        ("stl_left", [sys.executable, os.path.join("exps", "multi_digits.py"),
                      "--model_dir=" + os.path.join("out", "stl_left"), "--tasks=left",
                      "--train_steps=5"]),
        ("stl_sum", [sys.executable, os.path.join("exps", "multi_digits.py"),
                     "--model_dir=" + os.path.join("out", "stl_sum"), "--tasks=sum",
                     "--train_steps=5"]),
        ("mtl", [sys.executable, os.path.join("exps", "multi_digits.py"),
                 "--model_dir=" + os.path.join("out", "mtl"), "--tasks=left,sum",
                 "--train_steps=5"])]
    # Per architecture: the baselines once, a multi-task run per architecture.
    plan = script.plan("multi_digits", "out", ["left"], [], "exps", ["hps", "mmoe"])
    assert [(name, command[2:]) for name, command in plan] == [
        ("stl_left", ["--model_dir=" + os.path.join("out", "stl_left"), "--tasks=left"]),
        ("mtl", ["--model_dir=" + os.path.join("out", "mtl"), "--tasks=left"]),
        ("mtl_mmoe", ["--model_dir=" + os.path.join("out", "mtl_mmoe"), "--tasks=left",
                      "--architecture=mmoe"])]


def test_run_baselines_end_to_end(tmp_path, digits_data_dir):
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "run_baselines.py"),
         "--experiment=multi_digits", f"--out={tmp_path}", "--tasks=left", "--parallel=2", "--",
         f"--data_dir={digits_data_dir}", "--backbone=mlp", "--train_steps=2", "--eval_every=2",
         "--checkpoint_every=2", "--batch_size=8", "--eval_steps=1"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    # One task keeps the test short: the MTL run then trains that task alone too. The two
    # runs train at once, each writing its output to logs/.
    assert sorted(os.listdir(tmp_path)) == ["logs", "mtl", "report", "stl_left"]
    assert {"mtl.log", "stl_left.log"} <= set(os.listdir(tmp_path / "logs"))
    assert "step 2" in (tmp_path / "logs" / "mtl.log").read_text()
    for name in ("stl_left", "mtl"):
        assert json.loads((tmp_path / name / "results.json").read_text())["step"] == 2
    assert (tmp_path / "report" / "report.md").exists()
    assert "**Δm = " in run.stdout and "over 1 task " in run.stdout
