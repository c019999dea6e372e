"""Paired timing: the first side alternates, and the speed-up is the median of per-pair ratios."""

from __future__ import annotations

import pytest

from benchmarks.pairing import pair_summary, paired


def test_the_side_that_runs_first_alternates():
    calls: list[str] = []
    times = paired(lambda: calls.append("dense"), lambda: calls.append("sparse"), pairs=3)
    assert calls == ["dense", "sparse", "sparse", "dense", "dense", "sparse"]
    assert all(len(v) == 3 for v in times.values())


def test_speed_up_is_the_median_of_per_pair_ratios_not_a_ratio_of_medians():
    dense, sparse = [1.0, 4.0, 9.0], [1.0, 1.0, 3.0]  # ratios 1, 4, 3; medians 4 / 1 would say 4
    times = {"dense_wall": dense, "sparse_wall": sparse, "dense_cpu": dense, "sparse_cpu": sparse}
    summary = pair_summary(times)
    assert summary["speedup_wall"] == 3.0
    assert (summary["speedup_wall_min"], summary["speedup_wall_max"]) == (1.0, 4.0)
    assert summary["dense_ms_wall"] == pytest.approx(4000.0)
    assert summary["sparse_ms_cpu"] == pytest.approx(1000.0)
