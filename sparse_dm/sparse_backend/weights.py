"""What every sparse training layer shares: named compact weights, their layouts, dense gradients on request.

A layer stores each masked weight `<name>` as a Parameter `<name>_values` (nnz entries, CSR order) and a
`SparseLayout`; the optimizer sees only the values. On mask-update steps the caller sets
`dense_grad_requested = True` before backward and then reads `dense_grad(name)`: the full weight
gradient (what `weight.grad` of the masked dense model holds before it is masked), which RigL and
momentum growth need at inactive positions. On every other step no dense gradient is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.reference import DenseGrad

VALUES_SUFFIX = "_values"


class SparseWeights(nn.Module):
    """Base of the sparse layers: `weight_names` lists the compact weights in the dense model's naming."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_names: list[str] = []
        self.layouts: dict[str, SparseLayout] = {}
        self.dense_grads: dict[str, DenseGrad] = {}
        self.dense_grad_requested = False

    def _add_weight(self, name: str, dense: Tensor, mask: Tensor) -> None:
        if tuple(mask.shape) != tuple(dense.shape):
            raise ValueError(f"{name}: mask of shape {tuple(mask.shape)}, weight of {tuple(dense.shape)}")
        layout = SparseLayout.from_mask(mask.bool())
        self.weight_names.append(name)
        self.layouts[name] = layout
        self.dense_grads[name] = DenseGrad()
        self.register_parameter(name + VALUES_SUFFIX, nn.Parameter(layout.compact(dense.float())))

    def values(self, name: str) -> nn.Parameter:
        return getattr(self, name + VALUES_SUFFIX)

    def check_input_dtype(self, x: Tensor, kernels_loaded: bool) -> None:
        """Refuse (never convert) an input whose dtype is not the values' dtype: a silent cast would
        hide a precision change. The compiled kernels are float32 only; the torch reference runs in
        whatever dtype the module was moved to (float64 for the equivalence tests)."""
        dtype = self.values(self.weight_names[0]).dtype
        if kernels_loaded and dtype != torch.float32:
            raise ValueError(f"{type(self).__name__}: the compiled kernels take float32, values are {dtype}")
        if x.dtype != dtype:
            raise ValueError(f"{type(self).__name__} trains in {dtype} (its values' dtype), got {x.dtype}")

    def dense_weight(self, name: str) -> Tensor:
        """The dense weight (zeros outside the mask), e.g. for a checkpoint in the masked engine's format."""
        return self.layouts[name].expand(self.values(name))

    def mask(self, name: str) -> Tensor:
        return self.layouts[name].mask()

    @torch.no_grad()
    def set_layout(self, name: str, layout: SparseLayout, values: Tensor) -> None:
        """A new mask for `name` (a mask update): same nnz, so the values Parameter keeps its identity
        (and the optimizer its reference to it); its entries are replaced by `values`."""
        old = self.layouts[name]
        if layout.shape != old.shape or layout.nnz != old.nnz:
            raise ValueError(
                f"{name}: a new layout must keep shape {old.shape} and nnz {old.nnz}, "
                f"got {layout.shape} and {layout.nnz}"
            )
        layout.check_values(values)
        self.values(name).copy_(values)
        self.layouts[name] = layout

    def sink(self, name: str) -> DenseGrad | None:
        """Where this backward writes the dense gradient of `name`, or None when none was requested."""
        return self.dense_grads[name] if self.dense_grad_requested else None

    def dense_grad(self, name: str) -> Tensor | None:
        return self.dense_grads[name].grad

    def clear_dense_grads(self) -> None:
        for grad in self.dense_grads.values():
            grad.clear()
