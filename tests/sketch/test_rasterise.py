"""The sketch renderer: deterministic, fitted into the margins, batchable, grid PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparse_dm.sketch.rasterise import make_grid, render_batch, render_strokes, save_grid_png

SQUARE = [np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0]]), np.array([[0.0, 4.0], [0.0, 1.0]])]


def test_deterministic_and_ink_on_white() -> None:
    a, b = render_strokes(SQUARE), render_strokes(SQUARE)
    assert a.dtype == np.uint8 and a.shape == (128, 128)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a).tolist()) == {0, 255}


def test_margin_respected_and_box_filled() -> None:
    size, margin, width = 64, 10, 2
    image = render_strokes(SQUARE, canvas_size=size, line_width=width, margin=margin)
    ink_rows, ink_cols = np.nonzero(image == 0)
    slack = width // 2 + 1
    assert ink_rows.min() >= margin - slack and ink_rows.max() <= size - margin + slack
    assert ink_cols.min() >= margin - slack and ink_cols.max() <= size - margin + slack
    assert ink_cols.max() - ink_cols.min() >= size - 2 * margin - 1  # scaled up to fill the box


def test_invariant_to_translation_and_scale() -> None:
    moved = [s * 2.0 + np.array([8.0, -16.0]) for s in SQUARE]
    np.testing.assert_array_equal(render_strokes(SQUARE), render_strokes(moved))


def test_degenerate_drawings() -> None:
    assert (render_strokes([]) == 255).all()
    dot = render_strokes([np.array([[3.0, 3.0]])], canvas_size=32, line_width=4)
    assert (dot == 0).any() and dot[16, 16] == 0


def test_batch_is_rgb_uint8_tensor() -> None:
    batch = render_batch([SQUARE, SQUARE[:1], []], canvas_size=32)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0], batch[:, 2])
    np.testing.assert_array_equal(batch[0, 0].numpy(), render_strokes(SQUARE, canvas_size=32))


def test_grid_png(tmp_path: Path) -> None:
    grid = make_grid(render_batch([SQUARE] * 5, canvas_size=16), ncols=3, padding=2)
    assert grid.shape == (3, 2 * 18 + 2, 3 * 18 + 2)
    path = save_grid_png([SQUARE] * 5, tmp_path / "sub" / "g.png", ncols=3, canvas_size=16)
    with Image.open(path) as image:
        assert image.size == (3 * 18 + 2, 2 * 18 + 2)
