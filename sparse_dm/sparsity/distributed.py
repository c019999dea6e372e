"""Cross-rank agreement of masks under data parallelism.

Every rank derives its masks from the same all-reduced gradients and the same (seed, update index)
generator, so they should never differ; if they do (a rank seeded differently, a non-deterministic
kernel, a rank that resumed from another checkpoint) each rank silently trains another network.
A checksum per layer, gathered from all ranks, turns that into an immediate error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparse_dm.sparsity.masks import PrunableWeight

# Multiplier of Knuth's multiplicative hash; positions are hashed so that a moved connection changes
# the checksum even when the per-layer count stays the same.
HASH_MULTIPLIER = 2_654_435_761
HASH_MODULUS = 2**31 - 1
MAX_NAMED_LAYERS = 5  # layers named in the error message


class RankDivergenceError(RuntimeError):
    """Masks differ between ranks."""


def mask_checksums(weights: Sequence[PrunableWeight]) -> Tensor:
    """[layers, 2] int64: active count and a hash of the active positions of every mask."""
    rows = []
    for weight in weights:
        positions = weight.mask.flatten().nonzero().flatten()
        hashed = (positions * HASH_MULTIPLIER) % HASH_MODULUS
        rows.append(torch.stack([positions.new_tensor(positions.numel()), hashed.sum()]))
    return torch.stack(rows)


def verify_identical_masks(
    weights: Sequence[PrunableWeight], all_gather: Callable[[Tensor], Tensor], step: int
) -> None:
    """Raise RankDivergenceError on every rank (so none hangs at the next collective) if any rank's
    masks differ from rank 0's. `all_gather` maps a tensor to [world_size, *shape]."""
    gathered = all_gather(mask_checksums(weights))
    if gathered.dim() == 2:  # one process: nothing to compare
        return
    differing = (gathered != gathered[0]).any(dim=-1)  # [world, layers]
    if not differing.any():
        return
    ranks = sorted({int(r) for r in differing.nonzero()[:, 0]})
    layers = [weights[int(i)].name for i in differing.any(dim=0).nonzero().flatten()]
    shown = ", ".join(layers[:MAX_NAMED_LAYERS]) + (", ..." if len(layers) > MAX_NAMED_LAYERS else "")
    raise RankDivergenceError(
        f"masks differ between ranks after the mask update at step {step}: rank(s) {ranks} disagree "
        f"with rank 0 on {len(layers)} layer(s) ({shown}). Every rank must use the same seed and resume "
        "from the same checkpoint; the run is stopped so no rank keeps training a different network. "
        "Checkpoints written so far hold states from before this update."
    )
