"""The sparsity engine: masks, layer densities, prune/grow criteria, schedules, FLOPs accounting.

Plain PyTorch; no Lightning and nothing diffusion-specific, so it drops into any training loop.
"""

from sparse_dm.sparsity.adaptive import AdaptivePruneRate
from sparse_dm.sparsity.bands import BandRouter, TimestepBands
from sparse_dm.sparsity.bands_engine import BandedSparseEngine
from sparse_dm.sparsity.distributions import layer_counts, layer_densities
from sparse_dm.sparsity.ema import MaskedEMA
from sparse_dm.sparsity.engine import SparseEngine, UpdateReport
from sparse_dm.sparsity.masks import PrunableWeight, apply_masks, find_prunable

__all__ = [
    "AdaptivePruneRate",
    "BandRouter",
    "BandedSparseEngine",
    "MaskedEMA",
    "PrunableWeight",
    "SparseEngine",
    "TimestepBands",
    "UpdateReport",
    "apply_masks",
    "find_prunable",
    "layer_counts",
    "layer_densities",
]
