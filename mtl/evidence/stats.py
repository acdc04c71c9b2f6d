"""Statistics over seeds: mean, standard deviation, Student-t confidence intervals, the paired
t-test and Holm's adjustment of many p-values. Pure functions of lists of numbers (one value
per seed); nothing here reads runs.

    summary = summarize([1.2, 0.8, 1.5])            # mean, std (ddof=1), 95% CI of the mean
    paired = paired_comparison(method, reference)   # a[i], b[i]: the same seed

Definitions (n values x_1..x_n, n >= 2):
    mean  = (1/n) Σ x_i
    std   = sqrt(Σ (x_i - mean)² / (n - 1))                      (the sample std, ddof=1)
    CI    = mean ± t_{(1+c)/2, n-1} · std / sqrt(n)              (c = 0.95: t_{0.975, n-1})
Paired comparison of a with b (the same seeds): the differences d_i = a_i - b_i, their mean, std and
CI as above, t = mean(d) / (std(d) / sqrt(n)) and the two-sided p-value 2 · P(T_{n-1} >= |t|)
(scipy.stats.ttest_rel). With fewer than 2 values the std, CI, t and p are None.
Holm's adjustment of m p-values p_(1) <= ... <= p_(m) (Holm 1979): p~_(i) = max over j <= i of
min(1, (m - j + 1) p_(j)); rejecting where p~ < alpha bounds the chance of any false "significant"
among the m tests by alpha (the family-wise error rate), with no assumption on their dependence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1) and confidence interval of the mean of `values`."""

    values: tuple
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return len(self.values)

    def to_json(self) -> dict:
        return {"values": list(self.values), "n": self.n, "mean": self.mean, "std": self.std,
                "ci": [self.ci_low, self.ci_high], "confidence": self.confidence}


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """a - b over paired values: the differences' summary, the t statistic and the two-sided
    p-value of the paired t-test (H0: the mean difference is 0)."""

    differences: Summary
    t: float | None
    p_value: float | None

    def significant(self, alpha: float = ALPHA) -> int:
        """+1 when a is significantly higher than b (p < alpha), -1 when lower, else 0."""
        if self.p_value is None or not self.p_value < alpha:
            return 0
        return 1 if self.differences.mean > 0 else -1

    def to_json(self) -> dict:
        return {"differences": self.differences.to_json(), "t": self.t,
                "p_value": self.p_value}


def t_critical(n: int, confidence: float = CONFIDENCE) -> float:
    """t_{(1+confidence)/2, n-1}: the half-width of the CI in standard errors."""
    if n < 2:
        raise ValueError(f"A confidence interval needs at least 2 values; got {n}.")
    return float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, n - 1))


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, std (ddof=1) and the Student-t confidence interval of the mean of `values`."""
    values = tuple(float(v) for v in values)
    _check(values, confidence)
    n = len(values)
    if n == 0:
        return Summary(values, None, None, None, None, confidence)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(values, mean, None, None, None, confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n, confidence) * std / math.sqrt(n)
    return Summary(values, mean, std, mean - half, mean + half, confidence)


def paired_comparison(a: Sequence[float], b: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedComparison:
    """The paired t-test of a against b (a[i] and b[i] from the same seed).

    When every difference is the same (std 0), t is ±inf and p is 0 if that difference is not 0,
    and t and p are None (no evidence either way) if it is 0.
    """
    if len(a) != len(b):
        raise ValueError(f"Paired values need as many of each: {len(a)} and {len(b)}.")
    differences = summarize([x - y for x, y in zip(a, b)], confidence)
    if differences.std is None:
        return PairedComparison(differences, None, None)
    n = differences.n
    if differences.std == 0:
        if differences.mean == 0:
            return PairedComparison(differences, None, None)
        return PairedComparison(differences, math.copysign(math.inf, differences.mean), 0.0)
    t = differences.mean / (differences.std / math.sqrt(n))
    p = float(2.0 * scipy_stats.t.sf(abs(t), n - 1))
    return PairedComparison(differences, t, p)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the order given; None (no test) stays None and is
    not counted among the m tests."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    bad = [p for p, _ in tested if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"p-values must be in [0, 1]; got {bad[0]!r}.")
    adjusted, running, m = [None] * len(p_values), 0.0, len(tested)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _check(values: tuple, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"Values must be finite numbers; got {bad[0]!r} among {list(values)}.")
