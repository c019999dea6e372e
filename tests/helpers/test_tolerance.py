"""The shared float tolerance: the bound holds for every summation order a CPU kernel may use, is
within a small factor of what an adversarial order reaches, and the network counts are right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.tolerance import (
    SAMPLER_ROUNDINGS_PER_STEP,
    PredictionScale,
    assert_close_computed,
    ddim_scale,
    float_bound,
    reductions,
    unit_roundoff,
)
from torch import nn

from sparse_dm.diffusion import NoiseSchedule, ddim_sample
from sparse_dm.diffusion.samplers import ddim_timesteps
from sparse_dm.models.ldm_unet import AttentionBlock

F32 = torch.float32


def orders(terms: torch.Tensor) -> dict[str, float]:
    """One float32 sum of `terms` in each order a kernel may use."""

    def sequential(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=F32)
        for v in values:
            total = total + v
        return total

    def pairwise(values: torch.Tensor) -> torch.Tensor:
        while len(values) > 1:
            if len(values) % 2:
                values = torch.cat([values, values.new_zeros(1)])
            values = values[0::2] + values[1::2]
        return values[0]

    def lanes(values: torch.Tensor, width: int) -> torch.Tensor:  # SIMD: `width` partial sums, then fold
        padded = torch.cat([values, values.new_zeros(-len(values) % width)]).reshape(-1, width)
        partial = torch.zeros(width, dtype=F32)
        for row in padded:
            partial = partial + row
        return sequential(partial)

    return {
        "forward": float(sequential(terms)),
        "reverse": float(sequential(terms.flip(0))),
        "ascending |x|": float(sequential(terms[terms.abs().argsort()])),
        "descending |x|": float(sequential(terms[terms.abs().argsort(descending=True)])),
        "pairwise": float(pairwise(terms)),
        "8 lanes (AVX2)": float(lanes(terms, 8)),
        "16 lanes (AVX-512)": float(lanes(terms, 16)),
        "torch.sum": float(terms.sum()),
        "matmul (BLAS)": float(terms[None, :] @ torch.ones(len(terms), 1)),
    }


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_every_summation_order_stays_within_the_bound(n):
    generator = torch.Generator().manual_seed(n)
    terms = torch.randn(n, generator=generator, dtype=torch.float64).exp().mul(torch.randn(n).sign()).float()
    exact = math.fsum(terms.double().tolist())
    bound = float_bound(n, float(terms.abs().sum()))
    sums = orders(terms)
    for name, value in sums.items():
        assert abs(value - exact) <= bound / 2, name  # each order: within gamma_n * sum|terms|
    assert max(sums.values()) - min(sums.values()) <= bound


def test_an_adversarial_order_reaches_most_of_the_bound():
    """1 followed by many terms just below half an ulp of 1: the forward sum drops every one of them
    (an error of 0.9 gamma_n * sum|terms|), the reverse sum keeps them. The bound (gamma_n per side)
    is tight, not a blanket tolerance."""
    n = 1000
    terms = torch.tensor([1.0] + [0.9 * unit_roundoff(F32)] * (n - 1), dtype=F32)
    exact = math.fsum(terms.double().tolist())
    sums = orders(terms)
    per_side = float_bound(n, float(terms.abs().sum())) / 2
    assert sums["forward"] == 1.0
    assert 0.85 * per_side < exact - sums["forward"] <= per_side
    assert abs(sums["reverse"] - exact) < per_side / 100


def test_the_bound_is_two_gamma_n_and_refuses_what_it_cannot_bound():
    u = unit_roundoff(F32)
    assert u == 2.0**-24
    assert float_bound(10, 3.0) == pytest.approx(2 * 10 * u / (1 - 10 * u) * 3.0, rel=1e-15)
    assert float_bound(10, 1.0, torch.float64) < float_bound(10, 1.0, F32) / 1e8
    with pytest.raises(ValueError, match="reduction_length"):
        float_bound(0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        float_bound(3, -1.0)
    with pytest.raises(ValueError, match="wider dtype"):
        float_bound(1024, 1.0, torch.float16)  # n u = 1/2: the bound says nothing


def test_assert_close_computed_passes_at_the_bound_and_fails_beyond_it_saying_why():
    expected = torch.tensor([1.0, -2.0, 3.0])
    bound = float_bound(50, 3.0)
    assert_close_computed(expected + bound * 0.5, expected, reduction_length=50, scale=3.0, why="x")
    with pytest.raises(AssertionError, match=r"gamma_50 .* a reason"):
        assert_close_computed(expected + bound * 2, expected, reduction_length=50, scale=3.0, why="a reason")
    array = expected.numpy()
    assert_close_computed(array.copy(), array, reduction_length=50, scale=3.0, why="numpy")
    with pytest.raises(TypeError, match="floats"):
        assert_close_computed(np.arange(3), np.arange(3), reduction_length=1, scale=1.0, why="ints")


def test_reductions_of_a_linear_are_its_fan_in_and_its_sum_of_absolute_terms():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    x = torch.randn(3, 12)
    out, counted = reductions(linear, x)
    torch.testing.assert_close(out, linear(x), rtol=0, atol=0)
    assert counted.lengths == (13,)  # 12 products and the bias
    terms = (x[:, None, :] * linear.weight[None]).detach()  # (batch, out, in)
    by_hand = (terms.abs().sum(-1) + linear.bias.detach().abs()).max()
    assert_close_computed(  # the same 13 terms, summed by a matmul there and by sum() here
        torch.tensor(counted.scale), by_hand, reduction_length=13, scale=float(by_hand), why="sum order"
    )


def test_reductions_of_a_gru_count_every_step_of_every_layer_and_each_call():
    torch.manual_seed(0)
    gru = nn.GRU(5, 8, num_layers=2, batch_first=True)
    x = torch.randn(2, 9, 5)
    _, counted = reductions(gru, x)
    assert counted.lengths == (9 * ((5 + 1 + 8 + 1) + (8 + 1 + 8 + 1)),)
    _, twice = reductions(gru, x, call=lambda x: (gru(x), gru(x[:, :4])))
    assert twice.lengths == (counted.lengths[0], 4 * counted.lengths[0] // 9)
    assert twice.length == sum(twice.lengths) and twice.longest == counted.lengths[0]


def test_reductions_of_an_attention_block_count_what_sdpa_sums():
    torch.manual_seed(0)
    block = AttentionBlock(32, num_head_channels=16)
    x = torch.randn(2, 32, 4, 4)
    _, counted = reductions(block, x)
    positions, group = 16, 32 // 32 * 16
    norm, conv, sdpa = 2 * group + 2, 32 + 1, 16 + 2 * positions
    assert counted.lengths == (norm + conv + sdpa + conv,)  # norm, qkv, attention, proj_out


def test_reductions_refuse_a_module_they_cannot_count():
    with pytest.raises(TypeError, match="BatchNorm1d"):
        reductions(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), torch.randn(4, 3))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_scale_is_how_far_x0_moves_per_unit_of_eps_error(eta):
    """An eps_fn that ignores x (no Jacobian feedback) and errs by d at step k only: x_0 moves by
    g_k d, and ddim_scale with S = 1 at that step alone is g_k (two float64 runs, each rounding its
    updates: PredictionScale)."""
    schedule = NoiseSchedule("linear", 1000, 1e-4, 2e-2).double()
    steps = ddim_timesteps(1000, 5)
    x_T = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = 1e-3

    def eps_fn(x, t, erring=None):
        return torch.full_like(x, 0.3) + (d if int(t[0]) == erring else 0.0)

    tracked = PredictionScale(eps_fn, schedule)
    plain = ddim_sample(tracked, x_T, schedule, 5, eta, torch.Generator().manual_seed(1))
    for k, step in enumerate(steps):
        erring = PredictionScale(lambda x, t, step=step: eps_fn(x, t, step), schedule)
        moved = ddim_sample(erring, x_T, schedule, 5, eta, torch.Generator().manual_seed(1))
        gain = ddim_scale(schedule, tuple(float(i == k) for i in range(len(steps))), 5, eta)
        assert_close_computed(
            (moved - plain).abs(), torch.full_like(x_T, gain * d),
            reduction_length=len(steps) * SAMPLER_ROUNDINGS_PER_STEP,
            scale=max(tracked.largest, erring.largest) + gain * d, why="two float64 DDIM runs",
        )  # fmt: skip
    assert ddim_scale(schedule, (1.0,) * 5, 5, eta) > 1  # high-noise steps amplify
    with pytest.raises(ValueError, match="4 step scales for 5"):
        ddim_scale(schedule, (1.0,) * 4, 5, eta)


def test_prediction_scale_records_the_largest_x0_prediction():
    schedule = NoiseSchedule("linear", 100).double()
    tracked = PredictionScale(lambda x, t: -x, schedule)
    x, t = torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.tensor([99])
    assert torch.equal(tracked(x, t), -x)
    a_bar = float(schedule.alphas_cumprod[99])
    by_hand = (2 + (1 - a_bar) ** 0.5 * 2) / a_bar**0.5
    assert_close_computed(  # 6 float64 operations, here and in torch
        torch.tensor(tracked.largest), torch.tensor(by_hand), reduction_length=6, scale=by_hand, why="6 ops"
    )
