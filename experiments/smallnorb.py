"""smallnorb: object category, camera elevation, azimuth and lighting from one toy photograph.

Downloads smallNORB (about 250 MB) through TFDS on first use, into --data_dir (default: TFDS's,
~/tensorflow_datasets or $TFDS_DATA_DIR). Offline, prepare it on a machine with network and copy
the folder (the error message says how).

    python experiments/smallnorb.py                            # 4 tasks, 48x48 images
    python experiments/smallnorb.py --tasks=category           # single-task baseline
    python experiments/smallnorb.py --smallnorb_stereo --smallnorb_image_size=96
    tensorboard --logdir runs/smallnorb

The test split shows other object instances than the train split, so every task measures
generalisation to new objects. Expected on one GPU with the defaults (small ResNet, 48x48 mono
images, batch 128, 20,000 steps, about 100 epochs, Adam 1e-3, random shifts), in about ten
minutes: `category` test accuracy around 0.9 (CNNs in the literature reach 0.94-0.97 on this
split); `lighting` and `elevation` are learned less well on new instances and `azimuth` is
the hardest (18 classes with near-symmetric views). Estimates, not measured with this code.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.

from absl import flags as absl_flags  # noqa: E402

import mtl  # noqa: E402,F401  (before keras: it filters TensorFlow's start-up lines)
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import smallnorb  # noqa: E402

flags.define_flags(backbone="resnet", train_steps=20_000, batch_size=128, eval_batch_size=500,
                   eval_every=5000, checkpoint_every=5000, log_every=200)
absl_flags.DEFINE_integer("smallnorb_image_size", 48,
                          "Images are resized to this height and width (96: native size).",
                          lower_bound=8)
absl_flags.DEFINE_bool("smallnorb_stereo", False,
                       "Feed both cameras of the stereo pair as two channels.")


def make_experiment(*, image_size: int = 48, stereo: bool = False) -> experiment.Experiment:
    """The smallNORB experiment on `image_size` images, mono or `stereo`."""

    def build_tasks(config):
        del config
        return smallnorb.tasks()

    def build_model(config, task_names):
        return config.build_model(smallnorb.image_shape(image_size, stereo),
                                  smallnorb.heads(task_names))

    def train_data(config, task_names, input_context=None):
        return smallnorb.load("train", batch_size=config.batch_size, training=True,
                              tasks=task_names, data_dir=config.data_dir, seed=config.seed,
                              image_size=image_size, stereo=stereo,
                              input_context=input_context)

    def eval_data(config, task_names):
        return smallnorb.load("test", batch_size=config.eval_batch_size, training=False,
                              tasks=task_names, data_dir=config.data_dir,
                              image_size=image_size, stereo=stereo)

    return experiment.Experiment(name="smallnorb", tasks=build_tasks, model=build_model,
                                 settings={"smallnorb_image_size": image_size,
                                           "smallnorb_stereo": stereo},
                                 train_data=train_data, eval_data=eval_data)


EXPERIMENT = make_experiment()


def main(argv):
    options = absl_flags.FLAGS
    experiment.main(make_experiment(image_size=options.smallnorb_image_size,
                                    stereo=options.smallnorb_stereo), argv)


if __name__ == "__main__":
    cli.run(main)
