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


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced training timesteps, descending, always ending at t = 0."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"sampling.steps must be in [1, {num_timesteps}], got {num_steps}")
    stride = num_timesteps / num_steps
    return sorted({round(i * stride) for i in range(num_steps)}, reverse=True)


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021). eta = 0 is deterministic; eta = 1 with all T steps is DDPM."""
    x = x_T
    steps = ddim_timesteps(schedule.num_timesteps, num_steps)
    for i, step in enumerate(tqdm(steps, disable=not progress, desc="DDIM")):
        t = _timesteps(x, step)
        prev = _timesteps(x, steps[i + 1] if i + 1 < len(steps) else -1)
        eps = eps_fn(x, t)
        a_bar, a_bar_prev = schedule.alpha_bar(t, x), schedule.alpha_bar(prev, x)
        x0 = schedule.predict_x0(x, t, eps)
        sigma = eta * ((1.0 - a_bar_prev) / (1.0 - a_bar) * (1.0 - a_bar / a_bar_prev)).sqrt()
        x = a_bar_prev.sqrt() * x0 + (1.0 - a_bar_prev - sigma**2).clamp_min(0.0).sqrt() * eps
        if eta > 0 and i + 1 < len(steps):
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
) -> Tensor:
    """Dispatch on the configured sampler name."""
    if sampler == "ddim":
        return ddim_sample(eps_fn, x_T, schedule, num_steps, eta, generator, progress)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, x_T, schedule, generator, progress)
    raise ValueError(f"sampling.sampler must be one of {SAMPLERS}, got {sampler!r}")
