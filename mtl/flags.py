"""The command-line flags shared by every experiment, mapped onto `mtl.config.Config`.

This is the only module that defines or reads absl flags: experiment scripts call
`define_flags()` at import and `config_from_flags()` in `main`, then pass the `Config` on. The
rules and allowed values live in `mtl.config`; this module only maps flags to it.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from mtl import distribute, optimizers
from mtl import weighting as weighting_lib
from mtl.config import (GRADIENT_MODES, GRANULARITIES, INPUT_SHARDINGS,  # noqa: F401
                        JACOBIAN_DTYPES, MIXED_PRECISION, ON_NONFINITE, Config, UsageError,
                        parse_options)



_DEFAULTS = Config()


def define_flags(**defaults) -> None:
    """Defines the shared flags (once); `defaults` override `Config`'s defaults per experiment."""
    values = {**dataclasses.asdict(_DEFAULTS), **defaults}
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise UsageError(f"define_flags: no flag {unknown[0]!r}.")
    if "train_steps" in flags.FLAGS:
        for name, value in defaults.items():
            flags.FLAGS.set_default(name, _flag_default(name, value))
        _adopt_as_key_flags()
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
    f.DEFINE_string("weighting_options", _options_text(values["weighting_options"]),
                    "Options of the weighting method, as name=value pairs ('c=0.4,rescale=1') "
                    "or a JSON object ('{\"c\": 0.4}'); see docs/weighting.md.")
    f.DEFINE_string("architecture", values["architecture"],
                    "How the tasks share the model: hps (one backbone, a head per task) or a "
                    "soft-sharing architecture, one of "
                    f"{list(_architecture_names())}; see the README.")
    f.DEFINE_string("architecture_options", _options_text(values["architecture_options"]),
                    "Options of the architecture, as name=value pairs ('num_experts=4') or a "
                    "JSON object.")
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
    f.DEFINE_enum("input_sharding", values["input_sharding"], list(INPUT_SHARDINGS),
                  "How several workers share the train input: exact (each builds the whole "
                  "stream and keeps its share of every global batch: the batches of one device, "
                  "N times the input work) or shard (each reads and decodes only its 1/N of "
                  "the examples: other examples meet in a batch; each global batch is still one "
                  "update on the mean over its examples). Identical on one worker.")
    f.DEFINE_integer("grad_accum_steps", values["grad_accum_steps"],
                     "Accumulate gradients over this many micro-batches of "
                     "batch_size / grad_accum_steps examples, then apply once.")
    f.DEFINE_bool("jit_compile", values["jit_compile"],
                  "Compile the forward and backward pass with XLA (a GPU knob: measure it).")
    f.DEFINE_enum("mixed_precision", values["mixed_precision"], list(MIXED_PRECISION),
                  "Mixed precision policy; float16 uses dynamic loss scaling.")
    f.DEFINE_enum("on_nonfinite", values["on_nonfinite"], list(ON_NONFINITE),
                  "On a NaN/inf loss or gradient: stop (naming the task and step) or skip "
                  "the update.")
    f.DEFINE_enum("gradient_mode", values["gradient_mode"], list(GRADIENT_MODES),
                  "For gradient-based weighting: per-task gradients of all shared variables "
                  "(exact) or of the shared representation (rep, cheaper).")
    f.DEFINE_enum("granularity", values["granularity"], list(GRANULARITIES),
                  "For gradient-based methods (exact mode): combine the task gradients of all "
                  "shared variables at once (all), of each shared layer (layer) or of each "
                  "variable (variable) on its own.")
    f.DEFINE_float("clip_norm", values["clip_norm"],
                   "Clip the update's gradient to this global norm, computed over all replicas "
                   "and micro-batches (as on one device); unset: no clipping.")
    f.DEFINE_integer("jacobian_chunk_size", values["jacobian_chunk_size"],
                     "Gradient methods (exact mode): compute the per-task gradients this many "
                     "tasks at a time, bounding the backward pass's memory (unset: all at once).")
    f.DEFINE_string("jacobian_scope", values["jacobian_scope"],
                    "Partial Jacobian for Gramian methods: their weights come from the task "
                    "gradients of the last N shared layers ('top:N') or of the layers named "
                    "('conv_1,features'); unset or 'all': every shared variable (exact mode).")
    f.DEFINE_enum("jacobian_dtype", values["jacobian_dtype"], list(JACOBIAN_DTYPES),
                  "Gradient methods: keep the per-task gradients in float32 or bfloat16 (half "
                  "the memory, ~3 significant digits).")
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
    f.DEFINE_list("allow_config_change", list(values["allow_config_change"]) or None,
                  "Settings a resumed run may change from what the run folder recorded "
                  "(e.g. learning_rate,optimizer); each change is appended to the run's "
                  "config_history.json. Without it a changed setting is refused.")
    f.DEFINE_bool("deterministic", values["deterministic"],
                  "Deterministic ops (bitwise-repeatable runs and resumes; slower).")
    f.DEFINE_bool("checkpoint_input", values["checkpoint_input"],
                  "Save the input pipeline's position in checkpoints (single replica); "
                  "otherwise a resumed run skips the batches already seen.")
    _adopt_as_key_flags()


def _adopt_as_key_flags() -> None:
    """Makes the shared flags key flags of the running script, so that its `--help` lists
    them (absl's `--help` shows only the main module's own and key flags)."""
    import sys

    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    if not main:
        return
    for field in dataclasses.fields(Config):
        flags.FLAGS.register_key_flag_for_module(main, flags.FLAGS[field.name])


def _architecture_names():
    from mtl import architectures

    return architectures.ARCHITECTURES


def _options_text(options: dict) -> str:
    import json

    return json.dumps(options) if options else ""


def _flag_default(name, value):
    if name == "tasks" and value is not None:
        return ",".join(value)
    if name in ("weighting_options", "architecture_options"):
        return _options_text(value)
    if name == "allow_config_change":
        return ",".join(value) or None
    return value


def config_from_flags(flag_values=None) -> Config:
    """The parsed flags as a checked `Config`."""
    fv = flags.FLAGS if flag_values is None else flag_values
    kwargs = {}
    for field in dataclasses.fields(Config):
        value = fv[field.name].value
        if field.name == "tasks" and value is not None:
            value = tuple(v.strip() for v in value if v.strip())
        if field.name in ("weighting_options", "architecture_options"):
            value = parse_options(value, f"--{field.name}")
        if field.name == "allow_config_change":
            value = tuple(v.strip() for v in value or () if v.strip())
        kwargs[field.name] = value
    return Config(**kwargs)
