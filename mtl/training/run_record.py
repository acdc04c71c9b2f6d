"""A run remembers what it is: the settings that shaped its state, checked on every resume.

A run folder records, when it starts, the settings checked on every resume:
  * `config.json` (experiment scripts): the experiment's name and every `Config` field;
  * `trainer.json` (every `Trainer` with a `model_dir`, the Python API included;
    `trainer_record`): the tasks, the weighting method and its options, the optimizer's
    configuration (learning rate or schedule included), the precision policy and every
    `TrainerOptions` setting that shapes the run's state (`mtl.options.TRAINER_RECORD` names
    each entry).
It also holds `model.json` (the architecture it is rebuilt from: `mtl.training.model_record`)
and `model_signature.json` (the weights' shapes a checkpoint must fit:
`mtl.training.checkpoints`), which are not settings.

A resumed run compares what it is given with the record before anything is loaded. A setting
that shapes the run's state or the meaning of its results may only change when the user says so
(`--allow_config_change=FIELD,...`, `TrainerOptions(allow_config_change=(...))`); otherwise the
run stops naming each difference. Settings that do not (the number of steps, the eval,
checkpoint and log cadence, where data lives, the devices) change freely. Every change is
appended to `config_history.json`; the original record is never rewritten.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Iterable

import tensorflow as tf
from absl import logging

from mtl import options as options_lib
from mtl.errors import UsageError

HISTORY_FILE = "config_history.json"
TRAINER_FILE = "trainer.json"


def normalise(value):
    """A JSON-comparable form (tuples as lists, objects by their string)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read(path: str) -> dict | None:
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}); it records how the run in this "
                         "folder was made. Restore it, or use another folder.") from None


def differences(recorded: dict, given: dict) -> dict:
    """`{field: (recorded, given)}` for every field that differs."""
    fields = sorted(set(recorded) | set(given))
    return {f: (recorded.get(f), given.get(f)) for f in fields
            if normalise(recorded.get(f)) != normalise(given.get(f))}


def check(recorded: dict | None, given: dict, *, free: Iterable[str], allowed: Iterable[str],
          where: str, option: str) -> dict:
    """The differences between `given` and the run's record; raises `UsageError` naming the
    ones that shape the run's state and are not in `allowed`. Returns every difference."""
    if recorded is None:
        return {}
    changes = differences(recorded, normalise(given))
    refused = {f: c for f, c in changes.items() if f not in set(free) and f not in set(allowed)}
    if refused:
        lines = "; ".join(f"{f}: {_show(old)} in the run, {_show(new)} now"
                          for f, (old, new) in refused.items())
        raise UsageError(
            f"{where} holds a run made with other settings ({lines}). These shape the run's "
            f"state or results, so resuming with them changed is refused (nothing was loaded). "
            f"Use the run's settings, another folder, or {option}="
            f"{','.join(refused)} to resume with the change recorded in the run's history.")
    return changes


def write_json(path: str, value) -> None:
    """Writes `value` as JSON to a temporary name, then renames it to `path`: a reader (another
    worker of a multi-worker run reading the record as the chief writes it) sees the whole file
    or none."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    temporary = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        json.dump(value, f, indent=2)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def write_once(path: str, record: dict) -> None:
    """Writes the original record (never overwritten)."""
    if tf.io.gfile.exists(path):
        return
    write_json(path, normalise(record))


def append_history(model_dir: str, source: str, changes: dict, step: int) -> None:
    """Appends one resume's changes to `config_history.json`."""
    if not changes:
        return
    path = os.path.join(model_dir, HISTORY_FILE)
    history = read(path) or []
    history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "step": step, "record": source,
                    "changes": {f: {"from": old, "to": new}
                                for f, (old, new) in normalise(changes).items()}})
    write_json(path, history)


def _show(value) -> str:
    return "unset" if value is None else json.dumps(value, default=str)


# ------------------------------------------------------------------------------ trainer.json
def trainer_record(*, tasks, weighting, optimizer, model, options) -> dict:
    """What shapes a `Trainer`'s state and results: its `trainer.json`."""
    config = {k: v for k, v in optimizer.get_config().items() if k != "name"}
    policy = getattr(model, "dtype_policy", None)
    return {
        "tasks": [[t.name, t.weight] for t in tasks],
        "weighting": {"name": weighting.name,
                      "options": {k: getattr(weighting, k) for k in weighting.options()
                                  if hasattr(weighting, k)}},
        "optimizer": {"class": type(optimizer).__name__, **config},
        "precision": getattr(policy, "name", str(policy)),
        # Every state-shaping setting, as its field records it.
        **options_lib.record_entries(options),
    }


def check_trainer_record(model_dir: str, record: dict, *, allowed: Iterable[str]) -> dict:
    """Refuses, before anything is loaded, to resume the run in `model_dir` with a `record`
    other than its `trainer.json` (unless `allowed` names the changes); returns the allowed
    changes, each logged as a warning."""
    changes = check(read(os.path.join(model_dir, TRAINER_FILE)), record, free=(),
                    allowed=allowed, where=model_dir, option="allow_config_change")
    for name, (old, new) in changes.items():
        logging.warning("Resuming %s with %s changed (allowed): %s -> %s.", model_dir, name,
                        old, new)
    return changes


def write_trainer_record(model_dir: str, record: dict, changes: dict, step: int) -> None:
    """Writes `trainer.json` (once) and appends a resume's `changes` to its history."""
    write_once(os.path.join(model_dir, TRAINER_FILE), record)
    append_history(model_dir, TRAINER_FILE, changes, step)
