"""The engine a method config describes: `conf/method/*` are partials of `build_engine`, completed
with the denoiser by `sparse_dm.train`. One mask (SparseEngine) unless `timestep_bands` is set
(BandedSparseEngine); `adaptive` adds the phase-adaptive prune rate to either.

The two optional specs are plain mappings from the config; `timestep_bands_from` / `adaptive_from`
turn them into their objects, whose constructors own the value checks (config.validate calls these
same functions before anything is built).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from sparse_dm.sparsity.adaptive import AdaptivePruneRate
from sparse_dm.sparsity.bands import TimestepBands
from sparse_dm.sparsity.bands_engine import BandedSparseEngine
from sparse_dm.sparsity.engine import SparseEngine

BANDS_KEYS = frozenset({"boundaries", "sparsities"})
ADAPTIVE_KEYS = frozenset({"loss_ema_decay", "min_prune_rate"})


def _spec_keys(spec: Any, key: str, allowed: frozenset[str], shape: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping) or set(spec) != allowed:
        raise ValueError(f"{key}={spec!r}; allowed: null or {shape}")
    return spec


def timestep_bands_from(spec: Any, num_timesteps: int) -> TimestepBands:
    """`method.timestep_bands` ({boundaries, sparsities}) over [0, num_timesteps)."""
    bands = _spec_keys(
        spec,
        "method.timestep_bands",
        BANDS_KEYS,
        "{boundaries: [t_1, ...], sparsities: [S_0, ..., S_K-1]}",
    )
    for field in BANDS_KEYS:
        if isinstance(bands[field], str) or not isinstance(bands[field], Sequence):
            raise ValueError(f"method.timestep_bands.{field}={bands[field]!r}; allowed: a list")
    return TimestepBands(
        tuple(bands["boundaries"]),
        tuple(bands["sparsities"]),
        int(num_timesteps),
    )


def adaptive_from(spec: Any) -> AdaptivePruneRate:
    """`method.adaptive` ({loss_ema_decay, min_prune_rate})."""
    rule = _spec_keys(
        spec,
        "method.adaptive",
        ADAPTIVE_KEYS,
        "{loss_ema_decay: [0, 1), min_prune_rate: (0, prune_rate]}",
    )
    return AdaptivePruneRate(rule["loss_ema_decay"], rule["min_prune_rate"])


def build_engine(
    net: nn.Module,
    *,
    sparsity: float,
    timestep_bands: Mapping[str, Any] | None = None,
    adaptive: Mapping[str, Any] | None = None,
    num_timesteps: int | None = None,
    **method: Any,
) -> SparseEngine:
    """SparseEngine(net, sparsity, **method), or with `timestep_bands` a BandedSparseEngine whose
    bands partition [0, num_timesteps) (`sparsity` then only labels the run)."""
    rule = None if adaptive is None else adaptive_from(adaptive)
    if timestep_bands is None:
        return SparseEngine(net, sparsity, adaptive=rule, **method)
    if num_timesteps is None:
        raise ValueError("method.timestep_bands needs method.num_timesteps (the diffusion's T)")
    return BandedSparseEngine(
        net, timestep_bands_from(timestep_bands, num_timesteps), adaptive=rule, **method
    )
