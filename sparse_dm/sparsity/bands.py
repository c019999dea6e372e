"""Timestep-dependent masks: K bands partition the diffusion timesteps [0, T), and every prunable
weight has one mask per band over ONE shared weight tensor (the paper's Sec. 4.5 future work).

Band k covers [b_{k-1}, b_k) with b_0 = 0 and b_K = T, and holds its own sparsity S_k. A sample at
timestep t runs the denoiser with the weights W * m_band(t) (`BandRouter`: the batch is split by
band, each part runs through `torch.func.functional_call` with masked copies, outputs are stitched
back in batch order), so the gradient of W at a position only comes from the samples of the bands
that use it. The union of the band masks is the ordinary `<attr>_mask` buffer: everything that
works on one mask (gradient masking, re-masking, the masked EMA, checkpoints) keeps working on the
union, and weights active in no band stay exactly zero. The K masks live in an extra bool buffer
`<attr>_band_masks` of shape (K, *weight.shape), so they travel with every checkpoint.

The denoiser must treat samples independently (no batch statistics), which holds for the GRU and
the UNet here (GroupNorm).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sparse_dm.sparsity.masks import PrunableWeight, apply_masks, random_mask, register_masks

BAND_MASKS_SUFFIX = "_band_masks"
BOUNDARIES_KEY = "method.timestep_bands.boundaries"
SPARSITIES_KEY = "method.timestep_bands.sparsities"


@dataclass(frozen=True)
class TimestepBands:
    """K = len(sparsities) bands over [0, num_timesteps) split at `boundaries` (strictly increasing,
    inside (0, T)); band k has sparsity `sparsities[k]`."""

    boundaries: tuple[int, ...]
    sparsities: tuple[float, ...]
    num_timesteps: int

    def __post_init__(self) -> None:
        check_bands(list(self.boundaries), list(self.sparsities), self.num_timesteps)

    @property
    def num_bands(self) -> int:
        return len(self.sparsities)

    def band_of(self, t: Tensor) -> Tensor:
        """Band index (long) of every timestep in `t`: t in [b_{k-1}, b_k) -> k."""
        edges = torch.tensor(self.boundaries, dtype=t.dtype, device=t.device)
        return torch.bucketize(t, edges, right=True)

    def band_of_step(self, t: int) -> int:
        return sum(1 for b in self.boundaries if t >= b)

    def ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every band."""
        edges = [0, *self.boundaries, self.num_timesteps]
        return list(itertools.pairwise(edges))

    def train_shares(self) -> list[float]:
        """Fraction of training samples in each band (t is drawn uniformly from [0, T))."""
        return [(end - start) / self.num_timesteps for start, end in self.ranges()]

    def steps_per_band(self, timesteps: Sequence[int]) -> list[int]:
        """How many of the sampler's `timesteps` fall in each band."""
        counts = [0] * self.num_bands
        for t in timesteps:
            counts[self.band_of_step(int(t))] += 1
        return counts


def check_bands(boundaries: Sequence[Any], sparsities: Sequence[Any], num_timesteps: int) -> None:
    """Raise ValueError naming the config key if the bands do not partition [0, T) or a sparsity
    is outside [0, 1)."""
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries) or not boundaries:
        raise ValueError(f"{BOUNDARIES_KEY}={list(boundaries)!r}; allowed: a non-empty list of integers")
    if any(not 0 < b < num_timesteps for b in boundaries) or any(
        a >= b for a, b in itertools.pairwise(boundaries)
    ):
        raise ValueError(
            f"{BOUNDARIES_KEY}={list(boundaries)!r}; allowed: strictly increasing "
            f"integers inside (0, {num_timesteps}) (model.diffusion.num_timesteps)"
        )
    if len(sparsities) != len(boundaries) + 1:
        raise ValueError(
            f"{SPARSITIES_KEY} has {len(sparsities)} values; allowed: "
            f"len({BOUNDARIES_KEY}) + 1 = {len(boundaries) + 1} (one per band)"
        )
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s < 1.0:
            raise ValueError(f"{SPARSITIES_KEY}={list(sparsities)!r}; allowed: numbers in [0, 1)")


def band_masks(weight: PrunableWeight) -> Tensor:
    """The (K, *shape) bool band masks of one prunable weight (a view of its buffer)."""
    return getattr(weight.module, weight.attr + BAND_MASKS_SUFFIX)


def register_band_masks(weights: Sequence[PrunableWeight], masks: Sequence[Tensor]) -> None:
    """Attach (or overwrite) the (K, *shape) band-mask buffers, set each weight's ordinary mask to
    their union and zero the weights outside it."""
    for weight, stacked in zip(weights, masks, strict=True):
        name = weight.attr + BAND_MASKS_SUFFIX
        stacked = stacked.to(device=weight.param.device, dtype=torch.bool)
        if hasattr(weight.module, name):
            band_masks(weight).copy_(stacked)
        else:
            weight.module.register_buffer(name, stacked)
    register_masks(weights, [band_masks(w).any(0) for w in weights])


def random_band_masks(
    weights: Sequence[PrunableWeight], counts: Sequence[Sequence[int]], generator: torch.Generator
) -> list[Tensor]:
    """Independent uniform masks with exact counts: counts[k][i] for band k of weight i."""
    return [
        torch.stack([random_mask(w.param.shape, band[i], generator) for band in counts])
        for i, w in enumerate(weights)
    ]


@torch.no_grad()
def sync_union(weights: Sequence[PrunableWeight]) -> None:
    """Set each ordinary mask to the union of its band masks and zero weights active in no band."""
    for weight in weights:
        weight.set_mask(band_masks(weight).any(0))
    apply_masks(weights)


def _take(value: Any, index: Tensor, batch: int) -> Any:
    """Rows `index` of a batch-first tensor argument (on its own device); anything else unchanged."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value[index.to(value.device)]
    return value


class BandRouter:
    """Calls the denoiser with each sample's band mask: `router(x_t, t, *rest)` == `net(x_t, t, *rest)`
    where sample i sees the weights W * m_band(t_i).

    While `capturing` (set by the engine before an update step), the dense gradient dL/d(W * m_k) of
    every band is accumulated in `captured[k][i]` (gradient growth of band k uses its own samples'
    gradient), and `captured_samples[k]` counts the samples that produced it.
    """

    def __init__(self, net: nn.Module, weights: Sequence[PrunableWeight], bands: TimestepBands) -> None:
        self.net = net
        self.weights = list(weights)
        self.bands = bands
        self.capturing = False
        self.captured: list[list[Tensor]] = []
        self.captured_samples: list[int] = []

    def begin_capture(self) -> None:
        """Start accumulating per-band dense gradients from zero (every band, so data-parallel
        ranks can all-reduce the same tensors even where a rank saw no sample of a band)."""
        self.capturing = True
        self.captured = [
            [torch.zeros_like(w.param, memory_format=torch.contiguous_format) for w in self.weights]
            for _ in range(self.bands.num_bands)
        ]
        self.captured_samples = [0] * self.bands.num_bands

    def end_capture(self) -> tuple[list[list[Tensor]], list[int]]:
        grads, samples = self.captured, self.captured_samples
        self.capturing = False
        self.captured, self.captured_samples = [], []
        return grads, samples

    def masked_weights(self, band: int) -> dict[str, Tensor]:
        """W * m_band for every prunable weight (differentiable in W), keyed by parameter name."""
        weights = {}
        for i, weight in enumerate(self.weights):
            masked = weight.param.masked_fill(~band_masks(weight)[band], 0.0)
            if self.capturing and masked.requires_grad:
                masked.register_hook(self._accumulator(band, i))
            weights[weight.name] = masked
        return weights

    def _accumulator(self, band: int, index: int):
        def accumulate(grad: Tensor) -> None:
            self.captured[band][index] += grad.detach()

        return accumulate

    def call_band(self, band: int, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.capturing and torch.is_grad_enabled():
            self.captured_samples[band] += int(x.shape[0])
        return functional_call(self.net, self.masked_weights(band), (x, t, *args), kwargs, strict=False)

    def __call__(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return route_by_band(self.bands, self.call_band, x, t, *args, **kwargs)


def route_by_band(
    bands: TimestepBands, call_band: Callable[..., Tensor], x: Tensor, t: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """`call_band(k, x_k, t_k, *args_k, **kwargs_k)` on the samples of each band k present in `t`,
    outputs back in batch order. One call on the whole batch when every sample shares a band (a
    DDIM step: one t for all); batch-first tensor arguments are split along with x and t."""
    band = bands.band_of(t)
    present = torch.unique(band).tolist()
    if len(present) == 1:
        return call_band(int(present[0]), x, t, *args, **kwargs)
    batch = x.shape[0]
    pieces, order = [], []
    for k in present:
        index = (band == k).nonzero().flatten()
        sub_args = [_take(a, index, batch) for a in args]
        sub_kwargs = {key: _take(v, index, batch) for key, v in kwargs.items()}
        pieces.append(call_band(int(k), x[index], t[index], *sub_args, **sub_kwargs))
        order.append(index)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(pieces)[inverse.to(x.device)]
