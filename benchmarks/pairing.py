"""Paired timing of a dense and a sparse callable in one process: the side that runs first alternates
between pairs, so a drift in load or clock speed falls on both sides equally; the speed-up is the
median of the per-pair ratios, with its range."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

SIDES = ("dense", "sparse")
CLOCKS = ("wall", "cpu")


def paired(dense: Callable[[], Any], sparse: Callable[[], Any], pairs: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of each side, `pairs` times; dense runs first in even pairs, sparse in odd."""
    times: dict[str, list[float]] = {f"{side}_{clock}": [] for side in SIDES for clock in CLOCKS}
    for i in range(pairs):
        order = ((dense, "dense"), (sparse, "sparse"))
        for fn, side in order if i % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[f"{side}_cpu"].append(time.process_time() - cpu)
            times[f"{side}_wall"].append(time.perf_counter() - wall)
    return times


def pair_summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians in ms and the per-pair speed-up dense / sparse (median, min, max), wall and CPU."""
    out: dict[str, float] = {}
    for clock in CLOCKS:
        dense, sparse = times[f"dense_{clock}"], times[f"sparse_{clock}"]
        ratios = [d / s for d, s in zip(dense, sparse, strict=True)]
        out |= {
            f"dense_ms_{clock}": 1e3 * statistics.median(dense),
            f"sparse_ms_{clock}": 1e3 * statistics.median(sparse),
            f"speedup_{clock}": statistics.median(ratios),
            f"speedup_{clock}_min": min(ratios),
            f"speedup_{clock}_max": max(ratios),
        }
    return out
