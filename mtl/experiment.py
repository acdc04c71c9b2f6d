"""Runs an experiment from a `Config`: strategy, data, model, `Trainer`, results.

An experiment script declares *what* to train (an `Experiment`: tasks, model, data) and calls
`train_and_evaluate(experiment, config)`; this module is the *how*, the same for every experiment.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any, Callable, Mapping, Sequence

import keras
import tensorflow as tf
from absl import logging

from absl import app

from mtl import distribute, flags, transfer
from mtl.config import Config
from mtl.errors import UsageError
from mtl.options import PRECISION_POLICIES
from mtl.tasks import Task
from mtl.training import progress, run_record
from mtl.training.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What an experiment trains.

    Attributes:
      name: the experiment's name (default run folder: runs/<name>).
      tasks: config -> every `Task` the experiment offers (`--tasks` picks a subset).
      model: (config, task names) -> a `MultiTaskModel` with one head per task; called under the
        strategy scope.
      train_data: (config, task names[, input_context]) -> endless global batches (of
        `config.batch_size`). With `input_context` (a `tf.distribute.InputContext`, passed only
        under `--input_sharding=shard` with several workers), endless batches of this input
        pipeline's part of the examples, cut before they are decoded (the built-in data modules
        take it as `input_context=`, see `mtl.data.pipeline.input_part`). An experiment whose
        `train_data` has no such parameter trains with `--input_sharding=exact` only.
      eval_data: (config, task names) -> one pass of eval batches (the test data).
      validation_data: None (default), or (config, task names) -> one pass of validation
        batches, held out from training and from the test data. When given, every evaluation
        (each `eval_every` steps and the final one) also evaluates it: TensorBoard
        `validation/`, and results.json's "validation" beside its "results". Model selection
        (scripts/compare.py --select=best_val) reads it, never the test data.
      settings: the experiment's own settings (its script's flags, e.g. {"celeb_a_mode":
        "tasks"}), JSON values: recorded in config.json under "experiment_settings"; a resume
        with one of them changed is refused (they shape the tasks, the model or the data),
        except those in `free_settings` (e.g. which split to evaluate on).
    """

    name: str
    tasks: Callable[[Config], Sequence[Task]]
    model: Callable[[Config, Sequence[str]], keras.Model]
    train_data: Callable[..., tf.data.Dataset]
    eval_data: Callable[[Config, Sequence[str]], tf.data.Dataset]
    validation_data: Callable[[Config, Sequence[str]], tf.data.Dataset] | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    free_settings: tuple = ()


def distributed_train_data(experiment: Experiment, config: Config, task_names,
                           strategy: tf.distribute.Strategy):
    """The experiment's train data for `strategy`: a function `(InputContext) -> dataset` that
    builds the pipeline with per-replica micro-batches (`batch_size / grad_accum_steps`
    examples per update, split over the replicas).

    Every call builds a fresh pipeline, so training reads the seeded stream from its start on
    any number of replicas: a tf.data shuffle reshuffles for each new iterator of one dataset
    object, and the Trainer's check of the first batch would otherwise move a shared dataset's
    training stream on to its second order. On one replica the Trainer builds it once for
    training and saves its position in checkpoints. With several input pipelines (workers),
    `config.input_sharding` says how they share it:
      * "exact": each builds the same, identically seeded stream and keeps every N-th batch, so
        the replicas of one step together see exactly the examples of one global batch, as on
        one device (N times the input work: every worker reads and decodes every example);
      * "shard": each reads only its part of the examples (`input_context` to the experiment's
        `train_data`: 1/N of the split, cut before decoding) and shuffles and batches that part,
        so a global batch is the union of per-replica batches drawn from different parts.
        Each update is still the mean over the examples of its global batch (README, "How a
        step works"); which examples meet in a batch is what changes.
    One input pipeline (one worker, any number of local replicas) reads everything either way.
    """
    shard = config.input_sharding == "shard"
    if shard and not takes_input_context(experiment.train_data):
        raise UsageError(f"--input_sharding=shard: experiment {experiment.name!r} cannot read a "
                         "part of its train data (its train_data takes no input_context "
                         "argument); use --input_sharding=exact.")
    micro_batch = config.batch_size // config.grad_accum_steps
    replicas = strategy.num_replicas_in_sync
    if micro_batch % replicas:
        raise UsageError(
            f"--batch_size={config.batch_size} (micro-batch {micro_batch} with "
            f"--grad_accum_steps={config.grad_accum_steps}) cannot be split evenly over "
            f"{replicas} replicas; use a micro-batch that is a multiple of {replicas}.")

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = dataclasses.replace(
            config, batch_size=context.get_per_replica_batch_size(micro_batch))
        if context.num_input_pipelines == 1:
            return experiment.train_data(per_replica, task_names)
        if shard:
            return experiment.train_data(per_replica, task_names, input_context=context)
        ds = experiment.train_data(per_replica, task_names)
        return ds.shard(context.num_input_pipelines, context.input_pipeline_id)

    return dataset_fn


def takes_input_context(train_data: Callable) -> bool:
    """Whether an experiment's `train_data` takes `input_context` (can read a part)."""
    try:
        parameters = inspect.signature(train_data).parameters
    except (TypeError, ValueError):
        return False
    return "input_context" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


CONFIG_RECORD = "config.json"
#: The key of config.json that records `Experiment.settings`.
SETTINGS_RECORD = "experiment_settings"


def check_run_record(experiment: Experiment, config: Config, model_dir: str) -> dict:
    """Refuses, before anything is built or loaded, to resume a run of another experiment or
    made with settings that shape its state (unless --allow_config_change names them); returns
    every change (free ones included) for the run's history."""
    recorded = run_record.read(os.path.join(model_dir, CONFIG_RECORD))
    if recorded is None:
        return {}
    if recorded.get("experiment") != experiment.name:
        raise UsageError(f"{model_dir} holds a run of experiment {recorded.get('experiment')!r}, "
                         f"not {experiment.name!r}; use another --model_dir.")
    settings = recorded.get(SETTINGS_RECORD)
    recorded = {k: v for k, v in recorded.items() if k not in ("experiment", SETTINGS_RECORD)}
    # A setting added after the run was made had its default then (e.g. --architecture=hps).
    defaults = Config().to_json()
    recorded = {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded}
    changes = run_record.check(recorded, config.to_json(), free=Config.FREE_TO_CHANGE,
                               allowed=config.allow_config_change, where=model_dir,
                               option="--allow_config_change")
    if settings is None:  # Recorded before experiments' own settings were.
        return changes
    own = run_record.differences(settings, dict(experiment.settings))
    refused = [f for f in own if f not in experiment.free_settings]
    if refused:
        lines = "; ".join(f"--{f}: {own[f][0]!r} in the run, {own[f][1]!r} now" for f in refused)
        raise UsageError(f"{model_dir} holds a run of experiment {experiment.name!r} made with "
                         f"other settings of its own ({lines}). These shape its tasks, model or "
                         "data, so resuming with them changed is refused (nothing was loaded). "
                         "Use the run's settings or another --model_dir.")
    return {**changes, **own}


def select_tasks(available: Sequence[Task], wanted: Sequence[str] | None) -> list[Task]:
    """The tasks named in `wanted` (all when None), in the experiment's order."""
    if wanted is None:
        return list(available)
    names = [t.name for t in available]
    for name in wanted:
        if name not in names:
            raise UsageError(f"--tasks names {name!r}, which this experiment does not have; its "
                             f"tasks are {names}.")
    return [t for t in available if t.name in wanted]


def train_and_evaluate(experiment: Experiment, config: Config) -> dict:
    """Trains to `config.train_steps`, evaluates, writes results.json; returns the results.

    results.json: `{"step": N, "results": {task: {metric: value}}}` on the eval (test) data,
    plus `"validation": {task: {metric: value}}` when the experiment has validation data.
    """
    # The strategy first: logical CPU devices and collectives must be set before TF starts.
    strategy = distribute.get_strategy(config.strategy, num_gpus=config.num_gpus,
                                       cpu_replicas=config.cpu_replicas, tpu=config.tpu)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    # Layers take the policy in force when they are built.
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[config.mixed_precision])
    tasks = select_tasks(experiment.tasks(config), config.tasks)
    task_names = [t.name for t in tasks]
    model_dir = config.model_dir or os.path.join("runs", experiment.name)
    changes = check_run_record(experiment, config, model_dir)
    train_ds = distributed_train_data(experiment, config, task_names, strategy)
    eval_ds = experiment.eval_data(config, task_names)
    validation_ds = (None if experiment.validation_data is None
                     else experiment.validation_data(config, task_names))
    with strategy.scope():
        model = experiment.model(config, task_names)
        if config.init_backbone_from:
            transfer.init_backbone(model.backbone, config.init_backbone_from)
            logging.info("Backbone initialised from %s.", config.init_backbone_from)
        trainer = Trainer(model, tasks, optimizer=config.optimizer_object(),
                          weighting=config.weighting_method(), model_dir=model_dir,
                          strategy=strategy, options=config.trainer)
    if trainer.is_chief:
        run_record.write_once(os.path.join(model_dir, CONFIG_RECORD),
                              {"experiment": experiment.name, **config.to_json(),
                               SETTINGS_RECORD: dict(experiment.settings)})
        run_record.append_history(model_dir, CONFIG_RECORD, changes, trainer.global_step)
    if trainer.global_step >= config.train_steps:
        logging.info("%s already holds a run at step %d >= --train_steps=%d: evaluating only. "
                     "Use a new --model_dir to train again.", model_dir, trainer.global_step,
                     config.train_steps)
    trainer.fit(train_ds, config.train_steps, eval_data=eval_ds, eval_every=config.eval_every,
                eval_steps=config.eval_steps, validation_data=validation_ds)
    results = trainer.evaluate(eval_ds, steps=config.eval_steps)
    record = {"step": trainer.global_step, "results": results}
    if validation_ds is not None:
        record["validation"] = trainer.evaluate(validation_ds, steps=config.eval_steps,
                                                split="validation")
        print(format_results_table(record["validation"], step=trainer.global_step,
                                   title="Validation results"))
    if trainer.is_chief:
        with open(os.path.join(model_dir, "results.json"), "w") as f:
            json.dump(record, f, indent=2)
    print(format_results_table(results, step=trainer.global_step))
    return results


def main(experiment: Experiment, argv: Sequence[str]) -> None:
    """The `main` of an experiment script: parsed flags -> `train_and_evaluate`. Run it with
    `mtl.cli.run`, which ends the program on bad input (status 2, nothing saved is touched),
    on training that cannot go on (status 1) or on a signal (143/130) with one line saying why.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
    progress.quiet_library_info()
    train_and_evaluate(experiment, flags.config_from_flags())


def format_results_table(results: dict, step: int | None = None, title: str = "Results"
                         ) -> str:
    """A plain-text table: one row per task, one column per metric."""
    columns = []
    for values in results.values():
        for name in values:
            if name not in columns:
                columns.append(name)
    width = max(8, *(len(t) for t in results))
    header = f"{'task':<{width}}" + "".join(f"{c:>14}" for c in columns)
    lines = [f"{title}{'' if step is None else f' at step {step}'}:", header, "-" * len(header)]
    for task, values in results.items():
        cells = "".join(f"{values[c]:>14.4f}" if c in values else f"{'':>14}" for c in columns)
        lines.append(f"{task:<{width}}{cells}")
    return "\n".join(lines)
