"""DDPM/DDIM samplers and the noise schedules."""

import numpy as np
import pytest
import torch
from helpers.tolerance import SAMPLER_ROUNDINGS_PER_STEP, PredictionScale, assert_close_computed

from sparse_dm.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, masked_mse, sample
from sparse_dm.diffusion.samplers import ddim_timesteps


def eps_fn(x, t):
    return 0.3 * x + 0.01 * t[:, None].to(x.dtype) / 1000


def test_ddim_with_all_steps_and_eta_one_is_ddpm():
    schedule = NoiseSchedule("linear", 200).double()
    x_T = torch.randn(3, 4, dtype=torch.float64)
    tracked = PredictionScale(eps_fn, schedule)
    a = ddpm_sample(tracked, x_T, schedule, torch.Generator().manual_seed(0))
    b = ddim_sample(tracked, x_T, schedule, 200, 1.0, torch.Generator().manual_seed(0))
    assert_close_computed(  # the same 200 steps by two formulas
        a, b, reduction_length=200 * SAMPLER_ROUNDINGS_PER_STEP, scale=tracked.largest, why="DDPM vs DDIM"
    )


def test_deterministic_ddim_ignores_the_generator_and_stochastic_ones_follow_it():
    schedule = NoiseSchedule("sqrt_linear", 100, 0.0015, 0.0195)
    x_T = torch.randn(2, 5)
    a = ddim_sample(eps_fn, x_T, schedule, 10, 0.0, torch.Generator().manual_seed(0))
    b = ddim_sample(eps_fn, x_T, schedule, 10, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample(eps_fn, x_T, schedule, "ddpm", generator=torch.Generator().manual_seed(3))
    d = sample(eps_fn, x_T, schedule, "ddpm", generator=torch.Generator().manual_seed(3))
    e = sample(eps_fn, x_T, schedule, "ddpm", generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_ddim_timesteps_are_even_descending_and_end_at_zero():
    assert ddim_timesteps(1000, 4) == [750, 500, 250, 0]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match=r"sampling\.steps"):
        ddim_timesteps(100, 101)


def test_perfect_eps_recovers_x0_with_ddim():
    schedule = NoiseSchedule("linear", 100).double()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    x_T = schedule.q_sample(x0, torch.full((4,), 99), noise)

    def oracle(x, t):  # the exact eps for a single known x0
        a_bar = schedule.alpha_bar(t, x)
        return (x - a_bar.sqrt() * x0) / (1 - a_bar).sqrt()

    tracked = PredictionScale(oracle, schedule)
    assert_close_computed(  # exact in exact arithmetic: 20 updates of rounding (the oracle's 6 ops included)
        ddim_sample(tracked, x_T, schedule, 20), x0, reduction_length=20 * SAMPLER_ROUNDINGS_PER_STEP,
        scale=tracked.largest, why="DDIM with the true eps",
    )  # fmt: skip


def test_schedules():
    ldm = NoiseSchedule("sqrt_linear", 1000, 0.0015, 0.0195)
    assert ldm.betas[0].item() == pytest.approx(0.0015) and ldm.betas[-1].item() == pytest.approx(0.0195)
    # sqrt_linear: linspace of sqrt(beta) over 1000 steps, squared; index 500 lies 500/999 of the way.
    # float64 (a handful of operations), then stored as float32: one rounding of a value this size
    root = 0.0015**0.5 + (0.0195**0.5 - 0.0015**0.5) * 500 / 999
    assert_close_computed(
        ldm.betas[500], torch.tensor(root**2, dtype=torch.float32), reduction_length=1, scale=root**2,
        why="float32 storage",
    )  # fmt: skip
    linear = NoiseSchedule("linear", 1000, 1e-4, 2e-2)
    assert torch.all(linear.alphas_cumprod[1:] < linear.alphas_cumprod[:-1])
    with pytest.raises(ValueError, match=r"diffusion\.schedule"):
        NoiseSchedule("cosine")
    assert not NoiseSchedule().state_dict(), "derived buffers must not be checkpointed"


def test_masked_mse_ignores_padding_and_weights_samples_equally():
    pred, target = torch.zeros(2, 4, 1), torch.ones(2, 4, 1)
    target[0, 2:] = 100.0  # padding of sample 0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)[..., None]
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def compvis_reference_ddim(eps_fn, x_T, alphas_cumprod, num_steps, eta, generator):
    """CompVis DDIM re-derived from its published rule (numpy, float64): c = T // S, timesteps
    range(0, T, c) + 1, alphas_prev = [alphas_cumprod[0], alphas[:-1]], noise added at every step."""
    ac = alphas_cumprod.double().numpy()
    c = len(ac) // num_steps
    timesteps = np.arange(0, len(ac), c) + 1
    alphas = ac[timesteps]
    alphas_prev = np.concatenate([[ac[0]], ac[timesteps[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    x, visited = x_T.clone(), []
    for index in range(len(timesteps) - 1, -1, -1):
        visited.append(int(timesteps[index]))
        e = eps_fn(x, torch.full((x.shape[0],), int(timesteps[index])))
        pred_x0 = (x - np.sqrt(1 - alphas[index]) * e) / np.sqrt(alphas[index])
        dir_xt = np.sqrt(1 - alphas_prev[index] - sigmas[index] ** 2) * e
        noise = sigmas[index] * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = np.sqrt(alphas_prev[index]) * pred_x0 + dir_xt + noise
    return x, visited


@pytest.mark.parametrize(("num_steps", "eta"), [(100, 0.0), (150, 0.0), (50, 1.0), (7, 0.5)])
def test_compvis_discretization_matches_a_reimplementation_of_compvis(num_steps, eta):
    schedule = NoiseSchedule("sqrt_linear", 1000, 0.0015, 0.0195).double()
    x_T = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def toy(x, t):
        seen.append(int(t[0]))
        return eps_fn(x, t)

    tracked = PredictionScale(toy, schedule)
    ours = ddim_sample(
        tracked, x_T, schedule, num_steps, eta, torch.Generator().manual_seed(7), discretization="compvis"
    )
    ref, visited = compvis_reference_ddim(
        eps_fn, x_T, schedule.alphas_cumprod, num_steps, eta, torch.Generator().manual_seed(7)
    )
    assert seen == visited == ddim_timesteps(1000, num_steps, "compvis")
    n = len(visited) * SAMPLER_ROUNDINGS_PER_STEP  # torch vs numpy: the same updates, other op orders
    assert_close_computed(ours, ref, reduction_length=n, scale=tracked.largest, why="CompVis rule")
    uniform = ddim_sample(eps_fn, x_T, schedule, num_steps, eta, torch.Generator().manual_seed(7))
    assert not torch.allclose(ours, uniform, atol=1e-3)  # the two discretisations really differ


def test_compvis_timesteps_follow_the_ldm_rule():
    steps = ddim_timesteps(1000, 100, "compvis")
    assert (steps[0], steps[-1], len(steps)) == (991, 1, 100)
    assert len(ddim_timesteps(1000, 150, "compvis")) == 167  # c = 6: CompVis's "150 steps"
    assert ddim_timesteps(1000, 200, "compvis")[:2] == [996, 991]
    with pytest.raises(ValueError, match=r"sampling\.steps must be in \[1, 500\]"):
        ddim_timesteps(1000, 501, "compvis")
    with pytest.raises(ValueError, match=r"sampling\.discretization"):
        ddim_timesteps(1000, 10, "quad")
