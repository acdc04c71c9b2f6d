"""The architectures by name: `ARCHITECTURES` (each builder module's specs), `get_spec` and
`build`, which checks the options against the spec before calling its builder."""

from __future__ import annotations

from typing import Mapping

import keras

from mtl.architectures import experts, layerwise
from mtl.architectures.spec import ArchitectureSpec
from mtl.errors import UsageError
from mtl.model import MultiTaskModel

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec for spec in (*experts.SPECS, *layerwise.SPECS)}


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
