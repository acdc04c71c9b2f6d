"""What an architecture is: `ArchitectureSpec` and its `Option`s, and the checks of a builder's
arguments that every builder shares (its backbone and backbone config, expert counts, numbers in
a range)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping

from mtl import backbones
from mtl.errors import UsageError, UsageTypeError, check_int
from mtl.model import MultiTaskModel


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of an architecture: its default and where the default comes from ("paper",
    "official code" or "ours")."""

    name: str
    default: Any
    source: str
    help: str


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """What an architecture is: its builder, options, paper and the backbones it accepts.

    `no_rep_reason` says why gradient_mode="rep" is not defined for it, as a clause without a
    final period like the weighting methods' (None for hard sharing, whose backbone output is
    the one shared representation).
    `backbones_reason` says why only `backbones` are accepted.
    """

    name: str
    builder: Callable[..., MultiTaskModel]
    options: tuple[Option, ...]
    paper: str
    no_rep_reason: str | None
    backbones: tuple[str, ...]
    backbones_reason: str = ""

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict:
        """`{option: default}`."""
        return {o.name: o.default for o in self.options}


#: Every backbone of `mtl.backbones`, for the architectures that take any.
ALL_BACKBONES = tuple(backbones.BUILDERS)


def checked_backbone_config(spec: ArchitectureSpec, backbone, config) -> dict:
    """The backbone's config, checked against what `spec` accepts."""
    if not isinstance(backbone, str) or backbone not in backbones.BUILDERS:
        raise UsageError(f"{spec.name}: unknown backbone {backbone!r}; expected one of "
                         f"{list(spec.backbones)}.")
    if backbone not in spec.backbones:
        raise UsageError(f"{spec.name}: backbone {backbone!r} is not supported "
                         f"({spec.backbones_reason}); expected one of {list(spec.backbones)}.")
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise UsageTypeError(f"{spec.name}: backbone_config must be a dict of {backbone}'s "
                             f"options; got {config!r}.")
    if "name" in config:
        raise UsageError(f"{spec.name}: backbone_config must not set 'name' (the architecture "
                         f"names its backbone copies); got name={config['name']!r}.")
    return dict(config)


def check_expert_counts(arch: str, num_shared: int, num_task: int) -> None:
    """CGC's and PLE's expert counts: each >= 0, and at least one expert for each task's gate."""
    check_int(f"{arch}: num_shared_experts", num_shared, 0)
    check_int(f"{arch}: num_task_experts", num_task, 0)
    if num_shared + num_task < 1:
        raise UsageError(f"{arch}: each task's gate needs at least one expert; got "
                         f"num_shared_experts={num_shared} and num_task_experts={num_task} "
                         "(expected a sum >= 1).")


def check_number(name: str, value, *, minimum: float, inclusive: bool,
                 maximum: float = math.inf) -> None:
    """`value` is a finite real number (not a bool) above `minimum` (or equal to it, when
    `inclusive`) and at most `maximum`."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and value <= maximum
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        low = f">= {minimum}" if inclusive else f"> {minimum}"
        high = f" and <= {maximum}" if maximum != math.inf else " and finite"
        raise UsageError(f"{name} must be a number {low}{high}; got {value!r}.")
