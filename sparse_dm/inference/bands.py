"""The inference form of a model trained with timestep-band masks (method.timestep_bands).

Such a net holds one shared weight W and K masks per prunable weight (`<attr>_band_masks`); a sample
at timestep t uses W * m_band(t). `band_net(net, k)` is the single-mask network of band k (its
ordinary masks are m_k), which the usual inference form converts (CSR or dense per matrix, chosen
per band: band densities differ). `BandedForm` holds the K forms and calls each sample's band form
with the same routing as training's `BandRouter`: a DDIM step (one t for the whole batch) is one
call of one form; a batch with mixed timesteps is split by band and put back in batch order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.bands import BAND_MASKS_SUFFIX, TimestepBands, route_by_band
from sparse_dm.sparsity.masks import MASK_SUFFIX


@torch.no_grad()
def band_net(net: nn.Module, band: int, num_bands: int) -> nn.Module:
    """A copy of `net` whose ordinary `<attr>_mask` buffers hold band `band`'s masks, without the
    band-mask buffers: what a sample of that band runs, as a plain single-mask network."""
    single = copy.deepcopy(net)
    found = 0
    for name, module in single.named_modules():
        for buffer, masks in list(module.named_buffers(recurse=False)):
            if not buffer.endswith(BAND_MASKS_SUFFIX):
                continue
            where = f"{name}.{buffer}" if name else buffer
            if masks.shape[0] != num_bands:
                raise ValueError(
                    f"{where} holds {masks.shape[0]} band masks but the model has {num_bands} timestep bands"
                )
            attr = buffer[: -len(BAND_MASKS_SUFFIX)]
            mask = getattr(module, attr + MASK_SUFFIX, None)
            if mask is None:
                raise ValueError(f"{where} has no ordinary mask {attr + MASK_SUFFIX} next to it")
            mask.copy_(masks[band])
            delattr(module, buffer)
            found += 1
    if not found:
        raise ValueError(f"the model has timestep bands but its net holds no {BAND_MASKS_SUFFIX} buffers")
    return single


class BandedForm(nn.Module):
    """One inference form per timestep band behind the net's own call: `forward(x_t, t, *rest)`
    equals the banded dense model's output (sample i uses the form of band(t_i)). Inference only.

    Attributes that are not weights (e.g. a UNet's `null_label`) are the same in every band and
    are read from band 0's form, so the module stands in for the net wherever the net is asked."""

    def __init__(self, forms: Sequence[nn.Module], bands: TimestepBands) -> None:
        super().__init__()
        if len(forms) != bands.num_bands:
            raise ValueError(f"{len(forms)} forms for {bands.num_bands} timestep bands")
        self.forms = nn.ModuleList(forms)
        self.bands = bands
        self.requires_grad_(False)

    def _call_band(self, band: int, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.forms[band](x, t, *args, **kwargs)

    @torch.no_grad()
    def forward(self, x_t: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return route_by_band(self.bands, self._call_band, x_t, t, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            forms = super().__getattr__("forms")  # raises while __init__ has not set it yet
            return getattr(forms[0], name)

    def extra_repr(self) -> str:
        return f"bands={self.bands.ranges()}"
