"""DDPM ancestral sampling and DDIM sampling for eps-prediction models.

Samplers only see an `eps_fn(x_t, t)` closure, so sequence masks, class conditioning and
classifier-free guidance stay with the model family that needs them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sparse_dm.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
SAMPLERS = ("ddim", "ddpm")
DISCRETIZATIONS = ("uniform", "compvis")
COMPVIS_MIN_STRIDE = 2  # stride 1 would visit timestep T, past the last trained one


def _timesteps(x: Tensor, value: int) -> Tensor:
    return torch.full((x.shape[0],), value, device=x.device, dtype=torch.long)


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise drawn on the generator's device (CPU generators give the same samples on any device)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddpm_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling over all T steps with the posterior variance beta_tilde."""
    x = x_T
    for step in tqdm(range(schedule.num_timesteps - 1, -1, -1), disable=not progress, desc="DDPM"):
        t = _timesteps(x, step)
        eps = eps_fn(x, t)
        a_bar = schedule.alpha_bar(t, x)
        a_bar_prev = schedule.alpha_bar(t - 1, x)
        beta = 1.0 - a_bar / a_bar_prev
        mean = (x - beta / (1.0 - a_bar).sqrt() * eps) / (1.0 - beta).sqrt()
        if step == 0:
            x = mean
        else:
            var = beta * (1.0 - a_bar_prev) / (1.0 - a_bar)
            x = mean + var.sqrt() * _noise_like(x, generator)
    return x


def ddim_timesteps(num_timesteps: int, num_steps: int, discretization: str = "uniform") -> list[int]:
    """The training timesteps DDIM visits, descending.

    "uniform": ``num_steps`` evenly spaced timesteps ending at t = 0 (its predecessor is alpha_bar = 1).
    "compvis": CompVis LDM's ``ddim_discretize="uniform"``: stride c = T // num_steps, timesteps
    range(0, T, c) + 1 (so 991 ... 1 for 100 steps; 150 steps gives 167 visits), each step's
    predecessor the next visited timestep and the last one's alphas_cumprod[0] (ddim_previous).
    """
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"sampling.discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    if discretization == "compvis":
        stride = num_timesteps // num_steps if num_steps >= 1 else 0
        if stride < COMPVIS_MIN_STRIDE:
            raise ValueError(
                f"sampling.steps must be in [1, {num_timesteps // COMPVIS_MIN_STRIDE}] with "
                f"sampling.discretization=compvis (its timesteps range(0, T, T // steps) + 1 must stay "
                f"below T = {num_timesteps}), got {num_steps}"
            )
        return [t + 1 for t in range(0, num_timesteps, stride)][::-1]
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"sampling.steps must be in [1, {num_timesteps}], got {num_steps}")
    stride = num_timesteps / num_steps
    return sorted({round(i * stride) for i in range(num_steps)}, reverse=True)


def ddim_previous(steps: list[int], discretization: str) -> list[int]:
    """Index of the alpha_bar each step moves to: the next visited timestep, then -1 (alpha_bar = 1,
    "uniform") or 0 (alphas_cumprod[0], "compvis")."""
    last = 0 if discretization == "compvis" else -1
    return [*steps[1:], last]


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    discretization: str = "uniform",
) -> Tensor:
    """DDIM (Song et al. 2021). eta = 0 is deterministic; eta = 1 with all T steps is DDPM.

    With "compvis" the update is CompVis's ``p_sample_ddim``: the stochastic term is added at every
    step including the last (its sigma is non-zero there since alpha_bar_prev = alphas_cumprod[0]).
    """
    x = x_T
    steps = ddim_timesteps(schedule.num_timesteps, num_steps, discretization)
    previous = ddim_previous(steps, discretization)
    noise_on_last = discretization == "compvis"
    for i, (step, prev_step) in enumerate(
        tqdm(list(zip(steps, previous, strict=True)), disable=not progress, desc="DDIM")
    ):
        t = _timesteps(x, step)
        eps = eps_fn(x, t)
        a_bar, a_bar_prev = schedule.alpha_bar(t, x), schedule.alpha_bar(_timesteps(x, prev_step), x)
        x0 = schedule.predict_x0(x, t, eps)
        sigma = eta * ((1.0 - a_bar_prev) / (1.0 - a_bar) * (1.0 - a_bar / a_bar_prev)).sqrt()
        x = a_bar_prev.sqrt() * x0 + (1.0 - a_bar_prev - sigma**2).clamp_min(0.0).sqrt() * eps
        if eta > 0 and (i + 1 < len(steps) or noise_on_last):
            x = x + sigma * _noise_like(x, generator)
    return x


def sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    discretization: str = "uniform",
) -> Tensor:
    """Dispatch on the configured sampler name (``discretization`` applies to DDIM only)."""
    if sampler == "ddim":
        return ddim_sample(eps_fn, x_T, schedule, num_steps, eta, generator, progress, discretization)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, x_T, schedule, generator, progress)
    raise ValueError(f"sampling.sampler must be one of {SAMPLERS}, got {sampler!r}")
