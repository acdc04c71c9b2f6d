#!/usr/bin/env python
"""The multi-task report: a multi-task run against single-task baselines, with Δm.

    python scripts/report.py --mtl=runs/md/mtl --stl=left:runs/md/stl_left \\
        --stl=right:runs/md/stl_right --stl=sum:runs/md/stl_sum --out=runs/md/report

Prints the Markdown table and writes report.md, report.json and (with matplotlib installed)
curves_<task>.png into --out. Δm > 0: the multi-task model beats the baselines on average.
Refused, before anything is written: a baseline run that trained more than one task, and runs
trained for different numbers of steps (Δm compares equal training budgets). Bad input prints
`error: ...` and exits with status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from mtl import cli  # noqa: E402
from mtl.errors import UsageError  # noqa: E402
from mtl.evidence import report  # noqa: E402


def parse_stl(values) -> dict[str, str]:
    """["task:RUN", ...] -> {task: RUN}."""
    runs = {}
    for value in values or ():
        task, sep, path = value.partition(":")
        if not sep or not task or not path:
            raise UsageError(f"--stl={value!r}: expected TASK:RUN_FOLDER, e.g. "
                             "--stl=left:runs/md/stl_left.")
        if task in runs:
            raise UsageError(f"--stl names task {task!r} twice.")
        runs[task] = path
    return runs


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mtl", required=True, help="The multi-task run folder.")
    parser.add_argument("--stl", action="append", default=[], metavar="TASK:RUN",
                        help="A single-task baseline run for TASK (repeat per task).")
    parser.add_argument("--out", required=True, help="Folder for report.md, .json and PNGs.")
    parser.add_argument("--metric", action="append", default=[], metavar="TASK:METRIC",
                        help="Use METRIC for TASK in Δm (repeatable; default: every metric "
                             "but the loss).")
    parser.add_argument("--direction", action="append", default=[], metavar="METRIC:lower|higher",
                        help="Which way is better for a metric the name does not tell.")
    parser.add_argument("--no_plots", action="store_true", help="Skip the PNG curves.")
    return parser.parse_args(argv)


def _pairs(values, flag) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, sep, rest = value.partition(":")
        if not sep or not key or not rest:
            raise UsageError(f"--{flag}={value!r}: expected two parts separated by ':'.")
        pairs.append((key, rest))
    return pairs


def run(argv=None) -> int:
    """Writes the report; user errors raise `mtl.UsageError`."""
    args = parse_args(argv)
    stl = parse_stl(args.stl)
    metrics = {}
    for task, metric in _pairs(args.metric, "metric"):
        metrics.setdefault(task, []).append(metric)
    directions = dict(_pairs(args.direction, "direction"))
    result = report.write_report(args.mtl, stl, args.out, metrics=metrics or None,
                                 directions=directions or None, plots=not args.no_plots)
    print(result.markdown)
    for note in result.notes:
        print(note)
    print("Wrote " + ", ".join(result.files))
    return 0


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
