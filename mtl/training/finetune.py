"""Freezing and fine-tuning a shared backbone, and the optimizer groups they imply.

    fine_tuning = mtl.FineTuning(freeze_backbone=True, unfreeze_at_step=1000,
                                 unfreeze_top_layers=2, backbone_lr_multiplier=0.1)
    trainer = mtl.Trainer(model, tasks, optimizer=..., fine_tuning=fine_tuning)

A frozen layer (`trainable = False`) runs in inference mode, so a frozen BatchNormalization keeps
its moving statistics. At `unfreeze_at_step` the top `unfreeze_top_layers` layers of the backbone
that have weights (all of them when None) become trainable; their optimizer slots exist from the
start, so nothing is rebuilt but the compiled step.

Optimizer groups (`optimizer_groups`): the variables trainable from the start use the user's
optimizer; with `backbone_lr_multiplier`, the backbone's variables use a second optimizer of the
same kind with that multiple of the learning rate; variables unfrozen later use an optimizer of
their own, fresh when they start training, so its state behaves as a new optimizer's would (Keras
3 bias-corrects Adam's slots with the optimizer's single `iterations` counter: slots of a variable
that starts training at step 2000 would be corrected as if it had trained from step 0, and its
first steps would be 3-6x the learning rate). A learning-rate schedule is evaluated at the user's
optimizer's step in every group, so all groups follow the same schedule.
"""

from __future__ import annotations

import keras

from mtl.errors import UsageError
from mtl.options import FineTuning


def weighted_layers(backbone: keras.Model) -> list:
    """The backbone's innermost layers that own weights, input to output."""
    layers = []
    for layer in backbone._flatten_layers(include_self=False, recursive=True):
        if layer._flatten_layers(include_self=False, recursive=False):
            continue  # a container (nested model): its leaves are listed instead
        if layer.weights:
            layers.append(layer)
    return layers


def freeze(model: keras.Model, fine_tuning: FineTuning) -> list:
    """Applies `fine_tuning.freeze_backbone` to `model`'s backbone; returns the layers to
    unfreeze at `unfreeze_at_step` ([] when none)."""
    backbone = getattr(model, "backbone", None)
    if fine_tuning.active and backbone is None:
        raise UsageError("fine_tuning needs a MultiTaskModel built from a backbone and heads.")
    if not fine_tuning.freeze_backbone:
        return []
    backbone.trainable = False  # Frozen layers run in inference mode (BatchNorm too).
    if fine_tuning.unfreeze_at_step is None:
        return []
    return layers_to_unfreeze(backbone, fine_tuning.unfreeze_top_layers)


def layers_to_unfreeze(backbone: keras.Model, top: int | None) -> list:
    layers = weighted_layers(backbone)
    if top is None:
        return layers
    if top > len(layers):
        raise UsageError(f"unfreeze_top_layers={top}, but the backbone {backbone.name!r} has only "
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


class FollowingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`multiplier` times `schedule` at the step `counter` holds (the user's optimizer's
    `iterations`), whatever step the optimizer using it passes."""

    def __init__(self, schedule, multiplier: float, counter):
        self.schedule = schedule
        self.multiplier = multiplier
        self.counter = counter

    def __call__(self, step):
        del step  # This group's own counter: not the schedule's step.
        return self.schedule(self.counter) * self.multiplier

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "multiplier": self.multiplier}


def group_optimizer(optimizer: keras.optimizers.Optimizer, multiplier: float, name: str):
    """A new optimizer like `optimizer`, fresh state, learning rate times `multiplier` (a
    schedule follows `optimizer`'s step)."""
    config = optimizer.get_config()
    rate = optimizer._learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        config["learning_rate"] = FollowingSchedule(rate, multiplier, optimizer.iterations)
    else:
        config["learning_rate"] = float(keras.ops.convert_to_numpy(rate)) * multiplier
    config["name"] = f"{config.get('name', 'optimizer')}_{name}"
    return type(optimizer).from_config(config)


def optimizer_groups(optimizer, fine_tuning: FineTuning, *, backbone_ids, trainable_now,
                     trainable_later) -> dict:
    """`{name: (optimizer, variables)}`: "optimizer" (the user's) for the variables trainable now
    (the backbone's only when its multiplier is 1), "backbone_optimizer" for the backbone's
    trainable variables under a multiplier, "unfrozen_optimizer" for the variables unfrozen
    later. Builds each optimizer on its variables (call under the strategy scope)."""
    multiplier = fine_tuning.backbone_lr_multiplier
    now_ids = {id(v) for v in trainable_now}
    later = [v for v in trainable_later if id(v) not in now_ids]
    scaled = multiplier != 1.0
    main = [v for v in trainable_now if not (scaled and id(v) in backbone_ids)]
    backbone = [v for v in trainable_now if scaled and id(v) in backbone_ids]
    groups = {"optimizer": (optimizer, main)}
    if backbone:
        groups["backbone_optimizer"] = (group_optimizer(optimizer, multiplier, "backbone"),
                                        backbone)
    if later:
        groups["unfrozen_optimizer"] = (group_optimizer(optimizer, multiplier, "unfrozen"),
                                        later)
    for group_optimizer_, variables in groups.values():
        group_optimizer_.build(variables)
    return groups
