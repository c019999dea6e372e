"""An exponential moving average of weights that respects masks.

Lightning's/timm's EMA averages buffers too, which would turn boolean masks into floats; and an
unmasked average keeps pruned weights alive. Here the shadow copy holds parameters only, and every
update and every copy back zeroes prunable weights outside the live model's current masks.

Two rules keep the average meaningful in sparse training (measured in issue 8: without them the
default run's EMA samples were scribbles while the raw weights drew strokes):
- warm-up: the decay at update n is min(decay, (1 + n) / (10 + n)) (CompVis LitEma, torch_ema), so
  the random initial weights leave the average within tens of steps instead of thousands;
- at a mask update, `on_mask_update="resync"` restarts the average from the live weights (shadow :=
  weights, n := 0): the update replaced a large part of the network, and averaging across it mixes
  two different networks. `"remask"` only zeroes pruned positions (the shadow of kept weights keeps
  its history).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.batched import IntMasks
from sparse_dm.sparsity.masks import MASK_SUFFIX, zero_outside

MASK_UPDATE_POLICIES = ("resync", "remask")


def check_ema_settings(decay: float, warmup: bool = True, on_mask_update: str = "resync") -> None:
    """The one check of `model.ema.*` (config validation calls it before anything is built)."""
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay < 1.0:
        raise ValueError(f"model.ema.decay={decay!r}; allowed: a number in [0, 1)")
    if not isinstance(warmup, bool):
        raise ValueError(f"model.ema.warmup={warmup!r}; allowed: true or false")
    if on_mask_update not in MASK_UPDATE_POLICIES:
        raise ValueError(
            f"model.ema.on_mask_update={on_mask_update!r}; allowed: one of {MASK_UPDATE_POLICIES}"
        )


def _key(name: str) -> str:
    return name.replace(".", "__")


class MaskedEMA(nn.Module):
    """Shadow parameters as buffers (so they are in checkpoints, with the update count), updated
    after each optimizer step."""

    def __init__(
        self, model: nn.Module, decay: float, warmup: bool = True, on_mask_update: str = "resync"
    ) -> None:
        super().__init__()
        check_ema_settings(decay, warmup, on_mask_update)
        self.decay = decay
        self.warmup = warmup
        self.on_mask_update = on_mask_update
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        for name, param in model.named_parameters():
            self.register_buffer(_key(name), param.detach().clone())
        self._int_masks = IntMasks()

    def _pairs(self, model: nn.Module) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        buffers = dict(model.named_buffers())
        for name, param in model.named_parameters():
            yield self.get_buffer(_key(name)), param, buffers.get(name + MASK_SUFFIX)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, weights_masked: bool = False) -> None:
        """One EMA step. `weights_masked`: the caller has just re-masked the weights (SparseStep does),
        so the shadow, already zero outside the masks, stays exactly zero there without a masking pass
        (lerp(0, 0, w) = 0); this saves a third of the per-step mask work. Multi-tensor ops: one
        `_foreach_lerp_` over all shadows and one masking op (sparsity/batched.py)."""
        decay = self.current_decay()
        pairs = list(self._pairs(model))
        if pairs:  # the foreach ops refuse empty lists
            torch._foreach_lerp_([s for s, _, _ in pairs], [p for _, p, _ in pairs], 1.0 - decay)
        if not weights_masked:
            masked = [(shadow, mask) for shadow, _, mask in pairs if mask is not None]
            self._int_masks.zero_outside([s for s, _ in masked], [m for _, m in masked])
        self.num_updates += 1

    @torch.no_grad()
    def remask(self, model: nn.Module) -> None:
        """Zero shadow weights outside the model's current masks (after masks are attached)."""
        for shadow, _, mask in self._pairs(model):
            if mask is not None:
                zero_outside(shadow, mask)

    @torch.no_grad()
    def masks_changed(self, model: nn.Module) -> None:
        """Apply the configured policy after a mask update (see the module docstring)."""
        if self.on_mask_update == "remask":
            self.remask(model)
            return
        pairs = list(self._pairs(model))
        if pairs:
            torch._foreach_copy_([s for s, _, _ in pairs], [p for _, p, _ in pairs])
        self.num_updates.zero_()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for shadow, param, mask in self._pairs(model):
            param.copy_(shadow)
            if mask is not None:
                zero_outside(param, mask)

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
