"""Layer-wise densities (uniform, ER, ERK with RigL's dense-capping) as exact integer counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTRIBUTIONS = ("uniform", "er", "erk")
CAP_TOLERANCE = 1e-9  # floating-point slack before a layer counts as over-full


def _score(shape: Sequence[int], kind: str) -> float:
    """ER scores (n_out + n_in) / (n_out * n_in); ERK adds the kernel dims: sum(shape) / prod(shape)."""
    if kind == "erk":
        return sum(shape) / math.prod(shape)
    n_out, n_in = shape[0], shape[1]
    return (n_out + n_in) / (n_out * n_in)


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}; allowed: a number in [0, 1)")


def check_distribution(kind: str) -> None:
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"method.distribution={kind!r}; allowed: one of {DISTRIBUTIONS}")


def layer_densities(shapes: Sequence[Sequence[int]], sparsity: float, kind: str = "erk") -> list[float]:
    """Target density per layer; their numel-weighted mean is 1 - sparsity.

    ER/ERK: density proportional to the layer's score; a layer that would exceed density 1 is made
    dense and removed from the pool, and the scale is solved again until no layer exceeds 1.
    """
    check_sparsity(sparsity)
    check_distribution(kind)
    numels = [math.prod(s) for s in shapes]
    if kind == "uniform" or sparsity == 0.0:
        return [1.0 - sparsity] * len(shapes)
    scores = [_score(s, kind) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = (1.0 - sparsity) * sum(numels) - sum(numels[i] for i in dense)
        divisor = sum(scores[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        scale = budget / divisor
        over = [i for i in range(len(shapes)) if i not in dense and scores[i] * scale > 1.0 + CAP_TOLERANCE]
        if not over:
            return [1.0 if i in dense else min(1.0, scores[i] * scale) for i in range(len(shapes))]
        dense.update(over)


def layer_counts(shapes: Sequence[Sequence[int]], sparsity: float, kind: str = "erk") -> list[int]:
    """Exact active-weight counts per layer, summing to round((1 - sparsity) * total).

    Floors of the real-valued targets, then the remainder goes one by one to the layers with the
    largest fractional parts (ties: earlier layer first), never beyond a layer's size.
    """
    numels = [math.prod(s) for s in shapes]
    targets = [d * n for d, n in zip(layer_densities(shapes, sparsity, kind), numels, strict=True)]
    counts = [min(n, math.floor(t)) for t, n in zip(targets, numels, strict=True)]
    remainder = round((1.0 - sparsity) * sum(numels)) - sum(counts)
    by_fraction = sorted(range(len(shapes)), key=lambda i: (-(targets[i] - math.floor(targets[i])), i))
    for i in by_fraction if remainder > 0 else reversed(by_fraction):
        if remainder > 0 and counts[i] < numels[i]:
            counts[i] += 1
            remainder -= 1
        elif remainder < 0 and counts[i] > 0:
            counts[i] -= 1
            remainder += 1
    return counts
