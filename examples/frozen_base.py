#!/usr/bin/env python
"""Layer sharing, classic 3: a pretrained, frozen base shared by two task models.

1. Pretrain a small convolutional base on one task (the left digit), here in the example itself,
   so nothing is downloaded.
2. Freeze it (`base.trainable = False`) and share it between two new task models (the right digit
   and the sum), each with its own trainable top.
3. Train the two tops jointly: the base's weights do not move (checked at the end); only the tops
   learn, on the stroke detectors the base learnt for the first task. Convolutions apply the same
   filters everywhere, so filters learnt on the left digit serve the right digit too (a dense
   layer trained on the left digit would have learnt to ignore the right half: it stays in the
   tops).

    python examples/frozen_base.py        # ~25 s on 2 CPU cores

Expected (1,000 + 1,000 steps): test accuracy about 0.95 on the right digit, sum MAE about 2.2,
and "frozen base unchanged by training: True".
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import mtl  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

TASKS = ("right", "sum")


def build_base(filters=(16, 32)) -> keras.Model:
    """Image [16, 32, 1] -> feature maps [4, 8, filters[-1]]: [Conv3x3 -> ReLU -> MaxPool2]s."""
    layers = [keras.Input(multi_digits.IMAGE_SHAPE)]
    for f in filters:
        layers += [keras.layers.Conv2D(f, 3, padding="same", activation="relu"),
                   keras.layers.MaxPooling2D()]
    return keras.Sequential(layers, name="base")


def top(outputs: int, width: int = 64) -> list:
    """A task's own layers on the base's feature maps."""
    return [keras.layers.Flatten(), keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(outputs)]


def pretrain(base: keras.Model, steps: int, *, data_dir=None, batch_size: int = 64) -> None:
    """Trains `base` with a temporary top on the left digit."""
    model = keras.Sequential([base, *top(10)], name="pretrain")
    trainer = mtl.Trainer(
        mtl.MultiTaskModel.from_models({"left": model}),
        [mtl.Task("left", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])],
        optimizer=keras.optimizers.Adam(1e-3), log_every=max(1, steps // 4))
    trainer.fit(multi_digits.load("train", batch_size=batch_size, training=True,
                                  tasks=("left",), data_dir=data_dir, seed=1), steps=steps)


def main(steps: int = 1000, *, pretrain_steps: int | None = None, data_dir: str | None = None,
         batch_size: int = 64, eval_steps: int | None = None) -> dict:
    """Pretrains, freezes and shares the base; trains the tops for `steps` steps.

    Returns {"results": test results, "base_unchanged": True if no base weight moved}.
    """
    keras.utils.set_random_seed(0)
    base = build_base()
    pretrain(base, pretrain_steps or steps, data_dir=data_dir, batch_size=batch_size)

    base.trainable = False  # Frozen: excluded from the trainable variables of every model.
    before = [w.numpy().copy() for w in base.weights]
    models = {
        "right": keras.Sequential([keras.Input(multi_digits.IMAGE_SHAPE), base, *top(10)],
                                  name="right_model"),
        "sum": keras.Sequential([keras.Input(multi_digits.IMAGE_SHAPE), base, *top(1)],
                                name="sum_model"),
    }
    model = mtl.MultiTaskModel.from_models(models)
    assert not any(any(w is v for v in model.trainable_variables) for w in base.weights)
    tasks = [mtl.Task("right", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"]),
             mtl.Task("sum", loss="mse", metrics=["mae"], weight=0.1)]
    trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(1e-3),
                          log_every=max(1, steps // 4))
    trainer.fit(multi_digits.load("train", batch_size=batch_size, training=True, tasks=TASKS,
                                  data_dir=data_dir, seed=0), steps=steps)
    results = trainer.evaluate(
        multi_digits.load("test", batch_size=256, training=False, tasks=TASKS,
                          data_dir=data_dir), steps=eval_steps)
    unchanged = all(np.array_equal(b, w.numpy()) for b, w in zip(before, base.weights))
    print(results)
    print("frozen base unchanged by training:", unchanged)
    return {"results": results, "base_unchanged": unchanged}


if __name__ == "__main__":
    main()
