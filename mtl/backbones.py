"""Shared backbones: Functional Keras models, inputs -> features, each built from a small config.

Every builder takes `input_shape` (without the batch axis) and returns a `keras.Model` whose output
is a feature tensor. `get(name, **config)` looks a builder up by name (as the `--backbone` flag does).
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
from mtl.errors import UsageError


def _check_input_shape(builder: str, input_shape) -> tuple:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"{builder}: input_shape must be a tuple of ints; got {input_shape!r}."
                         ) from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"{builder}: input_shape must be non-empty with positive sizes; "
                         f"got {input_shape!r}.")
    return shape


def mlp(input_shape, widths: Sequence[int] = (256, 128), *, activation: str = "relu",
        dropout: float = 0.0, name: str = "mlp") -> keras.Model:
    """Flatten -> [Dense(width) -> activation -> Dropout] per width. Output: [batch, widths[-1]]."""
    shape = _check_input_shape("mlp", input_shape)
    inputs = keras.Input(shape=shape, name="inputs")
    x = keras.layers.Flatten()(inputs) if len(shape) > 1 else inputs
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation=activation, name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return keras.Model(inputs, x, name=name)


def small_cnn(input_shape, filters: Sequence[int] = (32, 64), *, dense: int = 128,
              dropout: float = 0.0, batch_norm: bool = False, name: str = "small_cnn"
              ) -> keras.Model:
    """[Conv3x3 -> (BN) -> ReLU -> MaxPool2] per entry of `filters`, Flatten, Dense(dense).

    Flatten (not global pooling) keeps *where* things are, which tasks such as "the left digit"
    need. Output: [batch, dense].
    """
    shape = _check_input_shape("small_cnn", input_shape)
    if len(shape) != 3:
        raise UsageError(f"small_cnn: input_shape must be (height, width, channels); got {shape}.")
    inputs = keras.Input(shape=shape, name="inputs")
    x = inputs
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=not batch_norm, name=f"conv_{i}")(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.ReLU(name=f"relu_{i}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(dense, activation="relu", name="features")(x)
    return keras.Model(inputs, x, name=name)


def _residual_block(x, filters: int, stride: int, name: str):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_proj")(shortcut)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet(input_shape, widths: Sequence[int] = (16, 32, 64), *, blocks_per_stage: int = 2,
           pooling: str = "avg", name: str = "resnet") -> keras.Model:
    """A small pre-activation-free ResNet (He et al. 2016) for small images.

    A 3x3 stem, then one stage per width of `blocks_per_stage` basic blocks (the first block of
    every stage after the first halves the resolution). `pooling`: "avg" (global average,
    output [batch, widths[-1]]) or "flatten" (keeps spatial layout).
    """
    shape = _check_input_shape("resnet", input_shape)
    if pooling not in ("avg", "flatten"):
        raise UsageError(f"resnet: pooling must be 'avg' or 'flatten'; got {pooling!r}.")
    if blocks_per_stage < 1:
        raise UsageError(f"resnet: blocks_per_stage must be >= 1; got {blocks_per_stage}.")
    inputs = keras.Input(shape=shape, name="inputs")
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _residual_block(x, width, stride, name=f"stage{stage}_block{block}")
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="pool")(x)
    return keras.Model(inputs, x, name=name)


def mobilenet_v2(input_shape, *, alpha: float = 1.0, weights: str | None = None,
                 name: str = "mobilenet_v2") -> keras.Model:
    """`keras.applications.MobileNetV2` without its top, globally average-pooled.

    `weights`: None (random init) or the path of a local weights file (`.weights.h5`, or a
    `.keras`/`.h5` file holding the same architecture). Nothing is downloaded.
    """
    shape = _check_input_shape("mobilenet_v2", input_shape)
    if weights not in (None, "") and not isinstance(weights, str):
        raise UsageError(f"mobilenet_v2: weights must be None or a local file path; got {weights!r}.")
    if weights == "imagenet":
        raise UsageError("mobilenet_v2: weights='imagenet' would download from the network; "
                         "save the weights to a local file once and pass its path instead.")
    base = keras.applications.MobileNetV2(input_shape=shape, alpha=alpha, include_top=False,
                                          weights=None, pooling="avg")
    if weights:
        base.load_weights(weights)
    inputs = keras.Input(shape=shape, name="inputs")
    return keras.Model(inputs, base(inputs), name=name)


BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
}


def get(name: str, input_shape, **config) -> keras.Model:
    """Builds the backbone called `name` (one of `BUILDERS`)."""
    if name not in BUILDERS:
        raise UsageError(f"Unknown backbone {name!r}; expected one of {sorted(BUILDERS)}.")
    return BUILDERS[name](input_shape, **config)
