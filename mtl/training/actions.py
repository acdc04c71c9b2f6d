"""What happens between compiled loops: one small class per periodic action.

`Trainer.fit` runs the compiled step up to the nearest boundary any action asks for, then lets
every action act (Orbit's controller-plus-actions shape). An action says when it wants the loop
to stop (`next_boundary`) and what it does before a loop and after one. Adding a periodic action
is one class here and one line where the `Trainer` lists them. The actions: `TrainLog`,
`Evaluate`, `Diagnose`, `Save`, `Unfreeze`; `Summaries` writes their TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from mtl.step import UpdateStats


@dataclasses.dataclass
class LoopResult:
    """What one compiled call returned (NumPy)."""

    sums: UpdateStats  # the statistics summed over the applied updates
    applied: int       # updates applied
    steps_run: int     # updates run (applied or dropped)
    examples: float    # examples read
    last: UpdateStats  # the last update's statistics

    @classmethod
    def of(cls, outputs) -> "LoopResult":
        """From what `TrainStep.train_loop` returned (`mtl.step.LoopOutputs`)."""
        return cls(sums=outputs.sums.numpy(), applied=int(outputs.applied.numpy()),
                   steps_run=int(outputs.steps_run.numpy()),
                   examples=float(outputs.examples.numpy()), last=outputs.last.numpy())


class Action:
    """A periodic action; `every` steps (None: never on a period, only when `final`)."""

    every: int | None = None

    def next_boundary(self, step: int) -> int | None:
        return (step // self.every + 1) * self.every if self.every else None

    def due(self, step: int, final: bool) -> bool:
        return final or bool(self.every and step % self.every == 0)

    def before_loop(self, step: int) -> None:
        """Called before each compiled call."""

    def after_loop(self, step: int, loop: LoopResult, final: bool) -> None:
        """Called after each compiled call; `final` on the last one of `fit`."""


class Summaries:
    """TensorBoard writers, one per split, on the chief only."""

    def __init__(self, model_dir: str | None, enabled: bool):
        self.model_dir = model_dir if enabled else None
        self._writers = {}

    def write(self, split: str, step: int, scalars: dict) -> None:
        if not self.model_dir:
            return
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(
                os.path.join(self.model_dir, split))
        with self._writers[split].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self._writers[split].flush()


class TrainLog(Action):
    """Means of the task losses and metrics over each interval of `every` steps (applied
    updates only), into the history, TensorBoard and the progress bar."""

    def __init__(self, every: int, *, tasks, train_metrics: dict, optimizer, skipped_steps,
                 loss_scale, history, summaries: Summaries, bar):
        self.every = every
        self.tasks = tasks
        self.train_metrics = train_metrics  # {task: [metric]}, reset after each record
        self.optimizer = optimizer          # its learning rate is logged
        self.skipped_steps = skipped_steps  # tf.Variable: updates dropped as non-finite
        self.loss_scale = loss_scale        # float16's LossScale, or None
        self.history = history
        self.summaries = summaries
        self.bar = bar
        self._reset()

    def _reset(self) -> None:
        self.sums, self.applied, self.steps, self.examples = None, 0, 0, 0.0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """Leaves time spent outside training (evaluation) out of the throughput."""
        self.started = time.perf_counter()

    def after_loop(self, step: int, loop: LoopResult, final: bool) -> None:
        self.sums = loop.sums if self.sums is None else self.sums.plus(loop.sums)
        self.applied += loop.applied
        self.steps += loop.steps_run
        self.examples += loop.examples
        means = self.means()
        self.bar.update(loop.steps_run)
        self.bar.set_postfix({t.name: f"{v:.4g}" for t, v in zip(self.tasks, means.task_losses)},
                             refresh=False)
        if self.due(step, final):
            self.history.train.append(self._record(step, means))
            self._reset()

    def means(self) -> UpdateStats:
        """The statistics' means over the interval's applied updates (NaN when none)."""
        return self.sums.mean(self.applied)

    def _record(self, step: int, means: UpdateStats) -> dict:
        tasks = self.tasks
        weights = np.array([t.weight for t in tasks])
        # The same objective for every method: sum_t Task.weight * L_t + regularisation.
        total = float(np.sum(weights * means.task_losses) + means.regularisation)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {"step": step, "loss": total}
        for task, loss in zip(tasks, means.task_losses):
            record[f"{task.name}/loss"] = float(loss)
            for metric in self.train_metrics[task.name]:
                record[f"{task.name}/{metric.name}"] = float(metric.result())
                metric.reset_state()
        record["learning_rate"] = learning_rate(self.optimizer)
        record["skipped_steps"] = int(self.skipped_steps.numpy())
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale.scale.numpy())
        record["examples_per_sec"] = self.examples / elapsed
        record["steps_per_sec"] = self.steps / elapsed
        self.summaries.write("train", step, {"loss/total" if k == "loss" else k: v
                                             for k, v in record.items() if k != "step"})
        return record


class Evaluate(Action):
    """Evaluates every `every` steps and at the end of `fit`: the eval data (`history.eval`,
    TensorBoard eval/) and, when given, the validation data (`history.validation`,
    TensorBoard validation/). Either may be None."""

    def __init__(self, every: int | None, *, evaluate, data, steps, history, train_log,
                 validation=None):
        self.every = every
        self.evaluate = evaluate
        self.splits = [(split, data) for split, data in (("eval", data),
                                                         ("validation", validation))
                       if data is not None]
        self.steps = steps
        self.history = history
        self.train_log = train_log

    def after_loop(self, step: int, loop: LoopResult, final: bool) -> None:
        if not self.due(step, final):
            return
        for split, data in self.splits:
            results = self.evaluate(data, steps=self.steps, split=split)
            getattr(self.history, split).append({"step": step, **flatten_results(results)})
            logging.info("step %d %s: %s", step, split, format_results(results))
        self.train_log.restart_clock()


class Diagnose(Action):
    """Each task's weight, gradient norm on the shared variables and pairwise cosines, on a
    fixed batch (from a separate iterator: the training stream is not disturbed)."""

    def __init__(self, every: int, *, diagnostics, batch, tasks, history, summaries):
        self.every = every
        self.diagnostics = diagnostics
        self.batch = batch
        self.names = [t.name for t in tasks]
        self.history = history
        self.summaries = summaries

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0

    def after_loop(self, step: int, loop: LoopResult, final: bool) -> None:
        if not self.due(step, final):
            return
        norms, cosine, weights = (t.numpy() for t in self.diagnostics(self.batch))
        record = {"step": step}
        for i, name in enumerate(self.names):
            record[f"{name}/weight"] = float(weights[i])
            record[f"{name}/grad_norm"] = float(norms[i])
            for j in range(i + 1, len(self.names)):
                record[f"cosine/{name}__{self.names[j]}"] = float(cosine[i, j])
        self.summaries.write("train", step, {f"diagnostics/{k}": v for k, v in record.items()
                                             if k != "step"})
        self.history.diagnostics.append(record)


class Save(Action):
    """A checkpoint every `every` steps and at the end of `fit`."""

    def __init__(self, every: int | None, *, save):
        self.every = every
        self.save = save

    def after_loop(self, step: int, loop: LoopResult, final: bool) -> None:
        if self.due(step, final):
            self.save()


class Unfreeze(Action):
    """Unfreezes the scheduled backbone layers once the global step reaches `at`."""

    def __init__(self, at: int | None, *, unfreeze):
        self.at = at
        self.unfreeze = unfreeze

    def next_boundary(self, step: int) -> int | None:
        return self.at if self.at is not None and self.at > step else None

    def before_loop(self, step: int) -> None:
        if self.at is not None and step >= self.at:
            self.unfreeze()
            self.at = None


def flatten_results(results: dict) -> dict:
    return {f"{task}/{name}": value for task, values in results.items()
            for name, value in values.items()}


def format_results(results: dict) -> str:
    return "; ".join(f"{task}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                     for task, values in results.items())


def learning_rate(optimizer) -> float:
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return math.nan

