"""two_tasks: a tiny experiment for scripts/compare.py's tests (runs in a few seconds).

Tasks `cls` (3 classes, accuracy: higher is better) and `reg` (regression, mae: lower is
better) on 6 random features; train, validation and test splits drawn with their own seeds.
It keeps the flag defaults (define_flags() with no overrides), so loading it in a test process
changes no other test's defaults: the tests pass --backbone=mlp and the small budget.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mtl  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mtl import cli, experiment, flags  # noqa: E402

flags.define_flags()

SPLITS = {"train": (0, 256), "validation": (1, 64), "test": (2, 64)}


def build_tasks(config):
    del config
    return [mtl.Task("cls", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"]),
            mtl.Task("reg", loss="mse", metrics=["mae"])]


def build_model(config, task_names):
    heads = {"cls": lambda: mtl.heads.classification(3), "reg": lambda: mtl.heads.regression(1)}
    return config.build_model((6,), {name: heads[name]() for name in task_names})


def examples(split, task_names):
    seed, size = SPLITS[split]
    x = np.random.RandomState(seed).normal(size=(size, 6)).astype(np.float32)
    labels = {"cls": (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1),
              "reg": x[:, :3].sum(axis=1, keepdims=True)}
    return tf.data.Dataset.from_tensor_slices((x, {t: labels[t] for t in task_names}))


def train_data(config, task_names):
    return examples("train", task_names).shuffle(256, seed=config.seed).repeat().batch(
        config.batch_size, drop_remainder=True)


def eval_data(config, task_names):
    return examples("test", task_names).batch(config.eval_batch_size)


def validation_data(config, task_names):
    return examples("validation", task_names).batch(config.eval_batch_size)


EXPERIMENT = experiment.Experiment(
    name="two_tasks", tasks=build_tasks, model=build_model, train_data=train_data,
    eval_data=eval_data, validation_data=validation_data)


def main(argv):
    experiment.main(EXPERIMENT, argv)


if __name__ == "__main__":
    cli.run(main)
