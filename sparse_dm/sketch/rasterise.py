"""Our sketch renderer: strokes -> uint8 images, the one used for PNG grids and for FID.

Rendering rules (all arguments, documented defaults):
- Each drawing is scaled uniformly so its bounding box fits a `canvas_size` square minus `margin`
  pixels on every side, and centred; a drawing with zero extent is drawn as a dot in the centre.
- Black strokes (`line_width` px, round joints) on white, no anti-aliasing, so output is a pure
  function of the input (deterministic, no fonts or randomness).
- y grows downwards, as in QuickDraw / KanjiVG screen coordinates (no flip).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

Strokes = Sequence[np.ndarray]  # one drawing: (k, 2) point arrays, one per pen-down stroke

CANVAS_SIZE = 128
LINE_WIDTH = 2
MARGIN = 8
BACKGROUND = 255
INK = 0


def _fit_to_canvas(strokes: Strokes, canvas_size: int, margin: int) -> list[np.ndarray]:
    """Pixel coordinates: uniform scale into the box inside the margins, centred."""
    points = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes])
    low, high = points.min(0), points.max(0)
    extent = float((high - low).max())
    inner = canvas_size - 2 * margin
    scale = inner / extent if extent > 0 else 0.0
    centre = (low + high) / 2
    return [(np.asarray(s, np.float64).reshape(-1, 2) - centre) * scale + canvas_size / 2 for s in strokes]


def render_strokes(
    strokes: Strokes,
    canvas_size: int = CANVAS_SIZE,
    line_width: int = LINE_WIDTH,
    margin: int = MARGIN,
) -> np.ndarray:
    """One drawing -> (canvas_size, canvas_size) uint8 grayscale, black ink on white."""
    image = Image.new("L", (canvas_size, canvas_size), BACKGROUND)
    strokes = [s for s in strokes if len(s)]
    if not strokes:
        return np.asarray(image)
    draw = ImageDraw.Draw(image)
    radius = line_width / 2
    for stroke in _fit_to_canvas(strokes, canvas_size, margin):
        xy = [tuple(p) for p in stroke.tolist()]
        if len(xy) == 1:
            ((x, y),) = xy
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=INK)
        else:
            draw.line(xy, fill=INK, width=line_width, joint="curve")
    return np.asarray(image)


def render_batch(
    drawings: Sequence[Strokes],
    canvas_size: int = CANVAS_SIZE,
    line_width: int = LINE_WIDTH,
    margin: int = MARGIN,
) -> Tensor:
    """List of drawings -> (N, 3, H, W) uint8 tensor (gray repeated to RGB, as FID expects)."""
    if not drawings:
        return torch.empty(0, 3, canvas_size, canvas_size, dtype=torch.uint8)
    gray = np.stack([render_strokes(d, canvas_size, line_width, margin) for d in drawings])
    return torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1).contiguous()


def make_grid(images: Tensor, ncols: int, padding: int = 2, pad_value: int = 128) -> Tensor:
    """(N, C, H, W) uint8 -> one (C, H', W') uint8 grid, row-major, gaps of `padding` px."""
    n, c, h, w = images.shape
    nrows = max(1, -(-n // ncols))
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncols * (w + padding) + padding), pad_value, dtype=torch.uint8
    )
    for i in range(n):
        top = (i // ncols) * (h + padding) + padding
        left = (i % ncols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_grid_png(
    drawings: Sequence[Strokes],
    path: str | Path,
    ncols: int,
    canvas_size: int = CANVAS_SIZE,
    line_width: int = LINE_WIDTH,
    margin: int = MARGIN,
) -> Path:
    """Render drawings and write them as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(render_batch(drawings, canvas_size, line_width, margin), ncols)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
