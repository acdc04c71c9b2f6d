#!/usr/bin/env python
"""The multi-task report: a multi-task run against single-task baselines, with Δm.

    python scripts/report.py --mtl=runs/md/mtl --stl=left:runs/md/stl_left \\
        --stl=right:runs/md/stl_right --stl=sum:runs/md/stl_sum --out=runs/md/report

Prints the Markdown table and writes report.md, report.json and (with matplotlib installed)
curves_<task>.png into --out. Δm > 0: the multi-task model beats the baselines on average.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402


def parse_stl(values) -> dict[str, str]:
    """["task:RUN", ...] -> {task: RUN}."""
    runs = {}
    for value in values or ():
        task, sep, path = value.partition(":")
        if not sep or not task or not path:
            raise ValueError(f"--stl={value!r}: expected TASK:RUN_FOLDER, e.g. "
                             "--stl=left:runs/md/stl_left.")
        if task in runs:
            raise ValueError(f"--stl names task {task!r} twice.")
        runs[task] = path
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
            raise ValueError(f"--{flag}={value!r}: expected two parts separated by ':'.")
        pairs.append((key, rest))
    return pairs


def main(argv=None) -> int:
    args = parse_args(argv)
    from mtl import report

    try:
        stl = parse_stl(args.stl)
        metrics = {}
        for task, metric in _pairs(args.metric, "metric"):
            metrics.setdefault(task, []).append(metric)
        directions = dict(_pairs(args.direction, "direction"))
        result = report.write_report(args.mtl, stl, args.out, metrics=metrics or None,
                                     directions=directions or None, plots=not args.no_plots)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.markdown)
    for note in result.notes:
        print(note)
    print("Wrote " + ", ".join(result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
