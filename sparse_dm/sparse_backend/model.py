"""A masked denoiser to its compact training form and back, keeping the masked engine's checkpoint format.

`to_compact(net, kernels)` replaces, in place, every masked `nn.Linear` and every masked bidirectional,
batch-first `nn.GRU` of `net` by a `SparseLinear` / `SparseBiGRU` (values of the active weights only,
CSR layouts). Each compact layer keeps the dense bool `<weight>_mask` buffers the masked engine keeps,
because the engine, the DDP mask checksum and every checkpoint read them; the layouts are derived from
them. Its `state_dict()` holds the dense weight (zeros outside the mask) under the dense name, so a
checkpoint of a compact run is the usual one (dense weight + `_mask` buffer) and `load_state_dict()`
takes the usual one, rebuilding each layout from the loaded mask. `to_dense(net)` is the inverse.

Only Linear and bidirectional GRU weights have compact layers; a model with any other masked weight
(a convolution) is refused by `check_convertible`, naming the layers, instead of training part of it
masked-dense without saying so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparse_dm.sparse_backend.compiled import TrainKernels
from sparse_dm.sparse_backend.gru import SparseBiGRU
from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.linear import SparseLinear
from sparse_dm.sparse_backend.weights import VALUES_SUFFIX, SparseWeights
from sparse_dm.sparsity.masks import MASK_SUFFIX, PrunableWeight

COMPACT_TYPES = "nn.Linear, bidirectional batch-first nn.GRU with biases"


class NotConvertibleError(ValueError):
    """backend=sparse on a model with masked weights no compact layer trains."""


@dataclass(frozen=True)
class CompactLayer:
    """One converted layer: its path in the net and the compact module now there."""

    path: str
    layer: SparseWeights

    def weight_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


def _convertible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.GRU)
        and module.bidirectional
        and module.batch_first
        and module.bias
        and not module.proj_size
    )


def _prunable_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.Linear):
        return ["weight"]
    return [name for name, _ in module.named_parameters(recurse=False) if name.startswith("weight_")]


def check_convertible(weights: Iterable[PrunableWeight]) -> None:
    """Refuse masked weights without a compact layer (naming them), and layers masked only in part
    (a whole layer trains compact or none of it)."""
    weights = list(weights)
    others = [w.name for w in weights if not _convertible(w.module)]
    if others:
        shown = ", ".join(others[:8]) + (f", ... ({len(others)} in all)" if len(others) > 8 else "")
        raise NotConvertibleError(
            f"backend=sparse trains masked {COMPACT_TYPES} weights compactly; this model's masked weights "
            f"include {len(others)} other one(s) ({shown}), e.g. convolutions, which have no sparse training "
            "kernel: use backend=dense (masks over dense kernels), or keep them dense with method.exclude"
        )
    masked: dict[int, set[str]] = {}
    for weight in weights:
        masked.setdefault(id(weight.module), set()).add(weight.attr)
    for weight in weights:
        missing = sorted(set(_prunable_names(weight.module)) - masked[id(weight.module)])
        if missing:
            owner = weight.name.rsplit(".", 1)[0] if "." in weight.name else "<net>"
            raise NotConvertibleError(
                f"backend=sparse converts whole layers, but {owner} has unmasked weights {missing} "
                "(method.include/exclude): mask all of that layer's weights or none"
            )


def _replace(net: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, attr, new)


def _dense_weights_hook(layer: SparseWeights, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict(): `<name>` (dense, zeros outside the mask) in place of `<name>_values`."""
    for name in layer.weight_names:
        values = state.pop(prefix + name + VALUES_SUFFIX)
        state[prefix + name] = layer.layouts[name].expand(values.detach())


def _compact_weights_hook(layer: SparseWeights, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict(): a dense `<name>` with its `<name>_mask` becomes the layout and the values."""
    for name in layer.weight_names:
        key = prefix + name
        if key not in state:
            continue  # the missing `<name>_values` is reported as usual
        dense, mask = state.pop(key), state.get(key + MASK_SUFFIX)
        if mask is None:
            raise ValueError(
                f"{key}: a compact layer loads a dense weight only with its mask ({key}{MASK_SUFFIX})"
            )
        mask = mask.to(torch.bool)
        check_zero_outside(dense, mask, key)
        layout = SparseLayout.from_mask(mask)
        values = layout.compact(dense).to(layer.values(name).dtype)
        layer.set_layout(name, layout, values)
        state[key + VALUES_SUFFIX] = values


def _compact_module(module: nn.Module, kernels: TrainKernels | None) -> SparseWeights:
    if isinstance(module, nn.Linear):
        layer: SparseWeights = SparseLinear.from_linear(module, kernels)
    else:
        layer = SparseBiGRU(module, kernels)
    for name in layer.weight_names:
        mask = getattr(module, name + MASK_SUFFIX)
        layer.register_buffer(name + MASK_SUFFIX, mask.detach().clone().to(torch.bool))
    layer.register_state_dict_post_hook(_dense_weights_hook)
    layer.register_load_state_dict_pre_hook(_compact_weights_hook)
    return layer


def to_compact(
    net: nn.Module, weights: Iterable[PrunableWeight], kernels: TrainKernels | None
) -> dict[int, CompactLayer]:
    """Replace the layers owning `weights` (the engine's masked weights) by compact ones, in place;
    `kernels`: the compiled training kernels, or None for the pure-torch reference (tests only).
    Returns id(replaced module) -> its compact layer, in module order (the replaced modules are
    dropped: nothing dense of them is kept)."""
    weights = list(weights)
    check_convertible(weights)
    owners = {id(weight.module) for weight in weights}
    converted: dict[int, CompactLayer] = {}
    for path, module in list(net.named_modules()):
        if id(module) not in owners:
            continue
        if not path:
            raise NotConvertibleError(
                "backend=sparse converts layers inside a net, not a bare nn.Linear/nn.GRU"
            )
        layer = _compact_module(module, kernels)
        _replace(net, path, layer)
        converted[id(module)] = CompactLayer(path, layer)
    return converted


def _dense_module(layer: SparseWeights) -> nn.Module:
    if isinstance(layer, SparseLinear):
        module: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    elif isinstance(layer, SparseBiGRU):
        module = nn.GRU(
            layer.input_size, layer.hidden_size, layer.num_layers, batch_first=True, bidirectional=True
        )
    else:
        raise TypeError(f"no dense counterpart of {type(layer).__name__}")
    module = module.to(next(layer.parameters()).dtype)
    for name in layer.weight_names:
        module.register_buffer(name + MASK_SUFFIX, getattr(layer, name + MASK_SUFFIX).clone())
    missing, unexpected = module.load_state_dict(layer.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"dense counterpart of {type(layer).__name__}: missing {missing}, extra {unexpected}"
        )
    if isinstance(module, nn.GRU):
        module.flatten_parameters()
    return module


@torch.no_grad()
def to_dense(net: nn.Module) -> nn.Module:
    """The inverse of `to_compact`, in place: masked nn.Linear / nn.GRU with the same weights and masks."""
    for path, module in list(net.named_modules()):
        if isinstance(module, SparseWeights):
            _replace(net, path, _dense_module(module))
    return net


def check_zero_outside(dense: Tensor, mask: Tensor, key: str) -> None:
    """Compacting drops what lies outside the mask: it must be exactly zero (a masked checkpoint)."""
    if bool(dense.masked_select(~mask.to(dense.device)).ne(0).any()):
        raise ValueError(f"{key}: non-zero entries outside its mask; not a masked weight")
