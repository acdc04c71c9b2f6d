"""What `Trainer.fit` reports: the `History` it returns, and the `NonFiniteError` it raises when
a task's loss or the gradient becomes NaN or inf."""

from __future__ import annotations

import dataclasses

import numpy as np

from mtl.step import UpdateStats


@dataclasses.dataclass
class History:
    """What `fit` saw: one record per logging interval and one per evaluation.

    Train records: `{"step", "loss", "<task>/loss", "<task>/<metric>", "learning_rate",
    "skipped_steps", "loss_scale" (float16 only), "examples_per_sec", "steps_per_sec"}`; eval
    records: `{"step", "<task>/loss", "<task>/<metric>"}`; validation records (when `fit` is
    given validation data), the same on the validation data; diagnostics records (every
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


class NonFiniteError(FloatingPointError):
    """A task loss or gradient became NaN or inf; raised before the bad update is applied."""


def nonfinite_error(tasks, stats: UpdateStats, step: int, latest: str | None) -> NonFiniteError:
    """The error that stops training after the update of step `step + 1` was found non-finite
    (`stats`: that update's statistics; `latest`: the last checkpoint written, if any)."""
    losses = stats.task_losses
    bad = [t.name for t, v in zip(tasks, losses) if not np.isfinite(v)]
    what = (f"non-finite loss in task(s) {bad}" if bad else
            "non-finite gradient (task losses were finite: "
            + ", ".join(f"{t.name}={v:.4g}" for t, v in zip(tasks, losses)) + ")")
    return NonFiniteError(
        f"Training stopped at step {step + 1}: {what}; the update was not "
        f"applied. Last good checkpoint: {latest or 'none'}. "
        + ("A NaN/inf label or prediction, or a class id outside the head's classes, makes "
           "a task's loss non-finite. " if bad else "")
        + "Use on_nonfinite='skip' (--on_nonfinite=skip) to drop such steps instead.")
