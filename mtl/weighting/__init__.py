"""Task-weighting methods, by name: `mtl.weighting.get("equal")`.

Loss-based (`LossWeighting.combine`): equal, uncertainty, dwa, rlw, gls, famo, stch.
Gradient-based (`GradientWeighting.aggregate`, or `GramianWeighting.weights_from_gramian`):
pcgrad, gradvac, graddrop, mgda, cagrad, imtl, nash_mtl, aligned_mtl, upgrad, gradnorm,
fairgrad, db_mtl, config, dualproj, moco.
See docs/weighting.md for a table of what each does and costs.
"""

from __future__ import annotations

from mtl.weighting.base import (GRAMIAN, JACOBIAN, LOSSES, GradientWeighting, GramianWeighting,
                                LossWeighting, SeededDraws, StepContext, Weighting)
from mtl.weighting.gradient_based import (CAGrad, IMTL, MGDA, AlignedMTL, GradNorm, NashMTL,
                                          UPGrad)
from mtl.weighting.gradient_surgery import GradDrop, GradVac, PCGrad
from mtl.weighting.loss_based import DWA, FAMO, GLS, RLW, Equal, Uncertainty
from mtl.weighting.recent import DBMTL, STCH, ConFIG, DualProj, FairGrad, MoCo
from mtl.errors import UsageError

METHODS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (
        Equal, Uncertainty, DWA, RLW, GLS, FAMO,
        PCGrad, GradVac, GradDrop, MGDA, CAGrad, IMTL, NashMTL, AlignedMTL, UPGrad, GradNorm,
        STCH, FairGrad, DBMTL, ConFIG, DualProj, MoCo)
}


def get(method: str | Weighting, **options) -> Weighting:
    """Returns a new weighting method. `method` is a registered name or a `Weighting` instance."""
    if isinstance(method, Weighting):
        if options:
            raise UsageError(f"Options {sorted(options)} given with an already built weighting "
                             f"object {method.name!r}; pass them to its constructor instead.")
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"Unknown weighting method {method!r}; expected one of "
                         f"{sorted(METHODS)} or a mtl.weighting.Weighting object.")
    cls = METHODS[method]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise UsageError(f"Weighting method {method!r} takes no option {unknown[0]!r}; "
                         f"its options are {cls.options()}.")
    return cls(**options)


__all__ = ["GRAMIAN", "JACOBIAN", "LOSSES", "AlignedMTL", "CAGrad", "ConFIG", "DBMTL", "DWA", "DualProj", "Equal", "FAMO",
           "FairGrad", "GLS", "GradDrop", "GradNorm", "GradVac", "GradientWeighting",
           "GramianWeighting", "IMTL", "LossWeighting", "METHODS", "MGDA", "MoCo", "NashMTL",
           "PCGrad", "RLW", "STCH", "SeededDraws", "StepContext", "UPGrad", "Uncertainty",
           "Weighting", "get"]
