"""Read-outs of a built architecture: `gate_model` (its task gates' weights over the experts)
and `attention_model` (its attention masks), sub-models sharing the model's own weights."""

from __future__ import annotations

import keras

from mtl.architectures.layers import GATE_LAYERS, AttentionMask
from mtl.errors import UsageError, UsageTypeError

_GATED_NAMES = ["mmoe", "cgc", "ple", "dselect_k"]


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


def _check_model(what: str, model) -> None:
    if not isinstance(model, keras.Model):
        raise UsageTypeError(f"{what}: expected a keras.Model built by mtl.architectures; got "
                             f"{type(model).__name__}.")


def _described(model) -> str:
    architecture = getattr(model, "architecture", None)
    return f"architecture {architecture.name!r}" if architecture else "hard sharing or no " \
        "architecture"
