"""celeb_a: 40 binary face attributes and 5 facial landmarks from one face image.

Downloads CelebA (about 1.4 GB) through TFDS on first use, into --data_dir (default: TFDS's,
~/tensorflow_datasets or $TFDS_DATA_DIR). Its Google Drive links often refuse automated
downloads; the error message then says where to put the manually downloaded files.

    python experiments/celeb_a.py                              # 40 attribute tasks + landmarks
    python experiments/celeb_a.py --celeb_a_mode=multilabel    # one 40-way multi-label task
    python experiments/celeb_a.py --tasks=Smiling,Male         # a subset of the tasks
    python experiments/celeb_a.py --celeb_a_eval_split=test    # final numbers
    tensorboard --logdir runs/celeb_a

Expected on one GPU with the defaults (small ResNet on 64x64 images, batch 128, 30,000 steps,
about 24 epochs, Adam 1e-3, random flips), in well under an hour: a mean attribute accuracy
around 0.90. Sener & Koltun (2018, ResNet-18 on 64x64 CelebA) report a mean test error over the
40 attributes of about 8.3-9.6% (accuracy 0.90-0.92) depending on the weighting method; always
predicting each attribute's majority class gives about 0.80. Landmark MAE is in units of the
image size (0.01 is about 2 pixels of the 178x218 original). Estimates, not measured with this
code.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Hide TF's start-up banner, keep warnings.

from absl import flags as absl_flags  # noqa: E402

import mtl  # noqa: E402,F401  (before keras: it filters TensorFlow's start-up lines)
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import celeb_a  # noqa: E402

flags.define_flags(backbone="resnet", train_steps=30_000, batch_size=128, eval_batch_size=500,
                   eval_every=5000, checkpoint_every=5000, log_every=200)
absl_flags.DEFINE_enum("celeb_a_mode", "tasks", list(celeb_a.MODES),
                       "tasks: each attribute is a binary task; multilabel: one task "
                       "'attributes' with 40 outputs. Both add the 'landmarks' task.")
absl_flags.DEFINE_integer("celeb_a_image_size", celeb_a.DEFAULT_IMAGE_SIZE,
                          "Images are resized to this height and width.", lower_bound=8)
absl_flags.DEFINE_enum("celeb_a_eval_split", "validation", list(celeb_a.SPLITS),
                       "Split to evaluate on (test for final numbers).")
absl_flags.DEFINE_float("celeb_a_landmarks_weight", 1.0,
                        "Fixed loss weight of the landmarks task (its MSE is in image-size "
                        "units, so it is small next to the attributes' cross-entropy).",
                        lower_bound=0.0)


def make_experiment(*, mode: str = "tasks", image_size: int = celeb_a.DEFAULT_IMAGE_SIZE,
                    eval_split: str = "validation",
                    landmarks_weight: float = 1.0) -> experiment.Experiment:
    """The CelebA experiment in `mode` ("tasks" or "multilabel")."""

    def build_tasks(config):
        del config
        return celeb_a.tasks(mode=mode, weights={"landmarks": landmarks_weight})

    def build_model(config, task_names):
        return config.build_model(celeb_a.image_shape(image_size),
                                  celeb_a.heads(task_names, mode=mode))

    def train_data(config, task_names, input_context=None):
        return celeb_a.load("train", batch_size=config.batch_size, training=True,
                            tasks=task_names, mode=mode, image_size=image_size,
                            data_dir=config.data_dir, seed=config.seed,
                            input_context=input_context)

    def eval_data(config, task_names):
        return celeb_a.load(eval_split, batch_size=config.eval_batch_size, training=False,
                            tasks=task_names, mode=mode, image_size=image_size,
                            data_dir=config.data_dir)

    return experiment.Experiment(
        name="celeb_a", tasks=build_tasks, model=build_model, train_data=train_data,
        eval_data=eval_data,
        settings={"celeb_a_mode": mode, "celeb_a_image_size": image_size,
                  "celeb_a_eval_split": eval_split, "celeb_a_landmarks_weight": landmarks_weight},
        free_settings=("celeb_a_eval_split",))


EXPERIMENT = make_experiment()


def main(argv):
    options = absl_flags.FLAGS
    experiment.main(make_experiment(mode=options.celeb_a_mode,
                                    image_size=options.celeb_a_image_size,
                                    eval_split=options.celeb_a_eval_split,
                                    landmarks_weight=options.celeb_a_landmarks_weight), argv)


if __name__ == "__main__":
    cli.run(main)
