"""One worker of a multi-worker run (TF_CONFIG from the launcher): trains a small model on
deterministic data sharded by InputContext and saves its final weights to OUT/weights_<i>.npz.

Usage: multi_worker_train.py OUT STEPS   (OUT/run is the shared model_dir)
With TF_CONFIG unset it trains the same model in one process on one device (the reference).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16


def arrays(n=128):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 6).astype(np.float32)
    labels = {"a": (x[:, 0] > 0).astype(np.int64), "b": x[:, 1:2] * 3.0}
    weights = {"a": (rng.rand(n) > 0.3).astype(np.float32)}
    return x, labels, weights


def dataset_fn(input_context):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(arrays())
    ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    per_replica = input_context.get_per_replica_batch_size(GLOBAL_BATCH)
    return ds.batch(per_replica, drop_remainder=True).repeat()


def build(strategy, model_dir):
    import keras

    import mtl

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = mtl.MultiTaskModel(mtl.backbones.mlp((6,), widths=(16,)),
                                   {"a": mtl.heads.classification(3),
                                    "b": mtl.heads.regression(1)})
        tasks = [mtl.Task("a", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=["accuracy"]), mtl.Task("b", loss="mse", weight=0.5)]
        trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(0.01),
                              strategy=strategy, model_dir=model_dir, checkpoint_every=5)
    return model, trainer


def main():
    out, steps = sys.argv[1], int(sys.argv[2])
    multi = bool(os.environ.get("TF_CONFIG"))
    import mtl

    strategy = mtl.distribute.get_strategy("multi_worker" if multi else "default")
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if multi else "single"
    model_dir = os.path.join(out, "run" if multi else "single_run")
    model, trainer = build(strategy, model_dir)
    trainer.fit(dataset_fn, steps=steps)
    np.savez(os.path.join(out, f"weights_{index}.npz"), *[v.numpy() for v in model.weights])
    print(json.dumps({"worker": index, "step": trainer.global_step,
                      "chief": trainer.is_chief}))


if __name__ == "__main__":
    main()
