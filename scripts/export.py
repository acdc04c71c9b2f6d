#!/usr/bin/env python
"""Exports a finished run as SavedModels: one per task and one joint model.

    python scripts/export.py --model_dir=runs/multi_digits --export_dir=exported
    python scripts/export.py --model_dir=runs/multi_digits --export_dir=exported --tasks=left,sum

The run's config.json names the experiment (experiments/<name>.py) whose model is rebuilt; the
latest checkpoint is loaded into it. Writes <export_dir>/<task>/ (serving_default: that task's
output), <export_dir>/joint/ (serving_default: every output; one signature per task) and
<export_dir>/export.json. Try them with scripts/predict.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="The run folder to export.")
    parser.add_argument("--export_dir", required=True, help="Where to write the SavedModels.")
    parser.add_argument("--tasks", default=None,
                        help="Comma-separated tasks to export (default: all of the run's).")
    parser.add_argument("--no_joint", action="store_true", help="Skip the joint SavedModel.")
    parser.add_argument("--experiments_dir", default=None,
                        help="Folder of experiment scripts (default: the repository's).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mtl import export, progress

    progress.quiet_library_info()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        paths = export.export_run(args.model_dir, args.export_dir, tasks,
                                  experiments_dir=args.experiments_dir, joint=not args.no_joint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:>12}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
