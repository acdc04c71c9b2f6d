#!/usr/bin/env python
"""Trains an experiment's single-task baselines and its multi-task run, then writes the report.

    python scripts/run_baselines.py --experiment=multi_digits --out=runs/md_baselines
    python scripts/run_baselines.py --experiment=multi_digits --out=runs/quick -- \\
        --train_steps=500 --eval_every=250

    python scripts/run_baselines.py --experiment=multi_digits --out=runs/md_arch \
        --architectures=hps,mmoe,cross_stitch --parallel=2

Runs `experiments/<experiment>.py --tasks=<task> --model_dir=OUT/stl_<task>` for every task,
then `--model_dir=OUT/mtl` with all of them (flags after `--` go to every run), `--parallel=N`
at a time (default 1: one after the other; with N > 1 each run's output goes to
OUT/logs/<run>.log and, where GPUs are visible, each of the N runs at once gets one of them),
and finally the report (scripts/report.py) into OUT/report. With `--architectures`, the
single-task baselines are trained once (hard sharing with one task is the single-task model)
and the multi-task run once per architecture, `OUT/mtl` for hps and `OUT/mtl_<architecture>`
with `--architecture=<architecture>` for the others, each with its report
(`OUT/report`, `OUT/report_<architecture>`) and a summary table of Δm per architecture. A run
folder that already holds a finished run is resumed, i.e. only evaluated again: rerunning the
command is cheap. Flags after `--` may not set --tasks or --model_dir (run_baselines sets them
per run); bad input prints `error: ...` and exits with status 2 before any run starts.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from mtl import architectures as architectures_lib  # noqa: E402
from mtl import cli  # noqa: E402
from mtl.errors import UsageError  # noqa: E402
from mtl.evidence import report, sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Flags every run gets from run_baselines itself; after `--` they would override them.
OWN_FLAGS = ("--tasks", "--model_dir", "--architecture")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="experiments/<name>.py to run.")
    parser.add_argument("--out", required=True, help="Folder for the runs and the report.")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated tasks (default: every task of the experiment).")
    parser.add_argument("--architectures", default="hps",
                        help="Comma-separated architectures of the multi-task runs (default: hps).")
    parser.add_argument("--parallel", type=int, default=1,
                        help="Runs at once (default 1; their outputs go to OUT/logs).")
    parser.add_argument("--experiments_dir", default=os.path.join(ROOT, "experiments"),
                        help="Folder of experiment scripts.")
    parser.add_argument("extra", nargs="*", help="Flags for every run, after `--`.")
    return parser.parse_args(argv)


experiment_tasks = sweep.experiment_tasks


def mtl_run_name(architecture: str) -> str:
    return "mtl" if architecture == "hps" else f"mtl_{architecture}"


def report_name(architecture: str) -> str:
    return "report" if architecture == "hps" else f"report_{architecture}"


def plan(experiment: str, out: str, tasks: list[str], extra: list[str],
         experiments_dir: str, architectures=("hps",)) -> list[tuple[str, list[str]]]:
    """[(run name, command)]: one single-task run per task, then a multi-task run per
    architecture."""
    script = os.path.join(experiments_dir, f"{experiment}.py")
    runs = [(f"stl_{task}", [f"--tasks={task}"]) for task in tasks]
    for architecture in architectures:
        runs.append((mtl_run_name(architecture), [f"--tasks={','.join(tasks)}"] + (
            [] if architecture == "hps" else [f"--architecture={architecture}"])))
    return [(name, [sys.executable, script, f"--model_dir={os.path.join(out, name)}", *flags,
                    *extra]) for name, flags in runs]


def check_extra(extra: list[str]) -> None:
    """Refuses flags after `--` that would override what run_baselines sets for each run."""
    sweep.check_extra(extra, OWN_FLAGS, "run_baselines",
                      "(one run per task, then all of them per architecture); choose the tasks "
                      "with run_baselines' own --tasks, the folder with --out and the "
                      "architectures with --architectures.")


def run(argv=None) -> int:
    """Trains the runs and writes the report; user errors raise `mtl.UsageError`."""
    args = parse_args(argv)
    sweep.experiment_script(args.experiment, args.experiments_dir)
    check_extra(args.extra)
    sweep.check_parallel(args.parallel)
    architectures = [a.strip() for a in args.architectures.split(",") if a.strip()]
    unknown = [a for a in architectures if a not in architectures_lib.ARCHITECTURES]
    if unknown or not architectures:
        raise UsageError(f"--architectures={args.architectures!r}: expected some of "
                         f"{list(architectures_lib.ARCHITECTURES)}.")
    for architecture in architectures:
        report.check_out_dir(os.path.join(args.out, report_name(architecture)))
    tasks = list(sweep.chosen_tasks(args.tasks, experiment_tasks(args.experiment,
                                                                 args.experiments_dir)))
    runs = [sweep.Run(name, tuple(command)) for name, command in plan(
        args.experiment, args.out, tasks, args.extra, args.experiments_dir, architectures)]
    at_once = args.parallel > 1
    failures = sweep.run_all(runs, parallel=args.parallel, env=sweep.subprocess_env(ROOT),
                             log_dir=os.path.join(args.out, "logs") if at_once else None,
                             gpus=sweep.visible_gpus() if at_once else ())
    for failure in failures:
        print(f"error: run {failure.name} failed with exit status {failure.status}"
              + (f"; its output: {failure.log}" if failure.log else "") + ".", file=sys.stderr)
        return failure.status
    summary = []
    for architecture in architectures:
        result = report.write_report(os.path.join(args.out, mtl_run_name(architecture)),
                                     {t: os.path.join(args.out, f"stl_{t}") for t in tasks},
                                     os.path.join(args.out, report_name(architecture)))
        print(result.markdown)
        for note in result.notes:
            print(note)
        print("Wrote " + ", ".join(result.files))
        summary.append((architecture, result.delta))
    if len(architectures) > 1:
        print("\n| architecture | " + " | ".join(f"{t} (%)" for t in tasks) + " | Δm (%) |")
        print("| --- |" + " ---: |" * (len(tasks) + 1))
        for architecture, delta in summary:
            cells = [f"{delta.per_task[t]:+.2f}" if delta.per_task.get(t) is not None else "-"
                     for t in tasks]
            value = "-" if delta.value is None else f"{delta.value:+.2f}"
            print(f"| {architecture} | " + " | ".join(cells) + f" | {value} |")
    return 0


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
