"""Statistics over seeds: mean ± SD and Welch's t-interval for a difference of two means.

The Student-t quantile is computed here (regularised incomplete beta + bisection) because scipy is not
a dependency; Welch's degrees of freedom are fractional, so tables of integer df would not do.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

BETA_CF_MAX_ITER = 300  # continued fraction converges in < 100 terms for the df a seed study sees
BETA_CF_EPS = 1e-15
BISECT_TOL = 1e-12
TINY = 1e-300  # Lentz's guard against division by zero


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > TINY else TINY)
    result = d
    for m in range(1, BETA_CF_MAX_ITER + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > TINY else TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > TINY else TINY
            result *= c * d
        if abs(c * d - 1.0) < BETA_CF_EPS:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df (> 0, possibly fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(prob: float, df: float) -> float:
    """The t with P(T <= t) = prob, by bisection on t_cdf (monotone, so bisection cannot miss)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {prob}")
    if prob < 0.5:
        return -t_quantile(1.0 - prob, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < prob:
        low, high = high, 2.0 * high
    while high - low > BISECT_TOL * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < prob else (low, mid)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class SeedStats:
    """Mean and sample SD over seeds; the SD is NaN for a single seed (it is undefined, not 0)."""

    n: int
    mean: float
    sd: float

    @classmethod
    def of(cls, values: Sequence[float]) -> SeedStats:
        n = len(values)
        mean = statistics.fmean(values) if n else math.nan
        sd = statistics.stdev(values) if n > 1 else math.nan
        return cls(n, mean, sd)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its Welch t-interval; low/high are None with a reason when undefined."""

    mean: float
    low: float | None
    high: float | None
    df: float | None
    reason: str | None = None

    @property
    def excludes_zero(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low > 0.0 or self.high < 0.0


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float) -> Difference:
    """Welch's t-interval for mean(a) - mean(b) (unequal variances, Welch-Satterthwaite df)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    sa, sb = SeedStats.of(a), SeedStats.of(b)
    mean = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        counts = f"n = {sa.n} vs {sb.n}"
        return Difference(mean, None, None, None, f"{counts}: an SD, and so an interval, needs 2 seeds each")
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n
    if va + vb == 0.0:
        return Difference(mean, None, None, None, "zero variance in both groups")
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    half = t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(va + vb)
    return Difference(mean, mean - half, mean + half, df)
