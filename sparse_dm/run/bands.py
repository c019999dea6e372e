"""Timestep-band masks inside an `.sdm` export (see sparse_dm.export).

The `.sdm` stores each weight over its ordinary mask, the union of the band masks. The bands add
one uint8 per active position whose bit k says whether band k uses it, in the order of the union's
flat nonzero positions: no more bytes than the union has active weights, and the band masks load
back exactly. The loaded module samples with the same per-timestep routing as the trained one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.bands import BandRouter, TimestepBands, band_masks, register_band_masks
from sparse_dm.sparsity.masks import PrunableWeight

MAX_BANDS = 8  # band membership is one bit of a uint8 per active position
EXTRA_KEY = "timestep_bands"


def encode_bands(weight: PrunableWeight) -> Tensor:
    """uint8 band-membership bits of every position of the union mask (flat order)."""
    masks = band_masks(weight).flatten(1)
    positions = weight.mask.flatten().nonzero().flatten()
    bits = torch.zeros(positions.numel(), dtype=torch.uint8)
    for band, mask in enumerate(masks):
        bits |= mask[positions].to(torch.uint8).cpu() << band
    return bits


def decode_bands(union: Tensor, bits: Tensor, num_bands: int) -> Tensor:
    """(K, *shape) bool band masks from the union mask and its membership bits."""
    positions = union.flatten().nonzero().flatten()
    masks = torch.zeros((num_bands, union.numel()), dtype=torch.bool)
    for band in range(num_bands):
        masks[band, positions] = ((bits.to(torch.long) >> band) & 1).bool()
    return masks.view(num_bands, *union.shape)


def bands_extra(module: Any) -> dict[str, Any]:
    """The `.sdm` extra entry of a module with timestep bands ({} without)."""
    router: BandRouter | None = getattr(module, "timestep_bands", None)
    if router is None:
        return {}
    bands = router.bands
    if bands.num_bands > MAX_BANDS:
        raise ValueError(
            f"the {bands.num_bands} timestep bands of this model do not fit the .sdm band encoding "
            f"(at most {MAX_BANDS}); sample from the checkpoint instead"
        )
    return {
        EXTRA_KEY: {
            "boundaries": list(bands.boundaries),
            "sparsities": list(bands.sparsities),
            "num_timesteps": bands.num_timesteps,
            "bits": {w.name: encode_bands(w) for w in router.weights},
        }
    }


def attach_bands(net: nn.Module, entry: dict[str, Any]) -> BandRouter:
    """Register the band masks stored in an `.sdm` on its freshly loaded net; the router to sample with."""
    bands = TimestepBands(
        tuple(int(b) for b in entry["boundaries"]),
        tuple(float(s) for s in entry["sparsities"]),
        int(entry["num_timesteps"]),
    )
    weights = []
    for name in entry["bits"]:
        module_name, _, attr = name.rpartition(".")
        weights.append(PrunableWeight(name, net.get_submodule(module_name), attr))
    masks = [decode_bands(w.mask.cpu(), entry["bits"][w.name], bands.num_bands) for w in weights]
    register_band_masks(weights, masks)
    return BandRouter(net, weights, bands)
