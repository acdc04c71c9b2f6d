"""A deliberately plain reference of one update, written from the semantics in the README ("How
a step works") and sharing no code with `mtl/step/` (the compiled update): eager, one device,
float32, no `tf.function`, no strategy, the whole update batch at once, each task gradient by
its own backward pass.

    weights = reference_updates(model, tasks, method, optimizer, update_batches, ...)

`model` is a `MultiTaskModel` (the reference trains it in place), `method` a built
`mtl.weighting` object (only its public `combine` / `aggregate` / `weights_from_gramian` are
called), `update_batches` a list of whole update batches `(x, labels, sample_weights)`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import mtl


def per_example_loss(kind: str, label, output):
    """The loss of each example, [n] float32, written out."""
    output = tf.cast(output, tf.float32)
    if kind == "sparse_ce":
        log_probs = tf.nn.log_softmax(output, axis=-1)
        picked = tf.gather(log_probs, tf.cast(label, tf.int32), axis=1, batch_dims=1)
        return -picked
    if kind == "mse":
        return tf.reduce_mean(tf.square(tf.reshape(tf.cast(label, tf.float32), [-1, 1])
                                        - output), axis=-1)
    raise ValueError(kind)


def task_loss(kind, label, output, weight):
    """Weighted mean over the labelled examples (weight > 0); 0 when none is labelled."""
    keep = weight > 0
    label, output, weight = (tf.boolean_mask(label, keep), tf.boolean_mask(output, keep),
                             tf.boolean_mask(weight, keep))
    if int(tf.size(weight)) == 0:
        return tf.constant(0.0)
    return tf.reduce_sum(weight * per_example_loss(kind, label, output)) / tf.reduce_sum(weight)


def forward(model, x, frozen_backbone: bool):
    features = model.backbone(x, training=not frozen_backbone)
    return {name: head(features, training=True) for name, head in model.heads.items()}, features


def _shared_by_gradients(model, tasks, batch):
    """(variables that two or more task losses reach, the others), in the model's order."""
    x, labels, weights = batch
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=True)
        losses = [task_loss(kind, labels[name], outputs[name], weights[name])
                  for name, kind, _ in tasks]
    variables = list(model.trainable_variables)
    reached = [sum(g is not None for g in (tape.gradient(loss, v) for loss in losses))
               for v in variables]
    del tape
    return ([v for v, n in zip(variables, reached) if n > 1],
            [v for v, n in zip(variables, reached) if n <= 1])


def reference_updates(model, tasks, method, optimizer, update_batches, *, mode="exact",
                      frozen_backbone=False, skip=(), group_methods=None, clip_norm=None,
                      clipped=None, scope_top=None):
    """Applies one update per whole update batch, except those whose index is in `skip` (the
    update changes nothing: neither the weights nor the method's state). `tasks` are
    (name, loss kind, Task.weight) triples. `clip_norm`: the model's gradient is scaled to at
    most that global norm (the method's own variables are not); `clipped`, a list, gets
    whether each update was clipped. `scope_top`: partial Jacobian, the method's weights from
    the Gramian of the task gradients of the last N shared layers only."""
    names = [name for name, _, _ in tasks]
    fixed = tf.constant([w for _, _, w in tasks], tf.float32)
    soft = getattr(model, "backbone", None) is None  # a soft-sharing architecture
    if soft:
        # Shared: the variables that more than one task's loss reaches (found by
        # differentiating each task's loss, not by reading the graph as mtl does).
        backbone_vars, head_vars = _shared_by_gradients(model, tasks, update_batches[0])
    else:
        backbone_vars = list(model.backbone.trainable_variables)
        head_vars = [v for name in names for v in model.heads[name].trainable_variables]
    method_vars = list(method.trainable_variables)
    is_loss_method = isinstance(method, mtl.weighting.LossWeighting)
    for index, (x, labels, weights) in enumerate(update_batches):
        if index in skip:
            continue
        with tf.GradientTape(persistent=True) as tape:
            if soft:
                outputs, features = model(x, training=True), None
            else:
                outputs, features = forward(model, x, frozen_backbone)
            losses = tf.stack([task_loss(kind, labels[name], outputs[name], weights[name])
                               for name, kind, _ in tasks])
            reg = tf.add_n(model.losses) if model.losses else tf.constant(0.0)
            rows = [fixed[i] * losses[i] for i in range(len(tasks))]
            plain_objective = tf.add_n(rows) + reg
            if is_loss_method:
                objective = method.combine(losses) + reg
        if is_loss_method:
            variables = backbone_vars + head_vars + method_vars
            gradients = tape.gradient(objective, variables)
        elif not backbone_vars:
            # Nothing shared to combine: every variable gets its task's gradient.
            variables = head_vars
            gradients = tape.gradient(plain_objective, head_vars)
        else:
            variables = backbone_vars + head_vars
            heads = tape.gradient(plain_objective, head_vars)
            reg_shared = [g if g is not None else tf.zeros_like(v) for g, v in zip(
                tape.gradient(reg, backbone_vars), backbone_vars)]
            context = mtl.weighting.StepContext(global_losses=tf.stop_gradient(losses))
            if mode == "exact" and scope_top:
                layers = list(dict.fromkeys(v.path.rsplit("/", 1)[0] for v in backbone_vars))
                scope = [v for v in backbone_vars
                         if v.path.rsplit("/", 1)[0] in layers[-scope_top:]]
                jacobian = np.stack([np.concatenate([tape.gradient(row, v).numpy().ravel()
                                                     for v in scope]) for row in rows])
                gram = jacobian.astype(np.float64) @ jacobian.T.astype(np.float64)
                w = method.weights_from_gramian(tf.constant(gram), context)
                shared = tape.gradient(rows, backbone_vars,
                                       output_gradients=[w[i] for i in range(len(rows))])
            elif mode == "exact" and group_methods:
                # Each layer's variables combined on their own, by that layer's method.
                shared = [None] * len(backbone_vars)
                for layer, layer_method in group_methods.items():
                    members = [i for i, v in enumerate(backbone_vars)
                               if v.path.rsplit("/", 1)[0] == layer]
                    jacobian = tf.stack([tf.concat([tf.reshape(tape.gradient(row, backbone_vars[i]),
                                                               [-1]) for i in members], 0)
                                         for row in rows])
                    direction = layer_method.aggregate(jacobian, context)
                    sizes = [int(np.prod(backbone_vars[i].shape)) for i in members]
                    for i, d in zip(members, tf.split(direction, sizes)):
                        shared[i] = tf.reshape(d, backbone_vars[i].shape)
            elif mode == "exact":
                jacobian = tf.stack([tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(
                    row, backbone_vars)], 0) for row in rows])
                direction = method.aggregate(jacobian, context)
                sizes = [int(np.prod(v.shape)) for v in backbone_vars]
                shared = [tf.reshape(d, v.shape) for d, v in
                          zip(tf.split(direction, sizes), backbone_vars)]
            elif getattr(method, "rep_form", "gramian") == "masks":
                # GradDrop: each task's representation gradient [B, D], times sign(A), summed
                # over the batch -> the method's masks [T, D] -> upstream sum_t m_t * g_t.
                per_task = [tf.reshape(tape.gradient(row, features), [len(x), -1])
                            for row in rows]
                signs = tf.reshape(tf.sign(features), [len(x), -1])
                masks = method.masks_from_rep(tf.stack([tf.reduce_sum(g * signs, 0)
                                                        for g in per_task]))
                upstream = tf.add_n([masks[t][None, :] * g for t, g in enumerate(per_task)])
                shared = tape.gradient(features, backbone_vars,
                                       output_gradients=tf.reshape(upstream, features.shape))
            else:
                jacobian = tf.stack([tf.reshape(tape.gradient(row, features), [-1])
                                     for row in rows])
                w = method.weights_from_gramian(tf.matmul(jacobian, jacobian, transpose_b=True),
                                                context)
                # The gradient of sum_t w_t row_t, w held constant.
                shared = tape.gradient(rows, backbone_vars,
                                       output_gradients=[w[i] for i in range(len(rows))])
            gradients = [s + r for s, r in zip(shared, reg_shared)] + heads
        del tape
        if clip_norm:
            model_ids = {id(v) for v in backbone_vars + head_vars}
            norm = float(np.sqrt(sum(float(tf.reduce_sum(tf.square(g)))
                                     for g, v in zip(gradients, variables)
                                     if g is not None and id(v) in model_ids)))
            factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
            gradients = [g * factor if g is not None and id(v) in model_ids else g
                         for g, v in zip(gradients, variables)]
            if clipped is not None:
                clipped.append(factor < 1.0)
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables)
                                   if g is not None])
    return model
