"""Trains one small model on one device and on 2 mirrored logical CPUs; prints the max weight
difference as JSON. Run as a subprocess: logical devices must be set before TF initialises."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mtl  # noqa: E402


def build_and_train(strategy, data, steps, weighting="equal", **trainer_args):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        backbone = mtl.backbones.mlp((6,), widths=(16,), dropout=0.0)
        model = mtl.MultiTaskModel(backbone, {"a": mtl.heads.classification(3),
                                              "b": mtl.heads.regression(1)})
        tasks = [mtl.Task("a", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"]),
                 mtl.Task("b", loss="mse", weight=0.5)]
        trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(0.01),
                              weighting=weighting, strategy=strategy, **trainer_args)
    trainer.fit(data, steps=steps)
    eval_data = data.take(3) if isinstance(data, tf.data.Dataset) else None
    if trainer_args:
        return [v.numpy() for v in model.weights], trainer
    return [v.numpy() for v in model.weights], (trainer.evaluate(eval_data) if eval_data else None)


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    mirrored = mtl.distribute.get_strategy("mirrored", cpu_replicas=2)
    rng = np.random.RandomState(0)
    n = 64
    x = rng.randn(n, 6).astype(np.float32)
    labels = {"a": (x[:, 0] > 0).astype(np.int64), "b": x[:, 1:2] * 3.0}
    # Labels missing unevenly: the first half of every batch lacks a's label more often, so
    # each replica sees a different number of labelled examples.
    weights = {"a": (rng.rand(n) > np.linspace(0.8, 0.1, n)).astype(np.float32)}
    data = tf.data.Dataset.from_tensor_slices((x, labels, weights)).batch(
        16, drop_remainder=True).repeat()
    examples = tf.data.Dataset.from_tensor_slices((x, labels, weights))

    def data_fn(context):  # per-replica batches, as distribute_datasets_from_function wants
        per_replica = context.get_per_replica_batch_size(16)
        return examples.shard(context.num_input_pipelines, context.input_pipeline_id).batch(
            per_replica, drop_remainder=True).repeat()

    single, single_eval = build_and_train(tf.distribute.OneDeviceStrategy("/cpu:0"), data, steps)
    multi, multi_eval = build_and_train(mirrored, data, steps)
    from_fn, _ = build_and_train(mirrored, data_fn, steps)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, multi))
    fn_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, from_fn))
    moved = max(float(np.max(np.abs(a))) for a in single)
    try:
        build_and_train(mirrored, examples.batch(15, drop_remainder=True).repeat(), 1)
        split_error = ""
    except ValueError as e:
        split_error = str(e)
    # Gradient accumulation under mirrored: 2 micro-batches of 8 == one step on 16.
    # (Missing labels included: the normaliser counts the labels of all micro-batches.)
    accumulated, _ = build_and_train(
        mirrored, examples.batch(8, drop_remainder=True).repeat(), steps, grad_accum_steps=2)
    accum_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, accumulated))
    # float16: only replica 1 overflows (its half of the batch has a huge label).
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        huge = {k: v.copy() for k, v in labels.items()}
        huge["b"][12] = 3e4
        data16 = tf.data.Dataset.from_tensor_slices((x, huge)).batch(16, drop_remainder=True)
        fp16_weights, fp16_trainer = build_and_train(mirrored, data16.take(1), 1,
                                                     on_nonfinite="stop")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    print(json.dumps({"accum_max_abs_diff": accum_diff,
                      "fp16_finite": all(bool(np.all(np.isfinite(w))) for w in fp16_weights),
                      "fp16_scale": float(fp16_trainer.loss_scale.scale.numpy()),
                      "fp16_skipped": int(fp16_trainer.skipped_steps.numpy()),
                      "max_abs_diff": diff, "fn_max_abs_diff": fn_diff, "max_abs_weight": moved,
                      "replicas": mirrored.num_replicas_in_sync, "split_error": split_error,
                      "single_eval": single_eval, "multi_eval": multi_eval}))


if __name__ == "__main__":
    main()
