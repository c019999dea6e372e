"""One exploration step: magnitude prune, grow, and reset optimizer state where masks changed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_dm.sparsity.criteria import Criterion, ScoreContext, top_k_mask
from sparse_dm.sparsity.masks import PrunableWeight, apply_masks


@dataclass(frozen=True)
class LayerUpdate:
    name: str
    pruned: int
    grown: int


def update_generator(seed: int, update_index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, update index): every data-parallel rank (and a resumed run)
    draws the same growth positions without any communication."""
    return torch.Generator().manual_seed(seed * 1_000_003 + update_index)


@torch.no_grad()
def explore(
    weights: Sequence[PrunableWeight],
    drop_fraction: float,
    prune: Criterion,
    grow: Criterion,
    generator: torch.Generator,
    dense_grads: Sequence[Tensor | None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    grad_emas: Sequence[Tensor] | None = None,
) -> tuple[list[LayerUpdate], list[Tensor]]:
    """Replace floor(drop_fraction * active) weights per layer; returns per-layer counts and the
    bool masks of changed positions (pruned or grown). Raises if a layer would lose more weights
    than it regrows (non-finite scores), rather than silently drifting off its exact count.

    Growth candidates are the positions inactive before this update, so pruned and grown sets are
    disjoint and every update really explores. Grown weights are set to 0 (RigL convention).
    Fully dense layers (ERK-capped) have nothing to explore and are left alone. Criteria see each
    weight's optimizer state as it was after the step, before this update resets it.
    """
    grads = list(dense_grads) if dense_grads is not None else [None] * len(weights)
    averages = list(grad_emas) if grad_emas is not None else [None] * len(weights)
    updates: list[LayerUpdate] = []
    changed: list[Tensor] = []
    for weight, grad, average in zip(weights, grads, averages, strict=True):
        mask = weight.mask
        active = int(mask.sum())
        inactive = mask.numel() - active
        k = min(math.floor(drop_fraction * active), inactive)
        state = optimizer.state.get(weight.param) if optimizer is not None else None
        context = ScoreContext(weight.param, mask, step, generator, grad, state or None, average)
        keep = top_k_mask(prune.score(context), mask, active - k)
        grow_scores = grow.score(context)
        grown = top_k_mask(grow_scores, ~mask, k)
        pruned, regrown = active - int(keep.sum()), int(grown.sum())
        if not pruned == regrown == k:
            raise RuntimeError(
                f"mask update of {weight.name} would prune {pruned} and grow {regrown} weights (expected "
                f"{k} each): its prune or grow scores are not finite; this layer and the ones after it "
                "were left unchanged"
            )
        new_mask = keep | grown
        changed.append(new_mask ^ mask)
        weight.param.data.masked_fill_(grown, 0.0)
        weight.set_mask(new_mask)
        updates.append(LayerUpdate(weight.name, pruned=pruned, grown=regrown))
    apply_masks(weights)
    return updates, changed


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, weights: Sequence[PrunableWeight], changed: Sequence[Tensor]
) -> None:
    """Zero every per-element optimizer state (Adam's exp_avg, exp_avg_sq, max_exp_avg_sq, momentum
    buffers, ...) at pruned and regrown positions, so stale moments neither revive pruned weights nor
    push freshly grown ones."""
    for weight, positions in zip(weights, changed, strict=True):
        state = optimizer.state.get(weight.param)
        if not state:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.shape == positions.shape:
                value.masked_fill_(positions, 0)
