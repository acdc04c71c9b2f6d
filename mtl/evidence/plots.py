"""The PNG plots of the evidence: those of a multi-seed comparison
(`mtl.evidence.comparison.compare`'s dict) and the curves of one run report
(`mtl.evidence.report.write_report`).

A comparison's (`write_plots`):

  delta_m.png             Δm per method (and architecture): the mean over seeds with its
                          confidence interval; the single-task models at 0.
  tasks_<a>_<b>.png       the first two tasks' first Δm metrics against each other: each entry's
                          mean with its interval on both axes, the single-task models marked.
  curves_<task>.png       each task's first Δm metric on the test data against the step: the
                          mean over seeds with its interval as a band.

A run report's (`plot_run_curves`):

  curves_<task>.png       one panel per metric: the train and eval curves of the multi-task run
                          and of the task's single-task run.

Needs matplotlib (`pip install -e ".[report]"`): `missing_matplotlib()` says so before anything
is trained; `plot_run_curves` returns a message instead when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Mapping

MATPLOTLIB_MISSING = ("matplotlib is not installed: the comparison's plots need it (pip install "
                      "matplotlib, or pip install -e '.[report]'); or pass --no_plots.")


def missing_matplotlib() -> str | None:
    """None when matplotlib is installed, else the message to show."""
    return MATPLOTLIB_MISSING if importlib.util.find_spec("matplotlib") is None else None


def file_safe(name: str) -> str:
    """`name` as a file name: runs of other characters than letters, digits, `_.-` become `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(comparison: dict, out_dir: str) -> list[str]:
    """Writes every plot into `out_dir`; returns their file names."""
    names = [plot_delta_m(comparison, out_dir)]
    if len(comparison["tasks"]) >= 2:
        names.append(plot_tasks(comparison, out_dir))
    names += plot_curves(comparison, out_dir)
    return names


def _save(plt, figure, out_dir: str, name: str) -> str:
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(figure)
    return name


def _errors(summary: dict) -> tuple[float, float]:
    """matplotlib's (below, above) error-bar lengths of a summary's interval."""
    low, high = summary["ci"]
    return summary["mean"] - low, high - summary["mean"]


def plot_delta_m(comparison: dict, out_dir: str) -> str:
    plt = _pyplot()
    entries = comparison["entries"]
    architectures = comparison["architectures"]
    methods = comparison["methods"]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(methods) + 2), 3.8))
    width = 0.8 / len(architectures)
    for a, architecture in enumerate(architectures):
        rows = [e for e in entries if e["architecture"] == architecture]
        xs = [methods.index(e["method"]) + (a - (len(architectures) - 1) / 2) * width
              for e in rows]
        means = [e["delta_m"]["mean"] for e in rows]
        errors = list(zip(*(_errors(e["delta_m"]) for e in rows)))
        axis.errorbar(xs, means, yerr=errors, fmt="o", capsize=4, color=f"C{a}",
                      label=architecture)
    axis.axhline(0.0, color="black", linestyle="--", linewidth=1, label="single-task (Δm = 0)")
    axis.set_xticks(range(len(methods)))
    axis.set_xticklabels(methods, rotation=30, ha="right")
    axis.set_ylabel("Δm (%) vs single-task")
    pct = f"{comparison['confidence']:.0%}"
    axis.set_title(f"Δm over {len(comparison['seeds'])} seeds (mean, {pct} CI)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return _save(plt, figure, out_dir, "delta_m.png")


def plot_tasks(comparison: dict, out_dir: str) -> str:
    plt = _pyplot()
    (task_x, task_y) = comparison["tasks"][:2]
    metric_x = comparison["delta_m_metrics"][task_x][0]
    metric_y = comparison["delta_m_metrics"][task_y][0]
    figure, axis = plt.subplots(figsize=(5.6, 4.6))
    stl = comparison["single_task"]["metrics"]
    axis.errorbar([stl[task_x][metric_x]["mean"]], [stl[task_y][metric_y]["mean"]],
                  xerr=[[e] for e in _errors(stl[task_x][metric_x])],
                  yerr=[[e] for e in _errors(stl[task_y][metric_y])],
                  fmt="*", markersize=12, color="black", capsize=3, label="single-task")
    for i, entry in enumerate(comparison["entries"]):
        x, y = entry["metrics"][task_x][metric_x], entry["metrics"][task_y][metric_y]
        axis.errorbar([x["mean"]], [y["mean"]], xerr=[[e] for e in _errors(x)],
                      yerr=[[e] for e in _errors(y)], fmt="o", capsize=3, color=f"C{i % 10}",
                      label=entry["label"])
    axis.set_xlabel(f"{task_x} {metric_x} ({_better(comparison, task_x)})")
    axis.set_ylabel(f"{task_y} {metric_y} ({_better(comparison, task_y)})")
    axis.set_title(f"Test metrics over {len(comparison['seeds'])} seeds "
                   f"(mean, {comparison['confidence']:.0%} CI)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(plt, figure, out_dir, f"tasks_{file_safe(task_x)}_{file_safe(task_y)}.png")


def _better(comparison: dict, task: str) -> str:
    return "lower is better" if comparison["curves"][task]["lower_is_better"] else \
        "higher is better"


def plot_curves(comparison: dict, out_dir: str) -> list[str]:
    plt = _pyplot()
    names = []
    for task, curve in comparison["curves"].items():
        figure, axis = plt.subplots(figsize=(6.0, 4.0))
        for i, (label, series) in enumerate(curve["series"].items()):
            color = "black" if label == "single-task" else f"C{(i - 1) % 10}"
            style = "--" if label == "single-task" else "-"
            axis.plot(series["steps"], series["mean"], style, marker="o", markersize=3,
                      color=color, label=label)
            axis.fill_between(series["steps"], series["ci_low"], series["ci_high"],
                              color=color, alpha=0.15)
        axis.set_xlabel("step")
        axis.set_ylabel(f"{curve['metric']} ({_better(comparison, task)})")
        axis.set_title(f"{task}: test {curve['metric']} (mean over "
                       f"{len(comparison['seeds'])} seeds, {comparison['confidence']:.0%} CI)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        names.append(_save(plt, figure, out_dir, f"curves_{file_safe(task)}.png"))
    return names


# ----------------------------------------------------------------- one run's report
def plot_run_curves(mtl_run, stl_runs: Mapping, out_dir: str) -> list[str] | str:
    """`curves_<task>.png` per task: one panel per metric, train and eval curves of the MTL run
    and of the task's STL run (`mtl.evidence.report.RunLogs` each). Returns the paths, or a
    message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("PNG curves skipped: matplotlib is not installed (pip install matplotlib, or "
                "pip install -e '.[report]').")
    paths = []
    for task in mtl_run.results:
        runs_for_task = [mtl_run] + ([stl_runs[task]] if task in stl_runs else [])
        metrics = []
        for run in runs_for_task:
            for logs in (run.train, run.eval):
                for tag in logs:
                    if tag.startswith(f"{task}/") and tag.split("/", 1)[1] not in metrics:
                        metrics.append(tag.split("/", 1)[1])
        if not metrics:
            continue
        figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6),
                                    squeeze=False)
        for axis, metric in zip(axes[0], metrics):
            for color, run in enumerate(runs_for_task):  # One colour per run.
                for split, logs, style in (("train", run.train, "-"), ("eval", run.eval, "o--")):
                    points = logs.get(f"{task}/{metric}")
                    if points:
                        steps, values = zip(*points)
                        axis.plot(steps, values, style, color=f"C{color}", markersize=3,
                                  label=f"{run.label} {split}")
            axis.set_title(f"{task}: {metric}")
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(out_dir, f"curves_{file_safe(task)}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths
