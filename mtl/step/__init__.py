"""The compiled train step and the parts it is composed of, chosen once at construction.

Reference semantics (README "How a step works"). One update is K micro-batches on R replicas:

  1. each task's loss is the weighted mean over the labelled examples of the whole update
     batch (all K micro-batches, all replicas): `task_losses.compute_task_losses`;
  2. the weighting method is applied once per update to what the whole batch gives it (the task
     losses; the per-task gradients of the shared variables; in rep mode the Gramian of the
     per-task gradients w.r.t. the shared representation); its state advances once, and its own
     trainable variables get the whole batch's gradient once: the gradient sources
     (`weighted.WeightedGradients`, `exact.JacobianRows`);
  3. regularisation losses are not a task: their gradient is added once, after the method has
     combined the task gradients; task-specific variables get their own task's gradient;
  4. frozen variables are not trained and a frozen backbone runs in inference mode;
  5. an update that is not applied (non-finite, float16 overflow) changes nothing: not the
     weights, not the method's state, not the layer state its forward pass moved (BatchNorm's
     moving statistics, Dropout's RNG), not the train metrics or logged means: `update_policy`
     judges, `train_step.TrainStep` restores;
  6. one `apply_gradients` per update (the backbone's own optimizer for its variables when it
     has a learning-rate multiplier): `apply.OptimizerApply`.

Where each axis is decided: the weighting family (`method.consumes`) and the gradient mode in
`plan` (`plan.gradient_source`, the one reader of the family); micro-batches in
`parts.accumulator` and the sources' `compute`; replicas in the sources' reductions; precision
and the non-finite policy in `update_policy.UpdatePolicy`; freezing in `parts.Forward`; the
optimizers in `apply.OptimizerApply`. What an update reports besides its gradients is
`parts.UpdateStats`, read by name. Only `mtl.step` builds `tf.function`s (`train_step.TrainStep`
and, under `jit_compile`, the sources' forward and backward pass); everything with Python side
effects lives in `mtl.training.trainer`.

Modules: `train_step` (TrainStep), `apply` (OptimizerApply), `plan` (checks, granularity,
Jacobian scope, the choice of source), `source` (what the sources share), `weighted` and
`exact` (the two sources), `decisions` (the weights a weighted sum follows), `task_jacobian`
(per-task gradients in chunks), `parts` (Forward, accumulators, UpdateStats, layer state),
`task_losses`, `update_policy`.
"""

from mtl.step import plan
from mtl.step.apply import OptimizerApply
from mtl.step.parts import UpdateStats, layer_state, seed_states, unique_variables
from mtl.step.plan import shared_variables
from mtl.step.train_step import LoopOutputs, TrainStep
from mtl.step.update_policy import LossScale, UpdatePolicy

__all__ = ["LoopOutputs", "LossScale", "OptimizerApply", "TrainStep", "UpdatePolicy",
           "UpdateStats", "layer_state", "plan", "seed_states", "shared_variables",
           "unique_variables"]
