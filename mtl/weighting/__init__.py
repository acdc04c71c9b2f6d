"""Task-weighting methods, by name: `mtl.weighting.get("equal")`.

Each method declares what it consumes (`Weighting.consumes`): the task losses (`LOSSES`), the
per-task gradients of the shared variables (a Jacobian, `JACOBIAN`) or only their Gramian J J^T
(`GRAMIAN`). The 22 methods by family, with the module of each kind:

Loss-based (`LossWeighting.combine`, consumes LOSSES): one weighted sum, one backward pass.
  loss_scalarisations   equal, gls, stch: a fixed scalarisation of the losses
  loss_dynamic_weights  uncertainty, dwa, rlw, famo: weights learned, random or from the losses'
                        rates of change
Gramian-based (`GramianWeighting.weights_from_gramian`, consumes GRAMIAN): direction w @ J.
  min_norm_descent      mgda, cagrad: a common descent direction over the simplex
  dual_cone_projection  upgrad, dualproj: projections onto the dual cone of the gradients
  fair_bargaining       nash_mtl, fairgrad: Nash bargaining and alpha-fair allocation
  gradient_balancing    imtl, aligned_mtl, gradnorm: balanced gradient magnitudes
  gradient_surgery      pcgrad, gradvac: each task gradient edited against the others
Jacobian-based (`GradientWeighting.aggregate`, consumes JACOBIAN):
  gradient_surgery      graddrop: a sign-consistency mask on the gradients' coordinates
  jacobian_direction    db_mtl, config, moco: directions built from the rows themselves

Also: `base` (the interface, `StepContext`, the Gramian in float64), `solvers` (the small
T x T solvers), `docs` (the methods table of docs/weighting.md, generated from the classes).
See docs/weighting.md for a table of what each does and costs.
"""

from __future__ import annotations

from mtl.weighting.base import (GRAMIAN, JACOBIAN, LOSSES, GradientWeighting, GramianWeighting,
                                LossWeighting, SeededDraws, StepContext, Weighting)
from mtl.weighting.dual_cone_projection import DualProj, UPGrad
from mtl.weighting.fair_bargaining import FairGrad, NashMTL
from mtl.weighting.gradient_balancing import IMTL, AlignedMTL, GradNorm
from mtl.weighting.gradient_surgery import GradDrop, GradVac, PCGrad
from mtl.weighting.jacobian_direction import DBMTL, ConFIG, MoCo
from mtl.weighting.loss_dynamic_weights import DWA, FAMO, RLW, Uncertainty
from mtl.weighting.loss_scalarisations import GLS, STCH, Equal
from mtl.weighting.min_norm_descent import MGDA, CAGrad
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


__all__ = ["GRAMIAN", "JACOBIAN", "LOSSES", "AlignedMTL", "CAGrad", "ConFIG", "DBMTL", "DWA",
           "DualProj", "Equal", "FAMO", "FairGrad", "GLS", "GradDrop", "GradNorm", "GradVac",
           "GradientWeighting", "GramianWeighting", "IMTL", "LossWeighting", "METHODS", "MGDA",
           "MoCo", "NashMTL", "PCGrad", "RLW", "STCH", "SeededDraws", "StepContext", "UPGrad",
           "Uncertainty", "Weighting", "get"]
