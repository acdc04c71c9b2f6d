"""The layer-wise architectures and their specs: `cross_stitch` (a backbone copy per task, mixed
after chosen layers) and `mtan` (one shared trunk, attended stage by stage by each task), and the
layer-by-layer cloning of a backbone they are built with."""

from __future__ import annotations

import re
from typing import Mapping

import keras

from mtl import backbones
from mtl.architectures.building import Names, Wiring, input_like, soft_sharing_builder
from mtl.architectures.layers import AttentionMask, CrossStitch
from mtl.architectures.spec import (ArchitectureSpec, Option, check_number,
                                    checked_backbone_config)
from mtl.errors import UsageError, UsageTypeError
from mtl.model import check_heads


@soft_sharing_builder
def cross_stitch(input_shape, heads: Mapping[str, keras.layers.Layer], *,
                 backbone: str = "small_cnn", backbone_config: dict | None = None,
                 alpha_same: float = 0.9) -> Wiring:
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
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(CROSS_STITCH, backbone, backbone_config)
    check_number("cross_stitch: alpha_same", alpha_same, minimum=0.0, inclusive=True,
                  maximum=1.0)
    names = Names(CROSS_STITCH, heads)
    tasks = list(heads)
    template = backbones.BUILDERS[backbone](input_shape, **config)
    points = _stitch_points(backbone, template)
    inputs = input_like(template)
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
    return Wiring(CROSS_STITCH, inputs, features, heads)


@soft_sharing_builder
def mtan(input_shape, heads: Mapping[str, keras.layers.Layer], *, backbone: str = "small_cnn",
         backbone_config: dict | None = None, batch_norm: bool = False) -> Wiring:
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
    heads = check_heads(heads, layers=True)
    config = checked_backbone_config(MTAN, backbone, backbone_config)
    if not isinstance(batch_norm, bool):
        raise UsageTypeError(f"mtan: batch_norm must be True or False; got {batch_norm!r}.")
    names = Names(MTAN, heads)
    template = backbones.BUILDERS[backbone](input_shape, **config)
    stages, last = _mtan_stages(backbone, template)
    shared = list({id(t): t for stage in stages for t in stage}.values())
    trunk = keras.Model(template.input, shared, name=names.take(template.name))
    inputs = input_like(template)
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
    return Wiring(MTAN, inputs, features, heads)



CROSS_STITCH = ArchitectureSpec(
    "cross_stitch", cross_stitch,
    (Option("alpha_same", 0.9, "paper",
            "initial alpha_tt; alpha_ts starts at (1 - alpha_same) / (T - 1)"),),
    paper="I. Misra, A. Shrivastava, A. Gupta, M. Hebert, Cross-stitch Networks for "
          "Multi-task Learning, CVPR 2016",
    no_rep_reason="each task has its own backbone copy, mixed with the others' at every "
                  "cross-stitch unit, so no one tensor is shared by all tasks",
    backbones=("mlp", "small_cnn", "resnet"),
    backbones_reason="the copies run layer by layer with units after the pooling, dense "
                     "or stage-end layers; mobilenet_v2 is one nested model")

MTAN = ArchitectureSpec(
    "mtan", mtan,
    (Option("batch_norm", False, "ours",
            "BatchNorm in the attention modules (the paper has it; the small trunks do "
            "not)"),),
    paper="S. Liu, E. Johns, A. J. Davison, End-to-End Multi-Task Learning with "
          "Attention, CVPR 2019",
    no_rep_reason="the tasks read the shared trunk at every stage through their own "
                  "attention masks, not through one representation",
    backbones=("small_cnn", "resnet"),
    backbones_reason="attention masks act on convolutional feature maps, stage by stage")

#: This module's architectures, in the order `mtl.architectures.ARCHITECTURES` lists them.
SPECS = (CROSS_STITCH, MTAN)


# ------------------------------------------------- a backbone's layers, cloned one by one
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


# ---------------------------------------------------------- where the units and masks go
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


def _mtan_stages(backbone: str, template: keras.Model) -> tuple[list, str]:
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


def _carry(attended, next_u, names: Names, name: str):
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

