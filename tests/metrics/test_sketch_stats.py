"""Sketch statistics: exact values on hand-built drawings, and ChiroDiff's data side in model units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_dm.metrics.sketch_stats import STAT_NAMES, sketch_stats

# Deltas (dx, dy, pen). A: strokes [r0 r1] [r2] [r3 r4] (pen up after r1 and r2), B: one stroke.
DRAWING_A = np.array([[0, 0, 0], [3, 4, 1], [0, 0, 1], [1, 0, 0], [-1, 0, 1]], np.float32)
DRAWING_B = np.array([[2, 0, 0], [0, 0, 1]], np.float32)


def test_exact_values_on_hand_built_drawings() -> None:
    stats = sketch_stats([DRAWING_A, DRAWING_B], pen_threshold=0.5)
    assert set(stats) == set(STAT_NAMES)
    assert stats["strokes_per_drawing"] == 2.0  # (3 + 1) / 2
    assert stats["one_point_stroke_fraction"] == 0.25  # 1 of 4 strokes
    assert stats["pen_up_rate"] == pytest.approx(4 / 7)  # rows with pen 1: 3 in A, 1 in B
    # dx and dy pooled: 14 values, sum 9, sum of squares 31.
    assert stats["delta_std"] == pytest.approx(math.sqrt(31 / 14 - (9 / 14) ** 2))


def test_sample_pens_are_thresholded_like_strokes() -> None:
    sample = torch.tensor([[0.0, 0.0, 0.1], [1.0, 1.0, 0.75], [1.0, 0.0, 0.2], [0.0, 1.0, 0.9]])
    low, high = sketch_stats([sample], 0.5), sketch_stats([sample], 0.8)
    assert (low["strokes_per_drawing"], low["pen_up_rate"]) == (2.0, 0.5)
    assert (high["strokes_per_drawing"], high["pen_up_rate"]) == (1.0, 0.25)
    assert low["one_point_stroke_fraction"] == high["one_point_stroke_fraction"] == 0.0
    at = sketch_stats([sample], 0.75)  # a pen exactly at the threshold lifts, as in deltas_to_strokes
    assert (at["strokes_per_drawing"], at["pen_up_rate"]) == (2.0, 0.5)


def test_single_point_drawings_are_one_point_strokes() -> None:
    dots = [np.array([[0.0, 0.0, 1.0]]), np.array([[5.0, -5.0, 1.0]])]
    stats = sketch_stats(dots, 0.5)
    assert stats == {
        "strokes_per_drawing": 1.0,
        "one_point_stroke_fraction": 1.0,
        "pen_up_rate": 1.0,
        "delta_std": pytest.approx(np.std([0.0, 0.0, 5.0, -5.0])),
    }


def test_empty_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one drawing"):
        sketch_stats([], 0.5)
    with pytest.raises(ValueError, match="at least one point"):
        sketch_stats([np.zeros((0, 3))], 0.5)
