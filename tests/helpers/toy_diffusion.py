"""A tiny diffusion family (MLP on 2-D points) for testing the Lightning plumbing quickly."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sparse_dm.data.loader import ResumableDataLoader
from sparse_dm.training.modules.diffusion import DiffusionBatch, DiffusionModule

MODULE_KWARGS = {
    "name": "toy",
    "diffusion": {"schedule": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 2e-2},
    "optimizer": functools.partial(
        torch.optim.AdamW, lr=1e-2, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8
    ),
    "ema": {"decay": 0.9},
    "sampling": {"weights": "ema", "sampler": "ddim", "steps": 5, "eta": 0.0, "num_samples": 4, "seed": 0},
    "validation": {"seed": 0},
}


class ToyNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x, t[:, None].float() / 100.0], dim=1)
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(h)))))


class ToyModule(DiffusionModule):
    def prepare_batch(self, batch) -> DiffusionBatch:
        return DiffusionBatch(x0=batch[0])

    def predict_eps(self, x_t: Tensor, t: Tensor, batch: DiffusionBatch) -> Tensor:
        return self.net(x_t, t)

    def generate(self, num_samples: int, generator: torch.Generator, **kwargs) -> Tensor:
        x_T = torch.randn(num_samples, 2, generator=generator)
        return self.sample_with(self.net, x_T, generator)

    def save_samples(self, samples: Tensor, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(samples, path.with_suffix(".pt"))
        return path.with_suffix(".pt")

    def example_net_inputs(self, batch_size: int = 1) -> tuple:
        device = next(self.net.parameters()).device
        return torch.zeros(batch_size, 2, device=device), torch.zeros(
            batch_size, dtype=torch.long, device=device
        )


def make_module(width: int = 32) -> ToyModule:
    return ToyModule(net=ToyNet(width), **MODULE_KWARGS)


class ToyData(L.LightningDataModule):
    def __init__(self, n: int = 256, batch_size: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
        self.points = centers[torch.randint(0, 2, (n,), generator=generator)] + 0.1 * torch.randn(
            n, 2, generator=generator
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(TensorDataset(self.points), batch_size=self.batch_size, seed=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.points[:64]), batch_size=self.batch_size)

    def num_train_samples(self) -> int:
        return len(self.points)
