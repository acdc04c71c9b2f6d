"""`Trainer`: the outer loop around the compiled step, as a small controller.

`fit` runs the compiled step (`mtl.step.TrainStep`) up to the next boundary any action asks for,
then lets the actions act (`mtl.actions`: summaries, evaluation, diagnostics, checkpoints,
unfreezing). The parts it composes have one job each: `mtl.checkpoints.Checkpointer` (what goes
into a checkpoint, save, restore with fallback), `mtl.input_state.InputState` (iterators that
continue where the run left off), `mtl.finetune.optimizer_groups` (which optimizer trains which
variable), `mtl.config.TrainerOptions` (the validated settings). Plain Python between compiled
loops: nothing here runs inside `tf.function`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mtl import (actions, checkpoints, model_record, preemption, progress, run_record,
                 validation)
from mtl import weighting as weighting_lib
from mtl.checkpoints import CheckpointReadError, CheckpointWriteError  # noqa: F401 (API)
from mtl.errors import UsageError, UsageTypeError
from mtl import options as options_lib
from mtl.options import TrainerOptions
from mtl.finetune import layers_to_unfreeze, optimizer_groups, trainable_weights_when_unfrozen
from mtl.input_state import Data, InputState, distribute, input_context
from mtl.preemption import TrainingStopped  # noqa: F401 (API)
from mtl.step import LossScale, TrainStep, UpdateStats, plan, seed_states, unique_variables
from mtl.tasks import Task


@dataclasses.dataclass
class History:
    """What `fit` saw: one record per logging interval and one per evaluation.

    Train records: `{"step", "loss", "<task>/loss", "<task>/<metric>", "examples_per_sec"}`;
    eval records: `{"step", "<task>/loss", "<task>/<metric>"}`; validation records (when `fit`
    is given validation data), the same on the validation data; diagnostics records (every
    `diagnostics_every` steps, when tasks share variables): `{"step", "<task>/weight",
    "<task>/grad_norm", "cosine/<task>__<task>"}`.
    """

    train: list = dataclasses.field(default_factory=list)
    eval: list = dataclasses.field(default_factory=list)
    validation: list = dataclasses.field(default_factory=list)
    diagnostics: list = dataclasses.field(default_factory=list)

    def series(self, key: str, split: str = "train") -> list:
        """The values of `key` over time, e.g. `history.series("left/loss")`."""
        return [r[key] for r in getattr(self, split) if key in r]


def _get_optimizer(optimizer) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return keras.optimizers.get(optimizer)
        except ValueError:
            raise UsageError(f"Unknown optimizer {optimizer!r}; expected a Keras optimizer name "
                             "('sgd', 'adam', 'adamw', 'rmsprop', ...) or a "
                             "keras.optimizers.Optimizer object.") from None
    raise UsageTypeError(f"optimizer must be a keras.optimizers.Optimizer or a name; got {optimizer!r}.")


class Trainer:
    """Trains all tasks of a `MultiTaskModel` jointly with one compiled step.

    Build it under the scope of the strategy it should use (the model and the optimizer too):

        with strategy.scope():
            model = mtl.MultiTaskModel(backbone, heads)
            trainer = mtl.Trainer(model, tasks, optimizer=keras.optimizers.Adam(1e-3))

    Args:
      model: a `MultiTaskModel` (any Functional model with dict outputs keyed by task name works).
      tasks: one `mtl.Task` per head.
      optimizer: a Keras optimizer (or its name).
      weighting: a method name for `mtl.weighting.get` or a `Weighting` object.
      model_dir: where checkpoints and TensorBoard summaries go; the latest checkpoint there is
        restored on construction. None: nothing is written.
      strategy: the `tf.distribute.Strategy`; defaults to the one whose scope is active.
      options: a `mtl.TrainerOptions`; `**settings` (its field names: steps_per_loop,
        log_every, checkpoint_every, max_to_keep, grad_accum_steps, jit_compile, on_nonfinite,
        gradient_mode, checkpoint_input, diagnostics_every, fine_tuning) override it.
    """

    def __init__(self, model: keras.Model, tasks: Sequence[Task], *, optimizer,
                 weighting="equal", model_dir: str | None = None,
                 strategy: tf.distribute.Strategy | None = None,
                 options: TrainerOptions | None = None, **settings):
        self.options = TrainerOptions.of(options, **settings)
        tasks = list(tasks)
        for task in tasks:
            if not isinstance(task, Task):
                raise UsageTypeError(f"tasks must be mtl.Task objects; got {task!r}.")
        task_names = getattr(model, "task_names", None)
        if task_names is None:
            outputs = getattr(model, "output", None)
            # Not a dict: the validation below says what is expected, with the output shapes.
            task_names = list(outputs) if isinstance(outputs, dict) else list(model.outputs)
        validation.check_tasks_match_heads(tasks, task_names)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.model = model
        self._checked_data = []  # Data whose first batch was checked (by identity).
        self.model_dir = model_dir
        # Keep the model's head order, so task i is the same task everywhere.
        by_name = {t.name: t for t in tasks}
        self.tasks = [by_name[name] for name in task_names]
        self.optimizer = _get_optimizer(optimizer)
        _check_optimizer_clipping(self.optimizer, self.strategy)
        self.weighting = weighting_lib.get(weighting)
        # An unbuilt copy: per-group methods (granularity) start from the same options.
        self._method_template = plan.method_template(self.weighting, self.options)
        plan.check(self.weighting, self.options, model)
        self._check_built_in_scope()
        self._to_unfreeze = self._freeze()
        with self.strategy.scope():
            self.weighting.build([t.name for t in self.tasks], [t.weight for t in self.tasks])
            self.group_methods = plan.group_methods(self.weighting, self._method_template,
                                                    self.options, self.model, self.tasks)
            self.variables = self._trainable_now()
            backbone = getattr(model, "backbone", None)
            # Keras 3 under MirroredStrategy needs every optimizer built in the scope before
            # the first compiled step; variables unfrozen later get their slots now.
            self.optimizer_groups = optimizer_groups(
                self.optimizer, self.options.fine_tuning,
                backbone_ids={id(v) for v in (backbone.weights if backbone is not None else [])},
                trainable_now=self.variables,
                trainable_later=trainable_weights_when_unfrozen(self._to_unfreeze))
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.train_metrics = {t.name: t.build_metrics() for t in self.tasks}
            self.eval_metrics = {t.name: t.build_metrics() for t in self.tasks}
            self.eval_losses = {t.name: keras.metrics.Mean(name="loss") for t in self.tasks}
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="skipped_steps")
            # float16 compute needs loss scaling; bfloat16 and float32 do not.
            self.loss_scale = LossScale() if _computes_in_float16(model) else None
        self._build_step()
        self.checkpointer = checkpoints.Checkpointer(
            self._checkpointed(), model_dir=model_dir, max_to_keep=self.options.max_to_keep,
            signature=self._signature(), is_chief=self.is_chief)
        self._summaries = actions.Summaries(model_dir, self.is_chief)
        self.input = InputState(self.strategy, self.checkpointer,
                                micro_batches=self.options.grad_accum_steps,
                                checkpoint_input=self.options.checkpoint_input)
        changes = self._check_record()
        self._strict_restore = not changes
        self.restore()
        if model_dir and self.is_chief:
            model_record.record_model(model_dir, model)  # what export needs to rebuild the model
        self._write_record(changes)
        self._maybe_unfreeze()

    # ------------------------------------------------------------------------- construction
    def _freeze(self) -> list:
        """Applies `fine_tuning.freeze_backbone`; returns the layers to unfreeze later."""
        fine = self.options.fine_tuning
        backbone = getattr(self.model, "backbone", None)
        if fine.active and backbone is None:
            raise UsageError("fine_tuning needs a MultiTaskModel built from a backbone and heads.")
        if not fine.freeze_backbone:
            return []
        backbone.trainable = False  # Frozen layers run in inference mode (BatchNorm too).
        if fine.unfreeze_at_step is None:
            return []
        return layers_to_unfreeze(backbone, fine.unfreeze_top_layers)

    def _checkpointed(self) -> dict:
        """Everything a resumed run needs besides the input position."""
        objects = {name: optimizer for name, (optimizer, _) in self.optimizer_groups.items()}
        if self.group_methods:
            objects["weighting_groups"] = [self.group_methods[k] for k in sorted(self.group_methods)]
        objects.update(
            model=self.model, step=self.step, weighting=self.weighting,
            skipped_steps=self.skipped_steps,
            # Dropout's RNG state lives in SeedGenerator variables that checkpointing the
            # model does not reach; saving them makes a resumed run draw the same masks.
            seed_states=seed_states(self.model))
        if self.loss_scale is not None:
            objects["loss_scale"] = self.loss_scale
        return objects

    def _trainable_now(self) -> list:
        return unique_variables(list(self.model.trainable_variables)
                       + list(self.weighting.trainable_variables))

    def _build_step(self) -> None:
        """(Re)creates the compiled functions for the currently trainable variables."""
        shared = plan.shared_variables(self.model, [t.name for t in self.tasks])
        self._steps = TrainStep(
            model=self.model, tasks=self.tasks, weighting=self.weighting,
            strategy=self.strategy, options=self.options,
            optimizer_groups=self.optimizer_groups, variables=self.variables,
            shared_variables=shared,
            scope_variables=plan.scope_variables(self.weighting, self.options, shared),
            group_methods=self.group_methods,
            train_metrics=self.train_metrics, eval_metrics=self.eval_metrics,
            eval_losses=self.eval_losses, step=self.step, skipped_steps=self.skipped_steps,
            loss_scale=self.loss_scale)

    def _maybe_unfreeze(self) -> None:
        """Unfreezes the scheduled backbone layers once the global step reaches the schedule."""
        at = self.options.fine_tuning.unfreeze_at_step
        if at is None or not self._to_unfreeze or self.global_step < at:
            return
        for layer in self._to_unfreeze:
            layer.trainable = True
        if self.options.fine_tuning.unfreeze_top_layers is None:
            self.model.backbone.trainable = True
        self.variables = self._trainable_now()
        logging.info("Step %d: unfroze %d backbone layers (%s); %d trainable variables.",
                     self.global_step, len(self._to_unfreeze),
                     ", ".join(layer.name for layer in self._to_unfreeze), len(self.variables))
        self._to_unfreeze = []
        self._build_step()

    def _check_built_in_scope(self) -> None:
        """The model's and the optimizer's variables must belong to this trainer's strategy."""
        extended = self.strategy.extended
        name = type(self.strategy).__name__
        for what, variable in (("model", next(iter(self.model.variables), None)),
                               ("optimizer", getattr(self.optimizer, "iterations", None))):
            if variable is None:
                continue
            if not extended.variable_created_in_scope(getattr(variable, "value", variable)):
                raise UsageError(
                    f"The {what} was created outside the scope of the trainer's strategy ({name}); "
                    "create the model, the optimizer and the Trainer inside "
                    "`with strategy.scope():`.")

    # ----------------------------------------------------------------------------- properties
    @property
    def is_chief(self) -> bool:
        """True on the worker that writes checkpoints, summaries and the progress bar."""
        return bool(getattr(self.strategy.extended, "should_checkpoint", True))

    @property
    def global_step(self) -> int:
        return int(self.step.numpy())

    # The settings, readable as attributes (as the constructor takes them).
    steps_per_loop = property(lambda self: self.options.steps_per_loop)
    log_every = property(lambda self: self.options.log_every)
    checkpoint_every = property(lambda self: self.options.checkpoint_every)
    grad_accum_steps = property(lambda self: self.options.grad_accum_steps)
    on_nonfinite = property(lambda self: self.options.on_nonfinite)
    diagnostics_every = property(lambda self: self.options.diagnostics_every)
    fine_tuning = property(lambda self: self.options.fine_tuning)

    # ------------------------------------------------------------------------------- training
    def fit(self, data: Data | dict, steps: int, *, eval_data: Data | None = None,
            eval_every: int | None = None, eval_steps: int | None = None,
            task_schedule=None, validation_data: Data | None = None) -> History:
        """Trains until the global step reaches `steps` (a resumed run continues from its saved
        step), evaluating every `eval_every` steps and at the end when `eval_data` is given.
        `validation_data` (for model selection: held out from training and from the test data)
        is evaluated at the same steps, into `History.validation` and TensorBoard validation/.

        `data` yields global batches of (features, labels[, sample_weights]), or is a function
        `(InputContext) -> per-replica batches` (the way to shard input across workers); it should
        repeat (steps, not epochs, decide when training ends). A later `fit` on the same `data`
        object goes on with its stream where this one stopped; other data is read from its start.

        Task sampling: with `task_schedule` (from `mtl.data.mixing.task_schedule`), `data` is
        `{task: batches of that task}` (`mtl.data.mixing.task_datasets`: every batch has all
        label keys, with sample weight 0 for the other tasks) and each step trains on a batch of
        the task the schedule draws for that step. All tasks share one compiled step (same
        batch structure, no retracing); the draw depends only on the seed and the step, so a
        resumed run draws what the uninterrupted one would.
        """
        self._check_fit(data, steps, eval_data, eval_every, task_schedule, validation_data)
        history = History()
        if self.global_step >= steps:
            logging.info("Already at step %d >= %d: nothing to train.", self.global_step, steps)
            return history
        iterators = self.input.iterators(data, task_schedule, self.global_step)
        bar = progress.progress_bar(total=steps, initial=self.global_step, enabled=self.is_chief)
        loop_actions = self._actions(history, bar, data, eval_data, eval_every, eval_steps,
                                     validation_data)
        with progress.absl_logging_through_tqdm(), bar, preemption.StopSignals() as stop:
            while self.global_step < steps:
                self._stop_if_signalled(stop)
                step = self.global_step
                for action in loop_actions:
                    action.before_loop(step)
                end = min([steps] + [b for b in (a.next_boundary(step) for a in loop_actions)
                                     if b is not None])
                iterator, n = self._next_run(iterators, task_schedule, step, end - step)
                loop = actions.LoopResult.of(self._steps.train_loop(iterator, tf.constant(n)))
                if loop.steps_run < n:
                    self._raise_nonfinite(loop.last)
                for action in loop_actions:
                    action.after_loop(self.global_step, loop, final=self.global_step == steps)
            self._stop_if_signalled(stop)  # A signal during the last call is still reported.
        return history

    def _actions(self, history, bar, data, eval_data, eval_every, eval_steps,
                 validation_data=None) -> list:
        """What acts between compiled loops, in order."""
        summaries = self._summaries
        train_log = actions.TrainLog(self.options.log_every, trainer=self, history=history,
                                     summaries=summaries, bar=bar)
        parts = [actions.Unfreeze(self.options.fine_tuning.unfreeze_at_step
                                  if self._to_unfreeze else None, unfreeze=self._maybe_unfreeze),
                 train_log]
        if self.options.diagnostics_every and self._steps.shared_variables:
            # A fixed batch from a separate iterator: the training stream is not disturbed
            # and successive diagnostics are comparable.
            first = next(iter(data.values())) if isinstance(data, dict) else data
            parts.append(actions.Diagnose(
                self.options.diagnostics_every, diagnostics=self._steps.diagnostics,
                batch=next(iter(distribute(self.strategy, first))), tasks=self.tasks,
                history=history, summaries=summaries))
        if eval_data is not None or validation_data is not None:
            parts.append(actions.Evaluate(eval_every, evaluate=self.evaluate, data=eval_data,
                                          steps=eval_steps, history=history,
                                          train_log=train_log, validation=validation_data))
        parts.append(actions.Save(self.options.checkpoint_every, save=self.save))
        return parts

    def _next_run(self, iterators, task_schedule, step: int, n: int):
        """The iterator and number of steps of the next compiled call (at most steps_per_loop;
        with a task schedule, up to the next change of task)."""
        n = min(self.options.steps_per_loop, n)
        if task_schedule is None:
            return iterators, n
        drawn = np.asarray(task_schedule.task_indices(step, n))
        changes = np.nonzero(drawn != drawn[0])[0]
        if changes.size:
            n = int(changes[0])
        return iterators[task_schedule.tasks[int(drawn[0])]], n

    def _check_fit(self, data, steps, eval_data, eval_every, task_schedule,
                   validation_data=None) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise UsageError(f"steps must be an int >= 0 (the global step to train to); got "
                             f"{steps!r}.")
        if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
            raise UsageError(f"eval_every must be None or an int >= 1; got {eval_every!r}.")
        if isinstance(data, dict):
            if task_schedule is None:
                raise UsageError("fit: data is a dict of per-task datasets; pass task_schedule= "
                                 "(mtl.data.mixing.task_schedule) to say which task trains when.")
            names = list(getattr(task_schedule, "tasks", data))
            if sorted(data) != sorted(names):
                raise UsageError(f"fit: the per-task datasets are for tasks {sorted(data)}, but "
                                 f"the task schedule draws from {sorted(names)}.")
            for task, dataset in data.items():
                self._check_data(dataset, f"train data of task {task!r}")
        else:
            if task_schedule is not None:
                raise UsageError("fit: task_schedule needs data as {task: dataset}.")
            self._check_data(data, "train data")
        if eval_data is not None:
            self._check_data(eval_data, "eval data")
        if validation_data is not None:
            self._check_data(validation_data, "validation data")

    def _any_worker(self, flag: bool) -> bool:
        """True when `flag` is set on any worker (multi-worker runs must stop together)."""
        if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return flag
        value = self.strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)) > 0

    def _stop_if_signalled(self, stop) -> None:
        if not self._any_worker(stop.received is not None):
            return
        why = stop.received or "a signal on another worker"
        latest = self.checkpointer.latest
        path = latest if latest and latest.endswith(f"-{self.global_step}") else self.save()
        where = f"checkpoint saved to {path}" if path else "checkpoint saved"
        raise preemption.TrainingStopped(
            f"Stopped by {why} at step {self.global_step}; {where}. Run the same command again "
            "to resume from this step.", signal_name=why)

    def _raise_nonfinite(self, stats: UpdateStats) -> None:
        """Stops training on a non-finite loss or gradient (the bad update was not applied)."""
        losses = stats.task_losses
        bad = [t.name for t, v in zip(self.tasks, losses) if not np.isfinite(v)]
        what = (f"non-finite loss in task(s) {bad}" if bad else
                "non-finite gradient (task losses were finite: "
                + ", ".join(f"{t.name}={v:.4g}" for t, v in zip(self.tasks, losses)) + ")")
        raise NonFiniteError(
            f"Training stopped at step {self.global_step + 1}: {what}; the update was not "
            f"applied. Last good checkpoint: {self.checkpointer.latest or 'none'}. "
            + ("A NaN/inf label or prediction, or a class id outside the head's classes, makes "
               "a task's loss non-finite. " if bad else "")
            + "Use on_nonfinite='skip' (--on_nonfinite=skip) to drop such steps instead.")

    def _check_data(self, data: Data, where: str) -> None:
        """Checks structure, shapes, batch split and the first batch's label values before any
        graph is built."""
        replicas = self.strategy.num_replicas_in_sync
        if isinstance(data, tf.data.Dataset):
            dataset = data
            spec = data.element_spec
            batch = tf.nest.flatten(spec)[0].shape[0] if isinstance(spec, tuple) else None
            if batch is not None and batch % replicas:
                raise UsageError(
                    f"{where}: the global batch size {batch} cannot be split evenly over "
                    f"{replicas} replicas; use a multiple of {replicas}.")
        elif callable(data):
            # This worker's own context: under several workers a function that reads a part
            # of the data (`--input_sharding=shard`) is checked on that part, not the whole.
            dataset = data(input_context(self.strategy))
            spec = dataset.element_spec
        else:
            raise UsageTypeError(f"{where} must be a tf.data.Dataset or a function (InputContext) -> "
                            f"tf.data.Dataset; got {type(data).__name__}.")
        validation.check_data(spec, self.tasks, self.model, where=where)
        if any(data is checked for checked in self._checked_data):
            return  # Its first batch was read already (a later fit, another evaluation).
        # Its own iterator: the stream `fit` trains on is not touched.
        validation.check_first_batch(dataset, self.tasks, self.model, where=where)
        self._checked_data.append(data)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, data: Data, steps: int | None = None, *, split: str = "eval") -> dict:
        """Returns `{task: {"loss": ..., metric_name: ...}}` over `data` (or its first `steps`
        batches). A task's loss and metrics count only the examples that carry its label.
        An empty dataset (or `steps` < 1) is an error, not a result of zeros. The results go to
        TensorBoard under `<model_dir>/<split>/` ("validation" for validation data)."""
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                                  or steps < 1):
            raise UsageError(f"evaluate: steps must be None (the whole dataset) or an int >= 1; "
                             f"got {steps!r}.")
        self._check_data(data, f"{split} data")
        if steps is None and isinstance(data, tf.data.Dataset) and \
                data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise UsageError("evaluate: the eval data repeats forever; pass steps= or give a "
                             "finite dataset.")
        for task in self.tasks:
            self.eval_losses[task.name].reset_state()
            for metric in self.eval_metrics[task.name]:
                metric.reset_state()
        if steps is not None and isinstance(data, tf.data.Dataset):
            data = data.take(steps)
        for i, batch in enumerate(distribute(self.strategy, data)):
            if steps is not None and i >= steps:
                break
            self._steps.eval_step(batch)
        results = {}
        for task in self.tasks:
            values = {"loss": float(self.eval_losses[task.name].result())}
            for metric in self.eval_metrics[task.name]:
                values[metric.name] = float(metric.result())
            results[task.name] = values
        self._summaries.write(split, self.global_step, actions.flatten_results(results))
        return results

    # -------------------------------------------------------------------------- checkpoints
    def save(self) -> str | None:
        """Writes a checkpoint at the current step; returns its path (None off the chief)."""
        return self.checkpointer.save(self.global_step)

    def restore(self) -> int:
        """Restores the newest readable checkpoint in `model_dir`; returns the global step."""
        if self.checkpointer.restore(strict=self._strict_restore):
            logging.info("Resumed at step %d.", self.global_step)
        return self.global_step

    # ------------------------------------------------------------------------- run record
    def record(self) -> dict:
        """What shapes this run's state and results (`trainer.json`; see `mtl.run_record`)."""
        optimizer = {k: v for k, v in self.optimizer.get_config().items() if k != "name"}
        method = self.weighting
        policy = getattr(self.model, "dtype_policy", None)
        return {
            "tasks": [[t.name, t.weight] for t in self.tasks],
            "weighting": {"name": method.name,
                          "options": {k: getattr(method, k) for k in method.options()
                                      if hasattr(method, k)}},
            "optimizer": {"class": type(self.optimizer).__name__, **optimizer},
            "precision": getattr(policy, "name", str(policy)),
            # Every state-shaping setting, as its field records it.
            **options_lib.record_entries(self.options),
        }

    def _check_record(self) -> dict:
        """Refuses, before anything is loaded, to resume a run made with other settings
        (unless `allow_config_change` names them); returns the allowed changes."""
        if not self.model_dir:
            return {}
        self.checkpointer.check_model()  # another model is refused as such, first
        path = os.path.join(self.model_dir, TRAINER_RECORD)
        changes = run_record.check(run_record.read(path), self.record(), free=(),
                                   allowed=self.options.allow_config_change,
                                   where=self.model_dir, option="allow_config_change")
        for name, (old, new) in changes.items():
            logging.warning("Resuming %s with %s changed (allowed): %s -> %s.", self.model_dir,
                            name, old, new)
        return changes

    def _write_record(self, changes: dict) -> None:
        if self.model_dir and self.is_chief:
            run_record.write_once(os.path.join(self.model_dir, TRAINER_RECORD), self.record())
            run_record.append_history(self.model_dir, TRAINER_RECORD, changes,
                                      self.global_step)

    def _signature(self) -> dict:
        # All the model's weights, trainable or not, so that freezing does not change it.
        return {"tasks": [t.name for t in self.tasks],
                "variables": [[v.path, list(v.shape)] for v in self.model.weights]}


TRAINER_RECORD = "trainer.json"


class NonFiniteError(FloatingPointError):
    """A task loss or gradient became NaN or inf; raised before the bad update is applied."""


def _check_optimizer_clipping(optimizer, strategy) -> None:
    """Keras 3 clips inside `apply_gradients`, on each replica's part of the gradient before the
    sum (PITFALLS): under several replicas that is not the one-device clipping. Refused there,
    pointing to the trainer's own `clip_norm`."""
    if strategy.num_replicas_in_sync == 1:
        return
    for name in ("clipnorm", "global_clipnorm", "clipvalue"):
        value = getattr(optimizer, name, None)
        if value:
            raise UsageError(
                f"The optimizer has {name}={value}; under {type(strategy).__name__} with "
                f"{strategy.num_replicas_in_sync} replicas Keras would clip each replica's part "
                "of the gradient before the sum, not the gradient. Leave it unset; the "
                "Trainer's clip_norm (--clip_norm) clips the global norm of the whole update's "
                "gradient.")


def _computes_in_float16(model) -> bool:
    return any(getattr(layer, "compute_dtype", None) == "float16"
               for layer in model._flatten_layers(include_self=True, recursive=True))
