"""Evaluates a model on 2 mirrored logical CPUs with a custom loss and metric objects built
outside the strategy scope; prints the evaluation and the same values computed plainly as JSON.
Run as a subprocess: logical devices must be set before TF initialises."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mtl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_tasks import FractionAbove, ScaledMSE, absolute_error  # noqa: E402


def main():
    strategy = mtl.distribute.get_strategy("mirrored", cpu_replicas=2)
    rng = np.random.RandomState(0)
    x = rng.randn(32, 4).astype(np.float32)
    y = rng.randn(32, 1).astype(np.float32)
    keras.utils.set_random_seed(0)
    metrics = [FractionAbove(threshold=0.05),
               keras.metrics.MeanMetricWrapper(absolute_error, name="abs_error")]
    with strategy.scope():
        model = mtl.MultiTaskModel(mtl.backbones.mlp((4,), widths=(8,), dropout=0.0),
                                   {"r": mtl.heads.regression(1)})
        task = mtl.Task("r", loss=ScaledMSE(factor=100.0), metrics=metrics)
        trainer = mtl.Trainer(model, [task], optimizer=keras.optimizers.SGD(0.0),
                              strategy=strategy)
    data = tf.data.Dataset.from_tensor_slices((x, {"r": y})).batch(8)
    evaluated = trainer.evaluate(data)["r"]
    prediction = model(x, training=False)["r"].numpy()
    built = [m for split in (trainer.train_metrics, trainer.eval_metrics) for m in split["r"]]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "distributed_state": all(isinstance(v.value, tf.distribute.DistributedValues)
                                 for m in built for v in m.variables),
        "evaluated": {name: float(value) for name, value in evaluated.items()},
        "expected": {"loss": float(np.mean(100.0 * (prediction - y) ** 2)),
                     "plain_mse": float(np.mean((prediction - y) ** 2)),
                     "above": float(np.mean(prediction > 0.05)),
                     "abs_error": float(np.mean(np.abs(prediction - y)))},
    }))


if __name__ == "__main__":
    main()
