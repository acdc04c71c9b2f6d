#!/usr/bin/env python
"""Exports a finished run as SavedModels: one per task and one joint model.

    python scripts/export.py --model_dir=runs/multi_digits --export_dir=exported
    python scripts/export.py --model_dir=runs/multi_digits --export_dir=exported --tasks=left,sum

The model is rebuilt from the run's model.json (every mtl.Trainer with a model_dir writes it,
the Python API's included) or from config.json's experiment (experiments/<name>.py); the newest
readable checkpoint is loaded into it (a truncated newest checkpoint is skipped with a warning).
Writes <export_dir>/<task>/ (serving_default: that task's output), <export_dir>/joint/
(serving_default: every output; one signature per task) and <export_dir>/export.json (with how
training scaled integer pixels, for predict). Try them with scripts/predict.py. Bad input
prints `error: ...` and exits with status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from mtl import cli, export  # noqa: E402
from mtl.training import progress  # noqa: E402


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="The run folder to export.")
    parser.add_argument("--export_dir", required=True, help="Where to write the SavedModels.")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated tasks to export (default: all of the run's).")
    parser.add_argument("--no_joint", action="store_true", help="Skip the joint SavedModel.")
    parser.add_argument("--checkpoint", default=None,
                        help="A checkpoint prefix to export instead of the newest readable one "
                             "(e.g. runs/x/checkpoints/ckpt-1000).")
    parser.add_argument("--image_scaling", default="auto",
                        choices=["auto", "unit_interval", "none"],
                        help="How training scaled integer pixels, recorded for predict: auto "
                             "(read off the run's eval data), unit_interval (x / 255, in [0, 1]) "
                             "or none (predict then refuses integer inputs for float ones).")
    parser.add_argument("--experiments_dir", default=None,
                        help="Folder of experiment scripts (default: the repository's).")
    return parser.parse_args(argv)


def run(argv=None) -> int:
    """Exports; user errors raise `mtl.UsageError`."""
    args = parse_args(argv)
    progress.quiet_library_info()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    scaling = None if args.image_scaling == "none" else args.image_scaling
    paths = export.export_run(args.model_dir, args.export_dir, tasks,
                              experiments_dir=args.experiments_dir, joint=not args.no_joint,
                              image_scaling=scaling, checkpoint=args.checkpoint)
    info = export.read_info(next(iter(paths.values())))
    print(f"exported step {info.get('step')} from {info.get('checkpoint')}")
    for name, path in paths.items():
        print(f"{name:>12}: {path}")
    return 0


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
