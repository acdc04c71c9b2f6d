"""The Keras layers of the soft-sharing architectures: the task gates (`SoftmaxGate` of MMoE, CGC
and PLE, `DSelectKGate` of DSelect-k), the gated `ExpertMixture`, the `CrossStitch` unit and
MTAN's `AttentionMask`.

Each is registered with Keras under the package "mtl" (`mtl>SoftmaxGate`, ...): a model
written with them (a Keras config, a `.keras` file) is read back by those names, so the names
are part of the format of every recorded model and stay as they are.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

#: Added inside logarithms and divisions of DSelect-k's regularisers (as the official code's
#: EPSILON), so that a selector at exactly 0 or 1 stays finite.
EPSILON = 1e-6


def smooth_step(t, gamma: float = 1.0):
    """DSelect-k's smooth step (Hazimeh et al. 2021, eq. 3), elementwise:

        S(t) = 0                                      if t <= -gamma/2
               -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2   if -gamma/2 < t < gamma/2
               1                                      if t >= gamma/2

    Continuously differentiable; exactly 0 or 1 outside [-gamma/2, gamma/2], where its gradient
    is 0, so a selector that has reached 0 or 1 stays there (the source of exact sparsity).
    """
    t = ops.convert_to_tensor(t)
    cubic = (-2.0 / gamma ** 3) * t ** 3 + (3.0 / (2.0 * gamma)) * t + 0.5
    return ops.where(t <= -gamma / 2, ops.zeros_like(t),
                     ops.where(t >= gamma / 2, ops.ones_like(t), cubic))


def _flatten(x):
    """[batch, ...] -> [batch, prod(...)]."""
    return ops.reshape(x, (ops.shape(x)[0], -1)) if len(x.shape) != 2 else x


@keras.saving.register_keras_serializable(package="mtl")
class SoftmaxGate(keras.layers.Layer):
    """A task's gate over `num_experts` experts (MMoE, CGC, PLE): g(x) = softmax(W flatten(x) + b).

    Input: [batch, ...] (the model input, or a level's gated output in PLE). Output:
    [batch, num_experts], each row >= 0 summing to 1. A gate over one expert is the constant 1
    and has no weights.
    """

    def __init__(self, num_experts: int, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = int(num_experts)

    def build(self, input_shape):
        if self.num_experts == 1:
            return
        features = int(np.prod(input_shape[1:]))
        self.kernel = self.add_weight(name="kernel", shape=(features, self.num_experts),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")

    def call(self, inputs):
        x = _flatten(inputs)
        if self.num_experts == 1:
            return ops.ones_like(x[:, :1])
        return ops.softmax(ops.matmul(x, self.kernel) + self.bias, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


@keras.saving.register_keras_serializable(package="mtl")
class DSelectKGate(keras.layers.Layer):
    """DSelect-k's per-example gate (Hazimeh et al., NeurIPS 2021, "example-conditioned").

    With n experts and m = ceil(log2 n) bits, each of k single-expert selectors maps the input to
    z_i = (W_z x + b_z)_i in R^m and gives expert e the weight

        r(z_i)_e = prod_j [S(z_ij) if bit j of e is 1 else 1 - S(z_ij)]     (S: `smooth_step`)

    and the gate is g(x) = sum_i softmax(W_w x + b_w)_i r(z_i): at most k experts get a non-zero
    weight once each selector's S(z_ij) have reached 0 or 1. z's weights start uniform in
    [-gamma/100, gamma/100] and the selector logits' in [-0.05, 0.05] (official code).

    n not a power of 2 (official code): only the first n of the 2^m binary codes are experts, so a
    selector's weights over the experts sum to at most 1 (the remaining mass sits on codes that
    are no expert), and the gate's row may sum to less than 1 until training has moved every
    selector onto the experts. The regulariser sum_i (1 / sum_e r(z_i)_e - 1) (the official
    code's sum_i 1 / sum_e r(z_i)_e less its minimum k, so that it reads 0 once every selector
    is on the experts) pushes them there.

    In training, the layer adds with `add_loss`, averaged over the examples of the batch:
      * `entropy_weight` x sum_i H(r(z_i)), H(p) = -sum_e p_e log(p_e + 1e-6): the paper's
        entropy regulariser, which speeds up the selectors' convergence to one expert each (the
        official code sums it over the batch; the mean here keeps the weight independent of the
        batch size);
      * the reachability term above, when n is not a power of 2.

    Input: [batch, ...]. Output: [batch, num_experts], each entry >= 0.
    """

    def __init__(self, num_experts: int, k: int, gamma: float = 1.0,
                 entropy_weight: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.num_experts, self.k = int(num_experts), int(k)
        self.gamma, self.entropy_weight = float(gamma), float(entropy_weight)
        self.num_bits = max(1, math.ceil(math.log2(self.num_experts)))
        self.power_of_2 = self.num_experts == 2 ** self.num_bits
        # Row e: the binary code of expert e, most significant bit first. [num_experts, m].
        self.codes = np.array([[int(b) for b in np.binary_repr(e, width=self.num_bits)]
                               for e in range(self.num_experts)], dtype=bool)

    def build(self, input_shape):
        features = int(np.prod(input_shape[1:]))
        z_init = keras.initializers.RandomUniform(-self.gamma / 100, self.gamma / 100)
        w_init = keras.initializers.RandomUniform(-0.05, 0.05)
        self.z_kernel = self.add_weight(name="z_kernel", initializer=z_init,
                                        shape=(features, self.k * self.num_bits))
        self.z_bias = self.add_weight(name="z_bias", shape=(self.k * self.num_bits,),
                                      initializer=z_init)
        self.w_kernel = self.add_weight(name="w_kernel", shape=(features, self.k),
                                        initializer=w_init)
        self.w_bias = self.add_weight(name="w_bias", shape=(self.k,), initializer=w_init)

    def selectors(self, inputs):
        """(selector outputs r(z_i) [batch, k, num_experts], selector weights [batch, k])."""
        x = _flatten(inputs)
        z = ops.reshape(ops.matmul(x, self.z_kernel) + self.z_bias, (-1, self.k, 1, self.num_bits))
        s = smooth_step(z, self.gamma)                                      # [batch, k, 1, m]
        codes = ops.convert_to_tensor(self.codes[None, None])               # [1, 1, n, m]
        r = ops.prod(ops.where(codes, s, 1.0 - s), axis=-1)                 # [batch, k, n]
        weights = ops.softmax(ops.matmul(x, self.w_kernel) + self.w_bias, axis=-1)
        return r, weights

    def call(self, inputs, training=None):
        r, weights = self.selectors(inputs)
        if training:
            self._add_regularisers(r)
        return ops.sum(weights[:, :, None] * r, axis=1)                     # [batch, n]

    def _add_regularisers(self, r):
        r = ops.cast(r, "float32")  # log(r + 1e-6) and 1/(sum + 1e-6) in float32 under float16.
        if self.entropy_weight:
            entropy = -ops.sum(r * ops.log(r + EPSILON), axis=(1, 2))      # [batch]
            self.add_loss(self.entropy_weight * ops.mean(entropy))
        if not self.power_of_2:
            reachable = ops.sum(r, axis=-1)                                 # [batch, k]
            self.add_loss(ops.mean(ops.sum(1.0 / (reachable + EPSILON) - 1.0, axis=-1)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "k": self.k,
                "gamma": self.gamma, "entropy_weight": self.entropy_weight}


@keras.saving.register_keras_serializable(package="mtl")
class ExpertMixture(keras.layers.Layer):
    """sum_e g[:, e] E_e: inputs `[gate [batch, n], E_0, ..., E_{n-1}]` (experts of one shape
    [batch, ...]); output: that shape."""

    def call(self, inputs):
        gate, *experts = inputs
        mixture = None
        for e, expert in enumerate(experts):
            weight = ops.cast(ops.reshape(gate[:, e], (-1,) + (1,) * (len(expert.shape) - 1)),
                              expert.dtype)
            mixture = weight * expert if mixture is None else mixture + weight * expert
        return mixture

    def compute_output_shape(self, input_shape):
        return input_shape[1]


@keras.saving.register_keras_serializable(package="mtl")
class CrossStitch(keras.layers.Layer):
    """One task's row of a cross-stitch unit (Misra et al., CVPR 2016, eq. 1):

        x~_t = sum_s alpha_ts x_s       over the tasks s (x_s: task s's activation at this layer)

    one scalar alpha_ts per pair of tasks and unit, the same for every channel and location, as
    in the paper's equation. alpha_t starts at `alpha_same` for s = t and
    (1 - alpha_same) / (T - 1) for the others (the paper's (0.9, 0.1) for two tasks; each row
    sums to 1; with one task, alpha = [1]). One layer per task keeps each task's row its own
    variable: the last unit's rows are then used by their task only.

    Inputs: T tensors of one shape, in task order. Output: that shape.
    """

    def __init__(self, task_index: int, num_tasks: int, alpha_same: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.task_index, self.num_tasks = int(task_index), int(num_tasks)
        self.alpha_same = float(alpha_same)

    def initial_alpha(self) -> np.ndarray:
        if self.num_tasks == 1:
            return np.ones([1], np.float32)
        alpha = np.full([self.num_tasks], (1.0 - self.alpha_same) / (self.num_tasks - 1),
                        np.float32)
        alpha[self.task_index] = self.alpha_same
        return alpha

    def build(self, input_shape):
        self.alpha = self.add_weight(name="alpha", shape=(self.num_tasks,),
                                     initializer=keras.initializers.Constant(self.initial_alpha()))

    def call(self, inputs):
        mixture = None
        for s, x in enumerate(inputs):
            term = ops.cast(self.alpha[s], x.dtype) * x
            mixture = term if mixture is None else mixture + term
        return mixture

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "task_index": self.task_index,
                "num_tasks": self.num_tasks, "alpha_same": self.alpha_same}


@keras.saving.register_keras_serializable(package="mtl")
class AttentionMask(keras.layers.Layer):
    """A task's attention mask at one stage of MTAN (Liu, Johns & Davison, CVPR 2019, eq. 1):

        a = sigmoid(Conv1x1(ReLU(Conv1x1([u ; f]))))  in [0, 1]^{H x W x channels}

    u: the shared trunk's feature of the stage; f: the task's attended feature of the previous
    stage, carried to this stage's resolution (absent at the first stage). Both 1x1 convolutions
    have `channels` filters (the official code's att_layer([2c, c, c])). `batch_norm` adds the
    paper's BatchNorm after each convolution.

    Inputs: `[u]` or `[u, f]` ([batch, H, W, c_u], [batch, H, W, c_f]). Output: [batch, H, W,
    channels].
    """

    def __init__(self, channels: int, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.batch_norm = int(channels), bool(batch_norm)
        self.conv1 = keras.layers.Conv2D(self.channels, 1, name="conv1")
        self.conv2 = keras.layers.Conv2D(self.channels, 1, name="conv2")
        self.bn1 = keras.layers.BatchNormalization(name="bn1") if batch_norm else None
        self.bn2 = keras.layers.BatchNormalization(name="bn2") if batch_norm else None

    def build(self, input_shape):
        in_channels = sum(int(shape[-1]) for shape in input_shape)
        shape = tuple(input_shape[0][:-1]) + (in_channels,)
        self.conv1.build(shape)
        hidden = tuple(input_shape[0][:-1]) + (self.channels,)
        self.conv2.build(hidden)
        if self.batch_norm:
            self.bn1.build(hidden)
            self.bn2.build(hidden)

    def call(self, inputs, training=None):
        x = ops.concatenate(list(inputs), axis=-1) if len(inputs) > 1 else inputs[0]
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x, training=training)
        x = self.conv2(ops.relu(x))
        if self.batch_norm:
            x = self.bn2(x, training=training)
        return ops.sigmoid(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][:-1]) + (self.channels,)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels,
                "batch_norm": self.batch_norm}


#: The classes of the task gates (what `mtl.architectures.gate_model` reads out).
GATE_LAYERS = (SoftmaxGate, DSelectKGate)
