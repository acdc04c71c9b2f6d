"""The trainer's settings: `TrainerOptions` and `FineTuning`, their allowed values and the
Jacobian-scope syntax.

    options = mtl.TrainerOptions(grad_accum_steps=2, on_nonfinite="skip")
    trainer = mtl.Trainer(model, tasks, optimizer=..., options=options)
    # or, as keyword arguments: mtl.Trainer(model, tasks, optimizer=..., grad_accum_steps=2)

Everything here raises `UsageError` (a `ValueError`) naming the setting, the value given and
what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mtl.errors import UsageError, check_choice, check_int, check_names, check_positive

ON_NONFINITE = ("stop", "skip")
GRADIENT_MODES = ("exact", "rep")
GRANULARITIES = ("all", "layer", "variable")
JACOBIAN_DTYPES = ("float32", "bfloat16")
MIXED_PRECISION = ("none", "float16", "bfloat16")


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
        check_names("allow_config_change", self.allow_config_change, TRAINER_RECORD)

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


