"""The command-line flags shared by every experiment, and the typed config they become.

This is the only module that defines or reads absl flags: experiment scripts call
`define_flags()` at import and `config_from_flags()` in `main`, then pass the `Config` on.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from mtl import distribute, optimizers
from mtl import weighting as weighting_lib


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything an experiment run needs, typed and checked."""

    model_dir: str | None = None
    train_steps: int = 1500
    batch_size: int = 64
    eval_batch_size: int = 256
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weighting: str = "equal"
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
    grad_accum_steps: int = 1
    jit_compile: bool = False
    mixed_precision: str = "none"
    on_nonfinite: str = "stop"
    gradient_mode: str = "exact"
    max_to_keep: int = 3
    deterministic: bool = False
    checkpoint_input: bool = True
    diagnostics_every: int = 1000
    init_backbone_from: str | None = None
    freeze_backbone: bool = False
    unfreeze_at_step: int | None = None
    unfreeze_top_layers: int | None = None
    backbone_lr_multiplier: float = 1.0

    def __post_init__(self):
        for name in ("train_steps", "seed", "diagnostics_every"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("batch_size", "eval_batch_size", "eval_every", "checkpoint_every",
                     "log_every", "steps_per_loop", "grad_accum_steps", "max_to_keep"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_steps", "num_gpus", "cpu_replicas"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0; got {self.learning_rate!r}.")
        if self.optimizer not in optimizers.NAMES:
            raise ValueError(f"--optimizer={self.optimizer!r} is unknown; expected one of "
                             f"{list(optimizers.NAMES)}.")
        if self.weighting not in weighting_lib.METHODS:
            raise ValueError(f"--weighting={self.weighting!r} is unknown; expected one of "
                             f"{sorted(weighting_lib.METHODS)}.")
        if self.strategy not in distribute.STRATEGIES:
            raise ValueError(f"--strategy={self.strategy!r} is unknown; expected one of "
                             f"{list(distribute.STRATEGIES)}.")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"--batch_size={self.batch_size} is the batch of one update and "
                             f"must split into --grad_accum_steps={self.grad_accum_steps} equal "
                             "micro-batches; use a multiple of it.")
        for name, allowed in (("mixed_precision", MIXED_PRECISION),
                              ("on_nonfinite", ("stop", "skip")),
                              ("gradient_mode", ("exact", "rep"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r} is unknown; expected one of "
                                 f"{list(allowed)}.")
        if self.unfreeze_at_step is not None:
            _check_int("unfreeze_at_step", self.unfreeze_at_step, minimum=0)
            if not self.freeze_backbone:
                raise ValueError("--unfreeze_at_step needs --freeze_backbone (nothing is frozen).")
        if self.unfreeze_top_layers is not None:
            _check_int("unfreeze_top_layers", self.unfreeze_top_layers, minimum=1)
        if not self.backbone_lr_multiplier > 0:
            raise ValueError(f"--backbone_lr_multiplier must be > 0; got "
                             f"{self.backbone_lr_multiplier!r}.")
        if self.tasks is not None and not self.tasks:
            raise ValueError("--tasks is empty; name at least one task or leave it unset.")


MIXED_PRECISION = ("none", "float16", "bfloat16")


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"--{name} must be an int >= {minimum}; got {value!r}.")


_DEFAULTS = Config()


def define_flags(**defaults) -> None:
    """Defines the shared flags (once); `defaults` override `Config`'s defaults per experiment."""
    values = {**dataclasses.asdict(_DEFAULTS), **defaults}
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"define_flags: no flag {unknown[0]!r}.")
    if "train_steps" in flags.FLAGS:
        for name, value in defaults.items():
            flags.FLAGS.set_default(name, _flag_default(name, value))
        return
    f = flags
    f.DEFINE_string("model_dir", values["model_dir"],
                    "Run folder: checkpoints, TensorBoard logs, config.json, results.json. An "
                    "existing run there is resumed.")
    f.DEFINE_integer("train_steps", values["train_steps"], "Global step to train to.")
    f.DEFINE_integer("batch_size", values["batch_size"], "Global train batch size.")
    f.DEFINE_integer("eval_batch_size", values["eval_batch_size"], "Global eval batch size.")
    f.DEFINE_float("learning_rate", values["learning_rate"], "Learning rate.")
    f.DEFINE_enum("optimizer", values["optimizer"], list(optimizers.NAMES), "Optimizer.")
    f.DEFINE_string("weighting", values["weighting"],
                    f"Task weighting method, one of {sorted(weighting_lib.METHODS)}.")
    f.DEFINE_list("tasks", values["tasks"],
                  "Comma-separated subset of the experiment's tasks (e.g. one task for a "
                  "single-task baseline). Default: all.")
    f.DEFINE_integer("eval_every", values["eval_every"], "Steps between evaluations.")
    f.DEFINE_integer("eval_steps", values["eval_steps"],
                     "Eval batches per evaluation. Default: the whole eval split.")
    f.DEFINE_integer("checkpoint_every", values["checkpoint_every"], "Steps between checkpoints.")
    f.DEFINE_integer("log_every", values["log_every"], "Steps between train summaries.")
    f.DEFINE_integer("steps_per_loop", values["steps_per_loop"],
                     "Train steps inside one compiled call.")
    f.DEFINE_integer("seed", values["seed"], "Random seed (weights, shuffling, dropout).")
    f.DEFINE_string("data_dir", values["data_dir"], "TFDS data folder (default: TFDS's own).")
    f.DEFINE_string("backbone", values["backbone"], "Backbone builder name.")
    f.DEFINE_string("strategy", values["strategy"],
                    f"Distribution strategy, one of {list(distribute.STRATEGIES)}.")
    f.DEFINE_integer("num_gpus", values["num_gpus"], "GPUs for --strategy=mirrored (default: all).")
    f.DEFINE_integer("cpu_replicas", values["cpu_replicas"],
                     "Mirror over this many logical CPU devices (no GPU needed).")
    f.DEFINE_string("tpu", values["tpu"], "TPU address for --strategy=tpu.")
    f.DEFINE_integer("grad_accum_steps", values["grad_accum_steps"],
                     "Accumulate gradients over this many micro-batches of "
                     "batch_size / grad_accum_steps examples, then apply once.")
    f.DEFINE_bool("jit_compile", values["jit_compile"],
                  "Compile the forward and backward pass with XLA (a GPU knob: measure it).")
    f.DEFINE_enum("mixed_precision", values["mixed_precision"], list(MIXED_PRECISION),
                  "Mixed precision policy; float16 uses dynamic loss scaling.")
    f.DEFINE_enum("on_nonfinite", values["on_nonfinite"], ["stop", "skip"],
                  "On a NaN/inf loss or gradient: stop (naming the task and step) or skip "
                  "the update.")
    f.DEFINE_enum("gradient_mode", values["gradient_mode"], ["exact", "rep"],
                  "For gradient-based weighting: per-task gradients of all shared variables "
                  "(exact) or of the shared representation (rep, cheaper).")
    f.DEFINE_integer("max_to_keep", values["max_to_keep"], "Checkpoints kept in model_dir.")
    f.DEFINE_string("init_backbone_from", values["init_backbone_from"],
                    "Start the backbone from another run (its model_dir or a checkpoint) or a "
                    "local Keras weights file; the heads start fresh.")
    f.DEFINE_bool("freeze_backbone", values["freeze_backbone"],
                  "Keep the backbone fixed (inference mode: BatchNorm statistics do not move).")
    f.DEFINE_integer("unfreeze_at_step", values["unfreeze_at_step"],
                     "With --freeze_backbone: step at which backbone layers become trainable.")
    f.DEFINE_integer("unfreeze_top_layers", values["unfreeze_top_layers"],
                     "How many of the backbone's top layers with weights to unfreeze "
                     "(default: all).")
    f.DEFINE_float("backbone_lr_multiplier", values["backbone_lr_multiplier"],
                   "The backbone's learning rate as a multiple of the heads' rate.")
    f.DEFINE_integer("diagnostics_every", values["diagnostics_every"],
                     "Steps between task-gradient diagnostics in TensorBoard (weights, gradient "
                     "norms, pairwise cosines); 0 turns them off.")
    f.DEFINE_bool("deterministic", values["deterministic"],
                  "Deterministic ops (bitwise-repeatable runs and resumes; slower).")
    f.DEFINE_bool("checkpoint_input", values["checkpoint_input"],
                  "Save the input pipeline's position in checkpoints (single replica); "
                  "otherwise a resumed run skips the batches already seen.")


def _flag_default(name, value):
    if name == "tasks" and value is not None:
        return ",".join(value)
    return value


def config_from_flags(flag_values=None) -> Config:
    """The parsed flags as a checked `Config`."""
    fv = flags.FLAGS if flag_values is None else flag_values
    kwargs = {}
    for field in dataclasses.fields(Config):
        value = fv[field.name].value
        if field.name == "tasks" and value is not None:
            value = tuple(v.strip() for v in value if v.strip())
        kwargs[field.name] = value
    return Config(**kwargs)
