"""cifar100: the fine (100 classes) and coarse (20 superclasses) labels of the same images.

Downloads CIFAR-100 (about 160 MB) through TFDS on first use, into --data_dir (default: TFDS's,
~/tensorflow_datasets or $TFDS_DATA_DIR). Offline, prepare it on a machine with network and copy
the folder (the error message says how).

    python experiments/cifar100.py                            # fine + coarse, ResNet
    python experiments/cifar100.py --tasks=fine               # single-task baseline
    python experiments/cifar100.py --weighting=<method> --model_dir=runs/cifar100_<method>
    tensorboard --logdir runs/cifar100

Expected on one GPU with the defaults (small ResNet, widths 16/32/64 with 2 blocks per stage;
batch 128; 40,000 steps, about 100 epochs; Adam 1e-3 without decay; crop + flip), in roughly a
quarter of an hour: test accuracy of roughly 0.55-0.65 on `fine` and 0.65-0.75 on `coarse`.
For reference, ResNet-20-sized networks reach about 0.68 on the fine labels with SGD and a
step schedule (literature); these ranges are estimates, not measured with this code.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.

from absl import flags as absl_flags  # noqa: E402

import mtl  # noqa: E402,F401  (before keras: it filters TensorFlow's start-up lines)
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import cifar100  # noqa: E402

flags.define_flags(backbone="resnet", train_steps=40_000, batch_size=128, eval_batch_size=500,
                   eval_every=5000, checkpoint_every=5000, log_every=200)
absl_flags.DEFINE_bool("cifar100_augment", True,
                       "Random 4-pixel shifts and left-right flips of the training images.")


def make_experiment(*, augment: bool = True) -> experiment.Experiment:
    """The CIFAR-100 experiment; `augment`: crop + flip when training."""

    def build_tasks(config):
        del config
        return cifar100.tasks()

    def build_model(config, task_names):
        return config.build_model(cifar100.IMAGE_SHAPE, cifar100.heads(task_names))

    def train_data(config, task_names, input_context=None):
        return cifar100.load("train", batch_size=config.batch_size, training=True,
                             tasks=task_names, data_dir=config.data_dir, seed=config.seed,
                             augment=augment, input_context=input_context)

    def eval_data(config, task_names):
        return cifar100.load("test", batch_size=config.eval_batch_size, training=False,
                             tasks=task_names, data_dir=config.data_dir)

    return experiment.Experiment(name="cifar100", tasks=build_tasks, model=build_model,
                                 settings={"cifar100_augment": augment},
                                 train_data=train_data, eval_data=eval_data)


EXPERIMENT = make_experiment()


def main(argv):
    options = absl_flags.FLAGS
    experiment.main(make_experiment(augment=options.cifar100_augment), argv)


if __name__ == "__main__":
    cli.run(main)
