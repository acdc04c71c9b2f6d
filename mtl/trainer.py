"""`Trainer`: the outer loop around the compiled step (checkpoints, evaluation, summaries, bar).

Plain Python between compiled loops: nothing here runs inside `tf.function`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mtl import checkpoints, preemption, progress, validation
from mtl.checkpoints import CheckpointReadError, CheckpointWriteError  # noqa: F401 (API)
from mtl.preemption import TrainingStopped  # noqa: F401 (API)
from mtl import weighting as weighting_lib
from mtl.finetune import (FineTuning, layers_to_unfreeze, scaled_optimizer,
                          trainable_weights_when_unfrozen)
from mtl.step import LossScale, TrainStep
from mtl.update_policy import ON_NONFINITE
from mtl.tasks import Task


#: What `fit` and `evaluate` take: a dataset of *global* batches, or a function
#: `(tf.distribute.InputContext) -> dataset of per-replica batches` for
#: `strategy.distribute_datasets_from_function` (each input pipeline reads its own shard).
Data = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]


@dataclasses.dataclass
class History:
    """What `fit` saw: one record per logging interval and one per evaluation.

    Train records: `{"step", "loss", "<task>/loss", "<task>/<metric>", "examples_per_sec"}`;
    eval records: `{"step", "<task>/loss", "<task>/<metric>"}`; diagnostics records (every
    `diagnostics_every` steps, when tasks share variables): `{"step", "<task>/weight",
    "<task>/grad_norm", "cosine/<task>__<task>"}`.
    """

    train: list = dataclasses.field(default_factory=list)
    eval: list = dataclasses.field(default_factory=list)
    diagnostics: list = dataclasses.field(default_factory=list)

    def series(self, key: str, split: str = "train") -> list:
        """The values of `key` over time, e.g. `history.series("left/loss")`."""
        return [r[key] for r in getattr(self, split) if key in r]


def _flatten_results(results: dict) -> dict:
    return {f"{task}/{name}": value for task, values in results.items()
            for name, value in values.items()}


def _get_optimizer(optimizer) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return keras.optimizers.get(optimizer)
        except ValueError:
            raise ValueError(f"Unknown optimizer {optimizer!r}; expected a Keras optimizer name "
                             "('sgd', 'adam', 'adamw', 'rmsprop', ...) or a "
                             "keras.optimizers.Optimizer object.") from None
    raise TypeError(f"optimizer must be a keras.optimizers.Optimizer or a name; got {optimizer!r}.")


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
      steps_per_loop: train steps run inside one compiled call.
      log_every: steps between train summaries / history records.
      checkpoint_every: steps between checkpoints (also written at the end of `fit`).
      max_to_keep: checkpoints kept in `model_dir`.
    """

    def __init__(self, model: keras.Model, tasks: Sequence[Task], *, optimizer,
                 weighting="equal", model_dir: str | None = None,
                 strategy: tf.distribute.Strategy | None = None, steps_per_loop: int = 10,
                 log_every: int = 100, checkpoint_every: int | None = 1000,
                 max_to_keep: int = 3, grad_accum_steps: int = 1, jit_compile: bool = False,
                 on_nonfinite: str = "stop", gradient_mode: str = "exact",
                 checkpoint_input: bool = True, diagnostics_every: int | None = None,
                 fine_tuning: FineTuning | None = None):
        tasks = list(tasks)
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(f"tasks must be mtl.Task objects; got {task!r}.")
        task_names = getattr(model, "task_names", None) or list(model.output)
        validation.check_tasks_match_heads(tasks, task_names)
        for name, value in (("steps_per_loop", steps_per_loop), ("log_every", log_every),
                            ("grad_accum_steps", grad_accum_steps), ("max_to_keep", max_to_keep)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
        if diagnostics_every is not None and (not isinstance(diagnostics_every, int)
                                              or diagnostics_every < 1):
            raise ValueError(f"diagnostics_every must be None or an int >= 1; got "
                             f"{diagnostics_every!r}.")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {list(ON_NONFINITE)}; got "
                             f"{on_nonfinite!r}.")
        if gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"gradient_mode must be one of {list(GRADIENT_MODES)}; got "
                             f"{gradient_mode!r}.")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be None or an int >= 1; got "
                             f"{checkpoint_every!r}.")
        self.strategy = strategy or tf.distribute.get_strategy()
        self.model = model
        # Keep the model's head order, so task i is the same task everywhere.
        by_name = {t.name: t for t in tasks}
        self.tasks = [by_name[name] for name in task_names]
        self.optimizer = _get_optimizer(optimizer)
        self.weighting = weighting_lib.get(weighting)
        _check_gradient_mode(self.weighting, gradient_mode, model)
        self.model_dir = model_dir
        self.on_nonfinite = on_nonfinite
        self.grad_accum_steps = grad_accum_steps
        self.checkpoint_input = checkpoint_input
        self.diagnostics_every = diagnostics_every
        self.fine_tuning = fine_tuning or FineTuning()
        self._gradient_mode = gradient_mode
        self._jit_compile = jit_compile
        self.steps_per_loop = steps_per_loop
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self._check_built_in_scope()

        backbone = getattr(model, "backbone", None)
        fine = self.fine_tuning
        if (fine.freeze_backbone or fine.backbone_lr_multiplier != 1.0) and backbone is None:
            raise ValueError("fine_tuning needs a MultiTaskModel built from a backbone and heads.")
        self._to_unfreeze = []
        if fine.freeze_backbone:
            backbone.trainable = False  # Frozen layers run in inference mode (BatchNorm too).
            if fine.unfreeze_at_step is not None:
                self._to_unfreeze = layers_to_unfreeze(backbone, fine.unfreeze_top_layers)
        with self.strategy.scope():
            self.weighting.build([t.name for t in self.tasks], [t.weight for t in self.tasks])
            self.variables = self._trainable_now()
            # Variables that become trainable later get optimizer slots now.
            later = trainable_weights_when_unfrozen(self._to_unfreeze)
            candidates = _unique(self.variables + later)
            backbone_ids = {id(v) for v in (backbone.weights if backbone is not None else [])}
            self.backbone_optimizer = None
            if fine.backbone_lr_multiplier != 1.0:
                self.backbone_optimizer = scaled_optimizer(self.optimizer,
                                                           fine.backbone_lr_multiplier)
                self.backbone_optimizer.build([v for v in candidates if id(v) in backbone_ids])
                candidates = [v for v in candidates if id(v) not in backbone_ids]
            self._backbone_ids = backbone_ids
            # Keras 3 under MirroredStrategy needs the optimizer's slots built in the scope
            # before the first compiled step.
            self.optimizer.build(candidates)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.train_metrics = {t.name: t.build_metrics() for t in self.tasks}
            self.eval_metrics = {t.name: t.build_metrics() for t in self.tasks}
            self.eval_losses = {t.name: keras.metrics.Mean(name="loss") for t in self.tasks}
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="skipped_steps")
            # float16 compute needs loss scaling; bfloat16 and float32 do not.
            self.loss_scale = LossScale() if _computes_in_float16(model) else None
        self._build_step()
        extra = {"loss_scale": self.loss_scale} if self.loss_scale is not None else {}
        if self.backbone_optimizer is not None:
            extra["backbone_optimizer"] = self.backbone_optimizer
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=self.optimizer, step=self.step, weighting=self.weighting,
            skipped_steps=self.skipped_steps,
            # Dropout's RNG state lives in SeedGenerator variables that checkpointing the model
            # does not reach; saving them makes a resumed run draw the same masks.
            seed_states=_seed_states(model), **extra)
        self._manager = None
        self._writers = {}
        self._restored_path = None
        self._input_resumed = False
        if model_dir:
            if self.is_chief:
                checkpoints.check_writable(model_dir)
            self._manager = tf.train.CheckpointManager(
                self.checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=max_to_keep)
            self.restore()
        self._maybe_unfreeze()

    def _trainable_now(self) -> list:
        return _unique(list(self.model.trainable_variables)
                       + list(self.weighting.trainable_variables))

    def _build_step(self) -> None:
        """(Re)creates the compiled functions for the currently trainable variables."""
        self._steps = TrainStep(
            model=self.model, tasks=self.tasks, weighting=self.weighting,
            optimizer=self.optimizer, strategy=self.strategy, variables=self.variables,
            train_metrics=self.train_metrics, eval_metrics=self.eval_metrics,
            eval_losses=self.eval_losses, step=self.step,
            shared_variables=shared_variables(self.model, [t.name for t in self.tasks]),
            grad_accum_steps=self.grad_accum_steps, jit_compile=self._jit_compile,
            loss_scale=self.loss_scale, on_nonfinite=self.on_nonfinite,
            skipped_steps=self.skipped_steps, gradient_mode=self._gradient_mode,
            backbone_optimizer=self.backbone_optimizer, backbone_ids=self._backbone_ids)

    def _maybe_unfreeze(self) -> None:
        """Unfreezes the scheduled backbone layers once the global step reaches the schedule."""
        at = self.fine_tuning.unfreeze_at_step
        if at is None or not self._to_unfreeze or self.global_step < at:
            return
        for layer in self._to_unfreeze:
            layer.trainable = True
        self.model.backbone.trainable = True if self.fine_tuning.unfreeze_top_layers is None \
            else self.model.backbone.trainable
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
                raise ValueError(
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

    # ------------------------------------------------------------------------------- training
    def fit(self, data: Data | dict, steps: int, *, eval_data: Data | None = None,
            eval_every: int | None = None, eval_steps: int | None = None,
            task_schedule=None) -> History:
        """Trains until the global step reaches `steps` (a resumed run continues from its saved
        step), evaluating every `eval_every` steps and at the end when `eval_data` is given.

        `data` yields global batches of (features, labels[, sample_weights]), or is a function
        `(InputContext) -> per-replica batches` (the way to shard input across workers); it should
        repeat (steps, not epochs, decide when training ends).

        Task sampling: with `task_schedule` (from `mtl.data.mixing.task_schedule`), `data` is
        `{task: batches of that task}` (`mtl.data.mixing.task_datasets`: every batch has all
        label keys, with sample weight 0 for the other tasks) and each step trains on a batch of
        the task the schedule draws for that step. All tasks share one compiled step (same
        batch structure, no retracing); the draw depends only on the seed and the step, so a
        resumed run draws what the uninterrupted one would.
        """
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0 (the global step to train to); got "
                             f"{steps!r}.")
        if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
            raise ValueError(f"eval_every must be None or an int >= 1; got {eval_every!r}.")
        if isinstance(data, dict):
            if task_schedule is None:
                raise ValueError("fit: data is a dict of per-task datasets; pass task_schedule= "
                                 "(mtl.data.mixing.task_schedule) to say which task trains when.")
            names = list(getattr(task_schedule, "tasks", data))
            if sorted(data) != sorted(names):
                raise ValueError(f"fit: the per-task datasets are for tasks {sorted(data)}, but "
                                 f"the task schedule draws from {sorted(names)}.")
            for task, dataset in data.items():
                self._check_data(dataset, f"train data of task {task!r}")
        else:
            if task_schedule is not None:
                raise ValueError("fit: task_schedule needs data as {task: dataset}.")
            self._check_data(data, "train data")
        if eval_data is not None:
            self._check_data(eval_data, "eval data")
        history = History()
        start = self.global_step
        if start >= steps:
            logging.info("Already at step %d >= %d: nothing to train.", start, steps)
            return history
        iterator = self._make_iterator(data, task_schedule)
        diagnostics_batch = None
        diagnose = bool(self.diagnostics_every and self._steps.shared_variables)
        if diagnose:
            # A fixed batch from a separate iterator: the training stream is not disturbed and
            # successive diagnostics are comparable.
            first = next(iter(data.values())) if isinstance(data, dict) else data
            diagnostics_batch = next(iter(self._distribute(first)))
        boundaries = [b for b in (self.log_every, eval_every, self.checkpoint_every,
                                  self.diagnostics_every) if b]
        unfreeze_at = self.fine_tuning.unfreeze_at_step if self._to_unfreeze else None
        bar = progress.progress_bar(total=steps, initial=start, enabled=self.is_chief)
        loss_sum, applied_sum, seen, examples = None, 0, 0, 0
        interval_start = time.perf_counter()
        with progress.absl_logging_through_tqdm(), bar, preemption.StopSignals() as stop:
            while self.global_step < steps:
                if self._any_worker(stop.received is not None):
                    self._stop_gracefully(stop.received or "a signal on another worker")
                step = self.global_step
                # Run up to the next step where something happens outside the compiled loop.
                next_stop = min([steps] + [(step // b + 1) * b for b in boundaries]
                                + ([unfreeze_at] if unfreeze_at and unfreeze_at > step else []))
                n = min(self.steps_per_loop, next_stop - step)
                loop_iterator = iterator
                if task_schedule is not None:
                    # Run the steps up to the next change of task in one call.
                    drawn = np.asarray(task_schedule.task_indices(step, n))
                    changes = np.nonzero(drawn != drawn[0])[0]
                    if changes.size:
                        n = int(changes[0])
                    loop_iterator = iterator[task_schedule.tasks[int(drawn[0])]]
                self._maybe_unfreeze()
                sums, applied, steps_run, num_examples, last = self._steps.train_loop(
                    loop_iterator, tf.constant(n, tf.int32))
                if int(steps_run) < n:
                    self._raise_nonfinite(last.numpy())
                sums = sums.numpy()
                loss_sum = sums if loss_sum is None else loss_sum + sums
                applied_sum += int(applied)
                seen += n
                examples += int(num_examples)
                step = self.global_step
                bar.update(n)
                means = self._interval_means(loss_sum, applied_sum)
                bar.set_postfix({t.name: f"{v:.4g}" for t, v in zip(self.tasks, means)},
                                refresh=False)
                if step % self.log_every == 0 or step == steps:
                    elapsed = max(time.perf_counter() - interval_start, 1e-9)
                    record = self._log_train(step, means[:len(self.tasks)],
                                             self._total_loss(means), examples / elapsed,
                                             seen / elapsed)
                    history.train.append(record)
                    loss_sum, applied_sum, seen, examples = None, 0, 0, 0
                    interval_start = time.perf_counter()
                if diagnose and step % self.diagnostics_every == 0:
                    history.diagnostics.append(self._log_diagnostics(step, diagnostics_batch))
                if eval_data is not None and ((eval_every and step % eval_every == 0)
                                              or step == steps):
                    results = self.evaluate(eval_data, steps=eval_steps)
                    history.eval.append({"step": step, **_flatten_results(results)})
                    logging.info("step %d eval: %s", step, _format_results(results))
                    interval_start = time.perf_counter()  # Do not count eval time as training.
                if self.checkpoint_every and step % self.checkpoint_every == 0 or step == steps:
                    self.save()
        return history

    def _interval_means(self, sums: np.ndarray, applied: int) -> np.ndarray:
        """The statistics' means over the applied updates of an interval (skipped updates do
        not count; NaN when none was applied)."""
        if not applied:
            return np.full_like(sums, np.nan)
        return sums / applied

    def _total_loss(self, means: np.ndarray) -> float:
        """The logged total: sum_t Task.weight * L_t plus the regularisation, the same
        objective for every weighting method (the method's own weights are in diagnostics)."""
        num_tasks = len(self.tasks)
        weights = np.array([t.weight for t in self.tasks])
        return float(np.sum(weights * means[:num_tasks]) + means[num_tasks])

    def _make_iterator(self, data, task_schedule=None):
        """An iterator over `data` (a dict of them for task sampling) that continues where a
        restored run left off.

        On one replica the iterator itself is saved in the checkpoint (`checkpoint_input`), so a
        resumed run reads exactly the batches the interrupted one would have. Otherwise (several
        replicas, whose distributed iterators TF cannot save, or checkpoint_input=False) the
        batches already consumed are skipped: exact for a deterministic pipeline, at the cost of
        reading them again.
        """
        resume = self._restored_path is not None and not self._input_resumed
        self._input_resumed = True
        k = self.grad_accum_steps
        if isinstance(data, dict):
            consumed = dict.fromkeys(data, 0)
            if resume and self.global_step:
                drawn = np.asarray(task_schedule.task_indices(0, self.global_step))
                for i, task in enumerate(task_schedule.tasks):
                    consumed[task] = int(np.sum(drawn == i)) * k
            if all(self._saves_input(ds) for ds in data.values()):
                iterators = {task: self._iterator(ds, 0) for task, ds in data.items()}
                return self._resume_input(iterators, resume, data, consumed)
            return {task: self._iterator(ds, consumed[task]) for task, ds in data.items()}
        consumed = self.global_step * k if resume else 0
        iterator = self._iterator(data, consumed if not self._saves_input(data) else 0)
        if self._saves_input(data):
            return self._resume_input(iterator, resume, data, consumed)
        return iterator

    def _saves_input(self, data) -> bool:
        return (isinstance(data, tf.data.Dataset) and self.checkpoint_input
                and self.strategy.num_replicas_in_sync == 1)

    def _iterator(self, data, skip: int):
        if skip:
            logging.info("Skipping %d batches already trained on.", skip)
            if isinstance(data, tf.data.Dataset):
                data = data.skip(skip)
            else:
                make = data
                data = lambda context: make(context).skip(skip)  # noqa: E731
        return iter(self._distribute(data))

    def _resume_input(self, iterators, resume: bool, data, consumed):
        """Restores the saved input position into `iterators` (or skips what was consumed) and
        tracks them in the checkpoint from now on."""
        if resume and checkpoints.has_input(self._restored_path):
            tf.train.Checkpoint(input=iterators).restore(self._restored_path).expect_partial()
            logging.info("Input pipeline restored to step %d.", self.global_step)
        elif resume and (sum(consumed.values()) if isinstance(consumed, dict) else consumed):
            if isinstance(data, dict):
                iterators = {t: self._iterator(ds, consumed[t]) for t, ds in data.items()}
            else:
                iterators = self._iterator(data, consumed)
        self.checkpoint.input = iterators  # Saved with every checkpoint from now on.
        return iterators

    def _any_worker(self, flag: bool) -> bool:
        """True when `flag` is set on any worker (multi-worker runs must stop together)."""
        if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return flag
        value = self.strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)) > 0

    def _stop_gracefully(self, why: str) -> None:
        path = self.save()
        where = f"checkpoint saved to {path}" if path else "checkpoint saved"
        raise preemption.TrainingStopped(
            f"Stopped by {why} at step {self.global_step}; {where}. Run the same command again "
            "to resume from this step.", signal_name=why)

    def _raise_nonfinite(self, stats: np.ndarray) -> None:
        """Stops training on a non-finite loss or gradient (the bad update was not applied)."""
        losses = stats[:len(self.tasks)]
        bad = [t.name for t, v in zip(self.tasks, losses) if not np.isfinite(v)]
        what = (f"non-finite loss in task(s) {bad}" if bad else
                "non-finite gradient (task losses were finite: "
                + ", ".join(f"{t.name}={v:.4g}" for t, v in zip(self.tasks, losses)) + ")")
        latest = self._manager.latest_checkpoint if self._manager else None
        raise NonFiniteError(
            f"Training stopped at step {self.global_step + 1}: {what}; the update was not "
            f"applied. Last good checkpoint: {latest or 'none'}. Use on_nonfinite='skip' "
            "(--on_nonfinite=skip) to drop such steps instead.")

    def _check_data(self, data: Data, where: str) -> None:
        """Checks structure, shapes and batch split before any graph is built."""
        replicas = self.strategy.num_replicas_in_sync
        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
            batch = tf.nest.flatten(spec)[0].shape[0] if isinstance(spec, tuple) else None
            if batch is not None and batch % replicas:
                raise ValueError(
                    f"{where}: the global batch size {batch} cannot be split evenly over "
                    f"{replicas} replicas; use a multiple of {replicas}.")
        elif callable(data):
            context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                                 num_replicas_in_sync=replicas)
            spec = data(context).element_spec
        else:
            raise TypeError(f"{where} must be a tf.data.Dataset or a function (InputContext) -> "
                            f"tf.data.Dataset; got {type(data).__name__}.")
        validation.check_data(spec, self.tasks, self.model, where=where)

    def _distribute(self, data: Data):
        if not isinstance(data, tf.data.Dataset):
            return self.strategy.distribute_datasets_from_function(data)
        if self.strategy.num_replicas_in_sync == 1:
            return data
        return self.strategy.experimental_distribute_dataset(data)

    def _log_diagnostics(self, step: int, batch) -> dict:
        """Each task's weight, gradient norm on the shared variables and pairwise cosines."""
        norms, cosine, weights = (t.numpy() for t in self._steps.diagnostics(batch))
        names = [t.name for t in self.tasks]
        record = {"step": step}
        for i, name in enumerate(names):
            record[f"{name}/weight"] = float(weights[i])
            record[f"{name}/grad_norm"] = float(norms[i])
            for j in range(i + 1, len(names)):
                record[f"cosine/{name}__{names[j]}"] = float(cosine[i, j])
        self._write_summaries("train", step, {f"diagnostics/{k}": v for k, v in record.items()
                                              if k != "step"})
        return record

    def _log_train(self, step, task_losses, total, examples_per_sec, steps_per_sec) -> dict:
        record = {"step": step, "loss": float(total)}
        for task, loss in zip(self.tasks, task_losses):
            record[f"{task.name}/loss"] = float(loss)
            for metric in self.train_metrics[task.name]:
                record[f"{task.name}/{metric.name}"] = float(metric.result())
                metric.reset_state()
        record["learning_rate"] = _learning_rate(self.optimizer)
        record["skipped_steps"] = int(self.skipped_steps.numpy())
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale.scale.numpy())
        record["examples_per_sec"] = float(examples_per_sec)
        record["steps_per_sec"] = float(steps_per_sec)
        self._write_summaries("train", step, {
            "loss/total" if k == "loss" else k: v for k, v in record.items() if k != "step"})
        return record

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, data: Data, steps: int | None = None) -> dict:
        """Returns `{task: {"loss": ..., metric_name: ...}}` over `data` (or its first `steps`
        batches). A task's loss and metrics count only the examples that carry its label."""
        self._check_data(data, "eval data")
        if steps is None and isinstance(data, tf.data.Dataset) and \
                data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("evaluate: the eval data repeats forever; pass steps= or give a "
                             "finite dataset.")
        for metric in self._all_eval_metrics():
            metric.reset_state()
        if steps is not None and isinstance(data, tf.data.Dataset):
            data = data.take(steps)
        for i, batch in enumerate(self._distribute(data)):
            if steps is not None and i >= steps:
                break
            self._steps.eval_step(batch)
        results = {}
        for task in self.tasks:
            values = {"loss": float(self.eval_losses[task.name].result())}
            for metric in self.eval_metrics[task.name]:
                values[metric.name] = float(metric.result())
            results[task.name] = values
        if self.model_dir:
            self._write_summaries("eval", self.global_step, _flatten_results(results))
        return results

    def _all_eval_metrics(self):
        for task in self.tasks:
            yield self.eval_losses[task.name]
            yield from self.eval_metrics[task.name]

    # ---------------------------------------------------------------------- checkpoints & logs
    def save(self) -> str | None:
        """Writes a checkpoint at the current step; returns its path (None off the chief).

        Under multi-worker training every worker must take part in saving; only the chief
        writes to `model_dir`, the others to a temporary folder removed right after (the
        documented `tf.distribute` pattern).
        """
        if self._manager is None:
            return None
        if self.is_chief:
            previous = self._manager.latest_checkpoint
            try:
                path = self._manager.save(checkpoint_number=self.global_step)
                checkpoints.write_signature(self._manager.directory, self._signature())
            except (tf.errors.OpError, OSError) as e:
                raise checkpoints.CheckpointWriteError(
                    f"Could not write the checkpoint of step {self.global_step} to "
                    f"{self._manager.directory} ({type(e).__name__}: {e}). The previous "
                    f"checkpoint {previous or '(none)'} is intact.") from None
            logging.info("Saved checkpoint %s", path)
            return path
        scratch = tempfile.mkdtemp(prefix="mtl_worker_checkpoint_")
        try:
            tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                checkpoint_number=self.global_step)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None

    def restore(self) -> int:
        """Restores the newest readable checkpoint in `model_dir`; returns its step.

        Every tensor of a checkpoint is read before anything is assigned, so a truncated or
        corrupt newest checkpoint is detected: the previous one is used instead, with a warning.
        A checkpoint of a different model (other tasks or variable shapes) is refused with an
        error, before anything is loaded.
        """
        if self._manager is None or not self._manager.checkpoints:
            return self.global_step
        checkpoints.check_signature(self._manager.directory, self._signature())
        problems = []
        for path in reversed(self._manager.checkpoints):
            try:
                checkpoints.read_all(path)
            except (tf.errors.OpError, ValueError, OSError, IndexError, RuntimeError) as e:
                problems.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0]}")
                logging.warning("Checkpoint %s is unreadable (%s); trying the previous one.",
                                path, type(e).__name__)
                continue
            self.checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
            self._restored_path = path
            if problems:
                logging.warning("Resumed from %s (step %d) because newer checkpoints are "
                                "unreadable: %s", path, self.global_step, "; ".join(problems))
            logging.info("Restored %s at step %d.", path, self.global_step)
            return self.global_step
        raise checkpoints.CheckpointReadError(
            f"No readable checkpoint in {self._manager.directory}: " + "; ".join(problems)
            + ". Move the folder away to start afresh.")

    def _signature(self) -> dict:
        # All the model's weights, trainable or not, so that freezing does not change it.
        return {"tasks": [t.name for t in self.tasks],
                "variables": [[v.path, list(v.shape)] for v in self.model.weights]}

    def _write_summaries(self, split: str, step: int, scalars: dict) -> None:
        if not self.model_dir or not self.is_chief:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self.model_dir, split))
        with self._writers[split].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self._writers[split].flush()


GRADIENT_MODES = ("exact", "rep")


class NonFiniteError(FloatingPointError):
    """A task loss or gradient became NaN or inf; raised before the bad update is applied."""


def _check_gradient_mode(method, mode: str, model) -> None:
    if not isinstance(method, weighting_lib.GradientWeighting):
        if mode != "exact":
            raise ValueError(f"gradient_mode={mode!r} applies to gradient-based weighting "
                             f"methods; {method.name!r} is loss-based.")
        return
    if mode != "rep":
        return
    if not (method.supports_rep and method.uses_gramian):
        raise ValueError(f"gradient_mode='rep' cannot be used with weighting {method.name!r}: "
                         "it needs the per-parameter gradients of the shared variables. Use "
                         "gradient_mode='exact', or a method that supports rep mode (" + ", ".join(
                             sorted(n for n, c in weighting_lib.METHODS.items()
                                    if getattr(c, "supports_rep", False)
                                    and getattr(c, "uses_gramian", False))) + ").")
    if getattr(model, "backbone", None) is None:
        raise ValueError("gradient_mode='rep' needs a MultiTaskModel built from a backbone and "
                         "heads (the shared representation is the backbone's output).")


def shared_variables(model, task_names) -> list:
    """Trainable variables that more than one task's output depends on (by layer use)."""
    users: dict[int, int] = {}
    task_model = getattr(model, "task_model", None)
    if task_model is None:
        return []
    for name in task_names:
        for v in task_model(name).trainable_variables:
            users[id(v)] = users.get(id(v), 0) + 1
    return [v for v in model.trainable_variables if users.get(id(v), 0) > 1]


def _computes_in_float16(model) -> bool:
    return any(getattr(layer, "compute_dtype", None) == "float16"
               for layer in model._flatten_layers(include_self=True, recursive=True))


def _unique(variables):
    seen, out = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _seed_states(model: keras.Model) -> list:
    states = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()) or ():
            states.append(generator.state)
    return _unique(states)


def _learning_rate(optimizer) -> float:
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return math.nan


def _format_results(results: dict) -> str:
    return "; ".join(f"{task}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                     for task, values in results.items())
