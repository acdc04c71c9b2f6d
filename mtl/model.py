"""`MultiTaskModel`: one Functional Keras model, inputs -> {task_name: output}.

Three ways to build one:
  * `MultiTaskModel(backbone, heads)`: a shared backbone (a Functional model) computed once per
    batch, feeding one head per task.
  * `MultiTaskModel.from_models({task: keras.Model})`: models built separately that share layer
    *instances* (one `Conv2D` object in two `Sequential`s). Keras deduplicates variables, so a shared
    kernel appears once in `trainable_variables` and receives the sum of every model's gradient.
  * `MultiTaskModel.from_outputs(inputs, {task: output})`: any Functional graph with one output
    per task, such as the soft-sharing architectures of `mtl.architectures` (experts and gates,
    cross-stitch units, attention modules).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf
from mtl.errors import UsageError, UsageTypeError
from mtl.tasks import check_task_name


def input_structure(model: keras.Model):
    """The model's symbolic inputs in their structure (a tensor, list or dict)."""
    if isinstance(model, keras.Function):  # A Functional model: `input` is what it was built on.
        return model.input
    inputs = getattr(model, "inputs", None)  # A Sequential's, once it has a keras.Input.
    if not inputs:
        raise UsageError(
            f"Model {model.name!r} has no defined inputs; build it with a keras.Input (a "
            "Functional model, or a Sequential whose first layer is keras.Input(shape)).")
    return inputs[0] if len(inputs) == 1 else inputs


def _fresh_inputs(model: keras.Model):
    """Symbolic `keras.Input`s with the same structure, shapes and dtypes as `model`'s inputs."""
    return tf.nest.map_structure(
        lambda t: keras.Input(shape=t.shape[1:], dtype=t.dtype), input_structure(model))


class _Refs:
    """Plain attribute holder: keeps Python references out of Keras/TF object tracking, so that
    the checkpoint graph is the Functional graph alone and does not change when `task_model` is
    called."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@dataclasses.dataclass(frozen=True)
class _Architecture:
    """What built a `from_outputs` model: the architecture's spec, the builder's call and the
    heads it was given (all None for a model no architecture built)."""

    spec: object = None
    args: dict | None = None
    heads: dict | None = None


class MultiTaskModel(keras.Model):
    """A Functional model whose outputs are a dict keyed by task name.

    Args:
      backbone: a Functional `keras.Model` (inputs -> shared features), run once per batch.
      heads: `{task_name: layer}`; each head maps the backbone's output to that task's output.
      name: the model's name.
    """

    def __init__(self, backbone: keras.Model, heads: Mapping[str, keras.layers.Layer], *,
                 name: str = "multi_task_model", _task_models=None, _architecture=None):
        if _task_models is not None:  # Built by `from_models` or `from_outputs`.
            inputs, outputs = _task_models
            super().__init__(inputs=inputs, outputs=outputs, name=name)
            self._mtl = _Refs(backbone=None, heads=dict(heads), task_models=dict(heads),
                              architecture=_architecture or _Architecture())
            return
        if not isinstance(backbone, keras.Model):
            raise UsageTypeError(f"backbone must be a keras.Model (Functional); got {type(backbone)}.")
        heads = check_heads(heads, layers=True)
        inputs = _fresh_inputs(backbone)
        features = backbone(inputs)
        outputs = {task: _one_output(head(features), f"head {task!r}")
                   for task, head in heads.items()}
        super().__init__(inputs=inputs, outputs=outputs, name=name)
        self._mtl = _Refs(backbone=backbone, heads=heads, task_models={},
                          symbolic=(inputs, outputs), architecture=_Architecture())

    @classmethod
    def from_models(cls, models: Mapping[str, keras.Model], *,
                    name: str = "multi_task_model") -> "MultiTaskModel":
        """Joint training of separately built models that share layer instances.

        All models must take inputs of the same structure and shape (one batch feeds them all).
        """
        models = check_heads(models, what="models")
        specs = {}
        for task, model in models.items():
            if not isinstance(model, keras.Model):
                raise UsageTypeError(f"from_models: task {task!r} must map to a keras.Model; got "
                                f"{type(model).__name__}.")
            if len(model.outputs) != 1:
                raise UsageError(
                    f"from_models: model {task!r} has {len(model.outputs)} outputs "
                    f"{[tuple(t.shape) for t in model.outputs]}; expected one output per task "
                    "(give each output its own task, e.g. one model per task sharing layers).")
            fresh = _fresh_inputs(model)
            specs[task] = tf.nest.map_structure(lambda t: (tuple(t.shape[1:]), t.dtype), fresh)
        first_task, first_spec = next(iter(specs.items()))
        for task, spec in specs.items():
            if spec != first_spec:
                raise UsageError(
                    f"from_models: all models must take the same inputs; model {task!r} takes "
                    f"{spec} but model {first_task!r} takes {first_spec}.")
        inputs = _fresh_inputs(models[first_task])
        outputs = {task: model(inputs) for task, model in models.items()}
        return cls(None, models, name=name, _task_models=(inputs, outputs))

    @classmethod
    def from_outputs(cls, inputs, outputs: Mapping[str, object], *,
                     name: str = "multi_task_model", architecture=None,
                     architecture_args: Mapping | None = None,
                     architecture_heads: Mapping[str, keras.layers.Layer] | None = None
                     ) -> "MultiTaskModel":
        """A multi-task model from a Functional graph: symbolic `inputs` (a `keras.Input`, or a
        list or dict of them) and `{task_name: symbolic output}`.

        Variables are shared by the tasks whose outputs depend on them (`sharing_report`), so
        soft sharing (experts with task gates, cross-stitch units, task attention over a shared
        trunk) trains like hard sharing: exact-mode gradient methods combine the task gradients
        of every variable more than one task uses. There is no single shared representation, so
        `gradient_mode="rep"` is refused. `architecture` (an object with a `name` and a
        `no_rep_reason`) names the architecture in messages; `mtl.architectures` sets it.

        `architecture_args` (the call to `mtl.architectures.build` that rebuilds this graph:
        `{"architecture", "input_shape", "backbone", "backbone_config", "options"}`) and
        `architecture_heads` (`{task: head layer}`, the heads that call was given) go together:
        `mtl.training.model_record` records a model that has them as that call and its heads.
        """
        outputs = check_heads(outputs, what="outputs")
        if (architecture_args is None) != (architecture_heads is None):
            given, missing = (("architecture_args", "architecture_heads")
                              if architecture_heads is None else
                              ("architecture_heads", "architecture_args"))
            raise UsageError(f"from_outputs: {given} was given without {missing}; expected both "
                             "(the call that built the graph and the heads it was given) or "
                             "neither.")
        if architecture_args is not None:
            if not isinstance(architecture_args, Mapping):
                raise UsageTypeError(f"from_outputs: architecture_args must be a dict; got "
                                     f"{type(architecture_args).__name__}.")
            architecture_heads = check_heads(architecture_heads, what="architecture_heads",
                                              layers=True)
            if set(architecture_heads) != set(outputs):
                raise UsageError(f"from_outputs: architecture_heads has the tasks "
                                 f"{sorted(architecture_heads)}; expected the outputs' "
                                 f"{sorted(outputs)}.")
        for task, output in outputs.items():
            _one_output(output, f"output {task!r}")
            if not isinstance(output, keras.KerasTensor):
                raise UsageTypeError(
                    f"from_outputs: output {task!r} is {type(output).__name__}; expected a "
                    "symbolic tensor (the result of calling layers on keras.Input).")
        task_models = {task: keras.Model(inputs, output, name=f"{task}_model")
                       for task, output in outputs.items()}
        return cls(None, task_models, name=name, _task_models=(inputs, dict(outputs)),
                   _architecture=_Architecture(architecture, _copied(architecture_args),
                                               architecture_heads))

    @property
    def architecture(self):
        """The soft-sharing architecture this model was built as (None: hard sharing or
        `from_models`)."""
        return self._mtl.architecture.spec

    @property
    def architecture_args(self) -> dict | None:
        """The call to `mtl.architectures.build` that built this model (`{"architecture",
        "input_shape", "backbone", "backbone_config", "options"}`, every option with its value,
        defaults included); None for a model no architecture built."""
        return _copied(self._mtl.architecture.args)

    @property
    def architecture_heads(self) -> dict | None:
        """`{task: head layer}` that the architecture's builder was given (the layers
        themselves); None for a model no architecture built."""
        heads = self._mtl.architecture.heads
        return None if heads is None else dict(heads)

    @property
    def backbone(self) -> keras.Model | None:
        """The shared backbone (None for a model built with `from_models`)."""
        return self._mtl.backbone

    @property
    def heads(self) -> dict:
        """`{task_name: head layer}` (for `from_models`, the task models themselves)."""
        return dict(self._mtl.heads)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._mtl.heads)

    def add_heads(self, heads: Mapping[str, keras.layers.Layer], *,
                  name: str | None = None) -> "MultiTaskModel":
        """A new MultiTaskModel with this one's backbone and heads plus `heads`.

        The layers are the same objects: training the new model goes on from what this one
        learned (e.g. add task B to a backbone trained on task A; freeze what should not move
        with `mtl.FineTuning` or `layer.trainable = False`).
        """
        if self.backbone is None:
            raise UsageError("add_heads needs a MultiTaskModel built from a backbone and heads.")
        heads = check_heads(heads, layers=True)
        clash = sorted(set(heads) & set(self.task_names))
        if clash:
            raise UsageError(f"add_heads: task {clash[0]!r} already has a head; the model's "
                             f"tasks are {list(self.task_names)}.")
        return MultiTaskModel(self.backbone, {**self._mtl.heads, **heads}, name=name or self.name)

    def task_model(self, name: str) -> keras.Model:
        """A plain `keras.Model` for one task, sharing the very same layer objects."""
        if name not in self._mtl.heads:
            raise KeyError(f"No task {name!r} in this model; its tasks are {list(self.task_names)}.")
        if name not in self._mtl.task_models:
            inputs, outputs = self._mtl.symbolic
            self._mtl.task_models[name] = keras.Model(inputs, outputs[name], name=f"{name}_model")
        return self._mtl.task_models[name]


def check_heads(heads, what="heads", layers: bool = False) -> dict:
    """`heads` as a dict, checked: task names as keys; with `layers`, a layer (or another
    callable on the backbone's output) as each value."""
    if not isinstance(heads, Mapping) or not heads:
        raise UsageError(f"{what} must be a non-empty dict {{task_name: ...}}; got {heads!r}.")
    for task, head in heads.items():
        check_task_name(task, f"{what}: a key (a task name)")
        if layers and not callable(head):
            raise UsageTypeError(
                f"{what}: task {task!r} maps to {head!r} of type {type(head).__name__}; expected "
                "a Keras layer that maps the backbone's output to the task's output, such as "
                "mtl.heads.classification(10) or mtl.heads.regression(1).")
    return dict(heads)


def _copied(value):
    """`value` with its dicts, lists and tuples copied (the values in them are the same)."""
    if isinstance(value, Mapping):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def _one_output(output, what: str):
    """A head's output: one tensor per task (a list or dict of outputs has no single loss)."""
    if isinstance(output, (list, tuple, dict)):
        raise UsageError(
            f"{what} returns {type(output).__name__} of {len(output)} outputs; expected one "
            "tensor per task (give each output its own task and head).")
    return output


@dataclasses.dataclass(frozen=True)
class SharedVariable:
    path: str
    shape: tuple
    size: int
    tasks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SharingReport:
    """Which trainable variables each task uses, and what sharing saves.

    `num_params_separate` counts the parameters of one separate model per task (what training the
    task models apart would need); `params_saved` is the difference to `num_params`.
    """

    variables: tuple[SharedVariable, ...]
    task_params: dict
    num_params: int
    num_params_separate: int

    @property
    def shared(self) -> tuple[SharedVariable, ...]:
        return tuple(v for v in self.variables if len(v.tasks) > 1)

    @property
    def params_saved(self) -> int:
        return self.num_params_separate - self.num_params

    def __str__(self) -> str:
        lines = [f"{'variable':48s} {'params':>9s}  tasks"]
        for v in self.shared:
            lines.append(f"{v.path:48s} {v.size:9d}  {', '.join(v.tasks)}")
        lines.append(f"shared variables: {len(self.shared)} of {len(self.variables)}; "
                     f"parameters: {self.num_params} (separate models: "
                     f"{self.num_params_separate}, saved by sharing: {self.params_saved})")
        return "\n".join(lines)


def sharing_report(model: MultiTaskModel) -> SharingReport:
    """Lists which trainable variables are shared by which tasks."""
    users: dict[int, list[str]] = {}
    task_params = {}
    for task in model.task_names:
        variables = model.task_model(task).trainable_variables
        task_params[task] = int(sum(np.prod(v.shape) for v in variables))
        for v in variables:
            users.setdefault(id(v), []).append(task)
    rows = []
    for v in model.trainable_variables:
        rows.append(SharedVariable(path=v.path, shape=tuple(v.shape), size=int(np.prod(v.shape)),
                                   tasks=tuple(users.get(id(v), ()))))
    return SharingReport(variables=tuple(rows), task_params=task_params,
                         num_params=sum(r.size for r in rows),
                         num_params_separate=sum(task_params.values()))


def seed_states(model: keras.Model) -> list:
    """The RNG state variables of the model's Dropout-like layers (their `SeedGenerator`s), each
    once, in layer order: checkpointing the model does not reach them."""
    states, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()) or ():
            if id(generator.state) not in seen:
                seen.add(id(generator.state))
                states.append(generator.state)
    return states
