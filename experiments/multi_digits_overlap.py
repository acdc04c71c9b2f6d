"""multi_digits_overlap: two handwritten digits overlapping on one canvas (MultiMNIST-style);
tasks left, right (10 classes) and sum.

The experiment of experiments/multi_digits.py (same tasks, model, flags and defaults) on the
`overlap` config of the dataset: each 8x8 digit upscaled to 16x16, the left one near the top-left
and the right one near the bottom-right of a 24x24 canvas, their strokes crossing, so that the
two digit tasks compete for the same pixels (mtl/data/multi_digits.py describes the
construction). Runs offline; the dataset is generated on first use.

    python experiments/multi_digits_overlap.py                  # ~1-2 min on 2 CPU cores
    python experiments/multi_digits_overlap.py --tasks=left     # single-task baseline
    tensorboard --logdir runs/multi_digits_overlap

A run folder records the experiment's name: a multi_digits run is not resumed here, nor the
other way round.

Expected with the defaults (3,000 steps, batch 64, Adam 1e-3, small_cnn, seed 0), about a minute
per run on 2 CPU cores; measured test accuracy, one run each: 0.93 on left and 0.91 on right for
the single-task models (--tasks=left, --tasks=right; 0.97 and 0.99 side by side), 0.90 on both for
the multi-task model with equal weighting, whose sum MAE is 1.61 (1.89 single-task). The README
(The multi_digits dataset) compares them with the side-by-side runs.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.


import mtl  # noqa: E402,F401  (before keras: it filters TensorFlow's start-up lines)
from mtl import cli, experiment, runs  # noqa: E402

# experiments/multi_digits.py defines the flags and builds the experiment of either variant.
EXPERIMENT = runs.experiment_script(
    "multi_digits", os.path.dirname(os.path.abspath(__file__))).make_experiment("overlap")


def main(argv):
    experiment.main(EXPERIMENT, argv)


if __name__ == "__main__":
    cli.run(main)
