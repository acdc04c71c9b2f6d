"""The trainer's settings (`TrainerOptions`, `FineTuning`), each defined once as a field.

    options = mtl.TrainerOptions(grad_accum_steps=2, on_nonfinite="skip")
    trainer = mtl.Trainer(model, tasks, optimizer=..., options=options)
    # or, as keyword arguments: mtl.Trainer(model, tasks, optimizer=..., grad_accum_steps=2)

A setting is one dataclass field made by `setting(...)`: its default, its help text, what it
allows (an int's minimum, a float that must be positive, a choice of names, None) and whether
it shapes a run's state (`state=True`: recorded in the run's `trainer.json` and refused on
resume unless `allow_config_change` names it). Everything else is generated from the fields:
the per-field checks (`check_fields`, the same for the Python API and the command line), the
command-line flags (`mtl.flags`), the README's flag table, the run records and the
`Attributes:` section of each class's docstring. `mtl.config.Config` nests `TrainerOptions` for
an experiment run and adds the run's own settings the same way.

Everything here raises `UsageError` (a `ValueError`) naming the setting, the value given and
what was expected.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from mtl.errors import UsageError, check_choice, check_int, check_names, check_positive

ON_NONFINITE = ("stop", "skip")
GRADIENT_MODES = ("exact", "rep")
GRANULARITIES = ("all", "layer", "variable")
JACOBIAN_DTYPES = ("float32", "bfloat16")
MIXED_PRECISION = ("none", "float16", "bfloat16")
#: The Keras dtype policy of each `mixed_precision` value.
PRECISION_POLICIES = {"none": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}

#: The flag kinds of `setting(kind=...)`: how `mtl.flags` defines the flag and reads its value.
KINDS = ("bool", "int", "float", "str", "enum", "list", "options", "nested")


def setting(default: Any = dataclasses.MISSING, *, help: str, kind: str | None = None,
            choices: tuple | None = None, minimum: int | None = None, positive: bool = False,
            optional: bool = False, state: bool = False, record: str | None = None,
            record_as: Callable | None = None, default_text: str | None = None,
            registry: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A settings field.

    Args:
      default / default_factory: as `dataclasses.field`.
      help: what the setting does (the flag's help, the docstring, the README's table).
      kind: the flag kind (one of `KINDS`); inferred from the default when it is a bool, int,
        float or str. "enum": `choices` are the flag's allowed values; "str" with `choices`:
        checked here, not by the flag parser (a registry whose message lists the names).
      choices / minimum / positive / optional: the value's rule, checked by `check_fields`
        (None passes when `optional`).
      state: shapes the run's state or the meaning of its results (see `mtl.training.run_record`).
      record: the entry of the trainer's record (`trainer.json`) the setting feeds, when not its
        own name.
      record_as: the setting's value as recorded (default: as it is).
      default_text: the default as the flag table shows it, when the value does not say it
        (e.g. "*the whole eval split*" for None).
      registry: `choices` are the names of a registry (methods, architectures, optimizers): a
        name outside them is "unknown".
    """
    if kind is None:
        value = default if default is not dataclasses.MISSING else None
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value))
        if kind is None:
            raise TypeError(f"setting(default={default!r}) needs kind=...")
    if kind not in KINDS:
        raise TypeError(f"setting kind {kind!r} is not one of {KINDS}")
    metadata = dict(help=help, kind=kind, choices=choices, minimum=minimum, positive=positive,
                    optional=optional, state=state, record=record, record_as=record_as,
                    default_text=default_text, registry=registry)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


def is_setting(field: dataclasses.Field) -> bool:
    return "kind" in field.metadata


def check_fields(obj, prefix: str = "") -> None:
    """Each field's own rule (its `setting` metadata); `prefix` ("--" for the command line)
    goes before the setting's name in the message."""
    for field in dataclasses.fields(obj):
        if not is_setting(field):
            continue
        meta, value, name = field.metadata, getattr(obj, field.name), prefix + field.name
        if value is None and meta["optional"]:
            continue
        if meta["kind"] == "bool" and not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False; got {value!r}.")
        if meta["choices"] is not None and meta["kind"] in ("enum", "str"):
            if meta["registry"] and value not in meta["choices"]:
                raise UsageError(f"{name}={value!r} is unknown; expected one of "
                                 f"{list(meta['choices'])}.")
            check_choice(name, value, meta["choices"])
        if meta["minimum"] is not None:
            check_int(name, value, meta["minimum"], optional=meta["optional"])
        if meta["positive"]:
            check_positive(name, value)


def flat_fields(cls) -> Iterator[tuple[str, dataclasses.Field, tuple[str, ...]]]:
    """(name, field, path) of every setting of `cls`, nested settings flattened: the path is
    the attribute chain from `cls` (`("trainer", "fine_tuning")` for `freeze_backbone` under
    `Config`). A nested field whose name is also a field further out is left to the outer one."""
    seen = set()

    def walk(current, path):
        for field in dataclasses.fields(current):
            if not is_setting(field):
                continue
            if field.metadata["kind"] == "nested":
                yield from walk(field.metadata["choices"][0], path + (field.name,))
            elif field.name not in seen:
                seen.add(field.name)
                yield field.name, field, path

    outer = {f.name for f in dataclasses.fields(cls)}
    for name, field, path in walk(cls, ()):
        if path and name in outer:
            continue
        yield name, field, path


def nested(cls: type, help: str, *, state: bool = False, record: str | None = None,
           record_as: Callable | None = None, default_factory: Callable | None = None) -> Any:
    """A field holding another settings dataclass (`cls`), whose settings are flattened into
    the command line and the records."""
    return setting(default_factory=default_factory or cls, help=help, kind="nested",
                   choices=(cls,), state=state, record=record, record_as=record_as)


def to_flat(obj) -> dict:
    """{name: value} of every setting of `obj`, nested ones flattened (as `flat_fields`)."""
    values = {}
    for name, _, path in flat_fields(type(obj)):
        holder = obj
        for part in path:
            holder = getattr(holder, part)
        values[name] = getattr(holder, name)
    return values


def from_flat(cls, values: dict, *, prefix: str = ""):
    """`cls` built from flat {name: value} (missing names take their defaults); an unknown
    name is refused, listing the known ones. Errors of a nested part name the setting with
    `prefix` too."""
    known = {name: path for name, _, path in flat_fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"{cls.__name__} has no setting {unknown[0]!r}; its settings are "
                         f"{sorted(known)}.")

    def build(current, path):
        kwargs = {}
        for field in dataclasses.fields(current):
            if is_setting(field) and field.metadata["kind"] == "nested":
                kwargs[field.name] = build(field.metadata["choices"][0], path + (field.name,))
            elif field.name in values and known.get(field.name) == path:
                kwargs[field.name] = values[field.name]
        try:
            return current(**kwargs)
        except UsageError as e:
            if prefix and not str(e).startswith(prefix):
                raise UsageError(f"{prefix}{e}") from None
            raise

    return build(cls, ())


def record_entries(obj) -> dict:
    """{record entry: value} of `obj`'s state-shaping settings (nested ones whole, as their
    `record_as` says), for the run's record."""
    entries = {}
    for field in dataclasses.fields(obj):
        if is_setting(field) and field.metadata["state"]:
            convert = field.metadata["record_as"] or (lambda value: value)
            entries[field.metadata["record"] or field.name] = convert(getattr(obj, field.name))
    return entries


def record_names(cls) -> tuple[str, ...]:
    """The record entries `record_entries` writes for `cls`, in field order."""
    return tuple(dict.fromkeys(f.metadata["record"] or f.name for f in dataclasses.fields(cls)
                               if is_setting(f) and f.metadata["state"]))


def document(cls) -> type:
    """Appends an `Attributes:` section, one entry per setting, to `cls`'s docstring."""
    lines = ["", "    Attributes:"]
    for field in dataclasses.fields(cls):
        if is_setting(field):
            lines.append(f"      {field.name}: {field.metadata['help']}")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls


# ------------------------------------------------------------------------------ settings
@document
@dataclasses.dataclass(frozen=True)
class FineTuning:
    """Freezing and fine-tuning a shared backbone (see `mtl.training.finetune`)."""

    freeze_backbone: bool = setting(
        False, state=True, help="keep the backbone fixed, in inference mode")
    unfreeze_at_step: int | None = setting(
        None, kind="int", minimum=0, optional=True, state=True, default_text="*never*",
        help="with `--freeze_backbone`: step at which backbone layers become trainable (they "
             "get a fresh optimizer state: Adam's bias correction counts from their first "
             "update)")
    unfreeze_top_layers: int | None = setting(
        None, kind="int", minimum=1, optional=True, state=True, default_text="*all layers*",
        help="how many of the backbone's top layers with weights to unfreeze")
    backbone_lr_multiplier: float = setting(
        1.0, positive=True, state=True,
        help="the backbone's learning rate as a multiple of the heads' (a schedule is scaled "
             "and follows the heads' step)")

    def __post_init__(self):
        check_fields(self)
        if self.unfreeze_at_step is not None and not self.freeze_backbone:
            raise UsageError("unfreeze_at_step needs freeze_backbone=True (nothing is frozen).")

    @property
    def active(self) -> bool:
        return self.freeze_backbone or self.backbone_lr_multiplier != 1.0


def _jacobian_dtype_record(value: str) -> str | None:
    # float32 (the default) as None: runs recorded before the setting existed match.
    return None if value == "float32" else value


@document
@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How `mtl.Trainer` trains (everything but the model, tasks, optimizer and method)."""

    steps_per_loop: int = setting(
        10, minimum=1, help="train steps per compiled call (it never runs past an eval, "
                            "checkpoint or log step)")
    log_every: int = setting(100, minimum=1, help="steps between train summaries")
    checkpoint_every: int | None = setting(
        1000, kind="int", minimum=1, optional=True,
        help="steps between checkpoints (unset: only at the end of `fit`)")
    max_to_keep: int = setting(3, minimum=1, help="checkpoints kept")
    grad_accum_steps: int = setting(
        1, minimum=1, state=True,
        help="micro-batches accumulated into one update (speed and memory, below)")
    jit_compile: bool = setting(False, help="XLA-compile the forward and backward pass")
    on_nonfinite: str = setting(
        "stop", kind="enum", choices=ON_NONFINITE,
        help="on a NaN/inf loss or gradient: `stop` naming the task and step, or `skip` the "
             "update")
    gradient_mode: str = setting(
        "exact", kind="enum", choices=GRADIENT_MODES, state=True,
        help="gradient-based methods: gradients of all shared variables (`exact`) or of the "
             "shared representation (`rep`)")
    checkpoint_input: bool = setting(
        True, help="save the input position in checkpoints (exact resume)")
    diagnostics_every: int | None = setting(
        None, kind="int", minimum=0, optional=True,
        help="steps between task-gradient diagnostics in TensorBoard; 0 or unset turns them "
             "off")
    fine_tuning: FineTuning = nested(
        FineTuning, state=True, record_as=dataclasses.asdict,
        help="freezing, scheduled unfreezing, backbone learning-rate multiplier "
             "(`mtl.FineTuning`)")
    granularity: str = setting(
        "all", kind="enum", choices=GRANULARITIES, state=True,
        help="gradient-based methods in exact mode: combine the task gradients of all shared "
             "variables at once (`all`), of each shared layer (`layer`) or of each variable "
             "(`variable`) on its own, each group with its own method state; the cost is that "
             "of `all` plus one small solve per group")
    clip_norm: float | None = setting(
        None, kind="float", positive=True, optional=True, state=True,
        help="clip the update's gradient to this global norm, computed after the sum over "
             "replicas and micro-batches (as on one device; Keras's optimizer `clipnorm` would "
             "clip each replica's part and is refused under several replicas); FAMO's and "
             "Nash-MTL's official code clip at 1")
    jacobian_chunk_size: int | None = setting(
        None, kind="int", minimum=1, optional=True,
        help="gradient methods (exact mode, partial Jacobian): how many tasks' backward passes "
             "run at once; below the task count, a loop over the tasks with that many in "
             "flight, so the memory is that of C tasks' activation gradients instead of all of "
             "them; same result. Unset: chosen from the model's activation size and the batch "
             "(all tasks batched when they fit in one forward pass's memory, at least 256 MiB; "
             "else fewer). Refused with a loss-based method or in rep mode, which compute no "
             "per-task gradients of the variables")
    jacobian_scope: Any = setting(
        None, kind="str", optional=True, state=True,
        record_as=lambda scope: scope_text(scope),
        help="partial Jacobian descent for the Gramian methods (`mgda`, `cagrad`, `imtl`, "
             "`pcgrad`, `gradvac`, `nash_mtl`, `aligned_mtl`, `upgrad`, `gradnorm`, "
             "`dualproj`, `config`, `fairgrad`, ...): the weights come from the Gramian of the "
             "task gradients of the last N shared layers (`top:N`) or of the layers named "
             "(`conv_1,features`; a name matches every layer with that name, e.g. `features` "
             "is every expert's last layer in `mmoe`), then every shared variable gets the "
             "weighted sum of the task gradients by one backward pass; a cost knob between rep "
             "mode (the representation) and exact mode (every shared variable), and an "
             "approximation: the weights see the scope's conflicts only. Unset or `all`: every "
             "shared variable, i.e. exact mode (the weights applied as `J^T w`, the per-task "
             "gradients being in hand)")
    jacobian_dtype: str = setting(
        "float32", kind="enum", choices=JACOBIAN_DTYPES, state=True,
        record_as=_jacobian_dtype_record,
        help="gradient methods: keep the per-task gradients (the `[T, P]` Jacobian, or the "
             "scope's) in `bfloat16`, half the memory; the Gramian (float64) and the direction "
             "are computed from the rounded rows, an approximation (measured: the update's "
             "direction within cosine 0.9999 and 1% of float32's on the test model); refused "
             "where it would be ignored (loss-based methods, rep mode)")
    allow_config_change: tuple[str, ...] = setting(
        (), kind="list",
        help="entries of the run's record (`trainer.json`) that a resumed run may change: "
             "names from `mtl.options.TRAINER_RECORD` (tasks, weighting, optimizer, precision "
             "and every setting above that shapes the run's state); each change is appended to "
             "`config_history.json`")

    def __post_init__(self):
        object.__setattr__(self, "jacobian_scope", parse_jacobian_scope(self.jacobian_scope))
        if isinstance(self.allow_config_change, list):
            object.__setattr__(self, "allow_config_change", tuple(self.allow_config_change))
        check_fields(self)
        if not isinstance(self.fine_tuning, FineTuning):
            raise UsageError(f"fine_tuning must be a mtl.FineTuning; got {self.fine_tuning!r}.")
        if self.jacobian_scope is not None and (self.gradient_mode != "exact"
                                                or self.granularity != "all"):
            raise UsageError(f"jacobian_scope={scope_text(self.jacobian_scope)!r} chooses the "
                             "shared variables whose Gramian the method sees; it needs "
                             "gradient_mode='exact' and granularity='all' (got "
                             f"{self.gradient_mode!r} and {self.granularity!r}).")
        if self.granularity != "all" and self.gradient_mode != "exact":
            raise UsageError(f"granularity={self.granularity!r} groups the shared parameters' "
                             "gradients; it needs gradient_mode='exact'.")
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
        if value[0] == "top" and not (isinstance(value[1], int) and value[1] >= 1):
            raise UsageError(f"jacobian_scope={value!r}: {expected}.")
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


#: The entries of a run's `trainer.json` (`mtl.training.run_record`): the trainer's own
#: inputs (tasks, method, optimizer, precision) and every state-shaping setting of
#: `TrainerOptions`.
TRAINER_RECORD = ("tasks", "weighting", "optimizer", "precision") + record_names(TrainerOptions)
