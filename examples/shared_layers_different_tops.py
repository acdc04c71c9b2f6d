#!/usr/bin/env python
"""Layer sharing, classic 2: two shared layers under different tops.

A shared convolution and a shared dense layer compute one representation; each task puts its own
top on it: a linear classifier for the left digit, a deeper classifier for the right digit, and a
small regressor for the sum. Each task model is an ordinary Functional model that calls the same
two layer objects; `MultiTaskModel.from_models` trains them jointly.

    python examples/shared_layers_different_tops.py        # ~25 s on 2 CPU cores

Expected (1,000 steps): test accuracy about 0.45-0.5 on each digit, sum MAE about 3.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import mtl  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

TASKS = ("left", "right", "sum")


def build_models(filters: int = 16, width: int = 64) -> tuple[list, dict]:
    """The two shared layers and {task: Functional model} with a different top per task."""
    shared_conv = keras.layers.Conv2D(filters, 3, activation="relu", name="shared_conv")
    shared_dense = keras.layers.Dense(width, activation="relu", name="shared_dense")

    def features(inputs):
        x = shared_conv(inputs)
        x = keras.layers.MaxPooling2D()(x)
        return shared_dense(keras.layers.Flatten()(x))

    tops = {
        "left": [keras.layers.Dense(10)],                                   # linear
        "right": [keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)],
        "sum": [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)],
    }
    models = {}
    for task, top in tops.items():
        inputs = keras.Input(multi_digits.IMAGE_SHAPE)
        x = features(inputs)
        for layer in top:
            x = layer(x)
        models[task] = keras.Model(inputs, x, name=f"{task}_model")
    return [shared_conv, shared_dense], models


def main(steps: int = 1000, *, data_dir: str | None = None, batch_size: int = 64,
         eval_steps: int | None = None) -> dict:
    """Trains the three task models jointly; returns the test results."""
    keras.utils.set_random_seed(0)
    shared, models = build_models()
    model = mtl.MultiTaskModel.from_models(models)
    report = mtl.sharing_report(model)
    print(report)
    shared_paths = {v.path for v in report.shared}
    assert all(w.path in shared_paths for layer in shared for w in layer.trainable_weights)
    classify = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tasks = [mtl.Task("left", loss=classify, metrics=["accuracy"]),
             mtl.Task("right", loss=classify, metrics=["accuracy"]),
             mtl.Task("sum", loss="mse", metrics=["mae"], weight=0.1)]
    trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(1e-3),
                          log_every=max(1, steps // 4))
    train = multi_digits.load("train", batch_size=batch_size, training=True, tasks=TASKS,
                              data_dir=data_dir, seed=0)
    test = multi_digits.load("test", batch_size=256, training=False, tasks=TASKS,
                             data_dir=data_dir)
    trainer.fit(train, steps=steps)
    results = trainer.evaluate(test, steps=eval_steps)
    print(results)
    return results


if __name__ == "__main__":
    main()
