"""Trains multi_digits with every weighting method (and rep mode where it applies) for STEPS
steps on one device and on 2 mirrored logical CPUs; prints one JSON line per run pair with the
largest weight difference and whether all weights stayed finite. Run as a subprocess."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mtl  # noqa: E402
from mtl.data import multi_digits  # noqa: E402

MIRRORED = mtl.distribute.get_strategy("mirrored", cpu_replicas=2)


def train(strategy, method, mode, data, steps):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        backbone = mtl.backbones.mlp(multi_digits.IMAGE_SHAPE, widths=(32,))
        model = mtl.MultiTaskModel(backbone, {"left": mtl.heads.classification(10),
                                              "right": mtl.heads.classification(10),
                                              "sum": mtl.heads.regression(1)})
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        tasks = [mtl.Task("left", loss=ce), mtl.Task("right", loss=ce),
                 mtl.Task("sum", loss="mse", weight=0.1)]
        trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(1e-3),
                              weighting=method, gradient_mode=mode, strategy=strategy,
                              steps_per_loop=steps)
    trainer.fit(data(), steps=steps)
    return [v.numpy() for v in model.weights]


def main():
    data_dir, steps = sys.argv[1], int(sys.argv[2])
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else sorted(mtl.weighting.METHODS)

    def data():  # A new pipeline per run: a reshuffling dataset's next iterator has a new order.
        return multi_digits.load("train", batch_size=32, training=True, data_dir=data_dir,
                                 seed=0)

    for method in methods:
        cls = mtl.weighting.METHODS[method]
        modes = ["exact"]
        if getattr(cls, "supports_rep", False):
            modes.append("rep")
        for mode in modes:
            one = train(tf.distribute.OneDeviceStrategy("/cpu:0"), method, mode, data, steps)
            two = train(MIRRORED, method, mode, data, steps)
            print(json.dumps({
                "method": method, "mode": mode,
                "finite": all(bool(np.all(np.isfinite(w))) for w in one + two),
                "max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, two)),
                "moved": max(float(np.max(np.abs(a))) for a in one)}), flush=True)


if __name__ == "__main__":
    main()
