"""shapes3d: six independent factors of a rendered scene (floor, wall and object hue, scale,
shape, orientation), as classification or as regression.

Downloads 3dshapes (about 255 MB, 480,000 images) through TFDS on first use, into --data_dir
(default: TFDS's, ~/tensorflow_datasets or $TFDS_DATA_DIR). Offline, prepare it on a machine
with network and copy the folder (the error message says how). The dataset has one split:
training uses its first 90%, evaluation the last 10% (a random, disjoint subset).

    python experiments/shapes3d.py                                # 6 classification tasks
    python experiments/shapes3d.py --shapes3d_mode=regression     # 6 regression tasks
    python experiments/shapes3d.py --tasks=shape,orientation
    tensorboard --logdir runs/shapes3d

Expected on one GPU with the defaults (small ResNet, batch 128, 5,000 steps, Adam 1e-3), in a
few minutes: held-out accuracy close to 1.0 on every factor (the factors are easy to read off
the image and every factor value occurs in training: a sanity check that every head trains,
and a fast benchmark for weighting methods). In regression mode the MAE
should fall well below half the spacing between a factor's values (0.05 for the hues in the
normalised units). Estimates, not measured with this code.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.

from absl import flags as absl_flags  # noqa: E402

import mtl  # noqa: E402,F401  (before keras: it filters TensorFlow's start-up lines)
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import shapes3d  # noqa: E402

flags.define_flags(backbone="resnet", train_steps=5000, batch_size=128, eval_batch_size=500,
                   eval_every=1000, checkpoint_every=1000, log_every=100)
absl_flags.DEFINE_enum("shapes3d_mode", "classification", list(shapes3d.MODES),
                       "classification: predict label_<factor>; regression: predict "
                       "value_<factor>, normalised to about [0, 1].")


def make_experiment(*, mode: str = "classification") -> experiment.Experiment:
    """The 3dshapes experiment with `mode` heads ("classification" or "regression")."""

    def build_tasks(config):
        del config
        return shapes3d.tasks(mode=mode)

    def build_model(config, task_names):
        return config.build_model(shapes3d.IMAGE_SHAPE, shapes3d.heads(task_names, mode=mode))

    def train_data(config, task_names, input_context=None):
        return shapes3d.load(shapes3d.TRAIN_SPLIT, batch_size=config.batch_size, training=True,
                             tasks=task_names, mode=mode, data_dir=config.data_dir,
                             seed=config.seed, input_context=input_context)

    def eval_data(config, task_names):
        return shapes3d.load(shapes3d.EVAL_SPLIT, batch_size=config.eval_batch_size,
                             training=False, tasks=task_names, mode=mode,
                             data_dir=config.data_dir)

    return experiment.Experiment(name="shapes3d", tasks=build_tasks, model=build_model,
                                 settings={"shapes3d_mode": mode},
                                 train_data=train_data, eval_data=eval_data)


EXPERIMENT = make_experiment()


def main(argv):
    experiment.main(make_experiment(mode=absl_flags.FLAGS.shapes3d_mode), argv)


if __name__ == "__main__":
    cli.run(main)
