#!/usr/bin/env python
"""Compares weighting methods (and architectures) over several seeds, with confidence intervals
and paired tests against equal weighting.

    python scripts/compare.py --experiment=multi_digits \\
        --methods=equal,uncertainty,famo,pcgrad,mgda,cagrad,nash_mtl,upgrad --seeds=5 \\
        --out=runs/md_compare [--architectures=hps,mmoe] [--select=final|best_val] \\
        [--parallel=N] -- [flags for every run, e.g. --train_steps=1000]

Trains, for every seed 0..N-1, the single-task baseline of every task (OUT/stl_<task>_s<seed>)
and every method on every architecture (OUT/<architecture>_<method>_s<seed>), each with
`--seed`, `--tasks`, `--weighting`, `--architecture` and `--model_dir` set here (flags after
`--` may not set them). A run already complete in OUT is skipped and a partial one resumes, so
an interrupted sweep continues where it stopped. `--parallel=N` runs N at once (one GPU each,
round robin, when GPUs are visible); each run's output goes to OUT/logs/<run>.log. Then writes
OUT/report.md, OUT/results.json and the plots OUT/*.png (mtl.evidence.comparison says how runs
are selected and what the statistics are). Bad input prints `error: ...` and exits with status
2 before any run starts; failed runs are listed and end it with status 1 (no report).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from mtl import architectures, cli, flags, weighting  # noqa: E402
from mtl import runs as runs_lib  # noqa: E402
from mtl.config import Config  # noqa: E402
from mtl.errors import UsageError  # noqa: E402
from mtl.evidence import comparison, plots, report, sweep, timing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_METHODS = "equal,uncertainty,famo,pcgrad,mgda,cagrad,nash_mtl,upgrad"
# Flags every run gets from compare itself; after `--` they would override them.
OWN_FLAGS = ("--seed", "--weighting", "--tasks", "--model_dir", "--architecture")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="experiments/<name>.py to run.")
    parser.add_argument("--out", required=True, help="Folder for the runs, report and plots.")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"Comma-separated weighting methods (default: {DEFAULT_METHODS}); "
                             "include equal for the paired comparisons.")
    parser.add_argument("--architectures", default="hps",
                        help="Comma-separated architectures (default: hps).")
    parser.add_argument("--seeds", type=int, default=5,
                        help="Seeds 0..N-1 per run (default 5; at least 2).")
    parser.add_argument("--select", default="final", choices=comparison.SELECTIONS,
                        help="Which evaluation of each run counts: final (the last) or "
                             "best_val (the best validation Δm; needs validation data).")
    parser.add_argument("--parallel", type=int, default=1, help="Runs at once (default 1).")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated tasks (default: every task of the experiment).")
    parser.add_argument("--no_plots", action="store_true", help="Skip the PNG plots.")
    parser.add_argument("--experiments_dir", default=os.path.join(ROOT, "experiments"),
                        help="Folder of experiment scripts.")
    parser.add_argument("extra", nargs="*", help="Flags for every run, after `--`.")
    return parser.parse_args(argv)


def _names(value: str, flag: str, known, what: str) -> tuple:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) != len(names):
        problem = (f"unknown {what} {unknown[0]!r}" if unknown else
                   f"no {what}" if not names else f"a {what} named twice")
        raise UsageError(f"{flag}={value!r}: {problem}; expected some of {sorted(known)}.")
    return names


def check_args(args) -> None:
    """The checks that need no experiment: names, numbers, flags after `--`, the folder."""
    args.methods = _names(args.methods, "--methods", weighting.METHODS, "weighting method")
    args.architectures = _names(args.architectures, "--architectures",
                                architectures.ARCHITECTURES, "architecture")
    if args.seeds < 2:
        raise UsageError(f"--seeds={args.seeds}: the confidence intervals and paired tests "
                         "need at least 2 seeds (5 is the default).")
    sweep.check_parallel(args.parallel)
    sweep.check_extra(args.extra, OWN_FLAGS, "compare",
                      "(one run per seed, task, method and architecture); choose them with "
                      "compare's own --seeds, --tasks, --methods and --architectures, and the "
                      "folder with --out.")
    report.check_out_dir(args.out)
    if not args.no_plots:
        missing = plots.missing_matplotlib()
        if missing:
            raise UsageError(missing)


def experiment_config(name: str, experiments_dir: str, extra: Sequence[str]) -> Config:
    """The `Config` every run gets from `extra` (the flags after `--`) and the experiment's own
    flag defaults, parsed as the experiment script will parse them, so that a flag that does
    not exist or a value that is not allowed is refused before any run starts. The process's
    flag values are left untouched (a copy is parsed). Flags are process-wide: in a process
    that loaded another experiment script first, its defaults stand where they differ."""
    runs_lib.load_experiment(name, experiments_dir)  # Defines the flags with its defaults.
    try:
        values = flags.parse_copy([f"{name}.py", *extra])
    except UsageError as e:
        raise UsageError(f"flags after `--`: {e}") from None
    return flags.config_from_flags(values)


def plan(args, protocol: comparison.Protocol, config) -> list[tuple[sweep.Run, object]]:
    """Every run of the protocol with the `Config` it will get; building these checks each
    run's flags as the run will (options after `--` that a method or architecture does not
    take are refused here)."""
    script = sweep.experiment_script(args.experiment, args.experiments_dir)
    runs = []
    for name, settings in comparison.run_settings(protocol):
        model_dir = os.path.join(args.out, name)
        command = (sys.executable, script, f"--model_dir={model_dir}",
                   *comparison.flags_of(settings), *args.extra)
        runs.append((sweep.Run(name, command),
                     dataclasses.replace(config, model_dir=model_dir, **settings)))
    return runs


def protocol_of(args) -> tuple[comparison.Protocol, object]:
    """The protocol and the experiment (`mtl.experiment.Experiment`), checked against it: its
    tasks, and validation data for --select=best_val."""
    sweep.experiment_script(args.experiment, args.experiments_dir)
    experiment = runs_lib.load_experiment(args.experiment, args.experiments_dir)
    tasks = sweep.chosen_tasks(args.tasks, sweep.experiment_tasks(args.experiment,
                                                                   args.experiments_dir))
    if args.select == "best_val" and experiment.validation_data is None:
        raise UsageError(f"--select=best_val: experiment {args.experiment!r} has no validation "
                         "data (its Experiment(validation_data=...) is None), and selecting on "
                         "the test data is not done. Use --select=final, or give the "
                         "experiment a validation split.")
    return comparison.Protocol(args.experiment, tasks, args.methods, args.architectures,
                               tuple(range(args.seeds)), args.select), experiment


def still_to_train(args, runs, validation: bool) -> list[sweep.Run]:
    """The runs that are not complete in --out (each complete one is named)."""
    todo = []
    for run, config in runs:
        if sweep.is_complete(config.model_dir, args.experiment, config, validation=validation):
            print(f"skip {run.name}: complete (step {config.train_steps})")
        else:
            todo.append(run)
    print(f"{len(runs)} runs: {len(runs) - len(todo)} complete, {len(todo)} to train.",
          flush=True)
    return todo


def train(args, todo: list[sweep.Run]) -> int:
    """Trains `todo`, --parallel at a time; 0, or 1 after failures (named), 130 on Ctrl-C."""
    gpus = sweep.visible_gpus() if args.parallel > 1 else []
    try:
        failures = sweep.run_all(todo, parallel=args.parallel, env=sweep.subprocess_env(ROOT),
                                 log_dir=os.path.join(args.out, "logs"), keep_going=True,
                                 gpus=gpus)
    except KeyboardInterrupt:
        print("Interrupted: the runs saved checkpoints; the same command continues the sweep.",
              file=sys.stderr)
        return 130
    for failure in failures:
        print(f"error: run {failure.name} failed with exit status {failure.status}; its "
              f"output: {failure.log}", file=sys.stderr)
    if failures:
        print("error: no report: rerun the same command to retry the failed runs (complete "
              "runs are skipped).", file=sys.stderr)
        return 1
    return 0


def run(argv=None) -> int:
    """Trains what is missing, then writes the report; user errors raise `mtl.UsageError`."""
    command = "python scripts/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_args(args)
    protocol, experiment = protocol_of(args)
    config = experiment_config(args.experiment, args.experiments_dir, args.extra)
    runs = plan(args, protocol, config)
    status = train(args, still_to_train(args, runs, experiment.validation_data is not None))
    return status or write_report(args, protocol, config, command)


def write_report(args, protocol: comparison.Protocol, config, command: str) -> int:
    logs = {name: report.read_run(os.path.join(args.out, name), name)
            for name, _ in comparison.run_settings(protocol)}
    result = comparison.compare(protocol, logs)
    written = [] if args.no_plots else plots.write_plots(result, args.out)
    run_time = timing.run_time(os.path.join(args.out, "logs"),
                               [name for name, _ in comparison.run_settings(protocol)])
    text = comparison.markdown(result, command=command, train_steps=config.train_steps,
                               eval_every=config.eval_every, plots=written, timing=run_time)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "train_steps": config.train_steps,
                   "eval_every": config.eval_every, "run_time": run_time, **result}, f,
                  indent=2)
    print(text)
    print("Wrote " + ", ".join(os.path.join(args.out, n)
                               for n in ["report.md", "results.json", *written]))
    return 0


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
