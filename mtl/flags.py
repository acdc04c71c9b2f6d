"""The command-line flags shared by every experiment, generated from `mtl.config.Config`.

This is the only module that defines or reads absl flags: experiment scripts call
`define_flags()` at import and `config_from_flags()` in `main`, then pass the `Config` on. Each
flag is one setting of `Config` (its own, its `TrainerOptions`' and their `FineTuning`'s, by
flat name): its type, default, allowed values and help come from the field (`mtl.options.setting`),
and its value is checked by the field's own rule when the `Config` is built. `flag_table()` is
the README's table of these flags, generated from the same fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

from absl import flags

from mtl.config import SETTINGS, Config, parse_options
from mtl.errors import UsageError
from mtl.options import flat_fields

_DEFAULTS = Config().to_settings()
#: absl's errors about a flag's value or name (not those about how flags are defined, such as a
#: flag defined twice): the user's to fix.
USER_ERRORS = (flags.IllegalFlagValueError, flags.UnrecognizedFlagError, flags.ValidationError,
               flags.CantOpenFlagFileError)
#: Any error absl raises while parsing a command line.
FlagError = flags.Error


def parse(argv) -> list[str]:
    """Parses the command line `argv` into the defined flags; returns the arguments left."""
    return flags.FLAGS(list(argv))


#: Every setting's field by its flat name (the flag's name).
_FIELDS: dict[str, dataclasses.Field] = {name: field for name, field, _ in flat_fields(Config)}


def _flag_default(name: str, value):
    """A setting's value as its flag holds it."""
    kind = _FIELDS[name].metadata["kind"]
    if kind == "options":
        return json.dumps(value) if value else ""
    if kind == "list":
        return list(value) if value else None
    if name == "jacobian_scope" and isinstance(value, tuple):
        return ",".join(value[1]) if value[0] == "layers" else f"top:{value[1]}"
    return value


def _define(name: str, field: dataclasses.Field, default) -> None:
    meta = field.metadata
    help_text = meta["help"]
    kind = meta["kind"]
    if kind == "bool":
        flags.DEFINE_bool(name, default, help_text)
    elif kind == "int":
        flags.DEFINE_integer(name, default, help_text)
    elif kind == "float":
        flags.DEFINE_float(name, default, help_text)
    elif kind == "enum":
        flags.DEFINE_enum(name, default, list(meta["choices"]), help_text)
    elif kind == "list":
        flags.DEFINE_list(name, default, help_text)
    else:  # str, options, names of a registry (checked by the setting's rule, naming them)
        if meta["choices"] is not None:
            help_text = f"{help_text} (one of {list(meta['choices'])})"
        flags.DEFINE_string(name, default, help_text)


def define_flags(**defaults) -> None:
    """Defines the shared flags (once); `defaults` override `Config`'s defaults per experiment."""
    unknown = sorted(set(defaults) - set(SETTINGS))
    if unknown:
        raise UsageError(f"define_flags: no flag {unknown[0]!r}.")
    if "train_steps" in flags.FLAGS:
        for name, value in defaults.items():
            flags.FLAGS.set_default(name, _flag_default(name, value))
        _adopt_as_key_flags()
        return
    values = {**_DEFAULTS, **defaults}
    for name, field in _FIELDS.items():
        _define(name, field, _flag_default(name, values[name]))
    _adopt_as_key_flags()


def _adopt_as_key_flags() -> None:
    """Makes the shared flags key flags of the running script, so that its `--help` lists
    them (absl's `--help` shows only the main module's own and key flags)."""
    main = sys.argv[0] if sys.argv and sys.argv[0] else None
    if not main:
        return
    for name in SETTINGS:
        flags.FLAGS.register_key_flag_for_module(main, flags.FLAGS[name])


def config_from_flags(flag_values=None) -> Config:
    """The parsed flags as a checked `Config`."""
    fv = flags.FLAGS if flag_values is None else flag_values
    fields = _FIELDS
    settings = {}
    for name in SETTINGS:
        value = fv[name].value
        kind = fields[name].metadata["kind"]
        if kind == "list" and value is not None:
            value = tuple(v.strip() for v in value if v.strip())
        elif kind == "list":
            value = None if fields[name].metadata["optional"] else ()
        elif kind == "options":
            value = parse_options(value, f"--{name}")
        settings[name] = value
    return Config(**settings)


def parse_copy(argv):
    """The command line `argv` (its first item the program's name) parsed into a copy of the
    defined flags, which it returns: the process's own flag values are left untouched (pass the
    copy to `config_from_flags`). A flag that does not exist, a value that does not parse or an
    argument that is not a flag is a `UsageError`."""
    values = copy.deepcopy(flags.FLAGS)
    try:
        rest = values(list(argv))
    except flags.Error as e:
        raise UsageError(str(e)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; expected --name=value flags.")
    return values


def flag_table(defaults: dict | None = None) -> str:
    """The README's flag table (markdown): one row per flag, its default and its help."""
    values = {**_DEFAULTS, **(defaults or {})}
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for name, field in _FIELDS.items():
        rows.append(f"| `--{name}` | {_default_cell(field, values[name])} | "
                    f"{field.metadata['help']} |")
    return "\n".join(rows)


def _default_cell(field: dataclasses.Field, value) -> str:
    meta = field.metadata
    if meta["default_text"] is not None:
        return meta["default_text"]
    if meta["kind"] == "bool":
        return "on" if value else "off"
    if value is None:
        return "*unset*"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)
