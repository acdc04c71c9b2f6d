#!/usr/bin/env python
"""Layer sharing, classic 1: one `Conv2D` object in two `Sequential` models, trained jointly.

A Keras layer is an object: put the same instance in two models and both use (and train) the
same kernel. `mtl.MultiTaskModel.from_models` trains the two models together in one step, so the
shared kernel receives the sum of both models' gradients.

    python examples/shared_conv.py        # ~30 s on 2 CPU cores

Expected (1,000 steps): test accuracy about 0.7 on the left digit, sum MAE about 3.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import mtl  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

TASKS = ("left", "sum")


def build_models(filters: int = 16) -> tuple[keras.Layer, dict]:
    """The shared conv layer and {task: Sequential} models that both contain it."""
    shared_conv = keras.layers.Conv2D(filters, 3, activation="relu", name="shared_conv")

    def model(outputs: int, name: str) -> keras.Sequential:
        return keras.Sequential([
            keras.Input(multi_digits.IMAGE_SHAPE), shared_conv, keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(outputs)], name=name)

    return shared_conv, {"left": model(10, "digit"), "sum": model(1, "total")}


def main(steps: int = 1000, *, data_dir: str | None = None, batch_size: int = 64,
         eval_steps: int | None = None) -> dict:
    """Trains both models jointly for `steps` steps; returns the test results."""
    keras.utils.set_random_seed(0)
    shared_conv, models = build_models()
    model = mtl.MultiTaskModel.from_models(models)
    print(mtl.sharing_report(model))  # shared_conv's kernel and bias: used by left and sum.
    tasks = [mtl.Task("left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"]),
             mtl.Task("sum", loss="mse", metrics=["mae"], weight=0.1)]
    trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(1e-3),
                          log_every=max(1, steps // 4))
    train = multi_digits.load("train", batch_size=batch_size, training=True, tasks=TASKS,
                              data_dir=data_dir, seed=0)
    test = multi_digits.load("test", batch_size=256, training=False, tasks=TASKS,
                             data_dir=data_dir)
    trainer.fit(train, steps=steps)
    results = trainer.evaluate(test, steps=eval_steps)
    # One kernel, one optimizer slot: it appears once among the trainable variables.
    assert sum(v is shared_conv.kernel for v in model.trainable_variables) == 1
    print(results)
    return results


if __name__ == "__main__":
    main()
