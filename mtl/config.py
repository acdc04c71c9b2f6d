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
import math
import os
from typing import Any

ON_NONFINITE = ("stop", "skip")
GRADIENT_MODES = ("exact", "rep")
GRANULARITIES = ("all", "layer", "variable")
JACOBIAN_DTYPES = ("float32", "bfloat16")
MIXED_PRECISION = ("none", "float16", "bfloat16")
INPUT_SHARDINGS = ("exact", "shard")


class UsageError(ValueError):
    """Something that is the user's to fix (a setting, a name, data that does not fit).

    Experiment scripts print it as `error: ...` and exit with status 2; nothing saved is
    touched. Anything else keeps its traceback.
    """


class UsageTypeError(UsageError, TypeError):
    """A `UsageError` about a value of the wrong type (also a `TypeError`)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        allowed = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise UsageError(f"{name} must be {allowed}; got {value!r}.")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"{name} must be one of {list(allowed)}; got {value!r}.")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UsageError(f"{name} must be > 0 and finite; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """Freezing and fine-tuning a shared backbone (see `mtl.finetune`).

    Attributes:
      freeze_backbone: keep the backbone fixed; it runs in inference mode.
      unfreeze_at_step: with `freeze_backbone`, the global step at which backbone layers become
        trainable (they get a fresh optimizer state: Adam's bias correction counts from their
        first update).
      unfreeze_top_layers: how many of the backbone's top layers with weights to unfreeze
        (None: all).
      backbone_lr_multiplier: the backbone's learning rate as a multiple of the heads' (a
        schedule is scaled and follows the heads' step).
    """

    freeze_backbone: bool = False
    unfreeze_at_step: int | None = None
    unfreeze_top_layers: int | None = None
    backbone_lr_multiplier: float = 1.0

    def __post_init__(self):
        check_int("unfreeze_at_step", self.unfreeze_at_step, 0, optional=True)
        check_int("unfreeze_top_layers", self.unfreeze_top_layers, 1, optional=True)
        if self.unfreeze_at_step is not None and not self.freeze_backbone:
            raise UsageError("unfreeze_at_step needs freeze_backbone=True (nothing is frozen).")
        check_positive("backbone_lr_multiplier", self.backbone_lr_multiplier)

    @property
    def active(self) -> bool:
        return self.freeze_backbone or self.backbone_lr_multiplier != 1.0


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How `mtl.Trainer` trains (everything but the model, tasks, optimizer and method).

    Attributes:
      steps_per_loop: train steps inside one compiled call.
      log_every: steps between train summaries / history records.
      checkpoint_every: steps between checkpoints (None: only at the end of `fit`).
      max_to_keep: checkpoints kept in `model_dir`.
      grad_accum_steps: micro-batches per update (K).
      jit_compile: XLA for the forward and backward pass.
      on_nonfinite: "stop" or "skip" on a non-finite loss or gradient.
      gradient_mode: "exact" or "rep", for gradient-based weighting methods.
      checkpoint_input: save the input pipeline's position (one replica).
      diagnostics_every: steps between task-gradient diagnostics (None: off).
      fine_tuning: freezing, scheduled unfreezing, backbone learning-rate multiplier.
      granularity: for gradient-based methods in exact mode, what the method combines at once:
        "all" the shared variables together (the papers' form), "layer" each shared layer's
        variables on their own, "variable" each shared variable on its own (GradVac's and
        TorchJD's grouping); each group gets its own method instance and state.
      jacobian_chunk_size: gradient methods in exact mode compute the per-task gradients this
        many tasks at a time (one batched Jacobian per chunk): the backward pass holds the
        activation gradients of that many tasks, not of all T (None: all at once). The result
        is the same; smaller chunks trade speed for memory.
      jacobian_scope: partial Jacobian descent (TorchJD's partial Jacobian), for methods defined
        by the Gramian of the task gradients: the method's weights come from the Gramian of the
        per-task gradients of a scope of the shared variables only, "top:N" (the last N shared
        layers, in the model's order) or a sequence of layer names; every shared variable then
        gets sum_t w_t grad(row_t) by one backward pass. An approximation of the method, stated
        as such: the weights see only the scope's conflicts. None or "all": every shared
        variable, i.e. exact mode, where the weights from the whole Gramian are applied as
        J^T w (the per-task gradients are in hand; a backward pass would cost more).
      jacobian_dtype: "float32", or "bfloat16" to keep the per-task gradients (the Jacobian
        of exact mode, the scope's of a partial Jacobian) in half the memory: the Gramian and the
        direction are computed from the rounded rows (an approximation: ~3 significant digits
        per entry; its effect on the direction is measured in tests/test_gradient_sources.py).
      clip_norm: clip the update's gradient of the model's variables to this global norm
        (None: no clipping), computed on the whole update's gradient (after the sum over
        replicas and micro-batches), so that it clips as on one device. (Keras's `clipnorm`
        on the optimizer clips each replica's part before the sum; the trainer refuses it
        under a multi-replica strategy.)
      allow_config_change: settings of the run's record (`trainer.json` in `model_dir`) that a
        resumed run may change: "tasks", "weighting", "optimizer", "precision",
        "grad_accum_steps", "gradient_mode", "fine_tuning" (see `mtl.run_record`).
    """

    steps_per_loop: int = 10
    log_every: int = 100
    checkpoint_every: int | None = 1000
    max_to_keep: int = 3
    grad_accum_steps: int = 1
    jit_compile: bool = False
    on_nonfinite: str = "stop"
    gradient_mode: str = "exact"
    checkpoint_input: bool = True
    diagnostics_every: int | None = None
    fine_tuning: FineTuning = FineTuning()
    granularity: str = "all"
    clip_norm: float | None = None
    jacobian_chunk_size: int | None = None
    jacobian_scope: Any = None
    jacobian_dtype: str = "float32"
    allow_config_change: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "jacobian_scope", parse_jacobian_scope(self.jacobian_scope))
        check_choice("jacobian_dtype", self.jacobian_dtype, JACOBIAN_DTYPES)
        if self.jacobian_scope is not None and (self.gradient_mode != "exact"
                                                or self.granularity != "all"):
            raise UsageError(f"jacobian_scope={scope_text(self.jacobian_scope)!r} chooses the "
                             "shared variables whose Gramian the method sees; it needs "
                             "gradient_mode='exact' and granularity='all' (got "
                             f"{self.gradient_mode!r} and {self.granularity!r}).")
        check_int("jacobian_chunk_size", self.jacobian_chunk_size, 1, optional=True)
        if self.clip_norm is not None:
            check_positive("clip_norm", self.clip_norm)
        for name in ("steps_per_loop", "log_every", "grad_accum_steps", "max_to_keep"):
            check_int(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "diagnostics_every"):
            check_int(name, getattr(self, name), 1, optional=True)
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_choice("gradient_mode", self.gradient_mode, GRADIENT_MODES)
        check_choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity != "all" and self.gradient_mode != "exact":
            raise UsageError(f"granularity={self.granularity!r} groups the shared parameters' "
                             "gradients; it needs gradient_mode='exact'.")
        if not isinstance(self.fine_tuning, FineTuning):
            raise UsageError(f"fine_tuning must be a mtl.FineTuning; got {self.fine_tuning!r}.")
        _check_names("allow_config_change", self.allow_config_change, TRAINER_RECORD)

    @classmethod
    def of(cls, options: "TrainerOptions | None" = None, **settings) -> "TrainerOptions":
        """`options` with `settings` (TrainerOptions fields) replaced; unknown names refused."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise UsageError(f"Trainer takes no setting {unknown[0]!r}; its settings are "
                             f"{names}.")
        return dataclasses.replace(options or cls(), **settings)


def parse_jacobian_scope(value):
    """None / "" / "all" -> None (every shared variable: exact mode); "top:N" -> ("top", N);
    "a,b" or a sequence of layer names -> ("layers", (a, b)). Anything else: `UsageError`
    naming the expected forms."""
    expected = ("expected 'all' (every shared variable), 'top:N' (N >= 1: the last N shared "
                "layers) or layer names ('conv_1,features' or a list)")
    if value is None or value == "" or value == "all":
        return None
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("top", "layers"):
        return value
    if isinstance(value, str):
        if value.startswith("top:"):
            count = value[4:]
            if not count.isdigit() or int(count) < 1:
                raise UsageError(f"jacobian_scope={value!r}: {expected}.")
            return ("top", int(count))
        names = tuple(n.strip() for n in value.split(",") if n.strip())
    elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        names = tuple(value)
    else:
        raise UsageError(f"jacobian_scope={value!r}: {expected}.")
    if not names:
        raise UsageError(f"jacobian_scope={value!r}: {expected}.")
    return ("layers", names)


def scope_text(scope) -> str | None:
    """A parsed `jacobian_scope` as written: "top:N" or "layer,layer" (None: every shared
    variable)."""
    if scope is None:
        return None
    return f"top:{scope[1]}" if scope[0] == "top" else ",".join(scope[1])


#: What `trainer.json` records (`mtl.run_record`): all of it shapes a run's state or results.
TRAINER_RECORD = ("tasks", "weighting", "optimizer", "precision", "grad_accum_steps",
                  "gradient_mode", "granularity", "clip_norm", "jacobian_scope", "jacobian_dtype",
                  "fine_tuning")


def _check_names(name: str, given, allowed) -> None:
    if isinstance(given, str) or not all(isinstance(g, str) for g in given):
        raise UsageError(f"{name} must be a sequence of setting names; got {given!r}.")
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise UsageError(f"{name} names {unknown[0]!r}, which is not a recorded setting; "
                         f"expected some of {list(allowed)}.")


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
        _check_names("--allow_config_change", self.allow_config_change,
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
