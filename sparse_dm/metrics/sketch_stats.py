"""Cheap, offline statistics of sketches in the delta representation (no Inception weights).

They tell at a glance how far generated sketches are from the data: exploding strokes show up as
a large delta std, scattered dots as one-point strokes and a high pen-up rate. Samples and data
must be given in the same units (ChiroDiff's normalised deltas, see `sparse_dm.data.stroke3`) and
split into strokes with the same pen threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from sparse_dm.sketch.representation import deltas_to_strokes

STAT_NAMES = ("strokes_per_drawing", "one_point_stroke_fraction", "pen_up_rate", "delta_std")


def _as_array(drawing: np.ndarray | Tensor) -> np.ndarray:
    """float32, the dtype data and samples live in, so pens compare with the threshold exactly as
    `deltas_to_strokes` compares them."""
    if isinstance(drawing, Tensor):
        return drawing.detach().cpu().float().numpy()
    return np.asarray(drawing, dtype=np.float32)


def sketch_stats(drawings: Sequence[np.ndarray | Tensor], pen_threshold: float) -> dict[str, float]:
    """Pooled statistics of (n_i, 3) delta drawings (dx, dy, pen).

    - strokes_per_drawing: mean number of pen-down strokes per drawing;
    - one_point_stroke_fraction: strokes made of a single point / all strokes;
    - pen_up_rate: points whose pen >= pen_threshold / all points;
    - delta_std: standard deviation of all dx and dy values pooled together.
    """
    arrays = [_as_array(d) for d in drawings]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("sketch statistics need at least one drawing, each with at least one point")
    strokes = [deltas_to_strokes(a, pen_threshold) for a in arrays]
    num_strokes = sum(len(s) for s in strokes)
    one_point = sum(len(stroke) == 1 for s in strokes for stroke in s)
    points = np.concatenate(arrays)
    return {
        "strokes_per_drawing": num_strokes / len(arrays),
        "one_point_stroke_fraction": one_point / num_strokes,
        "pen_up_rate": float(np.mean(points[:, 2] >= pen_threshold)),
        "delta_std": float(np.std(points[:, :2], dtype=np.float64)),
    }
