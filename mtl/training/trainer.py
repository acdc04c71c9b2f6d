"""`Trainer`: the outer loop around the compiled step, as a small controller.

`fit` runs the compiled step (`mtl.step.TrainStep`) up to the next boundary any action asks for,
then lets the actions act (`mtl.training.actions`: train logs, evaluation, diagnostics,
checkpoints, unfreezing). The parts it composes have one job each (modules of `mtl.training`):
`checkpoints.Checkpointer` (what goes into a checkpoint, save, restore with fallback),
`input_state.InputState` (iterators that continue where the run left off), `finetune` (freezing
and the optimizer groups: which optimizer trains which variable), `validation` (the checks
before any graph is built), `run_record` (`trainer.json`, checked on every resume),
`model_record` (`model.json`), `preemption` (a graceful stop on a signal), `progress` (the
progress bar), `history` (what `fit` returns, and `NonFiniteError`); the settings are a
validated `mtl.options.TrainerOptions`. Plain Python between compiled loops: nothing here runs
inside `tf.function`.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from absl import logging

from mtl import optimizers
from mtl import weighting as weighting_lib
from mtl.errors import UsageError
from mtl.options import TrainerOptions
from mtl.step import LossScale, TrainStep, plan, seed_states, unique_variables
from mtl.tasks import Task
from mtl.training import (actions, checkpoints, input_state, model_record, preemption, progress,
                          run_record, validation)
from mtl.training.finetune import freeze, optimizer_groups, trainable_weights_when_unfrozen
from mtl.training.history import History, nonfinite_error
from mtl.training.input_state import Data, InputState, distribute


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
      options: a `mtl.TrainerOptions`; `**settings` are any of its fields as keywords (each
        documented there, one entry per setting), and override it.
    """

    def __init__(self, model: keras.Model, tasks: Sequence[Task], *, optimizer,
                 weighting="equal", model_dir: str | None = None,
                 strategy: tf.distribute.Strategy | None = None,
                 options: TrainerOptions | None = None, **settings):
        self.options = TrainerOptions.of(options, **settings)
        # The model's head order, so task i is the same task everywhere.
        self.tasks = validation.check_tasks(tasks, model)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.model = model
        self._checked_data = []  # Data whose first batch was checked (by identity).
        self.model_dir = model_dir
        self.optimizer = optimizers.resolve(optimizer)
        validation.check_optimizer_clipping(self.optimizer, self.strategy)
        self.weighting = weighting_lib.get(weighting)
        # An unbuilt copy: per-group methods (granularity) start from the same options.
        self._method_template = plan.method_template(self.weighting, self.options)
        plan.check(self.weighting, self.options, model)
        validation.check_built_in_scope(self.strategy, self.model, self.optimizer)
        self._to_unfreeze = freeze(model, self.options.fine_tuning)
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
            signature=checkpoints.model_signature(self.tasks, self.model),
            is_chief=self.is_chief)
        self._summaries = actions.Summaries(model_dir, self.is_chief)
        self.input = InputState(self.strategy, self.checkpointer,
                                micro_batches=self.options.grad_accum_steps,
                                checkpoint_input=self.options.checkpoint_input)
        changes = {}
        if model_dir:
            self.checkpointer.check_model()  # another model is refused as such, first
            changes = run_record.check_trainer_record(
                model_dir, self.record(), allowed=self.options.allow_config_change)
        self._strict_restore = not changes
        self.restore()
        if model_dir and self.is_chief:
            model_record.record_model(model_dir, model)  # what export needs to rebuild the model
            run_record.write_trainer_record(model_dir, self.record(), changes, self.global_step)
        self._maybe_unfreeze()

    # ------------------------------------------------------------------------- construction
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

    # ----------------------------------------------------------------------------- properties
    @property
    def is_chief(self) -> bool:
        """True on the worker that writes checkpoints, summaries and the progress bar."""
        return bool(getattr(self.strategy.extended, "should_checkpoint", True))

    @property
    def global_step(self) -> int:
        return int(self.step.numpy())

    # Seven of the settings, readable as attributes (every setting: `self.options`).
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
        step), evaluating every `eval_every` steps and at the end when `eval_data` is given
        (`eval_steps` batches each time; None: the whole eval data).
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
        for dataset, where in validation.check_fit(
                data, steps, eval_every=eval_every, eval_steps=eval_steps,
                task_schedule=task_schedule, eval_data=eval_data,
                validation_data=validation_data):
            self._check_input(dataset, where)
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
                self._run_loop(steps, iterators, task_schedule, loop_actions)
            self._stop_if_signalled(stop)  # A signal during the last call is still reported.
        return history

    def _run_loop(self, steps: int, iterators, task_schedule, loop_actions) -> None:
        """One compiled call, up to the nearest boundary any action asks for, then the actions."""
        step = self.global_step
        for action in loop_actions:
            action.before_loop(step)
        end = min([steps] + [b for b in (a.next_boundary(step) for a in loop_actions)
                             if b is not None])
        iterator, n = input_state.next_run(iterators, task_schedule, step, end - step,
                                           self.options.steps_per_loop)
        loop = actions.LoopResult.of(self._steps.train_loop(iterator, tf.constant(n)))
        if loop.steps_run < n:
            # Stops on a non-finite loss or gradient (the bad update was not applied).
            raise nonfinite_error(self.tasks, loop.last, self.global_step,
                                  self.checkpointer.latest)
        for action in loop_actions:
            action.after_loop(self.global_step, loop, final=self.global_step == steps)

    def _actions(self, history, bar, data, eval_data, eval_every, eval_steps,
                 validation_data=None) -> list:
        """What acts between compiled loops, in order."""
        summaries = self._summaries
        train_log = actions.TrainLog(
            self.options.log_every, tasks=self.tasks, train_metrics=self.train_metrics,
            optimizer=self.optimizer, skipped_steps=self.skipped_steps,
            loss_scale=self.loss_scale, history=history, summaries=summaries, bar=bar)
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

    def _stop_if_signalled(self, stop) -> None:
        preemption.stop_if_signalled(stop, strategy=self.strategy, step=self.global_step,
                                     checkpointer=self.checkpointer)

    def _check_input(self, data: Data, where: str) -> None:
        validation.check_input(data, where, strategy=self.strategy, tasks=self.tasks,
                               model=self.model, checked=self._checked_data)

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
        self._check_input(data, f"{split} data")
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

    # ------------------------------------------------------------------- checkpoints, record
    def save(self) -> str | None:
        """Writes a checkpoint at the current step; returns its path (None off the chief)."""
        return self.checkpointer.save(self.global_step)

    def restore(self) -> int:
        """Restores the newest readable checkpoint in `model_dir`; returns the global step."""
        if self.checkpointer.restore(strict=self._strict_restore):
            logging.info("Resumed at step %d.", self.global_step)
        return self.global_step

    def record(self) -> dict:
        """What shapes this run's state and results (`trainer.json`; see
        `mtl.training.run_record`)."""
        return run_record.trainer_record(tasks=self.tasks, weighting=self.weighting,
                                         optimizer=self.optimizer, model=self.model,
                                         options=self.options)


def _computes_in_float16(model) -> bool:
    return any(getattr(layer, "compute_dtype", None) == "float16"
               for layer in model._flatten_layers(include_self=True, recursive=True))
