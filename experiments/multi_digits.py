"""multi_digits: two handwritten digits side by side; tasks left, right (10 classes) and sum.

Runs offline: the dataset is generated from scikit-learn's bundled digits on first use.

    python experiments/multi_digits.py                       # ~1-2 min on 2 CPU cores
    python experiments/multi_digits.py --tasks=left          # single-task baseline
    tensorboard --logdir runs/multi_digits

Expected with the defaults (3,000 steps, batch 64, Adam 1e-3, small_cnn), about 50 s on 2 CPU
cores: test accuracy 0.97-0.98 on left and right, and a sum MAE of about 1.05 (measured).

Runs evaluate on the test split; `EXPERIMENT.eval_data(config, tasks, split="validation")` gives
the validation split for choosing models. `make_experiment("overlap")` is the same experiment on
the overlapping digits (experiments/multi_digits_overlap.py).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.


import mtl  # noqa: E402  (before keras: it filters TensorFlow's start-up lines)
import keras  # noqa: E402
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

flags.define_flags(backbone="small_cnn", train_steps=3000, batch_size=64, eval_every=1000,
                   checkpoint_every=1000)


def build_tasks(config):
    del config
    return [
        mtl.Task("left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"]),
        mtl.Task("right", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 metrics=["accuracy"]),
        mtl.Task("sum", loss="mse", metrics=["mae"], weight=0.1),
    ]


def make_experiment(variant: str = "side_by_side") -> experiment.Experiment:
    """The experiment on `variant` of the dataset ("side_by_side" or "overlap"). The overlap one
    is named multi_digits_overlap (experiments/multi_digits_overlap.py runs it): a run folder
    records the name, so that it names its data and is not resumed on the other variant."""
    multi_digits.check_variant(variant)

    def build_model(config, task_names):
        all_heads = {"left": lambda: mtl.heads.classification(10),
                     "right": lambda: mtl.heads.classification(10),
                     "sum": lambda: mtl.heads.regression(1, hidden=(64,))}
        # --architecture (default hps: the backbone and a head per task) and --backbone.
        return config.build_model(multi_digits.IMAGE_SHAPES[variant],
                                  {name: all_heads[name]() for name in task_names})

    def train_data(config, task_names, input_context=None):
        return multi_digits.load("train", batch_size=config.batch_size, training=True,
                                 tasks=task_names, data_dir=config.data_dir, seed=config.seed,
                                 variant=variant, input_context=input_context)

    def eval_data(config, task_names, split="test"):
        """One pass over `split`: "test" (what runs report) or "validation" (new pairs of the
        training source images, for choosing models)."""
        return multi_digits.load(split, batch_size=config.eval_batch_size, training=False,
                                 tasks=task_names, data_dir=config.data_dir, variant=variant)

    def validation_data(config, task_names):
        return eval_data(config, task_names, split="validation")

    name = "multi_digits" if variant == "side_by_side" else f"multi_digits_{variant}"
    return experiment.Experiment(name=name, tasks=build_tasks, model=build_model,
                                 train_data=train_data, eval_data=eval_data,
                                 validation_data=validation_data)


EXPERIMENT = make_experiment()


def main(argv):
    experiment.main(EXPERIMENT, argv)


if __name__ == "__main__":
    cli.run(main)
