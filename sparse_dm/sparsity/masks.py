"""Which weights are prunable, and their boolean mask buffers.

A prunable weight `a.b.weight` gets a bool buffer `a.b.weight_mask` on the module that owns it, so
masks travel with `state_dict`, every checkpoint and `.to(device)`. RNN weights are masked in
place: `nn.GRU`/`nn.LSTM` keep using their own Parameters (the flat weight buffer stays valid).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MASK_SUFFIX = "_mask"
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
)
RNN_TYPES: tuple[type[nn.Module], ...] = (nn.GRU, nn.LSTM, nn.RNN)
RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")


@dataclass(frozen=True)
class PrunableWeight:
    """A weight tensor under a mask, addressed through its owning module (robust to `.to()`)."""

    name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> Tensor:
        return getattr(self.module, self.attr + MASK_SUFFIX)

    def set_mask(self, mask: Tensor) -> None:
        self.mask.copy_(mask)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def find_prunable(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[PrunableWeight]:
    """Every conv/linear weight and every RNN weight matrix, filtered by glob patterns on the full
    parameter name (`include=None` keeps all). Biases, norms and embeddings are never prunable."""
    found: list[PrunableWeight] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LAYER_TYPES):
            candidates = ["weight"] if module.weight is not None else []
        elif isinstance(module, RNN_TYPES):
            candidates = [n for n, _ in module.named_parameters(recurse=False) if RNN_WEIGHT.match(n)]
        else:
            continue
        for attr in candidates:
            name = prefix + attr
            if include is not None and not _matches(name, include):
                continue
            if _matches(name, exclude):
                continue
            found.append(PrunableWeight(name, module, attr))
    if not found:
        raise ValueError("no prunable weights found: check sparsity include/exclude patterns")
    return found


def random_mask(shape: torch.Size, count: int, generator: torch.Generator) -> Tensor:
    """A bool mask with exactly `count` True entries, uniformly placed (generated on CPU so every
    device and rank draws the same mask from the same generator state)."""
    numel = int(torch.Size(shape).numel())
    if not 0 <= count <= numel:
        raise ValueError(f"mask count {count} outside [0, {numel}]")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:count]] = True
    return flat.view(shape)


def register_masks(weights: Sequence[PrunableWeight], masks: Sequence[Tensor]) -> None:
    """Attach (or overwrite) the bool mask buffers and zero the weights outside them."""
    for weight, mask in zip(weights, masks, strict=True):
        buffer_name = weight.attr + MASK_SUFFIX
        device = weight.param.device
        if hasattr(weight.module, buffer_name):
            weight.mask.copy_(mask.to(device))
        else:
            weight.module.register_buffer(buffer_name, mask.to(device=device, dtype=torch.bool))
    apply_masks(weights)


@torch.no_grad()
def apply_masks(weights: Sequence[PrunableWeight]) -> None:
    """Set every weight outside its mask to exactly 0 (a NaN or inf there included)."""
    for weight in weights:
        zero_outside(weight.param.data, weight.mask)


@torch.no_grad()
def mask_gradients(weights: Sequence[PrunableWeight]) -> None:
    """Zero the gradients of inactive weights so they neither move weights nor count in clipping
    (non-finite values at inactive positions included)."""
    for weight in weights:
        if weight.param.grad is not None:
            zero_outside(weight.param.grad, weight.mask)


# Integer types as wide as each float type: zeroing by bitwise AND with 0 / all-ones (see zero_outside).
SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def zero_outside(values: Tensor, mask: Tensor) -> Tensor:
    """values[~mask] = 0 in place, exactly (+0.0), whatever was there (NaN and inf too), so not a
    multiplication (`nan * 0` is nan). It runs at every optimizer step, three times (gradients,
    weights, EMA). On the CPU a bitwise AND of the float bits with 0 / all-ones is ~3x faster than
    `masked_fill_(~mask, 0)` (docs/benchmarks.md: it halves the bookkeeping of a sparse step);
    elsewhere, and for non-float tensors, `masked_fill_`."""
    int_type = SAME_WIDTH_INT.get(values.dtype)
    if values.device.type == "cpu" and int_type is not None:
        values.view(int_type).bitwise_and_(mask.to(int_type).neg_())
    else:
        values.masked_fill_(~mask, 0.0)
    return values
