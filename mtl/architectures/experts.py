"""The expert-based architectures and their specs: hard sharing (`hps`) and the mixtures of
experts that gate backbone copies per task (`mmoe`, `cgc`, `ple`, `dselect_k`)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import keras

from mtl import backbones
from mtl.architectures.building import (Names, Wiring, backbone_copy, input_like,
                                        soft_sharing_builder)
from mtl.architectures.layers import DSelectKGate, ExpertMixture, SoftmaxGate
from mtl.architectures.spec import (ALL_BACKBONES, ArchitectureSpec, Option, check_expert_counts,
                                    check_number, checked_backbone_config)
from mtl.errors import UsageError, check_int
from mtl.model import MultiTaskModel, check_heads

_GATED = ("each task reads its own gated mixture of the experts' outputs, so no one tensor "
          "carries every task's gradient")  # A clause, as `Weighting.no_rep_reason`.
_PLE_PAPER = ("H. Tang et al., Progressive Layered Extraction (PLE): A Novel Multi-Task "
              "Learning (MTL) Model for Personalized Recommendations, RecSys 2020")


def hps(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None) -> MultiTaskModel:
    """Hard parameter sharing (Caruana 1997): one backbone, run once, feeds every head.

    y_t = head_t(B(x)). `MultiTaskModel(backbone, heads)`; the backbone's output is the one
    shared representation (gradient_mode="rep" is defined).
    """
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(HPS, backbone, backbone_config)
    return MultiTaskModel(backbones.get(backbone, input_shape, **config), heads)


HPS = ArchitectureSpec(
    "hps", hps, (),
    paper="R. Caruana, Multitask Learning, Machine Learning 28, 1997 (hard parameter "
          "sharing)",
    no_rep_reason=None, backbones=ALL_BACKBONES)


@soft_sharing_builder
def mmoe(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
         backbone_config: dict | None = None, num_experts: int = 4) -> Wiring:
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

    Experts E_1..E_n are `num_experts` fresh builds of the backbone (`expert_0`, ...); each task
    t has a gate g_t(x) = softmax(W_t flatten(x)) (`gate_{t}`), and

        y_t = head_t(sum_e g_t(x)_e E_e(x))          (the mixture: `mix_{t}`)

    Experts are shared by every task, gates and heads are their task's own.
    """
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(MMOE, backbone, backbone_config)
    check_int("mmoe: num_experts", num_experts, 1)
    return _one_gate_per_task(MMOE, heads, backbone, config, input_shape, num_experts,
                              lambda name: SoftmaxGate(num_experts, name=name))


MMOE = ArchitectureSpec(
    "mmoe", mmoe,
    (Option("num_experts", 4, "ours", "experts (backbone copies) shared by all tasks"),),
    paper="J. Ma et al., Modeling Task Relationships in Multi-task Learning with "
          "Multi-gate Mixture-of-Experts, KDD 2018",
    no_rep_reason=_GATED, backbones=ALL_BACKBONES)


@soft_sharing_builder
def cgc(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None, num_shared_experts: int = 1,
        num_task_experts: int = 1) -> Wiring:
    """Customized Gate Control (Tang et al., RecSys 2020: PLE's single extraction level).

    `num_shared_experts` backbone copies shared by all tasks (`shared_expert_{i}`) and
    `num_task_experts` per task (`{t}_expert_{i}`); task t's gate covers its own experts and the
    shared ones, in that order (the paper's S_t = [E_t,1..E_t,m_t, E_s,1..E_s,m_s]):

        y_t = head_t(sum_e g_t(x)_e S_t(x)_e),   g_t(x) = softmax(W_t flatten(x))   (`gate_{t}`)
    """
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(CGC, backbone, backbone_config)
    check_expert_counts("cgc", num_shared_experts, num_task_experts)
    names = Names(CGC, heads)
    tasks = list(heads)
    shared, own = _level_experts("", names, tasks, num_shared_experts, num_task_experts,
                                 functools.partial(backbone_copy, backbone, input_shape, config))
    inputs = input_like((shared + [e for t in tasks for e in own[t]])[0])
    features, _ = _extraction_level("", names, tasks, {t: inputs for t in tasks}, inputs,
                                    shared, own, shared_gate=False)
    return Wiring(CGC, inputs, features, heads)


CGC = ArchitectureSpec(
    "cgc", cgc,
    (Option("num_shared_experts", 1, "ours", "experts shared by all tasks"),
     Option("num_task_experts", 1, "ours", "experts of each task")),
    paper=_PLE_PAPER, no_rep_reason=_GATED, backbones=ALL_BACKBONES)


@soft_sharing_builder
def ple(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
        backbone_config: dict | None = None, num_levels: int = 2, num_shared_experts: int = 1,
        num_task_experts: int = 1, expert_units: int = 128) -> Wiring:
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
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(PLE, backbone, backbone_config)
    check_int("ple: num_levels", num_levels, 1)
    check_expert_counts("ple", num_shared_experts, num_task_experts)
    check_int("ple: expert_units", expert_units, 1)
    names = Names(PLE, heads)
    tasks = list(heads)
    task_inputs = shared_input = inputs = None
    for level in range(num_levels):
        prefix = f"level{level}_"
        make = (functools.partial(backbone_copy, backbone, input_shape, config) if level == 0
                else functools.partial(_dense_expert, expert_units))
        shared, own = _level_experts(prefix, names, tasks, num_shared_experts,
                                     num_task_experts, make)
        if level == 0:
            inputs = input_like((shared + [e for t in tasks for e in own[t]])[0])
            task_inputs, shared_input = {t: inputs for t in tasks}, inputs
        task_inputs, shared_input = _extraction_level(
            prefix, names, tasks, task_inputs, shared_input, shared, own,
            shared_gate=level < num_levels - 1 and num_shared_experts > 0)
    return Wiring(PLE, inputs, task_inputs, heads)


PLE = ArchitectureSpec(
    "ple", ple,
    (Option("num_levels", 2, "ours", "extraction levels (1 is cgc)"),
     Option("num_shared_experts", 1, "ours", "shared experts per level"),
     Option("num_task_experts", 1, "ours", "experts of each task per level"),
     Option("expert_units", 128, "ours",
            "width of the Dense experts of levels > 0 (small_cnn's feature width)")),
    paper=_PLE_PAPER, no_rep_reason=f"{_GATED}, at every level", backbones=ALL_BACKBONES)


@soft_sharing_builder
def dselect_k(input_shape, heads: Mapping[str, keras.layers.Layer], *,
              backbone: str = "small_cnn", backbone_config: dict | None = None,
              num_experts: int = 4, k: int = 2, gamma: float = 1.0,
              entropy_weight: float = 1e-6) -> Wiring:
    """DSelect-k mixture of experts (Hazimeh et al., NeurIPS 2021).

    As `mmoe` (experts `expert_{e}`, mixtures `mix_{t}`), with each task's softmax gate
    replaced by a `DSelectKGate` (`gate_{t}`): per example, k single-expert selectors built on
    the smooth step S with width `gamma`, so that at most k experts have a non-zero weight once
    the selectors have converged. Its regularisers (the selectors' entropy times
    `entropy_weight`; for `num_experts` not a power of 2, the reachability term) are added in
    training to `model.losses`.
    """
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(DSELECT_K, backbone, backbone_config)
    check_int("dselect_k: num_experts", num_experts, 2)
    check_int("dselect_k: k", k, 1)
    if k > num_experts:
        raise UsageError(f"dselect_k: k (the most experts a task's gate selects) must be <= "
                         f"num_experts = {num_experts}; got k={k}.")
    check_number("dselect_k: gamma", gamma, minimum=0.0, inclusive=False)
    check_number("dselect_k: entropy_weight", entropy_weight, minimum=0.0, inclusive=True)
    return _one_gate_per_task(
        DSELECT_K, heads, backbone, config, input_shape, num_experts,
        lambda name: DSelectKGate(num_experts, k, gamma, entropy_weight, name=name))


DSELECT_K = ArchitectureSpec(
    "dselect_k", dselect_k,
    (Option("num_experts", 4, "ours", "experts shared by all tasks (>= 2)"),
     Option("k", 2, "ours", "the most experts each task's gate selects"),
     Option("gamma", 1.0, "official code", "width of the smooth step's cubic region"),
     Option("entropy_weight", 1e-6, "official code",
            "weight of the selectors' entropy regulariser (a mean over examples here)")),
    paper="H. Hazimeh et al., DSelect-k: Differentiable Selection in the Mixture of "
          "Experts with Applications to Multi-Task Learning, NeurIPS 2021",
    no_rep_reason=_GATED, backbones=ALL_BACKBONES)

#: This module's architectures, in the order `mtl.architectures.ARCHITECTURES` lists them.
SPECS = (HPS, MMOE, CGC, PLE, DSELECT_K)


def _dense_expert(units: int, name: str) -> keras.layers.Layer:
    """PLE's experts beyond level 0: Dense(units, relu) on the previous level's mixture."""
    return keras.layers.Dense(units, activation="relu", name=name)


def _one_gate_per_task(spec: ArchitectureSpec, heads: Mapping, backbone: str, config: dict,
                       input_shape, num_experts: int, make_gate) -> Wiring:
    """MMoE's and DSelect-k's shape: `num_experts` backbone copies shared by every task, and
    per task a gate on the input (`make_gate(name)`) mixing them for its head."""
    names = Names(spec, heads)
    experts = [backbone_copy(backbone, input_shape, config, names.take(f"expert_{e}"))
               for e in range(num_experts)]
    inputs = input_like(experts[0])
    outputs = [expert(inputs) for expert in experts]
    features = {}
    for task in heads:
        gate = make_gate(names.take(f"gate_{task}"))(inputs)
        features[task] = ExpertMixture(name=names.take(f"mix_{task}"))([gate, *outputs])
    return Wiring(spec, inputs, features, heads)


def _level_experts(prefix: str, names: Names, tasks: list, num_shared: int, num_task: int,
                   make: Callable[[str], Any]):
    """A CGC level's experts (layers, not yet called): (shared, {task: its own})."""
    shared = [make(names.take(f"{prefix}shared_expert_{i}")) for i in range(num_shared)]
    own = {t: [make(names.take(f"{prefix}{t}_expert_{i}")) for i in range(num_task)]
           for t in tasks}
    return shared, own


def _extraction_level(prefix: str, names: Names, tasks: list, task_inputs: Mapping,
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
