"""The diffusion training loss, masked over padding."""

from __future__ import annotations

from torch import Tensor


def per_sample_masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error averaged over each sample's own valid elements: one value per sample."""
    err = (pred - target).pow(2)
    if mask is None:
        return err.flatten(1).mean(1)
    weights = mask.to(err.dtype).expand_as(err)
    return (err * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1.0)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample masked MSE, then the batch mean.

    Averaging per sample first keeps short drawings from being outweighed by long ones and makes the
    loss independent of how much padding a batch happens to carry.
    """
    return per_sample_masked_mse(pred, target, mask).mean()
