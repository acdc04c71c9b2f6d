"""Loss-based methods whose task weights change by a rule of their own (one backward pass):
`uncertainty` (learned log-variances, Kendall et al.), `dwa` (from each loss's rate of change
over periods, Liu et al.), `rlw` (random weights each step, Lin et al.) and `famo` (logits
moved by the change of the log losses, Liu et al.). Fixed scalarisations of the losses
(`equal`, `gls`, `stch`) are in `loss_scalarisations`.

Distribution. `combine` receives this replica's share of each task loss and must be *linear in
the shares*: every weight that depends on the losses is computed from `context.global_losses`
(the same on every replica) and held constant (`stop_gradient`); a term that is not a task-loss
share (uncertainty's log-variance regulariser) is divided by `context.num_replicas`. Then a
multi-replica step computes exactly the single-device gradient. Without a context (one device)
the losses themselves are global.

Every method multiplies its adaptive weight by the task's fixed `Task.weight`.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl.weighting.base import (LossWeighting, SeededDraws, StepContext, check_option,
                                global_losses, is_int, is_number, state_variable)


class Uncertainty(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Each task has a learned log-variance s_t = log sigma_t^2 (a trainable variable, trained by
    the model's optimizer; the trainer adds `trainable_variables` of the method to the
    optimizer's list). Two forms (`form`):

        "standard":  total = sum_t w_t * (exp(-s_t) * L_t + s_t)
        "half":      total = sum_t w_t * (exp(-s_t) * L_t / 2 + s_t / 2)

    "half" is the paper's Gaussian-likelihood form, 1 / (2 sigma^2) L + log sigma, which LibMTL
    applies to every task; "standard" drops the common factor 1/2 (the form of most other
    public implementations): the same optimum s_t = log L_t, gradients twice as large. (The
    paper's classification term, 1 / sigma^2 L + log sigma, mixes the two per task; it is not
    offered.) d total / d s_t vanishes at s_t = log L_t: the learned weight tends to 1 / L_t
    ("standard") or 1 / (2 L_t) ("half"). The s_t term is not a task-loss share, so each
    replica adds its 1 / num_replicas part (the replicas' gradients are summed). s_t starts at 0.

    Options:
      form: "standard" (default; the common implementations) or "half" (the paper's
        regression form; LibMTL).

    Cost: as `equal` (one backward pass); T extra trainable scalars.
    """

    name = "uncertainty"
    needs_global_losses = False
    FORMS = ("standard", "half")

    def __init__(self, form: str = "standard"):
        super().__init__()
        check_option(form in self.FORMS, self.name, "form", form, f"one of {self.FORMS}")
        self.form = form
        self._factor = 1.0 if form == "standard" else 0.5

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self.log_variances = tf.Variable(tf.zeros([self.num_tasks]), trainable=True,
                                         name="log_variances")

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        num_replicas = 1 if context is None else context.num_replicas
        s = self.log_variances
        return tf.reduce_sum(self.task_weights * self._factor * (
            tf.exp(-s) * losses + s / num_replicas))

    def weights(self) -> tf.Tensor:
        return self.task_weights * self._factor * tf.exp(
            -tf.convert_to_tensor(self.log_variances))


class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019), with periods of `period` steps in place of epochs.

        lambda_t = T * softmax_t(r / temperature),  r_t = Lbar_t(k-1) / Lbar_t(k-2)

    where Lbar_t(k) is task t's mean global loss over period k; lambda = 1 during the first two
    periods. The running sum of the current period and the means of the last two complete
    periods live in variables (checkpointed); weights change only at period boundaries.

    Options:
      period: steps per period (an int >= 1); default 100 (ours: the paper's period is an
        epoch; set it to the steps of one).
      temperature: the softmax temperature (> 0); default 2, the paper's and LibMTL's.

    Cost: as `equal`.
    """

    name = "dwa"

    def __init__(self, period: int = 100, temperature: float = 2.0):
        super().__init__()
        check_option(is_int(period) and period >= 1, self.name, "period", period,
                     "an integer >= 1 (steps)")
        check_option(is_number(temperature) and temperature > 0, self.name, "temperature",
                     temperature, "a number > 0")
        self.period = int(period)
        self.temperature = float(temperature)

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        t = self.num_tasks
        self.period_loss_sum = state_variable(tf.zeros([t]), "period_loss_sum")
        self.period_step = state_variable(0, "period_step", tf.int64)
        # Row 0: mean losses of the last complete period (k-1); row 1: the one before (k-2).
        self.period_means = state_variable(tf.ones([2, t]), "period_means")
        self.periods_done = state_variable(0, "periods_done", tf.int64)
        self._create_last_weights()

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        current = global_losses(losses, context)
        means = tf.convert_to_tensor(self.period_means)
        ratio = tf.math.divide_no_nan(means[0], means[1])
        adaptive = self.num_tasks * tf.nn.softmax(ratio / self.temperature)
        adaptive = tf.where(self.periods_done >= 2, adaptive, tf.ones_like(adaptive))
        weights = self._record_weights(self.task_weights * adaptive)

        loss_sum = self.period_loss_sum + current
        steps = self.period_step + 1
        complete = steps >= self.period
        self.period_means.assign(tf.where(
            complete, tf.stack([loss_sum / self.period, means[0]]), means))
        self.period_loss_sum.assign(tf.where(complete, tf.zeros_like(loss_sum), loss_sum))
        self.period_step.assign(tf.where(complete, tf.zeros_like(steps), steps))
        self.periods_done.assign_add(tf.cast(complete, tf.int64))
        return tf.reduce_sum(weights * losses)


class RLW(SeededDraws, LossWeighting):
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR
    2022): each step, lambda = softmax(z) with z ~ N(0, I_T).

    z is drawn with a stateless op seeded by (`seed`, the method's own step counter): every
    replica draws the same z, and a resumed run draws what the uninterrupted run would.

    Options:
      seed: an int.

    Cost: as `equal`.
    """

    name = "rlw"
    needs_global_losses = False

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        self._create_last_weights()

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        del context
        z = tf.random.stateless_normal([self.num_tasks], seed=self._next_seed())
        weights = self._record_weights(self.task_weights * tf.nn.softmax(z))
        return tf.reduce_sum(weights * losses)


class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (Liu, Liu, Stone & Liu, NeurIPS 2023).

    Task logits xi (a variable, start 0), z = softmax(xi). The paper's objective at step k is
    sum_t (z_t / c) log(L_t - m_t),  c = sum_t z_t / (L_t - m_t) held constant, whose gradient is

        sum_t lambda_t dL_t,   lambda_t = (z_t / D_t) / sum_j (z_j / D_j),   D_t = L_t - m_t + 1e-8

    (m_t = `min_losses`, a lower bound of task t's loss). `combine` returns
    sum_t w_t lambda_t * share_t with lambda from the global losses: the same gradient (and, on
    one device, a value whose gradient equals the paper's), exact under distribution.

    Update of xi, done at the start of `combine` from the global losses of this step and the
    stored ones of the previous step (as the authors' toy script does; their image experiments
    instead re-evaluate the same batch after the update, an extra forward pass this saves):

        delta_t = log D_t(k-1) - log D_t(k),   grad_xi = J_softmax(xi)^T delta
                = z * (delta - z . delta),     xi <- Adam(lr=w_lr, L2 weight decay=gamma)

    following the official implementation (torch Adam with `weight_decay=gamma`; the paper
    writes plain gradient descent xi <- xi - w_lr (grad_xi + gamma xi)). Nothing is updated at the
    first call. A task with L_t <= m_t (e.g. loss 0 when it has no label in the batch, with the
    default m_t = 0) gets lambda_t = 0 and contributes delta_t = 0. The official code also clips
    the gradient's norm at 1 (its `--max_norm`): for that form pass the trainer's
    `clip_norm=1` (`--clip_norm=1`), which clips the whole update's gradient across replicas.

    Options:
      gamma: decay of the logits (>= 0), official default 0.01 (the authors' toy problem, whose
        objective does not change, uses 0).
      w_lr: learning rate of the logits (> 0), official default 0.025.
      min_losses: a number, or one per task: lower bounds m_t of the losses; default 0, the
        official code's.

    State: logits, Adam moments and step, previous losses, a has-previous flag.
    Cost: as `equal` (T-sized updates).
    """

    name = "famo"

    def __init__(self, gamma: float = 0.01, w_lr: float = 0.025,
                 min_losses: float | Sequence[float] = 0.0):
        super().__init__()
        check_option(is_number(gamma) and gamma >= 0, self.name, "gamma", gamma,
                     "a number >= 0")
        check_option(is_number(w_lr) and w_lr > 0, self.name, "w_lr", w_lr, "a number > 0")
        numbers_ok = is_number(min_losses) or (
            isinstance(min_losses, (list, tuple)) and all(is_number(m) for m in min_losses))
        check_option(numbers_ok, self.name, "min_losses", min_losses,
                     "a number or a sequence of numbers, one per task")
        self.gamma = float(gamma)
        self.w_lr = float(w_lr)
        # A number, or a tuple of numbers checked against the task count in `build`.
        self._min_losses_option = (float(min_losses) if is_number(min_losses)
                                   else tuple(float(m) for m in min_losses))

    def build(self, task_names: Sequence[str], task_weights: Sequence[float]) -> None:
        super().build(task_names, task_weights)
        t = self.num_tasks
        if isinstance(self._min_losses_option, float):
            self.min_losses = tf.fill([t], self._min_losses_option)
        else:
            given = list(self._min_losses_option)
            check_option(len(given) == t, self.name, "min_losses", given,
                         f"{t} numbers, one per task {list(self.task_names)}")
            self.min_losses = tf.constant(given)
        self.logits = state_variable(tf.zeros([t]), "logits")
        self.adam_m = state_variable(tf.zeros([t]), "adam_m")
        self.adam_v = state_variable(tf.zeros([t]), "adam_v")
        self.adam_step = state_variable(0.0, "adam_step")
        self.previous_losses = state_variable(tf.zeros([t]), "previous_losses")
        self.has_previous = state_variable(0.0, "has_previous")  # 1.0 after the first call.
        self._create_last_weights()

    def _update_logits(self, current: tf.Tensor, present: tf.Tensor) -> None:
        """One Adam step on the logits from the change of log losses since the last call."""
        previous = tf.convert_to_tensor(self.previous_losses)
        has_previous = self.has_previous > 0.0
        usable = present & (previous > self.min_losses) & has_previous
        delta = tf.where(usable, self._log_gap(previous) - self._log_gap(current), 0.0)
        logits = tf.convert_to_tensor(self.logits)
        z = tf.nn.softmax(logits)
        gradient = z * (delta - tf.reduce_sum(z * delta)) + self.gamma * logits
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        step = self.adam_step + 1.0
        m = beta1 * self.adam_m + (1.0 - beta1) * gradient
        v = beta2 * self.adam_v + (1.0 - beta2) * tf.square(gradient)
        m_hat, v_hat = m / (1.0 - beta1 ** step), v / (1.0 - beta2 ** step)
        new_logits = logits - self.w_lr * m_hat / (tf.sqrt(v_hat) + eps)
        # Before the first call there is no previous loss: leave everything unchanged.
        self.logits.assign(tf.where(has_previous, new_logits, logits))
        self.adam_m.assign(tf.where(has_previous, m, self.adam_m))
        self.adam_v.assign(tf.where(has_previous, v, self.adam_v))
        self.adam_step.assign(tf.where(has_previous, step, self.adam_step))

    def _log_gap(self, losses: tf.Tensor) -> tf.Tensor:
        return tf.math.log(tf.maximum(losses - self.min_losses, 0.0) + 1e-8)

    def combine(self, losses: tf.Tensor, context: StepContext | None = None) -> tf.Tensor:
        current = global_losses(losses, context)
        present = current > self.min_losses
        self._update_logits(current, present)
        z = tf.nn.softmax(tf.convert_to_tensor(self.logits))
        gap = tf.maximum(current - self.min_losses, 0.0) + 1e-8
        ratios = tf.where(present, z / gap, 0.0)
        adaptive = tf.math.divide_no_nan(ratios, tf.reduce_sum(ratios))
        weights = self._record_weights(self.task_weights * adaptive)
        self.previous_losses.assign(current)
        self.has_previous.assign(1.0)
        return tf.reduce_sum(weights * losses)
