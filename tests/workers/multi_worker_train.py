"""One worker of a multi-worker run (TF_CONFIG from the launcher), or, with TF_CONFIG unset, the
single-process reference.

Usage: multi_worker_train.py OUT STEPS   (OUT/run is the shared model_dir)

Each worker:
  1. trains a small model on deterministic data sharded by InputContext and saves its final
     weights to OUT/weights_<i>.npz;
  2. evaluates them on datasets read from a one-file TFRecord (a file-based pipeline, as a TFDS
     split is) whose last batch is partial: split unevenly (3 + 2 examples), or leaving one
     worker an empty part (1 + 0);
  3. trains multi_digits (mlp backbone) with --input_sharding=shard: records the examples its
     input pipelines decode (OUT/read_<i>.npy, fingerprints), its first per-replica batch and
     initial weights with the first update's logged task losses (OUT/first_step_<i>.npz), and
     the weights after 4 steps straight and after 2 steps, a resume from the checkpoint and 2
     more (OUT/resume_<i>.npz).
It prints one JSON line. The reference trains the model of 1 on one device and evaluates the
datasets of 2 with the chief's final weights (OUT/weights_0.npz).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16
#: name -> (examples, batch): 37 = 2 x 16 + 5 (the last batch split 3 + 2), 33 = 2 x 16 + 1
#: (the last batch split 1 + 0: one worker evaluates an empty part).
EVAL_CASES = {"uneven_last_batch": (37, 16), "empty_part": (33, 16)}
SHARD_BATCH = 8  # multi_digits global batch of the input-sharding checks (4 per worker)


def arrays(n=128, seed=0):
    rng = np.random.RandomState(seed)
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


def eval_dataset(path, n, batch):
    """`n` examples other than the training ones, read through the one-file TFRecord `path`."""
    import tensorflow as tf

    largest = max(size for size, _ in EVAL_CASES.values())
    if not os.path.exists(path):
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(largest):
                writer.write(str(i).encode())
    x, labels, weights = arrays(largest, seed=1)

    def example(record):
        i = tf.strings.to_number(record, tf.int32)
        return (tf.gather(x, i), {k: tf.gather(v, i) for k, v in labels.items()},
                {k: tf.gather(v, i) for k, v in weights.items()})

    return tf.data.TFRecordDataset([path]).take(n).map(example).batch(batch)


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


def evaluations(trainer, out, index) -> dict:
    path = os.path.join(out, f"eval_{index}.tfrecord")
    return {name: trainer.evaluate(eval_dataset(path, n, batch))
            for name, (n, batch) in EVAL_CASES.items()}


# ----------------------------------------------------------------------- input sharding
def multi_digits_experiment():
    """experiments/multi_digits.py's `EXPERIMENT` (the script, imported as a module)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "multi_digits_script", os.path.join(root, "experiments", "multi_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPERIMENT


def shard_config():
    from mtl import flags

    return flags.Config(batch_size=SHARD_BATCH, backbone="mlp", input_sharding="shard",
                        strategy="multi_worker", log_every=1)


def fingerprints(images, source_ids):
    """int64 ids of multi_digits examples [n, 16, 32, 1] (their image and source images), the
    same in every process."""
    import tensorflow as tf

    flat = tf.reshape(tf.cast(images, tf.int64), [tf.shape(images)[0], -1])
    values = tf.concat([flat, tf.cast(source_ids, tf.int64)], axis=1)
    return tf.reshape(tf.bitcast(tf.fingerprint(values), tf.int64), [-1])


def record_decoded_examples():
    """Makes multi_digits' decode step put each example's id into the returned table."""
    import tensorflow as tf

    from mtl.data import multi_digits

    decode = multi_digits.to_example
    table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=0)

    def recording(features, tasks=multi_digits.TASKS):
        key = fingerprints(features["image"][None], features["source_ids"][None])
        with tf.control_dependencies([table.insert(key, tf.ones_like(key))]):
            image, labels = decode(features, tasks)
            return tf.identity(image), labels

    multi_digits.to_example = recording
    return table


def shard_trainer(strategy, experiment, config, model_dir):
    """multi_digits' model and tasks (config's backbone) under `strategy`, Adam, seeded."""
    import keras

    import mtl

    keras.utils.set_random_seed(0)
    tasks = experiment.tasks(config)
    with strategy.scope():
        model = experiment.model(config, [t.name for t in tasks])
        trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(0.01),
                              strategy=strategy, model_dir=model_dir, log_every=1)
    return model, trainer


def barrier(strategy) -> None:
    """Returns on every worker once all have reached it (a collective sum)."""
    import tensorflow as tf

    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)),
                    axis=None)


def input_sharding_checks(strategy, out, index) -> dict:
    from mtl import experiment as experiment_lib

    experiment = multi_digits_experiment()
    config = shard_config()
    names = [t.name for t in experiment.tasks(config)]
    read = record_decoded_examples()

    def train_data():
        return experiment_lib.distributed_train_data(experiment, config, names, strategy)

    # The first per-replica batch of the stream fit reads (the same seeded pipeline).
    first = next(iter(strategy.distribute_datasets_from_function(train_data())))
    features, labels = strategy.experimental_local_results(first)[0]
    # 4 steps straight (2, a copy of the run folder, 2 more: `fit` goes on with its stream),
    # then 2 + 2 from the copy: a resumed run that skips what each worker's replicas read.
    run_dir, copy_dir = os.path.join(out, "shard_run"), os.path.join(out, "shard_resumed")
    model, trainer = shard_trainer(strategy, experiment, config, run_dir)
    initial = [v.numpy() for v in model.weights]
    data = train_data()
    logged = trainer.fit(data, 2).train[0]  # step 1, on the initial weights
    if trainer.is_chief:
        shutil.copytree(run_dir, copy_dir)
    barrier(strategy)
    trainer.fit(data, 4)
    straight = [v.numpy() for v in model.weights]
    model, trainer = shard_trainer(strategy, experiment, config, copy_dir)
    resumed_from = trainer.global_step
    trainer.fit(train_data(), 4)
    np.savez(os.path.join(out, f"first_step_{index}.npz"), features=features.numpy(),
             **{f"label_{k}": v.numpy() for k, v in labels.items()},
             **{f"loss_{t}": logged[f"{t}/loss"] for t in names},
             **{f"initial_{i}": w for i, w in enumerate(initial)})
    np.savez(os.path.join(out, f"resume_{index}.npz"),
             **{f"straight_{i}": w for i, w in enumerate(straight)},
             **{f"resumed_{i}": v.numpy() for i, v in enumerate(model.weights)})
    np.save(os.path.join(out, f"read_{index}.npy"), read.export()[0].numpy())
    return {"read": int(read.size()), "resumed_from": resumed_from}


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
    report = {"worker": index, "step": trainer.global_step, "chief": trainer.is_chief}
    if not multi:  # The reference evaluates the chief's weights.
        with np.load(os.path.join(out, "weights_0.npz")) as f:
            model.set_weights([f[f"arr_{i}"] for i in range(len(f.files))])
    report["eval"] = evaluations(trainer, out, index)
    if multi:
        report["input_sharding"] = input_sharding_checks(strategy, out, index)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
