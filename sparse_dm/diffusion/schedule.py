"""Discrete-time Gaussian noise schedules (DDPM) and the closed-form forward process."""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCHEDULE_KINDS = ("linear", "sqrt_linear")


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas in float64. "sqrt_linear" is what LDM calls "linear": linear in sqrt(beta)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "sqrt_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"model.diffusion.schedule={kind!r}; allowed: one of {SCHEDULE_KINDS}")


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] reshaped to broadcast against a batch shaped like `like`."""
    return values.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule(nn.Module):
    """Betas and cumulative alphas as non-persistent buffers, so they follow .to(device) but stay
    out of checkpoints (they are derived from config)."""

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
    ) -> None:
        super().__init__()
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"model.diffusion.num_timesteps={num_timesteps!r}; allowed: an integer >= 1")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"model.diffusion.beta_start={beta_start!r}, beta_end={beta_end!r}; allowed: "
                "0 < beta_start <= beta_end < 1"
            )
        self.kind = kind
        self.num_timesteps = num_timesteps
        betas = make_betas(kind, num_timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt().float(), persistent=False
        )

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample given a noise estimate (from alpha_bar, like the samplers' other terms)."""
        a_bar = self.alpha_bar(t, x_t)
        return (x_t - (1.0 - a_bar).sqrt() * eps) / a_bar.sqrt()

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """alphas_cumprod[t] broadcast against `like`; t = -1 means alpha_bar = 1 (clean data)."""
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return _gather(padded, t + 1, like)
