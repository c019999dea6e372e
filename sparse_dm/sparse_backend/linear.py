"""SparseLinear: y = x W^T + b with W stored compactly (values at the active positions only)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from sparse_dm.sparse_backend import reference
from sparse_dm.sparse_backend.compiled import ALIGNMENT, TrainKernels
from sparse_dm.sparse_backend.layout import SparseLayout
from sparse_dm.sparse_backend.reference import DenseGrad
from sparse_dm.sparse_backend.weights import SparseWeights
from sparse_dm.sparsity.masks import MASK_SUFFIX


def aligned(tensor: Tensor) -> Tensor:
    """`tensor` itself when the kernels can read it in place, else a fresh contiguous copy (torch's CPU
    allocator returns 64-byte aligned memory). Only float32: another dtype is refused, not converted."""
    if tensor.dtype != torch.float32:
        raise ValueError(f"the compiled sparse kernels take float32 activations, got {tensor.dtype}")
    if tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return tensor.contiguous().clone()


class CompiledSparseLinear(torch.autograd.Function):
    """y = W x + b on feature-major columns x (in, ld) -> (out, ld), W = (values, layout). Backward: grad_x
    through the CSC walk of the same values, grad_values by the sampled product, the dense W gradient
    only into a given `dense` sink. Gradients at padding columns of y must be zero (the bias sums them)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        kernels: TrainKernels,
        layout: SparseLayout,
        dense: DenseGrad | None,
    ) -> Tensor:
        x = aligned(x)
        y = x.new_empty(layout.shape[0], x.shape[1])
        kernels.spmm(layout, values, x, y, bias=bias)
        ctx.save_for_backward(x, values)
        ctx.kernels, ctx.layout, ctx.dense, ctx.has_bias = kernels, layout, dense, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, values = ctx.saved_tensors
        kernels, layout = ctx.kernels, ctx.layout
        grad_y = aligned(grad_y)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.spmm(layout, values, grad_y, x.new_empty(x.shape), transpose=True)
        if ctx.needs_input_grad[1]:
            grad_values = kernels.sddmm(layout, grad_y, x, values.new_empty(layout.nnz))
        grad_bias = grad_y.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.dense is not None:
            ctx.dense.add(grad_y @ x.t())
        return grad_x, grad_values, grad_bias, None, None, None


class SparseLinear(SparseWeights):
    """A masked nn.Linear trained sparse. Parameters: `weight_values` (nnz,), `bias` (dense, optional).

    `kernels`: the compiled kernels (`load_train_kernels`) or None for the pure-torch reference (the
    test oracle; slow). Set `dense_grad_requested` before the forward whose backward must also
    produce the dense weight gradient (`dense_grad("weight")`)."""

    def __init__(
        self, weight: Tensor, mask: Tensor, bias: Tensor | None, kernels: TrainKernels | None
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._add_weight("weight", weight.detach(), mask)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.kernels = kernels

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kernels: TrainKernels | None, mask: Tensor | None = None
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
        self.check_input_dtype(x, self.kernels is not None)
        if self.kernels is not None:
            flat = x.reshape(-1, self.in_features)
            rows = flat.shape[0]
            columns = -(-rows // self.kernels.lanes) * self.kernels.lanes
            x_fm = F.pad(flat.t(), (0, columns - rows))  # (in, columns): padding columns are zero
            y = self.forward_columns(x_fm)[:, :rows].t()
            return y.reshape(*x.shape[:-1], self.out_features)
        y = reference.sparse_mm(x, self.values("weight"), self.layouts["weight"], self.sink("weight"))
        return y if self.bias is None else y + self.bias

    def forward_columns(self, x: Tensor) -> Tensor:
        """Feature-major columns (in, ld) -> (out, ld), ld a multiple of `kernels.lanes` (compiled only):
        no transposes, for a caller that keeps activations feature-major (e.g. on a GRU's output)."""
        if self.kernels is None:
            raise ValueError(
                "forward_columns runs the compiled kernels; this layer was built with kernels=None"
            )
        values, layout = self.values("weight"), self.layouts["weight"]
        return CompiledSparseLinear.apply(x, values, self.bias, self.kernels, layout, self.sink("weight"))

    def extra_repr(self) -> str:
        layout = self.layouts["weight"]
        return f"{self.in_features} -> {self.out_features}, nnz={layout.nnz} (density {layout.density:.3f})"
