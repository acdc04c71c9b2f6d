"""Applying an update's gradients: one `apply_gradients` per optimizer group, after clipping
the whole update's gradient to `clip_norm` (its global norm taken after the sum over replicas,
as on one device). A weighting method's own variables are not clipped.
"""

from __future__ import annotations

import tensorflow as tf


class OptimizerApply:
    """Applies one update's gradients (replica context), one `apply_gradients` per optimizer
    group (`mtl.training.finetune.optimizer_groups`): each variable goes to the optimizer of
    its group; the user's optimizer ("optimizer") is applied last, after the groups whose
    learning-rate schedule follows its step."""

    def __init__(self, groups: dict, clip_norm: float | None = None, unclipped=()):
        self.groups = [(optimizer, {id(v) for v in variables})
                       for name, (optimizer, variables) in groups.items() if name != "optimizer"]
        self.groups.append((groups["optimizer"][0], None))  # None: every other variable
        self.clip_norm = clip_norm
        self.unclipped = {id(v) for v in unclipped}  # a weighting method's own variables

    def _clip(self, pairs):
        """Scales the model's gradients by min(1, clip_norm / |g|), |g| the global norm of the
        whole update's gradient: the replicas' parts are summed first (Keras's clipnorm clips
        each replica's part before the sum, which is not the one-device clipping)."""
        clipped = [i for i, (_, v) in enumerate(pairs) if id(v) not in self.unclipped]
        local = [tf.convert_to_tensor(pairs[i][0]) for i in clipped]
        context = tf.distribute.get_replica_context()
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local) if context else local
        norm = tf.linalg.global_norm(total)
        factor = tf.minimum(1.0, tf.math.divide_no_nan(tf.constant(self.clip_norm, norm.dtype),
                                                       norm))
        factor = tf.where(norm > 0.0, factor, 1.0)
        pairs = list(pairs)
        for i, g in zip(clipped, local):
            pairs[i] = (g * tf.cast(factor, g.dtype), pairs[i][1])
        return pairs

    def __call__(self, pairs) -> None:
        # tf.identity: every gradient a tensor of this graph (some are captured from outside
        # the cond that decides whether to apply), as Keras's all-reduce requires.
        remaining = [(tf.identity(g), v) for g, v in pairs]
        if self.clip_norm:
            remaining = self._clip(remaining)
        for optimizer, ids in self.groups:
            mine = remaining if ids is None else [(g, v) for g, v in remaining if id(v) in ids]
            remaining = [] if ids is None else [(g, v) for g, v in remaining if id(v) not in ids]
            if mine:
                optimizer.apply_gradients(mine)
