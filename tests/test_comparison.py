"""mtl.evidence.comparison (selection, statistics over seeds, the report) and
scripts/compare.py: its errors before any run, and the protocol end to end on a tiny
experiment."""

import contextlib
import importlib.util
import io
import json
import math
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from mtl.evidence import comparison, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "tests", "comparison_experiments")
# The tiny budget of every run of the end-to-end test.
RUN_FLAGS = ["--backbone=mlp", "--train_steps=4", "--eval_every=2", "--checkpoint_every=4",
             "--log_every=2", "--batch_size=8", "--eval_batch_size=32"]


def _logs(name, tables, validation=None):
    """RunLogs of a run evaluated at the steps of `tables` ({step: {task: {metric: value}}});
    the last step is results.json's."""
    def scalars(by_step):
        out = {}
        for step, table in sorted(by_step.items()):
            for task, values in table.items():
                for metric, value in values.items():
                    out.setdefault(f"{task}/{metric}", []).append((step, value))
        return out

    last = max(tables)
    return report.RunLogs(label=name, model_dir=f"runs/{name}", step=last, results=tables[last],
                          train={}, eval=scalars(tables),
                          validation_results=validation[last] if validation else None,
                          validation=scalars(validation or {}))


def test_final_selects_the_last_evaluation_and_best_val_the_best_validation_step():
    test = {2: {"a": {"accuracy": 0.9}, "b": {"mae": 1.0}},
            4: {"a": {"accuracy": 0.5}, "b": {"mae": 3.0}},
            6: {"a": {"accuracy": 0.6}, "b": {"mae": 2.0}}}
    # Validation Δm vs a: 0.5, b: 2.0 -> step 2: (0.0 + 0.0)/2; step 4: (+20 - 25)/2 = -2.5;
    # step 6: (+40 + 10)/2 = +25 — step 6, though the test data is best at step 2.
    validation = {2: {"a": {"accuracy": 0.5}, "b": {"mae": 2.0}},
                  4: {"a": {"accuracy": 0.6}, "b": {"mae": 2.5}},
                  6: {"a": {"accuracy": 0.7}, "b": {"mae": 1.8}}}
    run = _logs("r", test, validation)
    reference = {"a": {"accuracy": 0.5}, "b": {"mae": 2.0}}
    assert comparison.select(run, "final") == comparison.Selected(6, test[6])
    chosen = comparison.select(run, "best_val", reference)
    assert (chosen.step, chosen.results) == (6, test[6])
    assert chosen.validation_delta_m == pytest.approx(25.0)
    # Ties go to the earliest step.
    flat = {s: {"a": {"accuracy": 0.5}, "b": {"mae": 2.0}} for s in (2, 4, 6)}
    assert comparison.select(_logs("r", test, flat), "best_val", reference).step == 2
    # results.json, not TensorBoard's float32 copy, gives the last step's values.
    assert comparison.evaluations(run, "eval")[6] is run.results
    with pytest.raises(ValueError, match="has no validation results"):
        comparison.select(_logs("r", test), "best_val", reference)


# Δm per seed of a method against its seed's baselines (a: accuracy, b: mae), seeds 0..2.
_STL = [{"a": {"accuracy": 0.80, "loss": 0.5}, "b": {"mae": 2.0, "loss": 4.0}},
        {"a": {"accuracy": 0.70, "loss": 0.6}, "b": {"mae": 2.5, "loss": 5.0}},
        {"a": {"accuracy": 0.75, "loss": 0.5}, "b": {"mae": 1.6, "loss": 3.0}}]


def _mtl(seed, gain_a, gain_b):
    """An MTL result with per-task gains gain_a, gain_b (%) over seed's baseline."""
    stl = _STL[seed]
    return {"a": {"accuracy": stl["a"]["accuracy"] * (1 + gain_a / 100), "loss": 0.1},
            "b": {"mae": stl["b"]["mae"] * (1 - gain_b / 100), "loss": 0.1}}


@pytest.fixture(scope="module")
def small_comparison():
    protocol = comparison.Protocol("exp", ("a", "b"), ("equal", "better", "worse", "noisy"),
                                   ("hps",), (0, 1, 2))
    gains = {"equal": [(1, 1), (0, 2), (2, 0)], "better": [(5, 5), (4, 6), (6, 5)],
             "worse": [(-3, -1), (-2, -3), (-4, -1)], "noisy": [(10, 0), (-8, 0), (1, 1)]}
    runs = {}
    for seed in protocol.seeds:
        for task in ("a", "b"):
            runs[comparison.stl_run_name(task, seed)] = _logs(
                "stl", {4: {task: _STL[seed][task]}})
        for method, per_seed in gains.items():
            runs[comparison.mtl_run_name("hps", method, seed)] = _logs(
                method, {2: _mtl(seed, 0, 0), 4: _mtl(seed, *per_seed[seed])})
    return comparison.compare(protocol, runs), gains


def test_delta_m_per_seed_then_over_seeds_and_the_paired_tests(small_comparison):
    result, gains = small_comparison
    entries = {e["method"]: e for e in result["entries"]}
    for method, per_seed in gains.items():
        values = [(ga + gb) / 2 for ga, gb in per_seed]
        d = entries[method]["delta_m"]
        assert d["values"] == pytest.approx(values)
        assert d["mean"] == pytest.approx(np.mean(values))
        assert d["std"] == pytest.approx(np.std(values, ddof=1))
        half = 4.302652729911275 * np.std(values, ddof=1) / math.sqrt(3)  # t_{0.975, 2}
        assert d["ci"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
        assert entries[method]["task_gains"]["a"]["values"] == pytest.approx(
            [ga for ga, _ in per_seed])
        assert entries[method]["steps"] == [4, 4, 4]
    assert "vs_equal" not in entries["equal"]
    assert entries["better"]["vs_equal"]["verdict"] == "better than equal weighting"
    assert entries["worse"]["vs_equal"]["verdict"] == "worse than equal weighting"
    assert entries["noisy"]["vs_equal"]["verdict"] == "no significant difference"
    assert entries["noisy"]["vs_equal"]["p_value"] > 0.05
    assert entries["better"]["vs_equal"]["p_value"] < 0.05
    # The baselines' metrics over seeds, every metric kept (Δm uses all but the loss).
    assert result["single_task"]["metrics"]["b"]["mae"]["values"] == [2.0, 2.5, 1.6]
    assert result["delta_m_metrics"] == {"a": ["accuracy"], "b": ["mae"]}
    # Curves: both evaluations, every seed.
    series = result["curves"]["b"]["series"]["better"]
    assert series["steps"] == [2, 4] and result["curves"]["b"]["lower_is_better"]
    assert series["mean"][0] == pytest.approx(np.mean([s["b"]["mae"] for s in _STL]))


def test_the_report_states_the_protocol_and_gives_verdicts_only_where_significant(
        small_comparison):
    result, _ = small_comparison
    text = comparison.markdown(result, command="python scripts/compare.py --seeds=3",
                               train_steps=4, eval_every=2,
                               plots=["delta_m.png", "tasks_a_b.png", "curves_a.png"])
    assert "- Command: `python scripts/compare.py --seeds=3`" in text
    assert "- Seeds: 3 (0, 1, 2)" in text and "- Steps: 4 train steps" in text
    assert "- Selection: `final`: each run's last evaluation (results.json, step 4)." in text
    assert "p is not corrected for multiple comparisons (3 here" in text
    assert "p (Holm) is Holm's adjustment over all of them" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()
            if line.startswith("| ") and "| hps |" in line}
    assert rows["equal"].endswith("| (reference) |")
    assert rows["better"].endswith("| better than equal weighting |")
    assert rows["worse"].endswith("| worse than equal weighting |")
    assert rows["noisy"].endswith("| no significant difference |")
    assert "| equal | hps | +1.00 ± 0.00 |" in text
    for plot in ("delta_m.png", "tasks_a_b.png", "curves_a.png"):
        assert f"![{plot}]({plot})" in text
    assert "| single-task | 0.7500 ± 0.0500 [0.6258, 0.8742] |" in text


def test_an_architecture_is_compared_with_hps_under_the_same_method_and_seeds():
    protocol = comparison.Protocol("exp", ("a", "b"), ("equal", "mgda"), ("hps", "mmoe"),
                                   (0, 1, 2))
    gains = {("hps", "equal"): [(1, 1), (0, 2), (2, 0)],
             ("hps", "mgda"): [(0, 0), (1, 1), (0, 2)],
             ("mmoe", "equal"): [(3, 3), (2, 4), (4, 3)],
             ("mmoe", "mgda"): [(5, -5), (0, 0), (1, 0)]}
    runs = {}
    for seed in protocol.seeds:
        for task in ("a", "b"):
            runs[comparison.stl_run_name(task, seed)] = _logs("stl", {4: {task: _STL[seed][task]}})
        for (architecture, method), per_seed in gains.items():
            runs[comparison.mtl_run_name(architecture, method, seed)] = _logs(
                method, {4: _mtl(seed, *per_seed[seed])})
    result = comparison.compare(protocol, runs)
    entries = {(e["architecture"], e["method"]): e for e in result["entries"]}
    assert "vs_hps" not in entries["hps", "equal"] and "vs_hps" not in entries["hps", "mgda"]
    delta = {key: [(ga + gb) / 2 for ga, gb in per_seed] for key, per_seed in gains.items()}
    d = np.subtract(delta["mmoe", "equal"], delta["hps", "equal"])  # 2, 2, 2.5
    vs = entries["mmoe", "equal"]["vs_hps"]
    assert vs["differences"]["values"] == pytest.approx(list(d))
    assert vs["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)))
    assert vs["verdict"] == "better than hps"
    assert entries["mmoe", "mgda"]["vs_hps"]["verdict"] == "no significant difference"
    # mmoe's methods are still paired with mmoe's equal.
    assert entries["mmoe", "mgda"]["vs_equal"]["differences"]["values"] == pytest.approx(
        list(np.subtract(delta["mmoe", "mgda"], delta["mmoe", "equal"])))
    text = comparison.markdown(result, command="c", train_steps=4, eval_every=2)
    assert "## Architectures against `hps`" in text
    assert f"| equal | mmoe | {d.mean():+.2f} [" in text and "| better than hps |" in text
    assert "p is not corrected for multiple comparisons (4 here" in text
    # Holm over the 4 paired tests of the report (2 against equal, 2 against hps).
    tests = [entries[key][kind] for key in (("mmoe", "equal"), ("hps", "mgda"), ("mmoe", "mgda"))
             for kind in ("vs_equal", "vs_hps") if kind in entries[key]]
    p = np.array([t["p_value"] for t in tests])
    order = np.argsort(p)
    holm = np.maximum.accumulate(np.minimum(1.0, (4 - np.arange(4)) * p[order]))
    assert [tests[i]["p_holm"] for i in order] == pytest.approx(list(holm), rel=1e-12)
    row = next(line for line in text.split("## Architectures against")[1].splitlines()
               if line.startswith("| equal | mmoe |"))
    assert row.endswith(f" | {comparison._p(vs['p_value'])} | {comparison._p(vs['p_holm'])} "
                        "| better than hps |")


def test_compare_refuses_runs_of_other_lengths():
    protocol = comparison.Protocol("exp", ("a",), ("equal",), ("hps",), (0, 1))
    runs = {"stl_a_s0": _logs("s", {4: {"a": {"accuracy": 0.5}}}),
            "stl_a_s1": _logs("s", {4: {"a": {"accuracy": 0.5}}}),
            "hps_equal_s0": _logs("m", {4: {"a": {"accuracy": 0.5}}}),
            "hps_equal_s1": _logs("m", {6: {"a": {"accuracy": 0.5}}})}
    with pytest.raises(ValueError, match="different numbers of steps"):
        comparison.compare(protocol, runs)


# ------------------------------------------------------------------------ the script
def _script():
    spec = importlib.util.spec_from_file_location(
        "script_compare", os.path.join(ROOT, "scripts", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(args):
    """compare.py's main in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = _script().main(args)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--methods=equal,nope"], "error: --methods='equal,nope': unknown weighting method "
                               "'nope'; expected some of ['aligned_mtl', "),
    (["--methods=equal,equal"], "error: --methods='equal,equal': a weighting method named "
                                "twice; expected some of "),
    (["--architectures=hps,moe"], "error: --architectures='hps,moe': unknown architecture "
                                  "'moe'; expected some of ['cgc', "),
    (["--seeds=1"], "error: --seeds=1: the confidence intervals and paired tests need at "
                    "least 2 seeds"),
    (["--parallel=0"], "error: --parallel=0: expected an int >= 1."),
    (["--select=best"], "error: argument --select: invalid choice: 'best'"),
    (["--experiment=nope"], "error: --experiment='nope': no experiment script "),
    (["--tasks=cls,color"], "error: --tasks='cls,color': the experiment's tasks are "
                            "['cls', 'reg']."),
    (["--", "--train_step=3"], "error: flags after `--`: Unknown command line flag "
                               "'train_step'"),
    (["--methods=equal,cagrad", "--", "--weighting_options=c=0.4"],
     "error: --weighting_options: Weighting method 'equal' takes no option 'c'"),
] + [(["--", f"{flag}=1"], f"error: '{flag}=1' after `--`: compare sets --seed, --weighting, "
      "--tasks, --model_dir, --architecture for each run itself (one run per seed, task, "
      "method and architecture); choose them with compare's own --seeds, --tasks, --methods "
      "and --architectures, and the folder with --out.")
     for flag in ("--seed", "--weighting", "--tasks", "--model_dir", "-architecture")])
def test_bad_input_exits_2_before_any_run(tmp_path, args, message):
    out = tmp_path / "out"
    status, stdout, err = _main(["--experiment=two_tasks", f"--experiments_dir={EXPERIMENTS}",
                                 f"--out={out}", *args])  # A later --experiment wins.
    assert status == 2, err
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "==>" not in stdout
    assert not out.exists()  # Nothing started.


def test_best_val_is_refused_without_validation_data(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    text = open(os.path.join(EXPERIMENTS, "two_tasks.py")).read()
    assert "eval_data=eval_data, validation_data=validation_data)" in text
    (experiments / "no_validation.py").write_text(text.replace(
        "validation_data=validation_data)", "validation_data=None)"))
    status, stdout, err = _main(["--experiment=no_validation", f"--experiments_dir={experiments}",
                                 f"--out={tmp_path / 'out'}", "--select=best_val"])
    assert status == 2
    assert err == ("error: --select=best_val: experiment 'no_validation' has no validation data "
                   "(its Experiment(validation_data=...) is None), and selecting on the test "
                   "data is not done. Use --select=final, or give the experiment a validation "
                   "split.\n")
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_is_refused_up_front_unless_no_plots(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    status, _, err = _main(["--experiment=two_tasks", f"--experiments_dir={EXPERIMENTS}",
                            f"--out={tmp_path / 'out'}"])
    assert status == 2
    assert err == ("error: matplotlib is not installed: the comparison's plots need it (pip "
                   "install matplotlib, or pip install -e '.[report]'); or pass --no_plots.\n")
    # --no_plots goes past that check, to the next one (the experiment's script).
    status, _, err = _main(["--experiment=nope", f"--experiments_dir={EXPERIMENTS}",
                            f"--out={tmp_path / 'out'}", "--no_plots"])
    assert status == 2 and err.startswith("error: --experiment='nope': no experiment script")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """2 seeds x (2 baselines + equal and uncertainty): trained once, 2 runs at a time."""
    out = tmp_path_factory.mktemp("compare")
    args = ["--experiment=two_tasks", f"--experiments_dir={EXPERIMENTS}", f"--out={out}",
            "--methods=equal,uncertainty", "--seeds=2", "--parallel=2", "--", *RUN_FLAGS]
    status, stdout, err = _main(args)
    assert status == 0, err + stdout
    return out, args, stdout


RUNS = ["stl_cls_s0", "stl_reg_s0", "hps_equal_s0", "hps_uncertainty_s0",
        "stl_cls_s1", "stl_reg_s1", "hps_equal_s1", "hps_uncertainty_s1"]


def _hand_delta_m(mtl, stl_cls, stl_reg):
    """Δm (%) of the two tasks: accuracy higher is better, mae lower is better."""
    gain_cls = (mtl["cls"]["accuracy"] - stl_cls["accuracy"]) / stl_cls["accuracy"] * 100
    gain_reg = -(mtl["reg"]["mae"] - stl_reg["mae"]) / stl_reg["mae"] * 100
    return (gain_cls + gain_reg) / 2


def _hand_summary(values):
    """mean, std and 95% CI over 2 seeds: t_{0.975, 1} = tan(0.475 pi) (Cauchy)."""
    values = np.asarray(values, np.float64)
    std = values.std(ddof=1)
    half = math.tan(0.475 * math.pi) * std / math.sqrt(len(values))
    return values.mean(), std, [values.mean() - half, values.mean() + half]


def test_protocol_end_to_end_statistics_equal_a_hand_computation(sweep_dir):
    out, args, stdout = sweep_dir
    assert "8 runs: 0 complete, 8 to train." in stdout
    files = set(os.listdir(out))
    assert set(RUNS) <= files
    assert {"report.md", "results.json", "delta_m.png", "tasks_cls_reg.png", "curves_cls.png",
            "curves_reg.png", "logs"} <= files
    results = json.loads((out / "results.json").read_text())
    own = {name: json.loads((out / name / "results.json").read_text()) for name in RUNS}
    assert all(r["step"] == 4 for r in own.values())
    assert results["train_steps"] == 4 and results["seeds"] == [0, 1]
    assert results["select"] == "final"
    deltas = {}
    for method in ("equal", "uncertainty"):
        deltas[method] = [_hand_delta_m(own[f"hps_{method}_s{s}"]["results"],
                                        own[f"stl_cls_s{s}"]["results"]["cls"],
                                        own[f"stl_reg_s{s}"]["results"]["reg"]) for s in (0, 1)]
    entries = {e["method"]: e for e in results["entries"]}
    for method, values in deltas.items():
        mean, std, ci = _hand_summary(values)
        got = entries[method]["delta_m"]
        assert got["values"] == pytest.approx(values, rel=1e-12)
        assert (got["mean"], got["std"]) == pytest.approx((mean, std), rel=1e-9)
        assert got["ci"] == pytest.approx(ci, rel=1e-9)
        accuracy = [own[f"hps_{method}_s{s}"]["results"]["cls"]["accuracy"] for s in (0, 1)]
        mean, std, ci = _hand_summary(accuracy)
        got = entries[method]["metrics"]["cls"]["accuracy"]
        assert [got["mean"], got["std"], *got["ci"]] == pytest.approx([mean, std, *ci],
                                                                      rel=1e-9)
    mae = [own[f"stl_reg_s{s}"]["results"]["reg"]["mae"] for s in (0, 1)]
    mean, std, ci = _hand_summary(mae)
    got = results["single_task"]["metrics"]["reg"]["mae"]
    assert [got["mean"], got["std"], *got["ci"]] == pytest.approx([mean, std, *ci], rel=1e-9)
    # Paired t-test with 1 degree of freedom: t = mean(d) / (std(d) / sqrt 2), and the Cauchy
    # distribution's two-sided tail p = 1 - (2 / pi) atan(|t|).
    d = np.subtract(deltas["uncertainty"], deltas["equal"])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(2))
    vs = entries["uncertainty"]["vs_equal"]
    assert vs["t"] == pytest.approx(t, rel=1e-9)
    assert vs["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-9)
    assert vs["differences"]["ci"] == pytest.approx(_hand_summary(d)[2], rel=1e-9)
    verdict = ("no significant difference" if vs["p_value"] >= 0.05 else
               "better than equal weighting" if d.mean() > 0 else "worse than equal weighting")
    assert vs["verdict"] == verdict
    assert vs["p_holm"] == pytest.approx(vs["p_value"], rel=1e-12)  # the report's only test
    text = (out / "report.md").read_text()
    assert "- Seeds: 2 (0, 1)" in text and "- Selection: `final`" in text
    assert "- Steps: 4 train steps per run, an evaluation every 2 steps" in text
    assert f"| uncertainty | hps | {np.mean(deltas['uncertainty']):+.2f} ± " in text
    assert f"| {verdict} |" in text
    for plot in ("delta_m.png", "tasks_cls_reg.png", "curves_cls.png", "curves_reg.png"):
        assert f"![{plot}]({plot})" in text
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert "--parallel=2 -- --backbone=mlp --train_steps=4" in text  # The full command.
    # Each run's wall time, summed, and the machine.
    timings = [json.loads(line) for line in (out / "logs" / "timings.jsonl").read_text()
               .splitlines()]
    assert sorted(t["run"] for t in timings) == sorted(RUNS)
    assert all(t["seconds"] > 0 and t["parallel"] == 2 for t in timings)
    total = sum(t["seconds"] for t in timings)
    assert results["run_time"]["seconds"] == pytest.approx(total, abs=0.2)
    assert results["run_time"]["runs"] == results["run_time"]["of_runs"] == 8
    assert f"- Run time: {total / 3600:.2f} h ({total:.0f} s) of wall time summed over 8 " \
           f"runs (each run's own, from logs/timings.jsonl; 2 at once), on " \
           f"{os.cpu_count()} CPU cores" in text


def _tensorboard(model_dir, split):
    """{step: {task: {metric: value}}} read straight from the event files."""
    tables = {}
    for path in tf.io.gfile.glob(os.path.join(model_dir, split, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                task, metric = value.tag.split("/")
                tables.setdefault(event.step, {}).setdefault(task, {})[metric] = float(
                    tf.make_ndarray(value.tensor))
    return tables


def test_rerun_trains_nothing_and_best_val_selects_on_validation(sweep_dir):
    out, args, _ = sweep_dir
    stamps = {name: os.stat(out / name / "results.json").st_mtime_ns for name in RUNS}
    assert args[6] == "--"
    status, stdout, err = _main(args[:6] + ["--select=best_val", "--", *RUN_FLAGS])
    assert status == 0, err
    assert "8 runs: 8 complete, 0 to train." in stdout and "==>" not in stdout
    assert [line for line in stdout.splitlines() if line.startswith("skip ")] == [
        f"skip {name}: complete (step 4)" for name in RUNS]
    assert {name: os.stat(out / name / "results.json").st_mtime_ns for name in RUNS} == stamps
    results = json.loads((out / "results.json").read_text())
    assert results["select"] == "best_val"
    own = {name: json.loads((out / name / "results.json").read_text()) for name in RUNS}
    for seed in (0, 1):
        reference = {"cls": own[f"stl_cls_s{seed}"]["validation"]["cls"],
                     "reg": own[f"stl_reg_s{seed}"]["validation"]["reg"]}
        for method in ("equal", "uncertainty"):
            name = f"hps_{method}_s{seed}"
            validation = _tensorboard(out / name, "validation")
            validation[4] = own[name]["validation"]  # results.json at the last step.
            assert sorted(validation) == [2, 4]
            scores = {step: _hand_delta_m(v, reference["cls"], reference["reg"])
                      for step, v in validation.items()}
            step = max(sorted(scores), key=lambda s: scores[s])
            run = results["runs"][name]
            assert run["step"] == step
            assert run["validation_delta_m"] == pytest.approx(scores[step], rel=1e-6)
            test = own[name]["results"] if step == 4 else _tensorboard(out / name, "eval")[step]
            assert run["results"]["cls"]["accuracy"] == pytest.approx(
                test["cls"]["accuracy"], rel=1e-6)
    text = (out / "report.md").read_text()
    assert "- Selection: `best_val`: each run's evaluation step with the highest validation " \
           "Δm" in text
    assert re.search(r"\| equal \| [+-]\d+\.\d\d \([24]\) \| [+-]\d+\.\d\d \([24]\) \|", text)
