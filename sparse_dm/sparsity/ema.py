"""An exponential moving average of weights that respects masks.

Lightning's/timm's EMA averages buffers too, which would turn boolean masks into floats; and an
unmasked average keeps pruned weights alive. Here the shadow copy holds parameters only, and every
update and every copy back multiplies prunable weights by the live model's current masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.masks import MASK_SUFFIX


def _key(name: str) -> str:
    return name.replace(".", "__")


class MaskedEMA(nn.Module):
    """Shadow parameters as buffers (so they are in checkpoints), updated after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        for name, param in model.named_parameters():
            self.register_buffer(_key(name), param.detach().clone())

    def _pairs(self, model: nn.Module) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        buffers = dict(model.named_buffers())
        for name, param in model.named_parameters():
            yield self.get_buffer(_key(name)), param, buffers.get(name + MASK_SUFFIX)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, param, mask in self._pairs(model):
            shadow.lerp_(param.detach(), 1.0 - self.decay)
            if mask is not None:
                shadow.mul_(mask)

    @torch.no_grad()
    def remask(self, model: nn.Module) -> None:
        """Zero shadow weights outside the model's current masks (after masks are attached or change)."""
        for shadow, _, mask in self._pairs(model):
            if mask is not None:
                shadow.mul_(mask)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for shadow, param, mask in self._pairs(model):
            param.copy_(shadow if mask is None else shadow * mask)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run `model` with the EMA weights, restoring the training weights after."""
        backup = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for param, saved in zip(model.parameters(), backup, strict=True):
                    param.copy_(saved)
