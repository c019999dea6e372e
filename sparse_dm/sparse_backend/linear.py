"""SparseLinear: y = x W^T + b with W stored compactly (values at the active positions only)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_dm.sparse_backend import reference
from sparse_dm.sparse_backend.weights import SparseWeights
from sparse_dm.sparsity.masks import MASK_SUFFIX


class SparseLinear(SparseWeights):
    """A masked nn.Linear trained sparse. Parameters: `weight_values` (nnz,), `bias` (dense, optional).

    `kernels`: the compiled kernels (`load_train_kernels`) or None for the pure-torch reference (the
    test oracle; slow). Set `dense_grad_requested` before the forward whose backward must also
    produce the dense weight gradient (`dense_grad("weight")`)."""

    def __init__(self, weight: Tensor, mask: Tensor, bias: Tensor | None, kernels: object | None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._add_weight("weight", weight.detach(), mask)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.kernels = kernels

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kernels: object | None, mask: Tensor | None = None
    ) -> SparseLinear:
        """From a (masked) nn.Linear; `mask` defaults to its `weight_mask` buffer, else all active."""
        if mask is None:
            mask = getattr(linear, "weight" + MASK_SUFFIX, None)
        if mask is None:
            mask = torch.ones_like(linear.weight, dtype=torch.bool)
        return cls(linear.weight, mask, linear.bias, kernels)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        if self.kernels is not None:
            raise NotImplementedError("compiled SparseLinear arrives with sparse_train.c")
        y = reference.sparse_mm(x, self.values("weight"), self.layouts["weight"], self.sink("weight"))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        layout = self.layouts["weight"]
        return f"{self.in_features} -> {self.out_features}, nnz={layout.nnz} (density {layout.density:.3f})"
