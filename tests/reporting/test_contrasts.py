"""The contrast statistics against published values: Student's sleep data (Cushny & Peebles, as in R's
`datasets::sleep`) for the paired and the Welch t-interval, Holm's step-down adjustment on p vectors
whose Holm, Bonferroni and unadjusted answers all differ, and the verdicts read from them.

Reference values are R 4.x `t.test(extra ~ group, data = sleep, paired = TRUE)` and
`t.test(extra ~ group, data = sleep)` as R prints them; each tolerance is half a unit in the last
digit R prints (the reference's own precision), far above this module's float error (~1e-12)."""

from __future__ import annotations

import math

import pytest

from sparse_dm.reporting.contrasts import (
    NO_DIFFERENCE,
    PAIRED,
    WELCH,
    estimate,
    holm,
    paired_estimate,
    two_sided_p,
    verdict,
    welch_from_stats,
)
from sparse_dm.reporting.seed_stats import SeedStats

# extra hours of sleep of 10 patients under drug 1 and drug 2 (the same patients: paired)
DRUG1 = (0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0)
DRUG2 = (1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4)


def by_seed(values):
    return dict(enumerate(values))


def test_paired_interval_matches_r_on_the_sleep_data():
    # R: t = -4.0621, df = 9, p-value = 0.002833, 95% CI -2.4598858 -0.7001142, mean difference -1.58
    e = paired_estimate(by_seed(DRUG1), by_seed(DRUG2), 0.95)
    assert e.test == PAIRED and e.n_pairs == 10 and e.df == 9
    assert e.difference == pytest.approx(-1.58, abs=1e-12)
    assert e.t == pytest.approx(-4.0621, abs=5e-5)
    assert e.p == pytest.approx(0.002833, abs=5e-7)
    assert (e.low, e.high) == pytest.approx((-2.4598858, -0.7001142), abs=5e-8)


def test_welch_interval_matches_r_on_the_sleep_data():
    # R (Welch, the default): t = -1.8608, df = 17.776, p-value = 0.07939, 95% CI -3.3654832 0.2054832
    e = welch_from_stats(SeedStats.of(DRUG1), SeedStats.of(DRUG2), 0.95)
    assert e.test == WELCH and e.n_pairs is None and (e.n_a, e.n_b) == (10, 10)
    assert e.df == pytest.approx(17.776, abs=5e-4)
    assert e.t == pytest.approx(-1.8608, abs=5e-5)
    assert e.p == pytest.approx(0.07939, abs=5e-6)
    assert (e.low, e.high) == pytest.approx((-3.3654832, 0.2054832), abs=5e-8)


def test_welch_with_unequal_sizes_and_variances():
    # n = 3 vs 5, var 1 vs 2.5: se^2 = 1/3 + 1/2; Welch-Satterthwaite df = (5/6)^2 / ((1/3)^2/2 +
    # (1/2)^2/4) = (25/36) / (17/144) = 100/17 exactly (a pooled-variance test would use 6)
    a, b = [1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    e = welch_from_stats(SeedStats.of(a), SeedStats.of(b), 0.95)
    assert e.df == pytest.approx(100 / 17, rel=1e-12)
    assert e.t == pytest.approx(-1.0 / math.sqrt(5 / 6), rel=1e-12)


def test_estimate_pairs_shared_seeds_and_falls_back_to_welch_without_two():
    a, b = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 3.0, 8: 0.0}
    paired = estimate(a, b, 0.95)
    assert paired.test == PAIRED and paired.n_pairs == 3  # seeds 7 and 8 have no partner
    assert paired.difference == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    unpaired = estimate({0: 1.0, 1: 2.0}, {2: 0.0, 3: 0.5}, 0.95)
    assert unpaired.test == WELCH and (unpaired.n_a, unpaired.n_b) == (2, 2)


def test_undefined_intervals_say_why():
    one = paired_estimate({0: 1.0, 1: 2.0}, {0: 0.5}, 0.95)
    assert one.p is None and one.low is None and "1 shared seed(s); need 2" in one.reason
    same = paired_estimate({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5}, 0.95)
    assert same.p is None and same.reason == "identical differences on every seed"
    flat = welch_from_stats(SeedStats.of([1.0, 1.0]), SeedStats.of([2.0, 2.0]), 0.95)
    assert flat.p is None and flat.reason == "zero variance in both arms"
    with pytest.raises(ValueError, match="confidence must lie in"):
        paired_estimate({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.0}, 95)


def test_two_sided_p_closed_form():
    # df = 1 is the Cauchy distribution: P(|T| >= t) = 1 - 2 atan(t) / pi
    assert two_sided_p(1.0, 1) == pytest.approx(0.5, rel=1e-12)
    assert two_sided_p(-3.0, 1) == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, rel=1e-10)
    assert two_sided_p(0.0, 5) == 1.0


def test_holm_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    # Holm (0.03, 0.04, 0.04), not Bonferroni (0.03, 0.06, 0.09) and not unmonotone (0.03, 0.04, 0.03)
    assert holm([0.01, 0.02, 0.03]) == pytest.approx([0.03, 0.04, 0.04], rel=1e-12)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1


def test_holm_counts_untested_contrasts_in_the_family():
    assert holm([0.01, None]) == [pytest.approx(0.02), None]
    assert holm([None, None]) == [None, None]


def test_verdicts_follow_the_adjusted_p():
    e = paired_estimate(by_seed(DRUG1), by_seed(DRUG2), 0.95)
    assert verdict(e, 0.01, 0.05, "drug 1", "drug 2") == "drug 1 < drug 2"
    flipped = paired_estimate(by_seed(DRUG2), by_seed(DRUG1), 0.95)
    assert verdict(flipped, 0.01, 0.05, "drug 2", "drug 1") == "drug 2 > drug 1"
    # the unadjusted interval excludes 0, but the Holm-adjusted p does not pass: no difference detected
    assert e.high < 0 and verdict(e, 0.06, 0.05, "drug 1", "drug 2") == NO_DIFFERENCE
    one = paired_estimate({0: 1.0, 1: 2.0}, {0: 0.5}, 0.95)
    assert verdict(one, None, 0.05, "a", "b") == "not tested (1 shared seed(s); need 2)"
