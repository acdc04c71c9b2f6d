"""Validated settings: the trainer's options and an experiment run's config, each rule checked
once, the allowed values defined once (the flags' help and enums reuse them).

    options = mtl.TrainerOptions(grad_accum_steps=2, on_nonfinite="skip")
    trainer = mtl.Trainer(model, tasks, optimizer=..., options=options)
    # or, as keyword arguments: mtl.Trainer(model, tasks, optimizer=..., grad_accum_steps=2)

`Config` is what an experiment script runs (`mtl/flags.py` maps the command line onto it); its
`trainer_options()` are the `TrainerOptions` it implies. Reading a run's `config.json` needs
this module only, not absl.

Everything here raises `UsageError` (a `ValueError`) naming the setting, the value given and
what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any



from mtl.errors import (UsageError, UsageTypeError, check_choice, check_int,  # noqa: F401
                        check_names, check_positive)
from mtl.options import (GRADIENT_MODES, GRANULARITIES, JACOBIAN_DTYPES,  # noqa: F401
                         MIXED_PRECISION, ON_NONFINITE, TRAINER_RECORD, FineTuning,
                         TrainerOptions, parse_jacobian_scope, scope_text)

INPUT_SHARDINGS = ("exact", "shard")


def parse_options(text: str | None, flag: str = "--weighting_options") -> dict[str, Any]:
    """`--weighting_options` / `--architecture_options` (`flag`): `"c=0.4,rescale=1"` or a JSON
    object -> a dict.

    Values are read as JSON where they parse (numbers, true/false, lists, quoted strings),
    otherwise kept as strings: `normalization=loss+` -> {"normalization": "loss+"}.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            options = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag}={text!r} is not a valid JSON object ({e}); "
                             "expected e.g. '{\"c\": 0.4}' or 'c=0.4,rescale=1'.") from None
        if not isinstance(options, dict):
            raise UsageError(f"{flag}={text!r} must be a JSON object.")
        return options
    options = {}
    for item in _split_top_level(text):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{flag}={text!r}: {item!r} is not name=value; "
                             "expected e.g. 'c=0.4,rescale=1' or a JSON object.")
        value = value.strip()
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    return options


def parse_weighting_options(text: str | None) -> dict[str, Any]:
    """`--weighting_options` (see `parse_options`)."""
    return parse_options(text, "--weighting_options")


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: 'min_losses=[0,1],gamma=0' -> 2 items."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [i for i in items if i.strip()]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything an experiment run needs, typed and checked (the command line's flags)."""

    model_dir: str | None = None
    train_steps: int = 1500
    batch_size: int = 64
    eval_batch_size: int = 256
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weighting: str = "equal"
    weighting_options: dict = dataclasses.field(default_factory=dict)
    architecture: str = "hps"
    architecture_options: dict = dataclasses.field(default_factory=dict)
    tasks: tuple[str, ...] | None = None  # None: every task of the experiment.
    eval_every: int = 500
    eval_steps: int | None = None
    checkpoint_every: int = 500
    log_every: int = 100
    steps_per_loop: int = 10
    seed: int = 0
    data_dir: str | None = None
    backbone: str = "small_cnn"
    strategy: str = "default"
    num_gpus: int | None = None
    cpu_replicas: int | None = None
    tpu: str | None = None
    # How several workers share the train input: "exact" (every worker reads the whole stream
    # and keeps its batches: the global batches of one device) or "shard" (each reads only its
    # part of the examples). See `mtl.experiment.distributed_train_data`.
    input_sharding: str = "exact"
    grad_accum_steps: int = 1
    jit_compile: bool = False
    mixed_precision: str = "none"
    on_nonfinite: str = "stop"
    gradient_mode: str = "exact"
    granularity: str = "all"
    clip_norm: float | None = None
    jacobian_chunk_size: int | None = None
    jacobian_scope: str | None = None
    jacobian_dtype: str = "float32"
    max_to_keep: int = 3
    deterministic: bool = False
    checkpoint_input: bool = True
    diagnostics_every: int = 1000
    init_backbone_from: str | None = None
    freeze_backbone: bool = False
    unfreeze_at_step: int | None = None
    unfreeze_top_layers: int | None = None
    backbone_lr_multiplier: float = 1.0
    allow_config_change: tuple[str, ...] = ()

    #: Fields a resumed run may change freely: they shape neither its state nor the meaning of
    #: its results (`mtl.run_record`). Every other field needs --allow_config_change.
    FREE_TO_CHANGE = ("model_dir", "train_steps", "eval_every", "eval_steps", "eval_batch_size",
                      "checkpoint_every", "log_every", "steps_per_loop", "data_dir",
                      "max_to_keep", "diagnostics_every", "strategy", "num_gpus",
                      "cpu_replicas", "tpu", "jit_compile", "deterministic", "checkpoint_input",
                      "init_backbone_from", "on_nonfinite", "allow_config_change",
                      "jacobian_chunk_size")
    #: Which entry of the trainer's record (`TRAINER_RECORD`) a field feeds.
    TRAINER_FIELDS = {"tasks": "tasks", "weighting": "weighting",
                      "weighting_options": "weighting", "optimizer": "optimizer",
                      "learning_rate": "optimizer", "mixed_precision": "precision",
                      "grad_accum_steps": "grad_accum_steps", "gradient_mode": "gradient_mode",
                      "granularity": "granularity", "clip_norm": "clip_norm",
                      "jacobian_scope": "jacobian_scope", "jacobian_dtype": "jacobian_dtype",
                      "freeze_backbone": "fine_tuning", "unfreeze_at_step": "fine_tuning",
                      "unfreeze_top_layers": "fine_tuning",
                      "backbone_lr_multiplier": "fine_tuning"}

    def __post_init__(self):
        from mtl import distribute, optimizers
        from mtl import weighting as weighting_lib

        def flag(error: UsageError) -> UsageError:
            return UsageError(f"--{error}")

        try:
            self.trainer_options()  # The trainer's rules, checked where they live.
            for name in ("train_steps", "seed", "diagnostics_every"):
                check_int(name, getattr(self, name), 0)
            for name in ("batch_size", "eval_batch_size", "eval_every"):
                check_int(name, getattr(self, name), 1)
            for name in ("eval_steps", "num_gpus", "cpu_replicas"):
                check_int(name, getattr(self, name), 1, optional=True)
            check_positive("learning_rate", self.learning_rate)
        except UsageError as e:
            raise flag(e) from None
        for name, allowed in (("optimizer", optimizers.NAMES),
                              ("weighting", sorted(weighting_lib.METHODS)),
                              ("strategy", distribute.STRATEGIES),
                              ("input_sharding", INPUT_SHARDINGS),
                              ("mixed_precision", MIXED_PRECISION)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name}={getattr(self, name)!r} is unknown; expected one of "
                                 f"{list(allowed)}.")
        if self.batch_size % self.grad_accum_steps:
            raise UsageError(f"--batch_size={self.batch_size} is the batch of one update and "
                             f"must split into --grad_accum_steps={self.grad_accum_steps} equal "
                             "micro-batches; use a multiple of it.")
        if self.tasks is not None and not self.tasks:
            raise UsageError("--tasks is empty; name at least one task or leave it unset.")
        if not isinstance(self.weighting_options, dict):
            raise UsageError(f"--weighting_options must be a dict; got "
                             f"{self.weighting_options!r}.")
        try:  # The method's own checks of its options.
            weighting_lib.get(self.weighting, **self.weighting_options)
        except ValueError as e:
            raise UsageError(f"--weighting_options: {e}") from None
        self._check_architecture()
        for name in ("data_dir", "model_dir"):
            path = getattr(self, name)
            if path and os.path.isfile(path):
                raise UsageError(f"--{name}={path!r} is a file; expected a folder.")
        if self.cpu_replicas is not None and self.strategy not in ("mirrored", "one_device"):
            raise UsageError(f"--cpu_replicas={self.cpu_replicas} needs --strategy=mirrored; "
                             f"got --strategy={self.strategy!r}.")
        check_names("--allow_config_change", self.allow_config_change,
                     [f.name for f in dataclasses.fields(self)
                      if f.name not in self.FREE_TO_CHANGE])
        if self.unfreeze_at_step is not None and self.unfreeze_at_step >= self.train_steps:
            raise UsageError(f"--unfreeze_at_step={self.unfreeze_at_step} is not before "
                             f"--train_steps={self.train_steps}: nothing would be unfrozen.")

    def fine_tuning(self) -> FineTuning:
        return FineTuning(freeze_backbone=self.freeze_backbone,
                          unfreeze_at_step=self.unfreeze_at_step,
                          unfreeze_top_layers=self.unfreeze_top_layers,
                          backbone_lr_multiplier=self.backbone_lr_multiplier)

    def _check_architecture(self) -> None:
        """The architecture's name, the names of its options and the backbone it accepts
        (the values are checked where the model is built, before training)."""
        from mtl import architectures

        if self.architecture not in architectures.ARCHITECTURES:
            raise UsageError(f"--architecture={self.architecture!r} is unknown; expected one of "
                             f"{list(architectures.ARCHITECTURES)}.")
        if not isinstance(self.architecture_options, dict):
            raise UsageError(f"--architecture_options must be a dict; got "
                             f"{self.architecture_options!r}.")
        spec = architectures.get_spec(self.architecture)
        unknown = sorted(set(self.architecture_options) - set(spec.option_names))
        if unknown:
            raise UsageError(f"--architecture_options: architecture {self.architecture!r} takes "
                             f"no option {unknown[0]!r}; its options are "
                             f"{list(spec.option_names)}.")
        if self.backbone not in spec.backbones:
            reason = f" ({spec.backbones_reason})" if spec.backbones_reason else ""
            raise UsageError(f"--architecture={self.architecture} does not take "
                             f"--backbone={self.backbone}{reason}; expected one of "
                             f"{list(spec.backbones)}.")

    def build_model(self, input_shape, heads):
        """The experiment's model: `heads` ({task: head layer}) on `--architecture` (with
        `--architecture_options`) built from `--backbone`."""
        from mtl import architectures

        return architectures.build(self.architecture, input_shape, heads,
                                   backbone=self.backbone, **self.architecture_options)

    def trainer_options(self) -> TrainerOptions:
        return TrainerOptions(
            steps_per_loop=self.steps_per_loop, log_every=self.log_every,
            checkpoint_every=self.checkpoint_every, max_to_keep=self.max_to_keep,
            grad_accum_steps=self.grad_accum_steps, jit_compile=self.jit_compile,
            on_nonfinite=self.on_nonfinite, gradient_mode=self.gradient_mode,
            granularity=self.granularity, clip_norm=self.clip_norm or None,
            jacobian_chunk_size=self.jacobian_chunk_size or None,
            jacobian_scope=self.jacobian_scope or None, jacobian_dtype=self.jacobian_dtype,
            checkpoint_input=self.checkpoint_input,
            diagnostics_every=self.diagnostics_every or None, fine_tuning=self.fine_tuning(),
            allow_config_change=tuple(sorted({self.TRAINER_FIELDS[f]
                                              for f in self.allow_config_change
                                              if f in self.TRAINER_FIELDS})))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "Config":
        """A config from `config.json` (keys that are not fields, e.g. "experiment", ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        for name in ("tasks", "allow_config_change"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)
