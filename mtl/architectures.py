"""Multi-task architectures: how the tasks share a network, by name (`build("mmoe", ...)`).

    model = mtl.architectures.build("mmoe", (16, 32, 1), heads, num_experts=4)

| name         | paper                            | what the tasks share                        |
|--------------|----------------------------------|---------------------------------------------|
| hps          | Caruana 1997 (hard sharing)      | one backbone; one head per task             |
| mmoe         | Ma et al., KDD 2018              | experts (backbone copies), a gate per task  |
| cgc          | Tang et al., RecSys 2020         | shared experts; each task also has its own  |
| ple          | Tang et al., RecSys 2020         | CGC stacked in levels, with shared gates    |
| dselect_k    | Hazimeh et al., NeurIPS 2021     | experts; each task's gate picks at most k   |
| cross_stitch | Misra et al., CVPR 2016          | a backbone per task, mixed by learnt units  |
| mtan         | Liu, Johns & Davison, CVPR 2019  | one trunk; each task attends to its stages  |

Every builder takes `input_shape`, `heads` (`{task: layer}`, each applied to that task's final
feature vector), a backbone name from `mtl.backbones` and its config, and the architecture's
options; it returns a `MultiTaskModel`. All but `hps` are built with
`MultiTaskModel.from_outputs(..., architecture=spec)`: variables are shared by the tasks whose
outputs depend on them (`mtl.sharing_report`), and `model.architecture` is the
`ArchitectureSpec`, whose `no_rep_reason` says why gradient_mode="rep" (the Gramian w.r.t. one
shared representation) is not defined for it.

Layer names are deterministic (`expert_0`, `gate_left`, `left_cross_stitch_1`, ...), so
checkpoints and exports of two builds with the same arguments match. Backbone copies build their
variables under their own name scope (`expert_0/conv_0/kernel`), so variable paths are unique.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import re
from typing import Any, Callable, Mapping

import keras
import numpy as np
from keras import ops

from mtl import backbones
from mtl.errors import UsageError, UsageTypeError, check_int
from mtl.model import MultiTaskModel, _check_heads

#: Added inside logarithms and divisions of DSelect-k's regularisers (as the official code's
#: EPSILON), so that a selector at exactly 0 or 1 stays finite.
EPSILON = 1e-6


# ------------------------------------------------------------------------------- specification
@dataclasses.dataclass(frozen=True)
class Option:
    """One option of an architecture: its default and where the default comes from ("paper",
    "official code" or "ours")."""

    name: str
    default: Any
    source: str
    help: str


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """What an architecture is: its builder, options, paper and the backbones it accepts.

    `no_rep_reason` says why gradient_mode="rep" is not defined for it, as a clause without a
    final period like the weighting methods' (None for hard sharing, whose backbone output is
    the one shared representation).
    `backbones_reason` says why only `backbones` are accepted.
    """

    name: str
    builder: Callable[..., MultiTaskModel]
    options: tuple[Option, ...]
    paper: str
    no_rep_reason: str | None
    backbones: tuple[str, ...]
    backbones_reason: str = ""

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict:
        """`{option: default}`."""
        return {o.name: o.default for o in self.options}


# ------------------------------------------------------------------------------------ layers
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


GATE_LAYERS = (SoftmaxGate, DSelectKGate)


# ---------------------------------------------------------------------------------- builders
def hps(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None) -> MultiTaskModel:
    """Hard parameter sharing (Caruana 1997): one backbone, run once, feeds every head.

    y_t = head_t(B(x)). `MultiTaskModel(backbone, heads)`; the backbone's output is the one
    shared representation (gradient_mode="rep" is defined).
    """
    spec = ARCHITECTURES["hps"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    return MultiTaskModel(backbones.get(backbone, input_shape, **config), heads)


def _records_its_call(builder):
    """Keeps, on the model a soft-sharing builder returns, its call (every option, defaults
    included) and the heads: what `mtl.runs` records to rebuild the very same graph, however
    the builder was called (directly or through `build`)."""
    signature = inspect.signature(builder)

    @functools.wraps(builder)
    def build_and_record(input_shape, heads, **kwargs):
        model = builder(input_shape, heads, **kwargs)
        bound = signature.bind(input_shape, heads, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        model._mtl.build_args = {
            "architecture": model.architecture.name,
            "input_shape": [int(d) for d in args.pop("input_shape")],
            "backbone": args.pop("backbone"),
            "backbone_config": dict(args.pop("backbone_config") or {}),
            "options": {k: v for k, v in args.items() if k != "heads"}}
        model._mtl.head_layers = dict(heads)
        return model

    return build_and_record


@_records_its_call
def mmoe(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
         backbone_config: dict | None = None, num_experts: int = 4) -> MultiTaskModel:
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    Experts E_1..E_n are `num_experts` fresh builds of the backbone (`expert_0`, ...); each task
    t has a gate g_t(x) = softmax(W_t flatten(x)) (`gate_{t}`), and

        y_t = head_t(sum_e g_t(x)_e E_e(x))          (the mixture: `mix_{t}`)

    Experts are shared by every task, gates and heads are their task's own.
    """
    spec = ARCHITECTURES["mmoe"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    check_int("mmoe: num_experts", num_experts, 1)
    return _one_gate_per_task(spec, heads, backbone, config, input_shape, num_experts,
                              lambda name: SoftmaxGate(num_experts, name=name))


@_records_its_call
def cgc(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None, num_shared_experts: int = 1,
        num_task_experts: int = 1) -> MultiTaskModel:
    """Customized Gate Control (Tang et al., RecSys 2020: PLE's single extraction level).

    `num_shared_experts` backbone copies shared by all tasks (`shared_expert_{i}`) and
    `num_task_experts` per task (`{t}_expert_{i}`); task t's gate covers its own experts and the
    shared ones, in that order (the paper's S_t = [E_t,1..E_t,m_t, E_s,1..E_s,m_s]):

        y_t = head_t(sum_e g_t(x)_e S_t(x)_e),   g_t(x) = softmax(W_t flatten(x))   (`gate_{t}`)
    """
    spec = ARCHITECTURES["cgc"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    _check_expert_counts("cgc", num_shared_experts, num_task_experts)
    names = _Names(spec, heads)
    tasks = list(heads)
    shared, own = _level_experts("", names, tasks, num_shared_experts, num_task_experts,
                                 functools.partial(_backbone_copy, backbone, input_shape, config))
    inputs = _input_like((shared + [e for t in tasks for e in own[t]])[0])
    features, _ = _extraction_level("", names, tasks, {t: inputs for t in tasks}, inputs,
                                    shared, own, shared_gate=False)
    return _assemble(spec, inputs, features, heads)


@_records_its_call
def ple(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None, num_levels: int = 2, num_shared_experts: int = 1,
        num_task_experts: int = 1, expert_units: int = 128) -> MultiTaskModel:
    """Progressive Layered Extraction (Tang et al., RecSys 2020).

    `num_levels` CGC levels (names prefixed `level{j}_`). Level j gives each task t the mixture
    h_t^j = sum_e g_t^j(.)_e S_t^j(.)_e over its own and the shared experts and, at every level
    but the last, a shared mixture h_s^j over all experts of the level (its gate
    `level{j}_gate_shared`):

      * level 0: every expert is a fresh backbone copy on x; every gate takes x;
      * level j > 0: experts are Dense(expert_units, relu): task t's take h_t^{j-1}, shared
        ones take h_s^{j-1}; each gate takes the same input as the experts it owns (task t's
        gate h_t^{j-1}, the shared gate h_s^{j-1}), as in the paper's eq. 5;
      * y_t = head_t(h_t^{L-1}).

    With `num_shared_experts=0` there is no shared path (and no shared gate).
    """
    spec = ARCHITECTURES["ple"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    check_int("ple: num_levels", num_levels, 1)
    _check_expert_counts("ple", num_shared_experts, num_task_experts)
    check_int("ple: expert_units", expert_units, 1)
    names = _Names(spec, heads)
    tasks = list(heads)
    task_inputs = shared_input = inputs = None
    for level in range(num_levels):
        prefix = f"level{level}_"
        make = (functools.partial(_backbone_copy, backbone, input_shape, config) if level == 0
                else functools.partial(_dense_expert, expert_units))
        shared, own = _level_experts(prefix, names, tasks, num_shared_experts,
                                     num_task_experts, make)
        if level == 0:
            inputs = _input_like((shared + [e for t in tasks for e in own[t]])[0])
            task_inputs, shared_input = {t: inputs for t in tasks}, inputs
        task_inputs, shared_input = _extraction_level(
            prefix, names, tasks, task_inputs, shared_input, shared, own,
            shared_gate=level < num_levels - 1 and num_shared_experts > 0)
    return _assemble(spec, inputs, task_inputs, heads)


@_records_its_call
def dselect_k(input_shape, heads: Mapping[str, keras.layers.Layer], *,
              backbone: str = "small_cnn", backbone_config: dict | None = None,
              num_experts: int = 4, k: int = 2, gamma: float = 1.0,
              entropy_weight: float = 1e-6) -> MultiTaskModel:
    """DSelect-k mixture of experts (Hazimeh et al., NeurIPS 2021).

    As `mmoe` (experts `expert_{e}`, mixtures `mix_{t}`), with each task's softmax gate
    replaced by a `DSelectKGate` (`gate_{t}`): per example, k single-expert selectors built on
    the smooth step S with width `gamma`, so that at most k experts have a non-zero weight once
    the selectors have converged. Its regularisers (the selectors' entropy times
    `entropy_weight`; for `num_experts` not a power of 2, the reachability term) are added in
    training to `model.losses`.
    """
    spec = ARCHITECTURES["dselect_k"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    check_int("dselect_k: num_experts", num_experts, 2)
    check_int("dselect_k: k", k, 1)
    if k > num_experts:
        raise UsageError(f"dselect_k: k (the most experts a task's gate selects) must be <= "
                         f"num_experts = {num_experts}; got k={k}.")
    _check_number("dselect_k: gamma", gamma, minimum=0.0, inclusive=False)
    _check_number("dselect_k: entropy_weight", entropy_weight, minimum=0.0, inclusive=True)
    return _one_gate_per_task(
        spec, heads, backbone, config, input_shape, num_experts,
        lambda name: DSelectKGate(num_experts, k, gamma, entropy_weight, name=name))


@_records_its_call
def cross_stitch(input_shape, heads: Mapping[str, keras.layers.Layer], *,
                 backbone: str = "small_cnn", backbone_config: dict | None = None,
                 alpha_same: float = 0.9) -> MultiTaskModel:
    """Cross-stitch networks (Misra et al., CVPR 2016).

    One copy of the backbone per task (its layers renamed `{t}_{layer}`), run layer by layer; at
    each unit point every task's activation is replaced by sum_s alpha_ts x_s (`CrossStitch`,
    `{t}_cross_stitch_{u}`, alpha starting at `alpha_same` on the diagonal and
    (1 - alpha_same)/(T - 1) off it). Unit points: after every pooling layer and after the
    feature layer (small_cnn: `pool_i`, `features`), after every dense layer (mlp: `dense_i`),
    at every stage end (resnet: the last block's `_out` of each stage). y_t = head_t(task t's
    last stitched activation).

    Every copy reaches every task through the units, so all copies' variables and all but the
    last unit's rows are shared by all tasks; the last unit's rows and the heads are their
    task's own.
    """
    spec = ARCHITECTURES["cross_stitch"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    _check_number("cross_stitch: alpha_same", alpha_same, minimum=0.0, inclusive=True,
                  maximum=1.0)
    names = _Names(spec, heads)
    tasks = list(heads)
    template = backbones.BUILDERS[backbone](input_shape, **config)
    points = _stitch_points(backbone, template)
    inputs = _input_like(template)
    values = {t: {id(template.input): inputs} for t in tasks}
    unit = 0
    for layer in _layers_of(template):
        for t in tasks:
            _call_clone(layer, values[t], names.take(f"{t}_{layer.name}"), template)
        if layer.name in points:
            stitched = [values[t][id(layer.output)] for t in tasks]
            for i, t in enumerate(tasks):
                values[t][id(layer.output)] = CrossStitch(
                    i, len(tasks), alpha_same, name=names.take(f"{t}_cross_stitch_{unit}")
                )(stitched)
            unit += 1
    features = {t: values[t][id(template.output)] for t in tasks}
    return _assemble(spec, inputs, features, heads)


@_records_its_call
def mtan(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
         backbone_config: dict | None = None, batch_norm: bool = False) -> MultiTaskModel:
    """Multi-Task Attention Network (Liu, Johns & Davison, CVPR 2019).

    The backbone up to its last stage is one shared trunk, run once (a nested model with the
    backbone's name), split into stages: small_cnn's [conv, relu] blocks (before each pool),
    resnet's stages. Stage j gives u_j, the feature the masks read, and p_j, the stage's output
    before down-sampling, which they weight (the paper's u^j and p^j: the outputs before and
    after the stage's last block): small_cnn has one conv per stage, so u_j = p_j = `relu_j`;
    resnet's p_j is the last block's `_out` and u_j the block before's (p_j with one block per
    stage). For each task t and stage j:

        a_t^j = AttentionMask([u_j ; f_t^{j-1}])   in [0, 1]      (`{t}_attention_{j}`)
        â_t^j = a_t^j * p_j                                       (`{t}_attended_{j}`)
        f_t^j = MaxPool2(ReLU(Conv3x3(â_t^j)))  with stage j+1's channels   (`{t}_carry_{j}`)

    (the pool only where stage j+1 has a lower resolution). Task t's last â_t runs through its
    own copy of the backbone's layers after the last stage (small_cnn: pool, flatten, dense
    `{t}_features`; resnet: the pooling), so y_t = head_t(features of the backbone's shape).
    The trunk is shared by all tasks; attention, carry and tail layers are their task's own.
    """
    spec = ARCHITECTURES["mtan"]
    heads = _check_heads(heads, layers=True)
    config = _backbone_config(spec, backbone, backbone_config)
    if not isinstance(batch_norm, bool):
        raise UsageTypeError(f"mtan: batch_norm must be True or False; got {batch_norm!r}.")
    names = _Names(spec, heads)
    template = backbones.BUILDERS[backbone](input_shape, **config)
    stages, last = _mtan_stages(backbone, template)
    shared = list({id(t): t for stage in stages for t in stage}.values())
    trunk = keras.Model(template.input, shared, name=names.take(template.name))
    inputs = _input_like(template)
    computed = trunk(inputs)
    computed = computed if isinstance(computed, (list, tuple)) else [computed]
    trunk_outputs = dict(zip((id(t) for t in shared), computed))
    tail = _layers_of(template)
    tail = tail[tail.index(template.get_layer(last)) + 1:]
    features = {}
    for t in heads:
        carried = None
        for j, (u, p) in enumerate(stages):
            u_j, p_j = trunk_outputs[id(u)], trunk_outputs[id(p)]
            mask = AttentionMask(p.shape[-1], batch_norm, name=names.take(f"{t}_attention_{j}"))(
                [u_j] if carried is None else [u_j, carried])
            attended = keras.layers.Multiply(name=names.take(f"{t}_attended_{j}"))([mask, p_j])
            if j + 1 < len(stages):
                carried = _carry(attended, stages[j + 1][0], names, f"{t}_carry_{j}")
        values = {id(stages[-1][1]): attended}
        for layer in tail:
            _call_clone(layer, values, names.take(f"{t}_{layer.name}"), template)
        features[t] = values[id(template.output)]
    return _assemble(spec, inputs, features, heads)


# ------------------------------------------------------------------------------ the registry
_ALL_BACKBONES = tuple(backbones.BUILDERS)
_GATED = ("each task reads its own gated mixture of the experts' outputs, so no one tensor "
          "carries every task's gradient")  # A clause, as `Weighting.no_rep_reason`.

ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in (
    ArchitectureSpec(
        "hps", hps, (),
        paper="R. Caruana, Multitask Learning, Machine Learning 28, 1997 (hard parameter "
              "sharing)",
        no_rep_reason=None, backbones=_ALL_BACKBONES),
    ArchitectureSpec(
        "mmoe", mmoe,
        (Option("num_experts", 4, "ours", "experts (backbone copies) shared by all tasks"),),
        paper="J. Ma et al., Modeling Task Relationships in Multi-task Learning with "
              "Multi-gate Mixture-of-Experts, KDD 2018",
        no_rep_reason=_GATED, backbones=_ALL_BACKBONES),
    ArchitectureSpec(
        "cgc", cgc,
        (Option("num_shared_experts", 1, "ours", "experts shared by all tasks"),
         Option("num_task_experts", 1, "ours", "experts of each task")),
        paper="H. Tang et al., Progressive Layered Extraction (PLE): A Novel Multi-Task "
              "Learning (MTL) Model for Personalized Recommendations, RecSys 2020",
        no_rep_reason=_GATED, backbones=_ALL_BACKBONES),
    ArchitectureSpec(
        "ple", ple,
        (Option("num_levels", 2, "ours", "extraction levels (1 is cgc)"),
         Option("num_shared_experts", 1, "ours", "shared experts per level"),
         Option("num_task_experts", 1, "ours", "experts of each task per level"),
         Option("expert_units", 128, "ours",
                "width of the Dense experts of levels > 0 (small_cnn's feature width)")),
        paper="H. Tang et al., Progressive Layered Extraction (PLE): A Novel Multi-Task "
              "Learning (MTL) Model for Personalized Recommendations, RecSys 2020",
        no_rep_reason=f"{_GATED}, at every level", backbones=_ALL_BACKBONES),
    ArchitectureSpec(
        "dselect_k", dselect_k,
        (Option("num_experts", 4, "ours", "experts shared by all tasks (>= 2)"),
         Option("k", 2, "ours", "the most experts each task's gate selects"),
         Option("gamma", 1.0, "official code", "width of the smooth step's cubic region"),
         Option("entropy_weight", 1e-6, "official code",
                "weight of the selectors' entropy regulariser (a mean over examples here)")),
        paper="H. Hazimeh et al., DSelect-k: Differentiable Selection in the Mixture of "
              "Experts with Applications to Multi-Task Learning, NeurIPS 2021",
        no_rep_reason=_GATED, backbones=_ALL_BACKBONES),
    ArchitectureSpec(
        "cross_stitch", cross_stitch,
        (Option("alpha_same", 0.9, "paper",
                "initial alpha_tt; alpha_ts starts at (1 - alpha_same) / (T - 1)"),),
        paper="I. Misra, A. Shrivastava, A. Gupta, M. Hebert, Cross-stitch Networks for "
              "Multi-task Learning, CVPR 2016",
        no_rep_reason="each task has its own backbone copy, mixed with the others' at every "
                      "cross-stitch unit, so no one tensor is shared by all tasks",
        backbones=("mlp", "small_cnn", "resnet"),
        backbones_reason="the copies run layer by layer with units after the pooling, dense "
                         "or stage-end layers; mobilenet_v2 is one nested model"),
    ArchitectureSpec(
        "mtan", mtan,
        (Option("batch_norm", False, "ours",
                "BatchNorm in the attention modules (the paper has it; the small trunks do "
                "not)"),),
        paper="S. Liu, E. Johns, A. J. Davison, End-to-End Multi-Task Learning with "
              "Attention, CVPR 2019",
        no_rep_reason="the tasks read the shared trunk at every stage through their own "
                      "attention masks, not through one representation",
        backbones=("small_cnn", "resnet"),
        backbones_reason="attention masks act on convolutional feature maps, stage by stage"),
)}


def get_spec(name: str) -> ArchitectureSpec:
    """The `ArchitectureSpec` called `name`."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise UsageError(f"Unknown architecture {name!r}; expected one of "
                         f"{list(ARCHITECTURES)}.")
    return ARCHITECTURES[name]


def build(name: str, input_shape, heads: Mapping[str, keras.layers.Layer], *,
          backbone: str = "small_cnn", backbone_config: dict | None = None,
          **options) -> MultiTaskModel:
    """Builds the architecture called `name` (a key of `ARCHITECTURES`) with `options`.

    Raises `UsageError` for an unknown name, an option the architecture does not take, a value
    out of range or a backbone it does not accept, naming what was given and what is expected.
    """
    spec = get_spec(name)
    unknown = sorted(set(options) - set(spec.option_names))
    if unknown:
        raise UsageError(f"Architecture {name!r} takes no option {unknown[0]!r}; its options "
                         f"are {list(spec.option_names)}.")
    return spec.builder(input_shape, heads, backbone=backbone, backbone_config=backbone_config,
                        **options)


def gate_model(model: keras.Model) -> keras.Model:
    """inputs -> {gate layer name: gate [batch, num_experts]}, for mmoe, cgc, ple and dselect_k
    (the gates' weights are the model's own)."""
    _check_model("gate_model", model)
    gates = [layer for layer in model.layers if isinstance(layer, GATE_LAYERS)]
    if not gates:
        raise UsageError(f"gate_model: model {model.name!r} ({_described(model)}) has no gates; "
                         f"expected a model built as one of {_GATED_NAMES}.")
    return keras.Model(model.input, {g.name: g.output for g in gates}, name=f"{model.name}_gates")


def attention_model(model: keras.Model) -> keras.Model:
    """inputs -> {attention layer name: mask [batch, H, W, C] in [0, 1]}, for mtan."""
    _check_model("attention_model", model)
    masks = [layer for layer in model.layers if isinstance(layer, AttentionMask)]
    if not masks:
        raise UsageError(f"attention_model: model {model.name!r} ({_described(model)}) has no "
                         "attention masks; expected a model built as 'mtan'.")
    return keras.Model(model.input, {m.name: m.output for m in masks},
                       name=f"{model.name}_attention")


_GATED_NAMES = ["mmoe", "cgc", "ple", "dselect_k"]


# ----------------------------------------------------------------------------------- helpers
class _Names:
    """Hands out layer names once each: a task name that would make a name clash with another
    (task "shared" in cgc, whose shared experts are `shared_expert_{i}`) is refused."""

    def __init__(self, spec: ArchitectureSpec, heads: Mapping):
        self.spec, self.tasks, self.taken = spec, list(heads), set()

    def take(self, name: str) -> str:
        if name in self.taken:
            raise UsageError(
                f"{self.spec.name}: the tasks {self.tasks} give two layers the name {name!r}; "
                "rename the task whose name matches the architecture's own layer names.")
        self.taken.add(name)
        return name


def _backbone_config(spec: ArchitectureSpec, backbone, config) -> dict:
    """The backbone's config, checked against what `spec` accepts."""
    if not isinstance(backbone, str) or backbone not in backbones.BUILDERS:
        raise UsageError(f"{spec.name}: unknown backbone {backbone!r}; expected one of "
                         f"{list(spec.backbones)}.")
    if backbone not in spec.backbones:
        raise UsageError(f"{spec.name}: backbone {backbone!r} is not supported "
                         f"({spec.backbones_reason}); expected one of {list(spec.backbones)}.")
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise UsageTypeError(f"{spec.name}: backbone_config must be a dict of {backbone}'s "
                             f"options; got {config!r}.")
    if "name" in config:
        raise UsageError(f"{spec.name}: backbone_config must not set 'name' (the architecture "
                         f"names its backbone copies); got name={config['name']!r}.")
    return dict(config)


def _check_expert_counts(arch: str, num_shared: int, num_task: int) -> None:
    check_int(f"{arch}: num_shared_experts", num_shared, 0)
    check_int(f"{arch}: num_task_experts", num_task, 0)
    if num_shared + num_task < 1:
        raise UsageError(f"{arch}: each task's gate needs at least one expert; got "
                         f"num_shared_experts={num_shared} and num_task_experts={num_task} "
                         "(expected a sum >= 1).")


def _check_number(name: str, value, *, minimum: float, inclusive: bool,
                  maximum: float = math.inf) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value <= maximum
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        low = f">= {minimum}" if inclusive else f"> {minimum}"
        high = f" and <= {maximum}" if maximum != math.inf else " and finite"
        raise UsageError(f"{name} must be a number {low}{high}; got {value!r}.")


def _backbone_copy(backbone: str, input_shape, config: dict, name: str) -> keras.Model:
    """A fresh build of the backbone called `name`, its variables under `name/`."""
    with keras.name_scope(name):
        return backbones.BUILDERS[backbone](input_shape, name=name, **config)


def _dense_expert(units: int, name: str) -> keras.layers.Layer:
    """PLE's experts beyond level 0: Dense(units, relu) on the previous level's mixture."""
    return keras.layers.Dense(units, activation="relu", name=name)


def _input_like(model: keras.Model):
    return keras.Input(shape=tuple(model.input.shape[1:]), dtype=model.input.dtype,
                       name="inputs")


def _assemble(spec: ArchitectureSpec, inputs, features: Mapping, heads: Mapping
              ) -> MultiTaskModel:
    outputs = {task: heads[task](features[task]) for task in heads}
    return MultiTaskModel.from_outputs(inputs, outputs, name=spec.name, architecture=spec)


def _one_gate_per_task(spec: ArchitectureSpec, heads: Mapping, backbone: str, config: dict,
                       input_shape, num_experts: int, make_gate) -> MultiTaskModel:
    """MMoE's and DSelect-k's shape: `num_experts` backbone copies shared by every task, and
    per task a gate on the input (`make_gate(name)`) mixing them for its head."""
    names = _Names(spec, heads)
    experts = [_backbone_copy(backbone, input_shape, config, names.take(f"expert_{e}"))
               for e in range(num_experts)]
    inputs = _input_like(experts[0])
    outputs = [expert(inputs) for expert in experts]
    features = {}
    for task in heads:
        gate = make_gate(names.take(f"gate_{task}"))(inputs)
        features[task] = ExpertMixture(name=names.take(f"mix_{task}"))([gate, *outputs])
    return _assemble(spec, inputs, features, heads)


def _level_experts(prefix: str, names: _Names, tasks: list, num_shared: int, num_task: int,
                   make: Callable[[str], Any]):
    """A CGC level's experts (layers, not yet called): (shared, {task: its own})."""
    shared = [make(names.take(f"{prefix}shared_expert_{i}")) for i in range(num_shared)]
    own = {t: [make(names.take(f"{prefix}{t}_expert_{i}")) for i in range(num_task)]
           for t in tasks}
    return shared, own


def _extraction_level(prefix: str, names: _Names, tasks: list, task_inputs: Mapping,
                      shared_input, shared: list, own: Mapping, *, shared_gate: bool):
    """One CGC level: shared experts run on `shared_input`, task t's on `task_inputs[t]`; returns
    ({task: its gated mixture}, the shared gate's mixture, or None without `shared_gate`)."""
    shared_out = [expert(shared_input) for expert in shared]
    own_out = {t: [expert(task_inputs[t]) for expert in own[t]] for t in tasks}
    mixtures = {}
    for t in tasks:
        pool = own_out[t] + shared_out
        gate = SoftmaxGate(len(pool), name=names.take(f"{prefix}gate_{t}"))(task_inputs[t])
        mixtures[t] = ExpertMixture(name=names.take(f"{prefix}mix_{t}"))([gate, *pool])
    if not shared_gate:
        return mixtures, None
    pool = [e for t in tasks for e in own_out[t]] + shared_out
    gate = SoftmaxGate(len(pool), name=names.take(f"{prefix}gate_shared"))(shared_input)
    return mixtures, ExpertMixture(name=names.take(f"{prefix}mix_shared"))([gate, *pool])


def _layers_of(model: keras.Model) -> list:
    """The model's layers in the order they run, without its input layer."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _call_clone(layer, values: dict, name: str, template: keras.Model) -> None:
    """Calls a fresh copy of `layer` named `name` on the tensors that `values` holds for the
    layer's inputs in `template`, and records its output under the layer's output.

    Each layer of the template must be called once (no shared layers): its `input` and
    `output` are then the template's tensors, whatever the graph (chains, residual blocks).
    """
    given = layer.input
    flat = given if isinstance(given, (list, tuple)) else [given]
    if any(id(t) not in values for t in flat):
        raise UsageError(f"The backbone {template.name!r} cannot be run layer by layer: its "
                         f"layer {layer.name!r} reads a tensor computed outside the part copied; "
                         "expected each layer called once on the previous layers' outputs.")
    args = [values[id(t)] for t in flat] if isinstance(given, (list, tuple)) else values[id(given)]
    clone = type(layer).from_config({**layer.get_config(), "name": name})
    values[id(layer.output)] = clone(args)


def _stitch_points(backbone: str, template: keras.Model) -> set:
    """Names of the layers after which cross-stitch units go."""
    layer_names = [layer.name for layer in _layers_of(template)]
    if backbone == "small_cnn":
        points = {n for n in layer_names if re.fullmatch(r"pool_\d+", n) or n == "features"}
    elif backbone == "mlp":
        points = {n for n in layer_names if re.fullmatch(r"dense_\d+", n)}
    else:  # resnet: the last block of each stage.
        points = set(_resnet_stage_ends(layer_names).values())
    if not points:
        raise UsageError(f"cross_stitch: backbone {backbone!r} with this config has no layer to "
                         "put a cross-stitch unit after; expected at least one "
                         "pooling, dense or stage-end layer.")
    return points


def _resnet_stage_ends(layer_names) -> dict:
    """{stage: name of its last block's output layer}."""
    ends = {}
    for name in layer_names:
        match = re.fullmatch(r"stage(\d+)_block(\d+)_out", name)
        if match:
            stage, block = int(match[1]), int(match[2])
            if stage not in ends or block > ends[stage][0]:
                ends[stage] = (block, name)
    return {stage: name for stage, (_, name) in sorted(ends.items())}


def _mtan_stages(backbone: str, template: keras.Model) -> list:
    """([(u_j, p_j)] per stage: the template's tensors the masks read and the ones they
    weight; the name of the layer that outputs the last p_j)."""
    layer_names = [layer.name for layer in _layers_of(template)]
    if backbone == "small_cnn":
        relus = sorted((n for n in layer_names if re.fullmatch(r"relu_\d+", n)),
                       key=lambda n: int(n.split("_")[1]))
        stages = [(template.get_layer(n).output,) * 2 for n in relus]
        ends = relus
    else:
        stages, ends = [], list(_resnet_stage_ends(layer_names).values())
        for stage, end in _resnet_stage_ends(layer_names).items():
            block = int(re.fullmatch(r"stage\d+_block(\d+)_out", end)[1])
            before = f"stage{stage}_block{block - 1}_out"
            p = template.get_layer(end).output
            stages.append((template.get_layer(before).output if block > 0 else p, p))
    if not stages:
        raise UsageError(f"mtan: backbone {backbone!r} with this config has no convolutional "
                         "stage to attend to; expected at least one.")
    return stages, ends[-1]


def _carry(attended, next_u, names: _Names, name: str):
    """MTAN's f: Conv3x3 + ReLU to the next stage's channels, then MaxPool2 to its resolution."""
    x = keras.layers.Conv2D(next_u.shape[-1], 3, padding="same", activation="relu",
                            name=names.take(name))(attended)
    if tuple(x.shape[1:3]) != tuple(next_u.shape[1:3]):
        x = keras.layers.MaxPooling2D(2, padding="same", name=names.take(f"{name}_pool"))(x)
    if tuple(x.shape[1:3]) != tuple(next_u.shape[1:3]):
        raise UsageError(f"mtan: a stage of {tuple(attended.shape[1:3])} is followed by one of "
                         f"{tuple(next_u.shape[1:3])}; expected each stage to keep or halve the "
                         "resolution.")
    return x


def _check_model(what: str, model) -> None:
    if not isinstance(model, keras.Model):
        raise UsageTypeError(f"{what}: expected a keras.Model built by mtl.architectures; got "
                             f"{type(model).__name__}.")


def _described(model) -> str:
    architecture = getattr(model, "architecture", None)
    return f"architecture {architecture.name!r}" if architecture else "hard sharing or no " \
        "architecture"
