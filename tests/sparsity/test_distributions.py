"""ER/ERK/uniform layer densities: exact totals, caps at 1, the RigL dense-capping loop."""

import math

import pytest
import torch
from helpers.tolerance import float_bound
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dm.sparsity.distributions import CAP_TOLERANCE, layer_counts, layer_densities

shapes_2d = st.tuples(st.integers(1, 64), st.integers(1, 64))
shapes_4d = st.tuples(
    st.integers(1, 32), st.integers(1, 32), st.sampled_from([1, 3]), st.sampled_from([1, 3])
)
shape_lists = st.lists(st.one_of(shapes_2d, shapes_4d), min_size=1, max_size=8)
sparsities = st.floats(0.0, 0.99)


@settings(max_examples=200, deadline=None)
@given(shapes=shape_lists, sparsity=sparsities, kind=st.sampled_from(["uniform", "er", "erk"]))
def test_counts_are_exact_and_bounded(shapes, sparsity, kind):
    counts = layer_counts(shapes, sparsity, kind)
    numels = [math.prod(s) for s in shapes]
    assert sum(counts) == round((1 - sparsity) * sum(numels))
    assert all(0 <= c <= n for c, n in zip(counts, numels, strict=True))


@settings(max_examples=200, deadline=None)
@given(shapes=shape_lists, sparsity=sparsities, kind=st.sampled_from(["er", "erk"]))
def test_densities_hit_target_and_never_exceed_one(shapes, sparsity, kind):
    densities = layer_densities(shapes, sparsity, kind)
    numels = [math.prod(s) for s in shapes]
    assert max(densities) <= 1.0  # min(1, ...) caps exactly
    # a layer within CAP_TOLERANCE above 1 is clipped (losing at most that share of it); the rest is
    # float64 rounding of a few operations per layer
    slack = CAP_TOLERANCE * sum(numels) + float_bound(4 * len(shapes) + 4, sum(numels), torch.float64)
    total = sum(d * n for d, n in zip(densities, numels, strict=True))
    assert abs(total - (1 - sparsity) * sum(numels)) <= slack


def test_erk_caps_small_layers_dense_and_rescales_the_rest():
    shapes = [(4, 3, 3, 3), (256, 256, 3, 3), (10, 256)]
    densities = layer_densities(shapes, 0.5, "erk")
    assert densities[0] == 1.0  # would be > 1 without capping
    assert 0 < densities[1] < 0.5 < densities[2] <= 1.0


def test_erk_score_uses_kernel_dims_and_er_does_not():
    conv, linear = (64, 64, 3, 3), (64, 576)  # same numel
    erk = layer_densities([conv, linear], 0.9, "erk")
    er = layer_densities([conv, linear], 0.9, "er")
    assert erk[0] / erk[1] == pytest.approx(((64 + 64 + 6) / (64 * 64 * 9)) / ((64 + 576) / (64 * 576)))
    assert er[0] / er[1] == pytest.approx(((64 + 64) / (64 * 64)) / ((64 + 576) / (64 * 576)))


def test_uniform_and_dense():
    assert layer_densities([(3, 4), (5, 6)], 0.25, "uniform") == [0.75, 0.75]
    assert layer_counts([(3, 4), (5, 6)], 0.0, "erk") == [12, 30]


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_invalid_sparsity_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        layer_densities([(3, 4)], sparsity, "erk")
