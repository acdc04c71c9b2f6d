"""A multi-seed comparison of weighting methods (and architectures) with single-task baselines:
which runs it takes, which evaluation of each run counts, and the statistics over seeds.
scripts/compare.py trains the runs and calls `compare` and `markdown`; nothing here trains.

Runs, for every seed s: `stl_<task>_s<s>` (the single-task baseline of each task: --tasks=<task>,
hps, equal weighting) and `<architecture>_<method>_s<s>` (every task, --weighting=<method>,
--architecture=<architecture>).

Model selection (`select`):
  final     each run's last evaluation: results.json.
  best_val  each run's evaluation step (every eval_every steps and the last) with the highest
            validation Δm against the same seed's single-task baselines' final validation
            metrics (results.json's "validation"); for a baseline that is the step of its best
            validation metric. The test metrics reported are those of that step (TensorBoard
            eval/, results.json at the last step); the test data never chooses.

Statistics (mtl.evidence.stats), over seeds: per task and metric the mean, std (ddof=1) and
95% Student-t interval; Δm of each run PER SEED against the same seed's baselines
(mtl.evidence.report.delta_m), then its mean, std and interval; each method against `equal`
(same architecture, same seeds): the paired differences of Δm, their interval and the
two-sided paired t-test, "better"/"worse" only where p < 0.05; likewise each soft-sharing
architecture against `hps` with the same method. Every one of these paired tests also gets
Holm's adjusted p-value ("p_holm") over all the paired tests of the comparison: where it is
< 0.05 the difference holds with a family-wise error rate of 5%. `markdown` writes the
comparison's report.md (mtl.evidence.plots its PNG plots).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from mtl.errors import UsageError
from mtl.evidence import report, stats

SELECTIONS = ("final", "best_val")
REFERENCE = "equal"
REFERENCE_ARCHITECTURE = "hps"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What is compared: every method on every architecture, and the baselines, per seed."""

    experiment: str
    tasks: tuple
    methods: tuple
    architectures: tuple
    seeds: tuple
    select: str = "final"

    def entries(self) -> list[tuple[str, str]]:
        """(architecture, method) of every multi-task configuration, in report order."""
        return [(a, m) for a in self.architectures for m in self.methods]

    def label(self, architecture: str, method: str) -> str:
        return method if len(self.architectures) == 1 else f"{method} [{architecture}]"


def stl_run_name(task: str, seed: int) -> str:
    return f"stl_{task}_s{seed}"


def mtl_run_name(architecture: str, method: str, seed: int) -> str:
    return f"{architecture}_{method}_s{seed}"


def run_settings(protocol: Protocol) -> list[tuple[str, dict]]:
    """[(run name, {Config field: value} the protocol sets)], seed by seed: the baselines, then
    every architecture and method."""
    runs = []
    for seed in protocol.seeds:
        for task in protocol.tasks:
            runs.append((stl_run_name(task, seed), dict(
                tasks=(task,), seed=seed, weighting="equal", architecture="hps")))
        for architecture, method in protocol.entries():
            runs.append((mtl_run_name(architecture, method, seed), dict(
                tasks=tuple(protocol.tasks), seed=seed, weighting=method,
                architecture=architecture)))
    return runs


def flags_of(settings: Mapping) -> list[str]:
    """`run_settings`' values as command-line flags."""
    return [f"--{name}={','.join(value) if isinstance(value, tuple) else value}"
            for name, value in settings.items()]


# ------------------------------------------------------------------------- selecting
@dataclasses.dataclass(frozen=True)
class Selected:
    """The evaluation of one run that counts: its step and test metrics ({task: {metric}}),
    and the validation Δm that chose it (None with `final`)."""

    step: int
    results: dict
    validation_delta_m: float | None = None


def evaluations(run: report.RunLogs, split: str) -> dict[int, dict]:
    """{step: {task: {metric: value}}} of every evaluation of `split` ("eval" or "validation"):
    the TensorBoard scalars, with results.json's values at the last step."""
    scalars = run.eval if split == "eval" else run.validation
    tables: dict[int, dict] = {}
    for tag, points in scalars.items():
        task, _, metric = tag.partition("/")
        for step, value in points:
            tables.setdefault(step, {}).setdefault(task, {})[metric] = value
    final = run.results if split == "eval" else run.validation_results
    if final is not None and run.step is not None:
        tables[run.step] = final
    return tables


def select(run: report.RunLogs, rule: str, reference: Mapping[str, Mapping] | None = None
           ) -> Selected:
    """The evaluation of `run` that counts under `rule` (see the module docstring);
    `reference` ({task: {metric}}: the baselines' final validation metrics) for best_val."""
    if rule == "final":
        return Selected(run.step, run.results)
    if not run.validation_results:
        raise UsageError(f"--select=best_val: the run {run.model_dir} has no validation results "
                         "(results.json has no 'validation'): it was trained by an experiment "
                         "without validation data, or before it had some. Use --select=final.")
    validation, test = evaluations(run, "validation"), evaluations(run, "eval")
    best = None
    for step in sorted(set(validation) & set(test)):
        value = report.delta_m(validation[step], reference).value
        if value is not None and (best is None or value > best[0]):  # ties: the earliest
            best = (value, step)
    if best is None:
        raise UsageError(f"--select=best_val: no evaluation of {run.model_dir} has a validation "
                         "Δm against the baselines (no step with both validation and test "
                         "metrics, or no metric the baselines share).")
    return Selected(best[1], test[best[1]], best[0])


# ------------------------------------------------------------------------- statistics
def compare(protocol: Protocol, runs: Mapping[str, report.RunLogs],
            confidence: float = stats.CONFIDENCE, alpha: float = stats.ALPHA) -> dict:
    """The comparison as a JSON-ready dict: every run's selected evaluation, the baselines'
    and each entry's per-task statistics, Δm per seed and over seeds, and the paired tests
    against `equal` (see the module docstring). `runs` maps every run name of `run_settings`
    to its logs (`mtl.evidence.report.read_run`)."""
    baselines, selected = {}, {}
    for seed in protocol.seeds:
        stl = {task: runs[stl_run_name(task, seed)] for task in protocol.tasks}
        for architecture, method in protocol.entries():
            report.check_comparable(runs[mtl_run_name(architecture, method, seed)], stl)
        reference = {t: (r.validation_results or {}).get(t, {}) for t, r in stl.items()}
        for task, run in stl.items():
            selected[stl_run_name(task, seed)] = select(
                run, protocol.select, {task: reference[task]})
        baselines[seed] = {t: selected[stl_run_name(t, seed)].results[t] for t in stl}
        for architecture, method in protocol.entries():
            name = mtl_run_name(architecture, method, seed)
            selected[name] = select(runs[name], protocol.select, reference)
    single_task = {task: _metric_summaries([baselines[s][task] for s in protocol.seeds],
                                           confidence) for task in protocol.tasks}
    entries, deltas = [], {}
    for architecture, method in protocol.entries():
        names = [mtl_run_name(architecture, method, s) for s in protocol.seeds]
        per_seed = [report.delta_m(selected[n].results, baselines[s])
                    for n, s in zip(names, protocol.seeds)]
        for name, delta in zip(names, per_seed):
            if delta.value is None or set(delta.per_task) != set(protocol.tasks):
                raise UsageError(f"Δm of run {name} cannot be computed for every task (rows: "
                                 f"{[(r.task, r.metric, r.note) for r in delta.rows]}).")
        deltas[architecture, method] = [d.value for d in per_seed]
        results = [selected[n].results for n in names]
        entries.append({
            "method": method, "architecture": architecture,
            "label": protocol.label(architecture, method), "runs": names,
            "steps": [selected[n].step for n in names],
            "metrics": {task: _metric_summaries([r[task] for r in results], confidence)
                        for task in protocol.tasks},
            "task_gains": {task: stats.summarize([d.per_task[task] for d in per_seed],
                                                 confidence).to_json()
                           for task in protocol.tasks},
            "delta_m": stats.summarize(deltas[architecture, method], confidence).to_json()})
    for entry in entries:
        own = deltas[entry["architecture"], entry["method"]]
        key = (entry["architecture"], REFERENCE)
        if entry["method"] != REFERENCE and key in deltas:
            paired = stats.paired_comparison(own, deltas[key], confidence)
            entry["vs_equal"] = {**paired.to_json(),
                                 "verdict": VERDICTS[paired.significant(alpha)]}
        # A soft-sharing architecture against hard sharing, the same method and seeds.
        key = (REFERENCE_ARCHITECTURE, entry["method"])
        if entry["architecture"] != REFERENCE_ARCHITECTURE and key in deltas:
            paired = stats.paired_comparison(own, deltas[key], confidence)
            entry["vs_hps"] = {**paired.to_json(),
                               "verdict": ARCHITECTURE_VERDICTS[paired.significant(alpha)]}
    tests = [entry[key] for entry in entries for key in ("vs_equal", "vs_hps") if key in entry]
    for test, adjusted in zip(tests, stats.holm([test["p_value"] for test in tests])):
        test["p_holm"] = adjusted
    return {
        "experiment": protocol.experiment, "tasks": list(protocol.tasks),
        "methods": list(protocol.methods), "architectures": list(protocol.architectures),
        "seeds": list(protocol.seeds), "select": protocol.select, "confidence": confidence,
        "alpha": alpha,
        "delta_m_metrics": {task: _delta_metrics(baselines, task) for task in protocol.tasks},
        "single_task": {"metrics": single_task,
                        "runs": [stl_run_name(t, s) for s in protocol.seeds
                                 for t in protocol.tasks]},
        "entries": entries,
        "runs": {name: {"model_dir": runs[name].model_dir, "step": sel.step,
                        "final_step": runs[name].step, "results": sel.results,
                        "validation_delta_m": sel.validation_delta_m}
                 for name, sel in selected.items()},
        "curves": learning_curves(protocol, runs, baselines, confidence),
    }


VERDICTS = {1: "better than equal weighting", -1: "worse than equal weighting",
            0: "no significant difference"}
ARCHITECTURE_VERDICTS = {1: "better than hps", -1: "worse than hps",
                         0: "no significant difference"}


def _metric_summaries(tables: Sequence[Mapping[str, float]], confidence: float) -> dict:
    """{metric: Summary JSON} over seeds of one task's {metric: value} tables."""
    return {metric: stats.summarize([t[metric] for t in tables], confidence).to_json()
            for metric in tables[0]}


def _delta_metrics(baselines: Mapping, task: str) -> list[str]:
    return report.default_metrics(next(iter(baselines.values()))[task])


def learning_curves(protocol: Protocol, runs: Mapping[str, report.RunLogs], baselines: Mapping,
                    confidence: float = stats.CONFIDENCE) -> dict:
    """Per task, its first Δm metric on the eval (test) data against the step: for the
    baselines and each entry, the mean over seeds and the interval at each step that every seed
    evaluated. {task: {"metric": m, "lower_is_better": b, "series": {label: {"steps": [...],
    "mean": [...], "ci_low": [...], "ci_high": [...]}}}}"""
    curves = {}
    for task in protocol.tasks:
        metric = _delta_metrics(baselines, task)[0]
        groups = {"single-task": [stl_run_name(task, s) for s in protocol.seeds]}
        for architecture, method in protocol.entries():
            groups[protocol.label(architecture, method)] = [
                mtl_run_name(architecture, method, s) for s in protocol.seeds]
        series = {}
        for label, names in groups.items():
            tables = [evaluations(runs[n], "eval") for n in names]
            steps = sorted(set.intersection(*(
                {s for s, t in table.items() if metric in t.get(task, {})} for table in tables)))
            points = [stats.summarize([table[s][task][metric] for table in tables], confidence)
                      for s in steps]
            series[label] = {"steps": steps, "mean": [p.mean for p in points],
                             "ci_low": [p.ci_low for p in points],
                             "ci_high": [p.ci_high for p in points]}
        curves[task] = {"metric": metric, "lower_is_better": report.lower_is_better(metric),
                        "series": series}
    return curves


# ---------------------------------------------------------------------------- report
SELECTION_TEXT = {
    "final": "`final`: each run's last evaluation (results.json, step {steps}).",
    "best_val": "`best_val`: each run's evaluation step with the highest validation Δm against "
                "the same seed's single-task baselines' final validation metrics (for a "
                "baseline: the step of its best validation metric); the test metrics of that "
                "step are reported. The test data never chooses.",
}


def markdown(comparison: dict, *, command: str, train_steps: int, eval_every: int,
             plots: Sequence[str] = (), timing: Mapping | None = None) -> str:
    """report.md: the header (seeds, selection, steps, command, run time and machine), Δm with
    the paired tests, the per-task table, the per-seed table and the plots (file names in the
    same folder). `timing`: `mtl.evidence.timing.run_time` (None: no run-time line)."""
    c = comparison
    seeds, confidence = c["seeds"], c["confidence"]
    pct = f"{confidence:.0%}"
    lines = [f"# Multi-seed comparison: {c['experiment']}", "",
             f"- Command: `{command}`",
             f"- Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); every single-task baseline "
             "and every method x architecture is trained once per seed.",
             f"- Steps: {train_steps} train steps per run, an evaluation every {eval_every} "
             "steps and at the end.",
             *_timing_lines(timing),
             "- Selection: " + SELECTION_TEXT[c["select"]].format(steps=train_steps),
             f"- Statistics over seeds: mean ± std (ddof=1) and the {pct} Student-t interval "
             "of the mean (mean ± t · std / √n). Δm (%) is computed per seed against the same "
             "seed's single-task baselines; Δm > 0: better than the single-task models. "
             f"Methods are compared with `{REFERENCE}` on the same architecture and seeds by a "
             f"paired t-test of Δm (two-sided); a verdict is given only where p < {c['alpha']}. "
             f"p is not corrected for multiple comparisons ({_comparisons(c)} "
             f"here: if no method differed from `{REFERENCE}`, "
             f"{_comparisons(c) * c['alpha']:.2f} of them would be called significant by "
             "chance on average); p (Holm) is Holm's adjustment over all of them: a "
             f"difference with p (Holm) < {c['alpha']} holds with a family-wise error rate of "
             f"{c['alpha']:.0%}.",
             "- Δm metrics: " + "; ".join(f"{t}: {', '.join(m)}"
                                           for t, m in c["delta_m_metrics"].items()),
             "", "## Δm", "",
             f"| method | architecture | Δm (%) mean ± std | {pct} CI | vs `{REFERENCE}`: "
             f"mean difference [{pct} CI] | p | p (Holm) | verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for entry in c["entries"]:
        d, vs = entry["delta_m"], entry.get("vs_equal")
        if vs is None:
            paired = ["–", "–", "–", "(reference)" if entry["method"] == REFERENCE else
                      f"no `{REFERENCE}` runs"]
        else:
            diff = vs["differences"]
            paired = [f"{diff['mean']:+.2f} {_interval(diff)}", _p(vs["p_value"]),
                      _p(vs.get("p_holm")), vs["verdict"]]
        lines.append(f"| {entry['method']} | {entry['architecture']} | "
                     f"{_mean_std(d, '+.2f')} | {_interval(d)} | " + " | ".join(paired) + " |")
    lines += _plot_lines(plots, "delta_m")
    against_hps = [e for e in c["entries"] if "vs_hps" in e]
    if against_hps:
        lines += ["", f"## Architectures against `{REFERENCE_ARCHITECTURE}`", "",
                  f"Each architecture's Δm minus `{REFERENCE_ARCHITECTURE}`'s with the same "
                  f"method on the same seeds: the mean difference [{pct} CI] and the paired "
                  "t-test.", "",
                  f"| method | architecture | vs `{REFERENCE_ARCHITECTURE}`: mean difference "
                  f"[{pct} CI] | p | p (Holm) | verdict |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for entry in against_hps:
            vs = entry["vs_hps"]
            diff = vs["differences"]
            lines.append(f"| {entry['method']} | {entry['architecture']} | "
                         f"{diff['mean']:+.2f} {_interval(diff)} | {_p(vs['p_value'])} | "
                         f"{_p(vs.get('p_holm'))} | {vs['verdict']} |")
    lines += ["", "## Per task", "",
              f"Test metrics at the selected step: mean ± std [{pct} CI] over seeds; Δ (%) is "
              "the task's relative gain over the same seed's baseline (its term of Δm).", ""]
    columns = [(t, m) for t, metrics in c["delta_m_metrics"].items() for m in metrics]
    lines += ["| run | " + " | ".join(f"{t} {m} ({_better(m)})" for t, m in columns) + " | "
              + " | ".join(f"{t} Δ (%)" for t in c["tasks"]) + " |",
              "| --- |" + " ---: |" * (len(columns) + len(c["tasks"]))]
    lines.append("| single-task | " + " | ".join(
        _cell(c["single_task"]["metrics"][t][m]) for t, m in columns) + " |"
        + " – |" * len(c["tasks"]))
    for entry in c["entries"]:
        lines.append(f"| {entry['label']} | " + " | ".join(
            _cell(entry["metrics"][t][m]) for t, m in columns) + " | " + " | ".join(
            _mean_std(entry["task_gains"][t], "+.2f") for t in c["tasks"]) + " |")
    lines += _plot_lines(plots, "tasks_")
    lines += ["", "## Per seed", "", "Δm (%) of each run against its seed's baselines, at the "
              "selected step (in parentheses).", "",
              "| run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "| --- |" + " ---: |" * len(seeds)]
    for entry in c["entries"]:
        lines.append(f"| {entry['label']} | " + " | ".join(
            f"{v:+.2f} ({step})" for v, step in zip(entry["delta_m"]["values"],
                                                     entry["steps"])) + " |")
    curves = [p for p in plots if p.startswith("curves_")]
    if curves:
        lines += ["", "## Learning curves", "",
                  f"Each task's first Δm metric on the test data at every evaluation: the mean "
                  f"over seeds, the band its {pct} interval.", ""]
        lines += [f"![{p}]({p})" for p in curves]
    return "\n".join(lines) + "\n"


def _timing_lines(timing: Mapping | None) -> list[str]:
    if not timing or not timing.get("runs"):
        return []
    seconds, runs = timing["seconds"], timing["runs"]
    at_once = " or ".join(map(str, timing["parallel"]))
    text = (f"- Run time: {seconds / 3600:.2f} h ({seconds:.0f} s) of wall time summed over "
            f"{runs} runs (each run's own, from logs/timings.jsonl; {at_once} at once), on "
            f"{'; '.join(timing['machines'])}.")
    if runs < timing["of_runs"]:
        text += f" {timing['of_runs'] - runs} runs have no time record."
    return [text]


def _comparisons(c: dict) -> int:
    return sum(("vs_equal" in e) + ("vs_hps" in e) for e in c["entries"])


def _plot_lines(plots: Sequence[str], prefix: str) -> list[str]:
    return [""] + [f"![{p}]({p})" for p in plots if p.startswith(prefix)] if any(
        p.startswith(prefix) for p in plots) else []


def _better(metric: str) -> str:
    return "lower is better" if report.lower_is_better(metric) else "higher is better"


def _mean_std(summary: dict, spec: str = ".4f") -> str:
    return f"{summary['mean']:{spec}} ± {summary['std']:.{_digits(spec)}f}"


def _interval(summary: dict, spec: str = "+.2f") -> str:
    low, high = summary["ci"]
    return f"[{low:{spec}}, {high:{spec}}]"


def _cell(summary: dict) -> str:
    return f"{_mean_std(summary)} {_interval(summary, '.4f')}"


def _digits(spec: str) -> int:
    return int(spec.rsplit(".", 1)[1].rstrip("f"))


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"
