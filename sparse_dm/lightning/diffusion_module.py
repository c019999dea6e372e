"""The LightningModule skeleton shared by every diffusion model family.

eps-prediction training with a masked MSE, a fixed-seed validation loss (same timesteps and noise
every time, so runs compare across methods and sparsities) measured with both the EMA and the raw
training weights, AdamW, a masked EMA, and sample grids written as PNG with the weights chosen by
`sampling.weights` (ema | raw). Families implement the data representation and
the denoiser call (see docs/CONTRACTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from sparse_dm.diffusion import NoiseSchedule, masked_mse, sample
from sparse_dm.sparsity.ema import MaskedEMA

SAMPLING_WEIGHTS = ("ema", "raw")


@dataclass
class DiffusionBatch:
    """One batch in the space the noise is added to."""

    x0: Tensor
    mask: Tensor | None = None
    cond: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DiffusionModule(L.LightningModule):
    """Base class; subclasses implement prepare_batch, predict_eps, generate, save_samples and
    example_net_inputs."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        diffusion: dict,
        optimizer: dict,
        ema: dict,
        sampling: dict,
        validation: dict,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.model_name = name
        self.net = net
        self.schedule = NoiseSchedule(
            diffusion["schedule"], diffusion["num_timesteps"], diffusion["beta_start"], diffusion["beta_end"]
        )
        self.ema = MaskedEMA(net, **ema)
        if sampling["weights"] not in SAMPLING_WEIGHTS:
            raise ValueError(
                f"model.sampling.weights must be one of {SAMPLING_WEIGHTS}, got {sampling['weights']!r}"
            )
        self.optimizer_cfg = dict(optimizer)
        self.sampling_cfg = dict(sampling)
        self.validation_cfg = dict(validation)
        self.output_dir: Path | None = None
        self.sample_paths: list[str] = []
        self.last_validated_step = -1
        # Set by sparse_dm.train for runs with method.timestep_bands: calls the net with each
        # sample's band mask (sparsity.timestep_bands.BandRouter). None: the plain net.
        self.timestep_bands: Callable[..., Tensor] | None = None

    # ----- family-specific hooks -------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> DiffusionBatch:
        raise NotImplementedError

    def predict_eps(self, x_t: Tensor, t: Tensor, batch: DiffusionBatch) -> Tensor:
        raise NotImplementedError

    def generate(self, num_samples: int, generator: torch.Generator, **kwargs: Any) -> Any:
        raise NotImplementedError

    def save_samples(self, samples: Any, path: Path) -> Path:
        raise NotImplementedError

    def example_net_inputs(self, batch_size: int = 1) -> tuple:
        raise NotImplementedError

    # ----- shared machinery ------------------------------------------------------------------
    @property
    def denoiser(self) -> Callable[..., Tensor]:
        """What families call instead of `self.net(x_t, t, ...)`: the net itself, or the net routed
        through the timestep-band masks."""
        return self.net if self.timestep_bands is None else self.timestep_bands

    @contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """Run self.net with the (masked) EMA weights inside the block."""
        with self.ema.swapped_into(self.net) as net:
            yield net

    def sampling_weights(self) -> AbstractContextManager[nn.Module]:
        """The weights samples, FID and `val/loss` use: EMA or the raw training weights."""
        return self.ema_weights() if self.sampling_cfg["weights"] == "ema" else nullcontext(self.net)

    def sample_with(self, eps_fn, x_T: Tensor, generator: torch.Generator | None, **overrides: Any) -> Tensor:
        """Run the configured sampler (sampling.sampler / steps / eta / discretization: compvis | uniform,
        DDIM only), allowing per-call overrides."""
        cfg = {**self.sampling_cfg, **overrides}
        return sample(
            eps_fn,
            x_T,
            self.schedule,
            sampler=cfg["sampler"],
            num_steps=cfg["steps"],
            eta=cfg["eta"],
            generator=generator,
            progress=cfg.get("progress", False),
            discretization=cfg.get("discretization", "uniform"),
        )

    def diffusion_loss(self, batch: DiffusionBatch, t: Tensor, noise: Tensor) -> Tensor:
        x_t = self.schedule.q_sample(batch.x0, t, noise)
        return masked_mse(self.predict_eps(x_t, t, batch), noise, batch.mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        data = self.prepare_batch(batch)
        x0 = data.x0
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        loss = self.diffusion_loss(data, t, torch.randn_like(x0))
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Update the EMA right after each real optimizer step, before any callback's
        on_train_batch_end (so checkpoints saved there hold the EMA of that step)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def _fixed_noise(self, x0: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """Timesteps and noise that depend only on (validation.seed, batch index)."""
        generator = torch.Generator().manual_seed(int(self.validation_cfg["seed"]) + batch_idx)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return t.to(x0.device), noise.to(x0.device)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs `val/loss_raw` (training weights), `val/loss_ema` (EMA weights) and `val/loss`, the
        one `sampling.weights` selects; a gap between the first two shows the EMA lagging."""
        data = self.prepare_batch(batch)
        t, noise = self._fixed_noise(data.x0, batch_idx)
        losses = {"raw": self.diffusion_loss(data, t, noise)}
        with self.ema_weights():
            losses["ema"] = self.diffusion_loss(data, t, noise)
        size = data.x0.shape[0]
        for name, value in losses.items():
            self.log(f"val/loss_{name}", value, batch_size=size, sync_dist=True)
        loss = losses[self.sampling_cfg["weights"]]
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.last_validated_step = self.trainer.global_step
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self.write_samples()

    @torch.no_grad()
    def write_samples(self, tag: str | None = None) -> Path | None:
        """Sample with the `sampling.weights` and a fixed seed (rank 0 only) and save a PNG grid."""
        if self.output_dir is None or not self.trainer.is_global_zero:
            return None
        generator = torch.Generator().manual_seed(int(self.sampling_cfg["seed"]))
        with self.sampling_weights():
            samples = self.generate(int(self.sampling_cfg["num_samples"]), generator)
        name = tag or f"step_{self.trainer.global_step:06d}"
        path = self.save_samples(samples, Path(self.output_dir) / "samples" / f"{name}.png")
        self.sample_paths.append(str(path))
        return path

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.optimizer_cfg
        return torch.optim.AdamW(
            self.net.parameters(),
            lr=cfg["lr"],
            weight_decay=cfg["weight_decay"],
            betas=tuple(cfg["betas"]),
            eps=cfg["eps"],
        )
