"""`Config`: everything an experiment run needs, typed and checked; what `config.json` records.

An experiment script runs a `Config` (`mtl/flags.py` generates one flag per setting and maps the
command line onto it). A `Config` holds the run's own settings (data, model, optimizer, method,
devices, cadence) and nests the `TrainerOptions` it trains with (`config.trainer`); it takes and
shows every setting flat, as the command line does:

    config = Config(batch_size=32, grad_accum_steps=2, weighting="pcgrad")
    config.trainer.grad_accum_steps == config.grad_accum_steps == 2

Each setting is one field (`mtl.options.setting`): its rule is checked once, the same for the
command line and the API, and its help is the flag's. `config.json` holds the flat settings
(`to_json` / `from_json`); reading it needs this module only, not absl.

Everything here raises `UsageError` (a `ValueError`) naming the setting (as its flag, `--name`),
the value given and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from mtl import architectures, distribute, optimizers
from mtl import weighting as weighting_lib
from mtl.errors import UsageError, check_names
from mtl.options import (MIXED_PRECISION, FineTuning, TrainerOptions, check_fields, document,
                         flat_fields, from_flat, nested, scope_text, setting, to_flat)

INPUT_SHARDINGS = ("exact", "shard")
#: The trainer settings an experiment run defaults differently from `TrainerOptions` (an
#: experiment checkpoints more often and writes gradient diagnostics for TensorBoard; a plain
#: `Trainer` does neither unless asked).
EXPERIMENT_TRAINER_DEFAULTS = {"checkpoint_every": 500, "diagnostics_every": 1000}


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



def _experiment_trainer() -> TrainerOptions:
    return TrainerOptions(**EXPERIMENT_TRAINER_DEFAULTS)


def _options_json(options: dict) -> str:
    return json.dumps(options) if options else ""


@document
@dataclasses.dataclass(frozen=True, init=False)
class Config:
    """Everything an experiment run needs, typed and checked (the command line's flags).

    `Config(**settings)` takes every setting by its flat name (those of `TrainerOptions` and
    `FineTuning` included) or `trainer=TrainerOptions(...)`; a flat trainer setting overrides
    the given `trainer`'s.
    """

    model_dir: str | None = setting(
        None, kind="str", optional=True, default_text="*`runs/<experiment>`*",
        help="run folder; a run already there is resumed")
    train_steps: int = setting(1500, minimum=0, help="global step to train to")
    batch_size: int = setting(
        64, minimum=1, state=True, help="global train batch size (the batch of one update)")
    eval_batch_size: int = setting(256, minimum=1, help="global eval batch size")
    learning_rate: float = setting(1e-3, positive=True, state=True, record="optimizer",
                                   default_text="1e-3", help="learning rate")
    optimizer: str = setting(
        "adam", kind="enum", choices=optimizers.NAMES, registry=True, state=True,
        record="optimizer", help=", ".join(f"`{n}`" for n in optimizers.NAMES))
    tasks: tuple[str, ...] | None = setting(
        None, kind="list", optional=True, state=True, record="tasks",
        default_text="*all the experiment's tasks*",
        help="comma-separated subset, e.g. `--tasks=left` for a single-task baseline")
    eval_every: int = setting(500, minimum=1, help="steps between evaluations")
    eval_steps: int | None = setting(
        None, kind="int", minimum=1, optional=True, default_text="*the whole eval split*",
        help="eval batches per evaluation")
    seed: int = setting(0, minimum=0, state=True, help="weights, shuffling and dropout")
    data_dir: str | None = setting(None, kind="str", optional=True,
                                   default_text="*TFDS's own folder*", help="TFDS data folder")
    backbone: str = setting("small_cnn", state=True, help="backbone builder")
    strategy: str = setting("default", choices=distribute.STRATEGIES, registry=True,
                            help="distribution strategy (below)")
    num_gpus: int | None = setting(None, kind="int", minimum=1, optional=True,
                                   default_text="*all local GPUs*",
                                   help="GPUs for `--strategy=mirrored`")
    cpu_replicas: int | None = setting(
        None, kind="int", minimum=1, optional=True, default_text="*none*",
        help="mirror over this many logical CPU devices (no GPU needed)")
    tpu: str | None = setting(None, kind="str", optional=True, default_text="*none*",
                              help="TPU address for `--strategy=tpu`")
    input_sharding: str = setting(
        "exact", kind="enum", choices=INPUT_SHARDINGS, registry=True, state=True,
        help="how several workers share the train input: `exact` (each builds the whole "
             "stream and keeps its share of every global batch: one device's batches, N times "
             "the input work) or `shard` (each reads and decodes only its 1/N of the examples: "
             "other examples meet in a batch, each update is still the mean over its global "
             "batch); the same on one worker ([Distributed training](#distributed-training))")
    weighting: str = setting("equal", choices=tuple(sorted(weighting_lib.METHODS)),
                             registry=True, state=True, record="weighting",
                             help="task-weighting method (below)")
    architecture: str = setting(
        "hps", choices=tuple(architectures.ARCHITECTURES), registry=True, state=True,
        help="how the tasks share the model: `hps` (the backbone and one head per task) or a "
             "soft-sharing architecture (" + ", ".join(
                 f"`{n}`" for n in architectures.ARCHITECTURES if n != "hps")
             + "; see [Architectures](#architectures))")
    architecture_options: dict = setting(
        kind="options", state=True, default_factory=dict, default_text="*none*",
        help="the architecture's options as `name=value` pairs "
             "(`--architecture_options=num_experts=4`) or a JSON object; names checked before "
             "anything runs, values when the model is built")
    weighting_options: dict = setting(
        kind="options", state=True, record="weighting", default_factory=dict,
        default_text="*none*",
        help="the method's options as `name=value` pairs (`--weighting_options=c=0.4,"
             "rescale=1`) or a JSON object; checked by the method before training, written "
             "into `config.json`")
    mixed_precision: str = setting(
        "none", kind="enum", choices=MIXED_PRECISION, registry=True, state=True,
        record="precision", help="`none`, `float16` (dynamic loss scaling), `bfloat16`")
    allow_config_change: tuple[str, ...] = setting(
        (), kind="list", default_text="*none*",
        help="settings a resumed run may change from what the run folder recorded "
             "(`--allow_config_change=learning_rate,optimizer`); each change is appended to "
             "`config_history.json` (Reliability, below)")
    deterministic: bool = setting(
        False, help="deterministic ops: bitwise-repeatable runs and resumes")
    init_backbone_from: str | None = setting(
        None, kind="str", optional=True, default_text="*none*",
        help="start the backbone from another run or a Keras weights file (fine-tuning, "
             "below)")
    trainer: TrainerOptions = nested(
        TrainerOptions, default_factory=_experiment_trainer,
        help="how the run trains (`mtl.TrainerOptions`; each of its settings is a flag)")

    def __init__(self, trainer: TrainerOptions | None = None, **settings):
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UsageError(f"Config has no setting {unknown[0]!r}; its settings are "
                             f"{sorted(SETTINGS)}.")
        flat = {k: v for k, v in settings.items() if k not in _OWN}
        for field in dataclasses.fields(self):
            if field.name == "trainer":
                continue
            if field.name in settings:
                value = settings[field.name]
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                value = field.default
            object.__setattr__(self, field.name, value)
        if trainer is not None and not isinstance(trainer, TrainerOptions):
            raise UsageError(f"trainer must be a mtl.TrainerOptions; got {trainer!r}.")
        base = trainer if trainer is not None else _experiment_trainer()
        values = {**to_flat(base), **flat, "allow_config_change": self._trainer_changes()}
        object.__setattr__(self, "trainer", from_flat(TrainerOptions, values, prefix="--"))
        self.__post_init__()

    def __getattr__(self, name: str):
        """A trainer setting read flat (`config.grad_accum_steps`), as it is given."""
        if name.startswith("_") or name not in _TRAINER_PATHS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        holder = self.trainer
        for part in _TRAINER_PATHS[name]:
            holder = getattr(holder, part)
        return getattr(holder, name)

    def _trainer_changes(self) -> tuple[str, ...]:
        """The trainer-record entries that `allow_config_change`'s settings feed."""
        names = self.allow_config_change
        if isinstance(names, (list, tuple)):
            return tuple(sorted({TRAINER_FIELDS[n] for n in names if n in TRAINER_FIELDS}))
        return ()

    def __post_init__(self):
        if isinstance(self.tasks, list):
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.allow_config_change, list):
            object.__setattr__(self, "allow_config_change", tuple(self.allow_config_change))
        check_fields(self, prefix="--")  # each own setting's rule, named as its flag
        trainer = self.trainer
        if self.batch_size % trainer.grad_accum_steps:
            raise UsageError(f"--batch_size={self.batch_size} is the batch of one update and "
                             f"must split into --grad_accum_steps={trainer.grad_accum_steps} "
                             "equal micro-batches; use a multiple of it.")
        if self.tasks is not None and not self.tasks:
            raise UsageError("--tasks is empty; name at least one task or leave it unset.")
        for name in ("weighting_options", "architecture_options"):
            if not isinstance(getattr(self, name), dict):
                raise UsageError(f"--{name} must be a dict; got {getattr(self, name)!r}.")
        try:  # The method's own checks of its options (constructing it builds no state).
            self.weighting_method()
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
                    [name for name in SETTINGS if name not in FREE_TO_CHANGE])
        at = trainer.fine_tuning.unfreeze_at_step
        if at is not None and at >= self.train_steps:
            raise UsageError(f"--unfreeze_at_step={at} is not before "
                             f"--train_steps={self.train_steps}: nothing would be unfrozen.")

    def _check_architecture(self) -> None:
        """The names of the architecture's options and the backbone it accepts (the values are
        checked where the model is built, before training)."""
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

    def replace(self, **settings) -> "Config":
        """This config with `settings` (flat names) replaced."""
        return Config(**{**self.to_settings(), **settings})

    def fine_tuning(self) -> FineTuning:
        return self.trainer.fine_tuning

    def trainer_options(self) -> TrainerOptions:
        """The `TrainerOptions` this run trains with (`self.trainer`)."""
        return self.trainer

    def weighting_method(self) -> weighting_lib.Weighting:
        """A new (unbuilt) weighting method: `--weighting` with `--weighting_options`."""
        return weighting_lib.get(self.weighting, **self.weighting_options)

    def optimizer_object(self):
        """A new optimizer: `--optimizer` with `--learning_rate` (build it under the strategy's
        scope)."""
        return optimizers.get(self.optimizer, self.learning_rate)

    def build_model(self, input_shape, heads):
        """The experiment's model: `heads` ({task: head layer}) on `--architecture` (with
        `--architecture_options`) built from `--backbone`."""
        return architectures.build(self.architecture, input_shape, heads,
                                   backbone=self.backbone, **self.architecture_options)

    def to_settings(self) -> dict:
        """{flat name: value} of every setting, as given."""
        values = {name: getattr(self, name) for name in SETTINGS if name in _OWN}
        trainer = to_flat(self.trainer)
        values.update({name: trainer[name] for name in SETTINGS if name not in _OWN})
        return values

    def to_json(self) -> dict:
        """What `config.json` records: every setting flat, as JSON values (the Jacobian scope as
        written, tuples as lists)."""
        values = self.to_settings()
        values["jacobian_scope"] = scope_text(values["jacobian_scope"])
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_json(cls, values: dict) -> "Config":
        """A config from `config.json` (keys that are not settings, e.g. "experiment" or a
        setting this version no longer has, ignored)."""
        values = {k: v for k, v in values.items() if k in SETTINGS}
        for name in LEGACY_UNSET_ZERO:
            if values.get(name) == 0:  # Written by mtl 0.1.0, where 0 meant unset.
                values[name] = None
        for name in ("tasks", "allow_config_change"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


_OWN = tuple(f.name for f in dataclasses.fields(Config) if f.name != "trainer")
#: Every setting of a run by its flat name (the flags, the keys of config.json), in order.
SETTINGS = tuple(name for name, _, _ in flat_fields(Config))
_TRAINER_PATHS = {name: path[1:] for name, _, path in flat_fields(Config) if path}
#: Settings a resumed run may change freely: they shape neither its state nor the meaning of
#: its results (`mtl.training.run_record`). Every other setting needs --allow_config_change.
FREE_TO_CHANGE = tuple(name for name, field, _ in flat_fields(Config)
                       if not field.metadata["state"])
#: Which entry of the trainer's record (`mtl.options.TRAINER_RECORD`) a setting feeds.
TRAINER_FIELDS = {
    name: field.metadata["record"] or (path[-1] if len(path) > 1 else name)
    for name, field, path in flat_fields(Config)
    if field.metadata["state"] and (path or field.metadata["record"])}
#: Settings whose 0 meant "unset" in run folders written by mtl 0.1.0.
LEGACY_UNSET_ZERO = ("clip_norm", "jacobian_chunk_size")
Config.FREE_TO_CHANGE = FREE_TO_CHANGE
Config.TRAINER_FIELDS = TRAINER_FIELDS
