"""Pre-declared contrasts between study arms, and the verdicts their numbers imply.

A contrast is A − B on one metric. Over seeds that both arms ran (the study shares seeds across arms,
and a seed fixes initialisation, masks and data order), the interval is the paired t-interval of the
per-seed differences; where fewer than two seeds are shared, or only per-arm statistics exist, it is
Welch's t-interval (Welch–Satterthwaite df). The p-values of a study's contrasts are adjusted by Holm's
step-down method over the whole declared family, and every verdict string is written here from those
numbers: nothing in the docs states a verdict that this module did not compute.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sparse_dm.reporting.seed_stats import SeedStats, t_cdf, t_quantile

PAIRED = "paired t"
WELCH = "Welch t"
NO_DIFFERENCE = "no difference detected"


@dataclass(frozen=True)
class Estimate:
    """mean(A) − mean(B) with its interval and two-sided p; low/high/p are None, with a reason, when
    the data cannot give them (too few seeds, zero variance)."""

    test: str
    difference: float
    low: float | None
    high: float | None
    df: float | None
    t: float | None
    p: float | None
    n_a: int
    n_b: int
    n_pairs: int | None  # seeds in the paired test; None for Welch
    reason: str | None = None

    @property
    def tested(self) -> bool:
        return self.p is not None


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return min(1.0, 2.0 * t_cdf(-abs(t), df))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _from_t(
    test: str, diff: float, se: float, df: float, confidence: float, counts: tuple[int, int, int | None]
) -> Estimate:
    half = t_quantile(0.5 + confidence / 2.0, df) * se
    t = diff / se
    return Estimate(test, diff, diff - half, diff + half, df, t, two_sided_p(t, df), *counts)


def paired_estimate(a: Mapping[int, float], b: Mapping[int, float], confidence: float) -> Estimate:
    """Paired t over the seeds both arms have: d_s = a_s − b_s, mean(d) ± t_{n−1} sd(d) / sqrt(n)."""
    _check_confidence(confidence)
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    counts = (len(a), len(b), n)
    mean = statistics.fmean(diffs) if diffs else math.nan
    if n < 2:
        return Estimate(PAIRED, mean, None, None, None, None, None, *counts, f"{n} shared seed(s); need 2")
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0.0:
        return Estimate(
            PAIRED, mean, None, None, None, None, None, *counts, "identical differences on every seed"
        )
    return _from_t(PAIRED, mean, se, n - 1, confidence, counts)


def welch_from_stats(a: SeedStats, b: SeedStats, confidence: float) -> Estimate:
    """Welch's t for independent groups given as (n, mean, SD): se² = sa²/na + sb²/nb, df by
    Welch–Satterthwaite. Exact from per-arm statistics, so a study whose per-seed values were not kept
    can still be tested (unpaired)."""
    _check_confidence(confidence)
    diff = a.mean - b.mean
    counts = (a.n, b.n, None)
    if a.n < 2 or b.n < 2:
        reason = f"n = {a.n} vs {b.n}: an SD, and so an interval, needs 2 seeds each"
        return Estimate(WELCH, diff, None, None, None, None, None, *counts, reason)
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    if va + vb == 0.0:
        return Estimate(WELCH, diff, None, None, None, None, None, *counts, "zero variance in both arms")
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    return _from_t(WELCH, diff, math.sqrt(va + vb), df, confidence, counts)


def estimate(a: Mapping[int, float], b: Mapping[int, float], confidence: float) -> Estimate:
    """Paired over shared seeds when at least two are shared, else Welch over all seeds of each arm."""
    if len(set(a) & set(b)) >= 2:
        return paired_estimate(a, b, confidence)
    return welch_from_stats(SeedStats.of(list(a.values())), SeedStats.of(list(b.values())), confidence)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values: sorted ascending, p_(i) × (m − i + 1), made monotone, capped
    at 1. A contrast that could not be tested (None) still counts in m (it sorts last), so the family is the
    one declared, not the one that happened to have data."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: math.inf if pvalues[i] is None else pvalues[i])
    adjusted: list[float | None] = [None] * m
    running = 0.0
    for rank, i in enumerate(order):
        p = pvalues[i]
        if p is not None:  # untested ones sort last: they only enlarge m
            running = max(running, min(1.0, (m - rank) * p))
            adjusted[i] = running
    return adjusted


def verdict(est: Estimate, p_holm: float | None, alpha: float, a: str, b: str) -> str:
    """ "A < B" / "A > B" when the Holm-adjusted p is below alpha, else "no difference detected";
    "not tested (why)" when the data gave no p."""
    if p_holm is None or not est.tested:
        return f"not tested ({est.reason})"
    if p_holm < alpha:
        return f"{a} < {b}" if est.difference < 0 else f"{a} > {b}"
    return NO_DIFFERENCE


def interval_text(est: Estimate, digits: int, confidence: float) -> str:
    """ "Δ = +0.0123, 95% CI [+0.0050, +0.0196]" (or the reason there is no interval)."""
    diff = "n/a" if math.isnan(est.difference) else f"{est.difference:+.{digits}f}"
    if est.low is None or est.high is None:
        return f"Δ = {diff}, no interval: {est.reason}"
    return f"Δ = {diff}, {confidence:.0%} CI [{est.low:+.{digits}f}, {est.high:+.{digits}f}]"
