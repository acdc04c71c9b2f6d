"""Loss-based methods that are one fixed scalarisation of the task losses, whose gradient the
step takes (one backward pass): `equal` (the weighted sum), `gls` (the weighted geometric mean,
Chennupati et al.) and `stch` (the smooth Tchebycheff scalarisation against a reference point
measured after a warm-up, Lin et al.). Methods whose weights follow a rule of their own
(learned, random, from the losses' rates of change) are in `loss_dynamic_weights`.

Distribution. `combine` receives this replica's share of each task loss (the shares of all
replicas sum to the global-batch loss) and returns a scalar whose gradient, summed across
replicas, is the update direction. So a method must be *linear in the shares*: every weight that
depends on the losses is computed from `context.global_losses` (the same on every replica) and
held constant (`stop_gradient`). Then a multi-replica step computes exactly the single-device
gradient of the scalarisation. Without a context (one device) the losses themselves are global.

Every method multiplies its weight by the task's fixed `Task.weight`, except `gls`, where
`Task.weight` is the task's exponent in the weighted geometric mean.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting.base import (LossWeighting, StepContext, check_option, global_losses, is_int,
                                is_number, state_variable)


class Equal(LossWeighting):
    """The sum of the tasks' losses, each times its fixed `Task.weight` (Keras `loss_weights`).

    Linear in the losses, so combining each replica's share and summing the gradients across
    replicas gives exactly the single-device gradient of the global batch.

    Cost: one forward and one backward pass (the reference for the others).
    """

    name = "equal"
    needs_global_losses = False

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        del context
        return tf.reduce_sum(self.task_weights * losses)


class GLS(LossWeighting):
    """Geometric Loss Strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019):
    minimise the geometric mean of the task losses,

        G = prod_t L_t^(w_t / W),  W = sum_t w_t    (w_t = Task.weight; all 1: (prod L_t)^(1/T)).

    dG = sum_t (G w_t / (W L_t)) dL_t, so each replica returns
    sum_t stop_gradient(G w_t / (W L_t)) * share_t with G and L_t of the global batch: the
    summed gradient is the single-device gradient of G, and the value (summed over replicas) is
    G. Losses must be positive; a task with loss 0 (no label in the batch) is left out of the
    product for that step instead of making G = 0.

    Cost: as `equal`.
    """

    name = "gls"

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self._create_last_weights()

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        current = global_losses(losses, context)
        present = current > 0.0
        exponents = tf.where(present, self.task_weights, 0.0)
        total_exponent = tf.reduce_sum(exponents)
        log_mean = tf.math.divide_no_nan(
            tf.reduce_sum(exponents * tf.math.log(tf.where(present, current, 1.0))),
            total_exponent)
        coefficients = tf.math.divide_no_nan(tf.exp(log_mean) * exponents,
                                             total_exponent * current)
        weights = self._record_weights(coefficients)
        return tf.reduce_sum(weights * losses)


class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Zhang, Zhang & Liu, "Smooth
    Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024), as in the official
    multi-task code (Xi-L/STCH, STCH_MTL, built on LibMTL; also LibMTL's `STCH`).

    The paper's scalarisation is mu log sum_t exp(w_t (L_t - z_t) / mu), a smooth maximum. The
    official multi-task code uses w_t = 1, the log losses against a reference point measured
    after a warm-up, and a factor T:

        warm-up (epochs < warmup_epoch):   sum_t log(L_t + 1e-20)
        averaging epoch (== warmup_epoch): the same, and n = the mean of the losses seen
        after:                             T mu log sum_t exp(log(L_t / n_t + 1e-20) / mu)

    Here an epoch is `period` steps (as `dwa`): warm-up for the first `warmup_periods * period`
    steps, the reference point n averaged over the next `period` steps, then STCH. The step
    differentiates `sum_t stop_gradient(c_t) * L_t` with c_t = dObjective/dL_t from the global
    losses (log phase: 1 / (L_t + 1e-20); STCH phase: T softmax_t(l / mu) / (L_t + 1e-20 n_t)),
    times Task.weight: the official objective's gradient, exact under distribution (the
    returned value is not the objective's). A task with loss 0 (no label in the update) gets
    weight 0, is left out of the softmax, and is not averaged into n.

    Options:
      mu: smoothing parameter (> 0); default 1.0, LibMTL's `--STCH_mu`.
      warmup_periods: warm-up epochs (an int >= 0); default 4, LibMTL's `--STCH_warmup_epoch`.
      period: steps per epoch (an int >= 1); default 100 (as `dwa`; set it to the steps of an
        epoch to follow the official code exactly).

    State: step count, the running sum and count of the losses, the reference point n.
    Cost: as `equal`.
    """

    name = "stch"

    def __init__(self, mu: float = 1.0, warmup_periods: int = 4, period: int = 100):
        super().__init__()
        check_option(is_number(mu) and mu > 0, self.name, "mu", mu, "a number > 0")
        check_option(is_int(warmup_periods) and warmup_periods >= 0, self.name,
                     "warmup_periods", warmup_periods, "an integer >= 0")
        check_option(is_int(period) and period >= 1, self.name, "period", period,
                     "an integer >= 1 (steps)")
        self.mu = float(mu)
        self.warmup_periods = int(warmup_periods)
        self.period = int(period)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        t = self.num_tasks
        self.steps = state_variable(0, "steps", tf.int64)
        self.loss_sum = state_variable(tf.zeros([t]), "loss_sum")
        self.loss_count = state_variable(tf.zeros([t]), "loss_count")
        self._create_last_weights()

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        current = global_losses(losses, context)
        present = current > 0.0
        warmup_end = self.warmup_periods * self.period
        averaging = (self.steps >= warmup_end) & (self.steps < warmup_end + self.period)
        stch_phase = self.steps >= warmup_end + self.period

        ones = tf.ones_like(current)
        nadir = tf.where(self.loss_count > 0.0,
                         tf.math.divide_no_nan(self.loss_sum, self.loss_count), ones)
        log_ratio = tf.math.log(tf.where(present, current / nadir, 1.0) + 1e-20)
        logits = tf.where(present, log_ratio / self.mu, -float("inf"))
        softmax = tf.where(present, tf.nn.softmax(logits), 0.0)
        stch = self.num_tasks * softmax / (current + 1e-20 * nadir)
        log_sum = 1.0 / (current + 1e-20)
        adaptive = tf.where(present, tf.where(stch_phase, stch, log_sum), 0.0)
        weights = self._record_weights(self.task_weights * adaptive)

        take = averaging & present
        self.loss_sum.assign_add(tf.where(take, current, 0.0))
        self.loss_count.assign_add(tf.where(take, 1.0, 0.0))
        self.steps.assign_add(1)
        return tf.reduce_sum(weights * losses)
