#!/usr/bin/env python
"""Runs an exported SavedModel on a batch and prints its outputs.

    python scripts/predict.py --export_dir=exported/joint --input=batch.npy
    python scripts/predict.py --export_dir=exported/joint --signature=left --input=batch.npy
    python scripts/predict.py --export_dir=exported/left --model_dir=runs/multi_digits \\
        --num_examples=8          # the first 8 examples of the run's eval data, with labels

--input: a .npy array (a single-input model) or a .npz file with one array per input name. The
inputs are checked against the signature (rank, shape, dtype) before anything runs; integer
pixels (uint8 0..255) are converted to the model's float images only where the export recorded
how training scaled them (export.json's image_scaling: "unit_interval" is x / 255). Bad input
prints `error: ...` with the expected and the given shape and dtype, and exits with status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402

from mtl import cli, export, runs  # noqa: E402
from mtl.errors import UsageError  # noqa: E402


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export_dir", required=True,
                        help="A SavedModel folder: <export_dir>/<task> or <export_dir>/joint.")
    parser.add_argument("--signature", default="serving_default",
                        help="Signature to run (the joint model has one per task).")
    parser.add_argument("--input", default=None, help="A .npy or .npz file of inputs.")
    parser.add_argument("--num_examples", type=int, default=None,
                        help="Use this many examples of --model_dir's eval data instead.")
    parser.add_argument("--model_dir", default=None, help="The run whose eval data to use.")
    parser.add_argument("--experiments_dir", default=None,
                        help="Folder of experiment scripts (default: the repository's).")
    args = parser.parse_args(argv)
    if (args.input is None) == (args.num_examples is None):
        parser.error("give either --input=FILE or --num_examples=N (with --model_dir).")
    if args.num_examples is not None and (args.num_examples < 1 or not args.model_dir):
        parser.error(f"--num_examples needs a value >= 1 (got {args.num_examples}) and "
                     "--model_dir.")
    return args


def read_inputs(path: str):
    """An array from a .npy file, or {name: array} from a .npz file; a file that is neither
    (or holds Python objects, or is cut short) is a `UsageError` naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"--input {path!r} " + ("is a folder; expected a .npy or .npz file."
                                                 if os.path.isdir(path) else "does not exist."))
    expected = ("expected an array saved with numpy.save (.npy) or numpy.savez (.npz) holding "
                "numbers")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        with open(path, "rb") as f:
            start = f.read(16)
        raise UsageError(f"--input {path!r} cannot be read as a NumPy file ({e}; it starts with "
                         f"{start!r}); {expected}.") from None


def format_outputs(outputs: dict, labels: dict | None = None) -> str:
    """One block per output: its shape, then one line per example (with the label if known)."""
    lines = []
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        for name, values in outputs.items():
            lines.append(f"{name}: shape {values.shape}")
            label = None if labels is None else labels.get(name)
            for i, row in enumerate(values):
                suffix = "" if label is None else f"   label {np.asarray(label[i]).tolist()}"
                lines.append(f"  [{i}] {np.asarray(row)}{suffix}")
    return "\n".join(lines)


def run(argv=None) -> int:
    """Predicts; user errors raise `mtl.UsageError`."""
    args = parse_args(argv)
    labels = None
    if args.input is not None:
        inputs = read_inputs(args.input)  # Before the model loads: a bad file fails fast.
    loaded = export.load(args.export_dir)
    if args.input is None:
        inputs, labels = runs.eval_batch(args.model_dir, args.num_examples,
                                         experiments_dir=args.experiments_dir)
        inputs = np.asarray(inputs) if not isinstance(inputs, dict) else {
            k: np.asarray(v) for k, v in inputs.items()}
        labels = {k: np.asarray(v) for k, v in labels.items()}
    scaling = export.read_info(args.export_dir).get("image_scaling")
    outputs = export.predict(loaded, inputs, signature=args.signature, image_scaling=scaling)
    print(format_outputs(outputs, labels))
    return 0


def main(argv=None) -> int:
    """`run`, with a user error printed as `error: ...` and exit status 2."""
    return cli.exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
