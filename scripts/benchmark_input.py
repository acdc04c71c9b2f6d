#!/usr/bin/env python
"""Input work per worker: the multi_digits train input alone, as each worker of a run builds it
(`--input_sharding=exact` or `shard`), without a model.

Each worker builds its own input pipeline with the context its strategy gives it (the shared
flags of the experiments: --strategy, --batch_size, --grad_accum_steps, --input_sharding, ...),
reads one batch (the shuffle buffer fills), then times reading what its replicas take in
`--epochs` epochs of the global stream (train split / global batch steps), and prints one JSON
line: the examples its pipeline decoded per epoch (multi_digits' decode step, counted) and the
seconds per epoch of the input pipeline alone.

    python scripts/launch_local_workers.py --num_workers=2 -- \\
        python scripts/benchmark_input.py --strategy=multi_worker --input_sharding=exact
    python scripts/launch_local_workers.py --num_workers=2 -- \\
        python scripts/benchmark_input.py --strategy=multi_worker --input_sharding=shard
    python scripts/benchmark_input.py                      # one process, for comparison

The decoded counts include what the pipeline reads ahead (prefetch, the next epoch's shuffle
buffer), spread over `--epochs`. A bad flag prints `error: ...` and exits with status 2.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import tensorflow as tf  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

import mtl  # noqa: E402
from mtl import cli, experiment, flags  # noqa: E402
from mtl.data import multi_digits  # noqa: E402
from mtl.training import input_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_EXAMPLES = 12_000  # multi_digits' train split

absl_flags.DEFINE_integer("epochs", 3, "Epochs of the global stream to time.", lower_bound=1)


def _experiment() -> experiment.Experiment:
    """experiments/multi_digits.py's `EXPERIMENT` (its flags' defaults with it)."""
    spec = importlib.util.spec_from_file_location(
        "multi_digits_experiment", os.path.join(ROOT, "experiments", "multi_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPERIMENT


EXPERIMENT = _experiment()


def count_decoded() -> tf.Variable:
    """Makes multi_digits' decode step count the examples it decodes."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    decode = multi_digits.to_example

    def counting(features, tasks=multi_digits.TASKS):
        with tf.control_dependencies([counter.assign_add(1)]):
            image, labels = decode(features, tasks)
            return tf.identity(image), labels

    multi_digits.to_example = counting
    return counter


def main(argv):
    del argv
    config = flags.config_from_flags()
    epochs = absl_flags.FLAGS.epochs
    strategy = mtl.distribute.get_strategy(config.strategy, num_gpus=config.num_gpus,
                                           cpu_replicas=config.cpu_replicas)
    decoded = count_decoded()
    names = [t.name for t in EXPERIMENT.tasks(config)]
    make = experiment.distributed_train_data(EXPERIMENT, config, names, strategy)
    context = input_state.input_context(strategy)
    # Each step, each local replica takes one per-replica batch from this worker's pipeline
    # (grad_accum_steps of them for one update).
    per_step = input_state.local_replicas(context) * config.grad_accum_steps
    steps_per_epoch = math.ceil(TRAIN_EXAMPLES / config.batch_size)
    batches = iter(make(context))
    next(batches)  # The shuffle buffer fills; not timed.
    start_decoded, start = int(decoded.numpy()), time.perf_counter()
    delivered = 0
    for _ in range(epochs * steps_per_epoch * per_step):
        delivered += int(tf.shape(tf.nest.flatten(next(batches))[0])[0])
    seconds = time.perf_counter() - start
    print(json.dumps({
        "worker": context.input_pipeline_id, "workers": context.num_input_pipelines,
        "input_sharding": config.input_sharding, "batch_size": config.batch_size,
        "epochs": epochs, "examples_to_its_replicas_per_epoch": delivered / epochs,
        "examples_decoded_per_epoch": (int(decoded.numpy()) - start_decoded) / epochs,
        "input_seconds_per_epoch": round(seconds / epochs, 3)}), flush=True)


if __name__ == "__main__":
    cli.run(main)
