#!/usr/bin/env python
"""Trains an experiment's single-task baselines and its multi-task run, then writes the report.

    python scripts/run_baselines.py --experiment=multi_digits --out=runs/md_baselines
    python scripts/run_baselines.py --experiment=multi_digits --out=runs/quick -- \\
        --train_steps=500 --eval_every=250

Runs, one after the other, `experiments/<experiment>.py --tasks=<task> --model_dir=OUT/stl_<task>`
for every task, then `--model_dir=OUT/mtl` with all of them (flags after `--` go to every run),
and finally the report (scripts/report.py) into OUT/report. A run folder that already holds a
finished run is resumed, i.e. only evaluated again: rerunning the command is cheap.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="experiments/<name>.py to run.")
    parser.add_argument("--out", required=True, help="Folder for the runs and the report.")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated tasks (default: every task of the experiment).")
    parser.add_argument("--experiments_dir", default=os.path.join(ROOT, "experiments"),
                        help="Folder of experiment scripts.")
    parser.add_argument("extra", nargs="*", help="Flags for every run, after `--`.")
    return parser.parse_args(argv)


def experiment_tasks(name: str, experiments_dir: str) -> list[str]:
    """The task names of experiments/<name>.py (with the default config)."""
    from mtl import flags, runs

    experiment = runs.load_experiment(name, experiments_dir)
    return [t.name for t in experiment.tasks(flags.Config())]


def plan(experiment: str, out: str, tasks: list[str], extra: list[str],
         experiments_dir: str) -> list[tuple[str, list[str]]]:
    """[(run name, command)]: one single-task run per task, then the multi-task run."""
    script = os.path.join(experiments_dir, f"{experiment}.py")
    runs = [(f"stl_{task}", [f"--tasks={task}"]) for task in tasks]
    runs.append(("mtl", [f"--tasks={','.join(tasks)}"]))
    return [(name, [sys.executable, script, f"--model_dir={os.path.join(out, name)}", *flags,
                    *extra]) for name, flags in runs]


def main(argv=None) -> int:
    args = parse_args(argv)
    script = os.path.join(args.experiments_dir, f"{args.experiment}.py")
    if not os.path.exists(script):
        print(f"error: no experiment script {script}", file=sys.stderr)
        return 2
    available = experiment_tasks(args.experiment, args.experiments_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else available
    unknown = [t for t in tasks if t not in available]
    if unknown or not tasks:
        print(f"error: --tasks={args.tasks!r}: the experiment's tasks are {available}.",
              file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    for name, command in plan(args.experiment, args.out, tasks, args.extra,
                              args.experiments_dir):
        print(f"==> {name}: {' '.join(command)}", flush=True)
        status = subprocess.run(command, env=env).returncode
        if status != 0:
            print(f"error: run {name} failed with exit status {status}.", file=sys.stderr)
            return status
    from mtl import report

    result = report.write_report(os.path.join(args.out, "mtl"),
                                 {t: os.path.join(args.out, f"stl_{t}") for t in tasks},
                                 os.path.join(args.out, "report"))
    print(result.markdown)
    for note in result.notes:
        print(note)
    print("Wrote " + ", ".join(result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
