"""The multi-task report: a multi-task run against single-task baselines.

    report = write_report(mtl_dir="runs/md/mtl", stl_dirs={"left": "runs/md/stl_left", ...},
                          out_dir="runs/md/report")
    print(report.markdown)

reads each run's results.json and TensorBoard logs (train/, eval/) and writes
`report.md` (per task and metric: MTL, STL, relative difference; then Δm), `report.json` (the same
numbers) and, when matplotlib is installed, `curves_<task>.png` (train and eval curves of every
run, drawn by mtl.evidence.plots). Nothing here trains. Reading a run folder (results.json and
its TensorBoard scalars: `read_run`) is here too; mtl.evidence.comparison reads every run so.

Δm (Maninis et al. 2019; Vandenhende et al. 2021) is the average relative gain of the multi-task
model over the single-task baselines, in percent; positive means MTL is better:

    Δm = (1/T) Σ_t (-1)^{l_t} (M_mtl,t - M_stl,t) / M_stl,t × 100,

with l_t = 1 when lower is better for the metric (loss, error, mae, mse, ...) and 0 when higher
is better (accuracy, auc, precision, recall, f1, ...). A task with several metrics contributes
the mean of its metrics' relative gains, so every task weighs the same. By default the metrics of
a task are all but its loss (a task that reports only its loss is measured by it).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Mapping, Sequence

import tensorflow as tf

from mtl import runs as runs_lib
from mtl.errors import UsageError
from mtl.evidence.plots import plot_run_curves

LOWER_IS_BETTER = ("loss", "error", "mae", "mse", "rmse", "mape", "msle", "crossentropy",
                   "hinge", "distance")
HIGHER_IS_BETTER = ("accuracy", "acc", "auc", "precision", "recall", "f1", "iou", "io_u",
                    "r2")


def lower_is_better(metric: str, directions: Mapping[str, str] | None = None) -> bool:
    """Whether a lower value of `metric` is better, decided from its name.

    The name's words (split at `_`, `/`, `-`, spaces) are matched: any of `LOWER_IS_BETTER`
    ("mean_absolute_error", "mae", "loss") -> True; any of `HIGHER_IS_BETTER`
    ("sparse_categorical_accuracy", "auc", "f1_score") -> False. `directions` overrides by exact
    name ({"psnr": "higher"}). An unknown name raises ValueError.
    """
    if directions and metric in directions:
        direction = directions[metric]
        if direction not in ("lower", "higher"):
            raise UsageError(f"Direction of {metric!r} must be 'lower' or 'higher'; got "
                             f"{direction!r}.")
        return direction == "lower"
    words = [w for w in re.split(r"[_/\-\s]+", metric.lower()) if w]
    joined = "_".join(words)
    if any(w in LOWER_IS_BETTER for w in words):
        return True
    if any(w in HIGHER_IS_BETTER for w in words) or "io_u" in joined:
        return False
    raise UsageError(
        f"Cannot tell whether lower or higher is better for metric {metric!r}: its name has none "
        f"of {list(LOWER_IS_BETTER)} (lower is better) or {list(HIGHER_IS_BETTER)} (higher is "
        "better). Pass directions={metric: 'lower' or 'higher'}.")


# ------------------------------------------------------------------------------------- Δm
@dataclasses.dataclass(frozen=True)
class MetricRow:
    """One task metric of the MTL run next to its single-task baseline."""

    task: str
    metric: str
    lower_is_better: bool
    mtl: float | None
    stl: float | None
    gain: float | None  # (-1)^l (mtl - stl) / stl * 100; None when it cannot be computed.
    note: str = ""


@dataclasses.dataclass(frozen=True)
class DeltaM:
    """Δm in percent (None when no task could be compared), its per-task terms and rows."""

    value: float | None
    per_task: dict
    rows: tuple


def default_metrics(task_results: Mapping[str, float]) -> list[str]:
    """A task's metrics for Δm: all but "loss" (or "loss" when it is the only one)."""
    names = [m for m in task_results if m != "loss"]
    return names or [m for m in task_results if m == "loss"]


def delta_m(mtl_results: Mapping[str, Mapping[str, float]],
            stl_results: Mapping[str, Mapping[str, float]], *,
            metrics: Mapping[str, Sequence[str]] | None = None,
            directions: Mapping[str, str] | None = None) -> DeltaM:
    """Δm of MTL vs STL from `{task: {metric: value}}` tables (results.json's "results").

    Tasks of `mtl_results` without a baseline in `stl_results` are listed with a note and left
    out of Δm, as are metrics whose baseline is 0 (no relative difference). `metrics`:
    `{task: [metric, ...]}` to choose a task's metrics (default: `default_metrics`).
    """
    rows, per_task = [], {}
    for task, values in mtl_results.items():
        chosen = list((metrics or {}).get(task) or default_metrics(values))
        baseline = stl_results.get(task)
        gains = []
        for metric in chosen:
            lower = lower_is_better(metric, directions)
            mtl_value = _number(values.get(metric))
            stl_value = _number(baseline.get(metric)) if baseline is not None else None
            note, gain = "", None
            if baseline is None:
                note = "no single-task run"
            elif mtl_value is None or stl_value is None:
                note = f"{metric} missing in the {'MTL' if mtl_value is None else 'STL'} results"
            elif stl_value == 0:
                note = "STL value is 0: no relative difference"
            else:
                gain = (-1.0 if lower else 1.0) * (mtl_value - stl_value) / abs(stl_value) * 100
                gain += 0.0  # -0.0 -> 0.0
                gains.append(gain)
            rows.append(MetricRow(task, metric, lower, mtl_value, stl_value, gain, note))
        if gains:
            per_task[task] = sum(gains) / len(gains)
    value = sum(per_task.values()) / len(per_task) if per_task else None
    return DeltaM(value=value, per_task=per_task, rows=tuple(rows))


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# -------------------------------------------------------------------------- reading runs
def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `log_dir`: {tag: [(step, value)]}.

    Reads summary v2 values (`value.tensor`) and v1 ones (`simple_value`). Where a step was
    logged more than once (a resumed run), the value written last wins.
    """
    from tensorflow.core.util import event_pb2

    latest: dict[tuple[str, int], tuple[float, float]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalar = _scalar(value)
                if scalar is None:
                    continue
                key = (value.tag, int(event.step))
                if key not in latest or event.wall_time >= latest[key][0]:
                    latest[key] = (event.wall_time, scalar)
    series: dict[str, list[tuple[int, float]]] = {}
    for (tag, step), (_, scalar) in sorted(latest.items()):
        series.setdefault(tag, []).append((step, scalar))
    return series


def _scalar(value) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        array = tf.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind in "fiub":
            return float(array.reshape(()))
    return None


@dataclasses.dataclass
class RunLogs:
    """What the report uses of one run folder."""

    label: str
    model_dir: str
    step: int | None
    results: dict
    train: dict
    eval: dict
    # Runs of experiments with validation data (older runs and others: None and {}).
    validation_results: dict | None = None
    validation: dict = dataclasses.field(default_factory=dict)


def read_run(model_dir: str, label: str) -> RunLogs:
    """results.json and the train/eval (and validation, when the run has them) scalars of a
    run folder."""
    results = runs_lib.read_results(model_dir)
    return RunLogs(label=label, model_dir=model_dir, step=results.get("step"),
                   results=results["results"],
                   train=read_scalars(os.path.join(model_dir, "train")),
                   eval=read_scalars(os.path.join(model_dir, "eval")),
                   validation_results=results.get("validation"),
                   validation=read_scalars(os.path.join(model_dir, "validation")))


# ------------------------------------------------------------------------------- output
def _cell(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(delta: DeltaM, mtl_run: RunLogs | None = None,
             stl_runs: Mapping[str, RunLogs] | None = None) -> str:
    """The report as Markdown: the runs, the metric table and Δm."""
    lines = ["# Multi-task report", ""]
    if mtl_run is not None:
        lines += ["| run | folder | step |", "| --- | --- | --- |",
                  f"| MTL | `{mtl_run.model_dir}` | {mtl_run.step} |"]
        for task, run in (stl_runs or {}).items():
            lines.append(f"| STL {task} | `{run.model_dir}` | {run.step} |")
        lines.append("")
    lines += ["| task | metric | better | MTL | STL | Δ (%) |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in delta.rows:
        gain = _cell(row.gain, 2) if row.gain is not None else f"– ({row.note})"
        lines.append(f"| {row.task} | {row.metric} | {'lower' if row.lower_is_better else 'higher'}"
                     f" | {_cell(row.mtl)} | {_cell(row.stl)} | {gain} |")
    lines.append("")
    if delta.value is None:
        lines.append("**Δm**: not computed (no task has a usable single-task baseline).")
    else:
        terms = ", ".join(f"{t} {v:+.2f}%" for t, v in delta.per_task.items())
        count = len(delta.per_task)
        lines.append(f"**Δm = {delta.value:+.2f}%** over {count} task{'s' * (count != 1)} "
                     f"({terms}); "
                     "positive: the multi-task model is better than the single-task baselines.")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Report:
    delta: DeltaM
    markdown: str
    files: list
    notes: list


def write_report(mtl_dir: str, stl_dirs: Mapping[str, str], out_dir: str, *,
                 metrics: Mapping[str, Sequence[str]] | None = None,
                 directions: Mapping[str, str] | None = None, plots: bool = True) -> Report:
    """Reads the runs, writes report.md, report.json and the curves into `out_dir`.

    Refused before anything is written (`UsageError`): an `out_dir` under a file, a baseline
    that is not a single-task run, a task the runs do not have, runs trained for different
    numbers of steps (their results.json "step").
    """
    check_out_dir(out_dir)
    mtl_run = read_run(mtl_dir, "MTL")
    stl_runs = {task: read_run(path, f"STL {task}") for task, path in stl_dirs.items()}
    check_comparable(mtl_run, stl_runs)
    delta = delta_m(mtl_run.results, {t: r.results[t] for t, r in stl_runs.items()},
                    metrics=metrics, directions=directions)
    text = markdown(delta, mtl_run, stl_runs)
    try:
        tf.io.gfile.makedirs(out_dir)
    except (OSError, tf.errors.OpError) as e:
        raise UsageError(f"Cannot create the report folder {out_dir!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    files, notes = [], []
    path = os.path.join(out_dir, "report.md")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)
    files.append(path)
    path = os.path.join(out_dir, "report.json")
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump({"delta_m": delta.value, "per_task": delta.per_task,
                   "rows": [dataclasses.asdict(r) for r in delta.rows],
                   "mtl": mtl_dir, "stl": dict(stl_dirs), "step": mtl_run.step}, f, indent=2)
    files.append(path)
    if plots:
        plotted = plot_run_curves(mtl_run, stl_runs, out_dir)
        if isinstance(plotted, str):
            notes.append(plotted)
        else:
            files.extend(plotted)
    return Report(delta=delta, markdown=text, files=files, notes=notes)


def check_out_dir(out_dir: str) -> None:
    """Refuses a report folder that is, or lies under, an existing file."""
    path = os.path.abspath(out_dir)
    while not tf.io.gfile.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
        where = "is" if path == os.path.abspath(out_dir) else "lies under"
        raise UsageError(f"The report folder {out_dir!r} {where} the file {path}; choose a "
                         "folder.")


def check_comparable(mtl_run: RunLogs, stl_runs: Mapping[str, RunLogs]) -> None:
    """Each baseline is a single-task run of a task the MTL run has, trained for as many steps
    as the MTL run (a run whose results.json records no step is not checked)."""
    for task, run in stl_runs.items():
        if len(run.results) > 1:
            raise UsageError(f"--stl={task}:{run.model_dir} is not a single-task run: it trained "
                             f"{len(run.results)} tasks {list(run.results)}. A baseline trains "
                             f"one task (e.g. --tasks={task}).")
        if task not in run.results:
            raise UsageError(f"--stl={task}:{run.model_dir}: that run has no results for task "
                             f"{task!r}; its tasks are {list(run.results)}.")
        if task not in mtl_run.results:
            raise UsageError(f"--stl names task {task!r}, which the MTL run {mtl_run.model_dir} "
                             f"does not have; its tasks are {list(mtl_run.results)}.")
        if None not in (run.step, mtl_run.step) and run.step != mtl_run.step:
            raise UsageError(
                f"Runs trained for different numbers of steps cannot be compared: the MTL run "
                f"{mtl_run.model_dir} ended at step {mtl_run.step}, the single-task run of "
                f"{task!r} {run.model_dir} at step {run.step}. Train them for the same number "
                "of steps (scripts/run_baselines.py passes the same flags to every run).")
