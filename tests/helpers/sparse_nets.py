"""Small networks for engine tests: a conv net and a bidirectional multi-layer GRU."""

from __future__ import annotations

import torch
from torch import nn


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))

    @staticmethod
    def batch(generator: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 3, 8, 8, generator=generator), torch.randn(n, 5, generator=generator)


class SmallGRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out)

    @staticmethod
    def batch(generator: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 6, 4, generator=generator), torch.randn(n, 6, 4, generator=generator)
