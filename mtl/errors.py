"""`UsageError` (everything that is the user's to fix) and the checks that raise it.

Every module of `mtl` raises these; this module imports nothing from `mtl`, so anything may
import it. A message names the setting, the value given and what was expected.
"""

from __future__ import annotations

import math


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


def check_names(name: str, given, allowed) -> None:
    if isinstance(given, str) or not all(isinstance(g, str) for g in given):
        raise UsageError(f"{name} must be a sequence of setting names; got {given!r}.")
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise UsageError(f"{name} names {unknown[0]!r}, which is not a recorded setting; "
                         f"expected some of {list(allowed)}.")
