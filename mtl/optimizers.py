"""The one look-up of optimizers by name: the `--optimizer` flag's names (`get`), and the
`Trainer`'s `optimizer=` argument, a Keras optimizer object or a Keras optimizer name
(`resolve`)."""

from __future__ import annotations

import keras
from mtl.errors import UsageError, UsageTypeError

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


def resolve(optimizer) -> keras.optimizers.Optimizer:
    """`optimizer` itself when it is a Keras optimizer object; a Keras optimizer name
    (`keras.optimizers.get`, Keras's defaults) otherwise."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return keras.optimizers.get(optimizer)
        except ValueError:
            raise UsageError(f"Unknown optimizer {optimizer!r}; expected a Keras optimizer name "
                             "('sgd', 'adam', 'adamw', 'rmsprop', ...) or a "
                             "keras.optimizers.Optimizer object.") from None
    raise UsageTypeError(f"optimizer must be a keras.optimizers.Optimizer or a name; got "
                         f"{optimizer!r}.")
