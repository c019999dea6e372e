"""Stroke-3 sketch representations and the pure conversions between them.

Representations (all small pure functions below, so every conversion is testable on its own):
- stroke-3:  rows (dx, dy, pen) as stored by sketch-rnn; row 0 is an offset from the origin and
             pen = 1 means the pen is lifted after that point (the stroke ends there).
- absolute:  rows (x, y, pen), the cumulative sum of the stroke-3 offsets.
- deltas:    the diffusion space. The normalised drawing starts at the origin, so row i holds
             (x_i - x_{i-1}, y_i - y_{i-1}, pen_i) with x_{-1} = 0 (row 0 is therefore (0, 0, pen_0)).
- features:  what the denoiser reads per step, (x, y, dx, dy, pen) with positions = cumsum(deltas);
             see `deltas_to_features`.
- strokes:   a list of (k, 2) point arrays, one per pen-down stroke, for rendering.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DATA_CHANNELS = 3  # deltas: (dx, dy, pen)
FEATURE_CHANNELS = 5  # denoiser features: (x, y, dx, dy, pen)
_BINARY_PEN_THRESHOLD = 0.5  # stored pen bits are exactly 0 or 1


def stroke3_to_absolute(stroke3: np.ndarray) -> np.ndarray:
    """(dx, dy, pen) offsets -> (x, y, pen) positions."""
    out = stroke3.astype(np.float32, copy=True)
    out[:, :2] = np.cumsum(out[:, :2], axis=0)
    return out


def normalise_absolute(absolute: np.ndarray, scale: float) -> np.ndarray:
    """ChiroDiff normalisation: first point to the origin, the farthest point at distance `scale`."""
    out = absolute.astype(np.float32, copy=True)
    out[:, :2] -= out[:1, :2]
    radius = float(np.linalg.norm(out[:, :2], axis=1).max())
    if radius > 0.0:
        out[:, :2] *= scale / radius
    return out


def absolute_to_deltas(absolute: np.ndarray) -> np.ndarray:
    """Positions -> per-step displacements (row 0 relative to the origin)."""
    out = absolute.astype(np.float32, copy=True)
    out[:, :2] = np.diff(absolute[:, :2], axis=0, prepend=np.zeros((1, 2), absolute.dtype))
    return out


def stroke3_to_deltas(stroke3: np.ndarray, scale: float) -> np.ndarray:
    """A raw stroke-3 drawing -> normalised deltas, the diffusion space."""
    return absolute_to_deltas(normalise_absolute(stroke3_to_absolute(stroke3), scale))


def deltas_to_features(deltas: Tensor) -> Tensor:
    """(..., L, 3) deltas -> (..., L, 5) denoiser features (x, y, dx, dy, pen).

    Positions are a causal cumsum, so padding after a drawing never changes its real positions.
    """
    return torch.cat([deltas[..., :2].cumsum(-2), deltas], dim=-1)


def deltas_to_strokes(deltas: np.ndarray | Tensor, pen_threshold: float) -> list[np.ndarray]:
    """Deltas (n, 3) -> pen-down strokes; a stroke ends after each point whose pen >= threshold."""
    arr = deltas.detach().cpu().numpy() if isinstance(deltas, Tensor) else np.asarray(deltas)
    points = np.cumsum(arr[:, :2].astype(np.float64), axis=0)
    ends = np.flatnonzero(arr[:-1, 2] >= pen_threshold) + 1
    return [s for s in np.split(points, ends) if len(s)]


def stroke3_to_strokes(stroke3: np.ndarray) -> list[np.ndarray]:
    """Raw stroke-3 (pen in {0, 1}) -> strokes, for rendering real data."""
    return deltas_to_strokes(stroke3, pen_threshold=_BINARY_PEN_THRESHOLD)
