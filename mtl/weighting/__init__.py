"""Task-weighting methods, by name: `mtl.weighting.get("equal")`."""

from __future__ import annotations

from mtl.weighting.base import GradientWeighting, LossWeighting, StepContext, Weighting
from mtl.weighting.loss_based import Equal

METHODS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (Equal,)
}


def get(method: str | Weighting, **options) -> Weighting:
    """Returns a new weighting method. `method` is a registered name or a `Weighting` instance."""
    if isinstance(method, Weighting):
        if options:
            raise ValueError(f"Options {sorted(options)} given with an already built weighting "
                             f"object {method.name!r}; pass them to its constructor instead.")
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"Unknown weighting method {method!r}; expected one of "
                         f"{sorted(METHODS)} or a mtl.weighting.Weighting object.")
    cls = METHODS[method]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise ValueError(f"Weighting method {method!r} takes no option {unknown[0]!r}; "
                         f"its options are {cls.options()}.")
    return cls(**options)


__all__ = ["Equal", "GradientWeighting", "LossWeighting", "METHODS", "StepContext", "Weighting",
           "get"]
