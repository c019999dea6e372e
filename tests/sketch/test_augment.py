"""Stroke-level augmentations and corruptions: each changes exactly what its name says, in extent units."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_dm.sketch.augment import (
    StrokeAugment,
    extent,
    point_noise,
    random_affine,
    stroke_dropout,
    stroke_jitter,
)

F64_EPS = float(np.finfo(np.float64).eps)
NUM_STROKES = 400
POINTS_PER_STROKE = 5
DRAWING_EXTENT = 50.0


def drawing(seed: int = 0) -> list[np.ndarray]:
    """Many strokes inside a DRAWING_EXTENT square whose corners are always hit (fixed extent)."""
    rng = np.random.default_rng(seed)
    strokes = [rng.uniform(0, DRAWING_EXTENT, (POINTS_PER_STROKE, 2)) for _ in range(NUM_STROKES)]
    strokes[0][0], strokes[0][1] = (0.0, 0.0), (DRAWING_EXTENT, DRAWING_EXTENT)
    return strokes


def sample_std_bound(n: int) -> float:
    """Relative deviation of a sample std of n Gaussian draws allowed at 5 standard errors (1 / sqrt(2n))."""
    return 5 / np.sqrt(2 * n)


def test_point_noise_moves_every_point_by_sigma_times_extent():
    d, sigma = drawing(), 0.02
    out = point_noise(d, sigma, np.random.default_rng(1))
    offsets = np.concatenate([b - a for a, b in zip(d, out, strict=True)])
    assert extent(d) == DRAWING_EXTENT
    assert abs(offsets.std() / (sigma * DRAWING_EXTENT) - 1) < sample_std_bound(offsets.size)
    assert [len(s) for s in out] == [len(s) for s in d]


def test_stroke_jitter_shifts_whole_strokes_and_keeps_their_shapes():
    d, sigma = drawing(), 0.05
    out = stroke_jitter(d, sigma, np.random.default_rng(1))
    shifts = np.array([(b - a)[0] for a, b in zip(d, out, strict=True)])
    # the same shift for every point of a stroke: (a + shift) - a rounds twice, at |a| + |shift|
    atol = 2 * F64_EPS * (DRAWING_EXTENT + np.abs(shifts).max())
    for a, b, shift in zip(d, out, shifts, strict=True):
        np.testing.assert_allclose(b - a, np.broadcast_to(shift, a.shape), rtol=0, atol=atol)
    assert abs(shifts.std() / (sigma * DRAWING_EXTENT) - 1) < sample_std_bound(shifts.size)


def test_stroke_dropout_removes_the_given_fraction_and_never_everything():
    d, p = drawing(), 0.3
    kept = stroke_dropout(d, p, np.random.default_rng(1))
    # binomial count of kept strokes: within 5 standard deviations of n (1 - p)
    assert abs(len(kept) - NUM_STROKES * (1 - p)) < 5 * np.sqrt(NUM_STROKES * p * (1 - p))
    originals = {a.tobytes() for a in d}
    assert all(s.tobytes() in originals for s in kept)  # strokes are removed, never altered
    assert len(stroke_dropout(d, 0.0, np.random.default_rng(1))) == NUM_STROKES
    assert len(stroke_dropout(d, 1.0, np.random.default_rng(1))) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stroke_dropout(d, 1.5, np.random.default_rng(1))


def test_random_affine_is_linear_about_the_centre():
    d = drawing()
    out = random_affine(d, rotation_deg=10.0, scale=0.15, shear=0.1, rng=np.random.default_rng(1))
    before, after = np.concatenate(d), np.concatenate(out)
    # a linear map about the centroid keeps the centroid and is recovered by least squares; rounding:
    # the n-term sums of the centroid plus the map's few flops, at coordinates up to 2 x extent
    # (scale <= 1.15 and rotation/shear about the centre), so (n + 4) eps 2 extent bounds both
    atol = (len(before) + 4) * F64_EPS * 2 * DRAWING_EXTENT
    np.testing.assert_allclose(after.mean(0), before.mean(0), rtol=0, atol=atol)
    centred = before - before.mean(0)
    matrix, *_ = np.linalg.lstsq(centred, after - after.mean(0), rcond=None)
    np.testing.assert_allclose(centred @ matrix, after - after.mean(0), rtol=0, atol=atol)
    assert not np.allclose(matrix, np.eye(2))


def test_stroke_augment_is_seeded_and_refuses_bad_settings():
    d = drawing()
    a = StrokeAugment()(d, np.random.default_rng(3))
    b = StrokeAugment()(d, np.random.default_rng(3))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match=r"augment\.stroke_dropout"):
        StrokeAugment(stroke_dropout=1.0)
    with pytest.raises(ValueError, match=r"augment\.point_jitter"):
        StrokeAugment(point_jitter=-0.1)
