"""Stroke-level transforms of one drawing (a list of (k, 2) point arrays): augmentations and corruptions.

They act on the pen trajectory, not on pixels, so every output is still a drawing of strokes that the
renderer (sparse_dm.sketch.rasterise) draws with the same line width. Distances are in units of the
drawing's extent (the longer side of its bounding box, what the renderer scales to the canvas), so one
level means the same visible change for any dataset's coordinate units. All randomness comes from the
`numpy.random.Generator` passed in.

Used twice, at different strengths: mild affine jitter, point jitter and stroke dropout are the
training augmentations of the sketch feature extractor (sparse_dm.metrics.sketch_features), and the
same point noise / stroke dropout plus stroke jitter at growing levels are the corruptions that
validate the metric (benchmarks/sketch_metric.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Drawing = list[np.ndarray]  # pen-down strokes, each (k, 2) float64


def as_drawing(strokes: Sequence[np.ndarray]) -> Drawing:
    """A copy as float64 (k, 2) arrays, empty strokes removed."""
    return [np.asarray(s, dtype=np.float64).reshape(-1, 2).copy() for s in strokes if len(s)]


def extent(drawing: Sequence[np.ndarray]) -> float:
    """The longer side of the bounding box (0 for a single point)."""
    points = np.concatenate([np.asarray(s, np.float64).reshape(-1, 2) for s in drawing])
    return float((points.max(0) - points.min(0)).max())


def point_noise(drawing: Sequence[np.ndarray], sigma: float, rng: np.random.Generator) -> Drawing:
    """Every point moved by independent Gaussian noise of std `sigma` x extent."""
    out = as_drawing(drawing)
    scale = sigma * extent(out)
    return [s + rng.normal(0.0, scale, s.shape) for s in out]


def stroke_jitter(drawing: Sequence[np.ndarray], sigma: float, rng: np.random.Generator) -> Drawing:
    """Every stroke translated as a whole by Gaussian noise of std `sigma` x extent: the strokes keep
    their shapes but their arrangement (what makes a kanji of radicals) breaks."""
    out = as_drawing(drawing)
    scale = sigma * extent(out)
    return [s + rng.normal(0.0, scale, (1, 2)) for s in out]


def stroke_dropout(drawing: Sequence[np.ndarray], p: float, rng: np.random.Generator) -> Drawing:
    """Each stroke removed with probability `p`; one stroke (drawn at random) always survives, so the
    result is never an empty drawing."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stroke dropout probability must be in [0, 1], got {p}")
    out = as_drawing(drawing)
    keep = rng.random(len(out)) >= p
    if not keep.any():
        keep[rng.integers(len(out))] = True
    return [s for s, k in zip(out, keep, strict=True) if k]


def random_affine(
    drawing: Sequence[np.ndarray], rotation_deg: float, scale: float, shear: float, rng: np.random.Generator
) -> Drawing:
    """A random linear map about the drawing's centre: rotation in +-rotation_deg, per-axis log-scale in
    +-log(1 + scale), shear in +-shear. (Translation and overall size are irrelevant: the renderer
    centres and fits every drawing.)"""
    out = as_drawing(drawing)
    angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    sx, sy = np.exp(rng.uniform(-np.log1p(scale), np.log1p(scale), 2))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.array([[1.0, rng.uniform(-shear, shear)], [0.0, 1.0]]) @ np.diag([sx, sy])
    centre = np.concatenate(out).mean(0)
    return [(s - centre) @ matrix.T + centre for s in out]


@dataclass(frozen=True)
class StrokeAugment:
    """The extractor's training views: a random affine map, point jitter, stroke dropout (in that order).

    Kept mild on purpose: the contrastive loss makes features invariant to whatever the augmentations
    do, so they must stay well below the corruptions the metric is meant to detect.
    """

    rotation_deg: float = 10.0
    scale: float = 0.15
    shear: float = 0.1
    point_jitter: float = 0.01
    stroke_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "scale", "shear", "point_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.stroke_dropout < 1.0:
            raise ValueError(f"augment.stroke_dropout must be in [0, 1), got {self.stroke_dropout}")

    def __call__(self, drawing: Sequence[np.ndarray], rng: np.random.Generator) -> Drawing:
        out = random_affine(drawing, self.rotation_deg, self.scale, self.shear, rng)
        out = point_noise(out, self.point_jitter, rng)
        return stroke_dropout(out, self.stroke_dropout, rng)
