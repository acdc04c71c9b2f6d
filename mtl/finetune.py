"""Freezing and fine-tuning a shared backbone.

    fine_tuning = mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=1000,
                                 unfreeze_top_layers=2, backbone_lr_multiplier=0.1)
    trainer = mtl.Trainer(model, tasks, optimizer=..., fine_tuning=fine_tuning)

A frozen layer (`trainable = False`) runs in inference mode, so a frozen BatchNormalization keeps
its moving statistics. At `unfreeze_at_step` the top `unfreeze_top_layers` layers of the backbone
that have weights (all of them when None) become trainable; their optimizer slots exist from the
start, so nothing is rebuilt but the compiled step. `backbone_lr_multiplier` gives the backbone's
variables a learning rate that is that multiple of the heads' rate (a second optimizer of the same
kind; a learning-rate schedule is scaled too).
"""

from __future__ import annotations

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class FineTuning:
    freeze_backbone: bool = False
    unfreeze_at_step: int | None = None
    unfreeze_top_layers: int | None = None
    backbone_lr_multiplier: float = 1.0

    def __post_init__(self):
        if self.unfreeze_at_step is not None and (not isinstance(self.unfreeze_at_step, int)
                                                  or self.unfreeze_at_step < 0):
            raise ValueError(f"unfreeze_at_step must be an int >= 0; got "
                             f"{self.unfreeze_at_step!r}.")
        if self.unfreeze_top_layers is not None and (not isinstance(self.unfreeze_top_layers, int)
                                                     or self.unfreeze_top_layers < 1):
            raise ValueError(f"unfreeze_top_layers must be an int >= 1; got "
                             f"{self.unfreeze_top_layers!r}.")
        if self.unfreeze_at_step is not None and not self.freeze_backbone:
            raise ValueError("unfreeze_at_step needs freeze_backbone=True (nothing is frozen).")
        if not self.backbone_lr_multiplier > 0:
            raise ValueError(f"backbone_lr_multiplier must be > 0; got "
                             f"{self.backbone_lr_multiplier!r}.")


def weighted_layers(backbone: keras.Model) -> list:
    """The backbone's innermost layers that own weights, input to output."""
    layers = []
    for layer in backbone._flatten_layers(include_self=False, recursive=True):
        if layer._flatten_layers(include_self=False, recursive=False):
            continue  # a container (nested model): its leaves are listed instead
        if layer.weights:
            layers.append(layer)
    return layers


def layers_to_unfreeze(backbone: keras.Model, top: int | None) -> list:
    layers = weighted_layers(backbone)
    if top is None:
        return layers
    if top > len(layers):
        raise ValueError(f"unfreeze_top_layers={top}, but the backbone {backbone.name!r} has only "
                         f"{len(layers)} layers with weights.")
    return layers[-top:]


def trainable_weights_when_unfrozen(layers) -> list:
    """The variables `layers` would train once unfrozen (their trainable flag is restored)."""
    states = [(layer, layer.trainable) for layer in layers]
    try:
        for layer in layers:
            layer.trainable = True
        return [v for layer in layers for v in layer.trainable_weights]
    finally:
        for layer, state in states:
            layer.trainable = state


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`multiplier` times another learning-rate schedule."""

    def __init__(self, schedule, multiplier: float):
        self.schedule = schedule
        self.multiplier = multiplier

    def __call__(self, step):
        return self.schedule(step) * self.multiplier

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "multiplier": self.multiplier}


def scaled_optimizer(optimizer: keras.optimizers.Optimizer, multiplier: float):
    """A new optimizer like `optimizer` with its learning rate times `multiplier`."""
    config = optimizer.get_config()
    rate = optimizer._learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        config["learning_rate"] = ScaledSchedule(rate, multiplier)
    else:
        config["learning_rate"] = float(keras.ops.convert_to_numpy(rate)) * multiplier
    config["name"] = f"{config.get('name', 'optimizer')}_backbone"
    return type(optimizer).from_config(config)
