"""Optimizers by name, as the `--optimizer` flag names them."""

from __future__ import annotations

import keras
from mtl.errors import UsageError

_BUILDERS = {
    "sgd": lambda lr: keras.optimizers.SGD(lr),
    "momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adamw": lambda lr: keras.optimizers.AdamW(lr),
    "rmsprop": lambda lr: keras.optimizers.RMSprop(lr),
    "adagrad": lambda lr: keras.optimizers.Adagrad(lr),
}
NAMES = tuple(_BUILDERS)


def get(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A new optimizer; create it under the strategy scope that will use it."""
    if name not in _BUILDERS:
        raise UsageError(f"Unknown optimizer {name!r}; expected one of {list(NAMES)}.")
    if not learning_rate > 0:
        raise UsageError(f"learning_rate must be > 0; got {learning_rate!r}.")
    return _BUILDERS[name](float(learning_rate))
