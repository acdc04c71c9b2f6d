"""The per-task gradients of a set of variables: the task Jacobian [T, P], computed in chunks
of tasks, and how many tasks' backward passes run at once by default.

Shapes: a list of per-variable gradients [T, *shape_i] flattens to [T, P] (P the variables'
total size, in their order); a direction [P] unflattens to one tensor per variable.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


def flatten_gradients(gradients: Sequence[tf.Tensor], num_tasks: int) -> tf.Tensor:
    """[g_1, ..., g_n] (each [num_tasks, *shape_i]) -> [num_tasks, num_params] float32."""
    return tf.concat([tf.reshape(tf.cast(g, tf.float32), [num_tasks, -1]) for g in gradients],
                     axis=1)


def unflatten(direction: tf.Tensor, variables: Sequence[tf.Variable]) -> list[tf.Tensor]:
    """[num_params] -> one tensor per variable, in the variables' shapes."""
    sizes = [int(np.prod(v.shape)) for v in variables]
    return [tf.reshape(part, v.shape) for part, v in zip(tf.split(direction, sizes), variables)]


def task_jacobian(tape, rows, variables, scale, dtype, chunk_size: int) -> tf.Tensor:
    """The (loss-scaled) rows' gradients w.r.t. `variables`, unscaled, as [T, P] in `dtype`.

    chunk_size >= T: one batched Jacobian (pfor): every task's backward pass vectorised at
    once, holding T copies of the activation gradients. chunk_size < T: a loop over the tasks
    with at most `chunk_size` of their backward passes in flight (a `tf.while_loop`, one
    instance of the backward graph), so the memory is bounded in the chunk, not in T.
    """
    num_tasks = int(rows.shape[0])
    batched = chunk_size >= num_tasks
    jacobian = tape.jacobian(rows, variables, experimental_use_pfor=batched,
                             parallel_iterations=None if batched else chunk_size,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.cast(flatten_gradients(jacobian, num_tasks) / scale, dtype)


#: The least extra memory the per-task backward passes may take by default (see
#: `default_chunk_size`): TensorFlow's own runtime takes more than this.
MIN_CHUNK_BUDGET_BYTES = 256 * 2 ** 20
#: The per-task backward passes may hold this many forward passes' activations by default.
CHUNK_BUDGET_FORWARD_PASSES = 4


def default_chunk_size(num_tasks: int, activation_bytes: float) -> int:
    """Tasks whose backward passes run at once when `jacobian_chunk_size` is not set.

    `activation_bytes`: one forward pass's activations (per replica and micro-batch), an upper
    bound on what one task's backward pass holds (measured on the 64x64 resnet: ~0.5 of it per
    batched task). The per-task passes may hold `CHUNK_BUDGET_FORWARD_PASSES` forward passes'
    activations (at least `MIN_CHUNK_BUDGET_BYTES`), about as much again as `equal` needs:
    every task batched (one pfor Jacobian) when that fits, else a loop with the largest number
    of tasks in flight that does (at least 1).
    """
    budget = max(CHUNK_BUDGET_FORWARD_PASSES * activation_bytes, MIN_CHUNK_BUDGET_BYTES)
    if num_tasks * activation_bytes <= budget:
        return num_tasks
    return int(max(1, min(num_tasks - 1, budget // max(activation_bytes, 1))))


def _flat_layers(model) -> list:
    """The layers of a (nested) Functional model in their graph order, sub-models opened."""
    layers = []
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, tf.keras.Model) and getattr(layer, "layers", None):
            layers.extend(_flat_layers(layer))
        else:
            layers.append(layer)
    return layers


def activation_elements(model, from_variables=None) -> int:
    """Elements of the layer outputs of a (nested) Functional model, per example: of every
    layer, or (`from_variables`) of the layers from the first one that owns one of them on,
    which a backward pass to those variables goes through."""
    wanted = None if from_variables is None else {id(v) for v in from_variables}
    total = 0
    for layer in _flat_layers(model):
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue  # the inputs: no layer's output, and counted once per nesting
        if wanted is not None:
            if not any(id(v) in wanted for v in layer.weights):
                continue
            wanted = None  # the backward pass reaches this layer and everything after it
        for node in getattr(layer, "_inbound_nodes", ()):
            for tensor in tf.nest.flatten(getattr(node, "outputs", ())):
                shape = getattr(tensor, "shape", None)
                if shape is not None and None not in tuple(shape[1:]):
                    total += int(np.prod(tuple(shape[1:])))
    return total
