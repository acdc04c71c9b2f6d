"""mtl.evidence.stats against textbook values and scipy's own tests."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtl.evidence import stats


def test_summary_of_one_to_five():
    # mean 3, sample variance 10/4 = 2.5; t_{0.975, 4} = 2.776 (t table); half-width
    # 2.776445 * sqrt(2.5) / sqrt(5) = 1.963243.
    summary = stats.summarize([1, 2, 3, 4, 5])
    assert summary.n == 5 and summary.mean == 3.0
    assert summary.std == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert summary.ci_low == pytest.approx(3.0 - 1.963243, abs=1e-6)
    assert summary.ci_high == pytest.approx(3.0 + 1.963243, abs=1e-6)
    assert summary.to_json()["ci"] == [summary.ci_low, summary.ci_high]


@pytest.mark.parametrize("n, table", [(2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262),
                                      (30, 2.045)])
def test_t_critical_matches_the_t_table(n, table):
    assert stats.t_critical(n) == pytest.approx(table, abs=5e-4)


def test_two_values_use_the_cauchy_quantile():
    # With 1 degree of freedom the t distribution is the Cauchy one: t_{0.975} = tan(0.475 pi).
    summary = stats.summarize([1.0, 2.0])
    half = math.tan(0.475 * math.pi) * (math.sqrt(0.5) / math.sqrt(2))
    assert summary.ci_high - summary.mean == pytest.approx(half, rel=1e-9)
    narrower = stats.summarize([1.0, 2.0], confidence=0.9)
    assert narrower.ci_high - narrower.mean == pytest.approx(
        math.tan(0.45 * math.pi) * 0.5, rel=1e-9)


def test_fewer_than_two_values_have_no_spread():
    assert stats.summarize([4.0]) == stats.Summary((4.0,), 4.0, None, None, None)
    assert stats.summarize([]).mean is None
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.t_critical(1)
    with pytest.raises(ValueError, match="finite"):
        stats.summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        stats.summarize([1.0, 2.0], confidence=95)


@pytest.mark.parametrize("a, b", [
    ([1.2, 0.4, 2.2, 1.9, 0.8], [0.3, 0.1, 1.7, 2.0, 0.2]),
    ([5.0, 6.0, 7.5], [5.5, 6.0, 8.5]),
    ([0.1, -0.2], [0.0, -0.5]),
])
def test_paired_comparison_matches_scipy_ttest_rel(a, b):
    paired = stats.paired_comparison(a, b)
    reference = scipy_stats.ttest_rel(a, b)
    assert paired.t == pytest.approx(reference.statistic, rel=1e-10)
    assert paired.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    d = np.subtract(a, b)
    assert paired.differences.mean == pytest.approx(d.mean())
    assert paired.differences.std == pytest.approx(d.std(ddof=1))
    interval = reference.confidence_interval(0.95)
    assert (paired.differences.ci_low, paired.differences.ci_high) == pytest.approx(
        (interval.low, interval.high), rel=1e-9)


def test_significance_is_signed_and_needs_p_below_alpha():
    better = stats.paired_comparison([2.0, 3.1, 2.9, 3.5], [1.0, 1.2, 1.1, 1.4])
    assert better.p_value < 0.05 and better.significant() == 1
    worse = stats.paired_comparison([1.0, 1.2, 1.1, 1.4], [2.0, 3.1, 2.9, 3.5])
    assert worse.significant() == -1
    noisy = stats.paired_comparison([1.0, 3.0, 0.5], [2.0, 1.0, 1.0])
    assert noisy.p_value > 0.05 and noisy.significant() == 0
    assert better.significant(alpha=better.p_value) == 0  # p < alpha, strictly


def test_paired_comparison_degenerate_cases():
    same = stats.paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert (same.t, same.p_value, same.significant()) == (None, None, 0)
    shifted = stats.paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # d = 1, 1, 1
    assert shifted.t == math.inf and shifted.p_value == 0.0 and shifted.significant() == 1
    single = stats.paired_comparison([1.0], [0.0])
    assert single.p_value is None and single.differences.mean == 1.0
    with pytest.raises(ValueError, match="as many"):
        stats.paired_comparison([1.0, 2.0], [1.0])


def test_holm_adjusts_in_the_given_order_and_keeps_untested_ones_out():
    # Worked by hand: sorted 0.01, 0.02, 0.03, 0.5 (m = 4) -> 0.04, 0.06, 0.06 (monotone:
    # 2 x 0.03 = 0.06, not below the previous 0.06), 0.5; None is no test and not counted.
    got = stats.holm([0.03, None, 0.5, 0.01, 0.02])
    assert got[1] is None
    assert [got[i] for i in (3, 4, 0, 2)] == pytest.approx([0.04, 0.06, 0.06, 0.5])
    assert stats.holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match="in \\[0, 1\\]; got 1.5"):
        stats.holm([0.1, 1.5])
