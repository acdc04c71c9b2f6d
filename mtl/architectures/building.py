"""What the builders share: layer names handed out once each, fresh copies of a backbone, the
model's input, and `soft_sharing_builder`, which turns a function that wires the tasks'
features into a builder of the `MultiTaskModel` that records its own call."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import keras

from mtl import backbones
from mtl.architectures.spec import ArchitectureSpec
from mtl.errors import UsageError
from mtl.model import MultiTaskModel


class Names:
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


def backbone_copy(backbone: str, input_shape, config: dict, name: str) -> keras.Model:
    """A fresh build of the backbone called `name`, its variables under `name/`."""
    with keras.name_scope(name):
        return backbones.BUILDERS[backbone](input_shape, name=name, **config)


def input_like(model: keras.Model):
    """A fresh `keras.Input` ("inputs") of the model's input shape and dtype."""
    return keras.Input(shape=tuple(model.input.shape[1:]), dtype=model.input.dtype,
                       name="inputs")


@dataclasses.dataclass(frozen=True)
class Wiring:
    """What a soft-sharing architecture wires: the model's `inputs`, each task's final feature
    vector (`features`, `{task: symbolic tensor}`) and the checked `heads` that read them."""

    spec: ArchitectureSpec
    inputs: Any
    features: Mapping
    heads: Mapping


def soft_sharing_builder(wire: Callable[..., Wiring]) -> Callable[..., MultiTaskModel]:
    """The builder that calls `wire(input_shape, heads, **options)`, applies each head to its
    task's features and returns the `MultiTaskModel.from_outputs` of the result.

    The model keeps, as `architecture_args`, the call (every option, defaults included) and, as
    `architecture_heads`, the heads: what `mtl.training.model_record` records to rebuild the
    very same graph, however the builder was called (directly or through `build`). The builder has
    `wire`'s name, docstring and signature, and returns a `MultiTaskModel`.
    """
    signature = inspect.signature(wire)

    @functools.wraps(wire)
    def build_and_record(input_shape, heads, **kwargs) -> MultiTaskModel:
        wiring = wire(input_shape, heads, **kwargs)
        bound = signature.bind(input_shape, heads, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        architecture_args = {
            "architecture": wiring.spec.name,
            "input_shape": [int(d) for d in args.pop("input_shape")],
            "backbone": args.pop("backbone"),
            "backbone_config": dict(args.pop("backbone_config") or {}),
            "options": {k: v for k, v in args.items() if k != "heads"}}
        outputs = {task: wiring.heads[task](wiring.features[task]) for task in wiring.heads}
        return MultiTaskModel.from_outputs(
            wiring.inputs, outputs, name=wiring.spec.name, architecture=wiring.spec,
            architecture_args=architecture_args, architecture_heads=dict(heads))

    build_and_record.__signature__ = signature.replace(return_annotation="MultiTaskModel")
    build_and_record.__annotations__ = {**wire.__annotations__, "return": "MultiTaskModel"}
    return build_and_record
