"""Pure-torch reference of the sparse training ops: gathers and index_add over the active entries.

It never builds a dense weight matrix, and its backward is written out (not left to autograd), so it
states the same three products the C kernels compute: y = x W^T over the CSR entries, grad_x =
grad_y W through the same entries, grad_values sampled at the active positions only (SDDMM). It is
the test oracle of the compiled kernels and is far too slow to train with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparse_dm.sparse_backend.layout import SparseLayout

# Active entries per gather: bounds the (rows, chunk) temporaries (128 MiB at 8192 rows x 4096 entries).
CHUNK = 4096


class DenseGrad:
    """Receives the dense weight gradient when the caller asked for one (mask-update steps: RigL and
    momentum growth rank inactive positions by it). It accumulates across backward calls, as `.grad`."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def add(self, grad: Tensor) -> None:
        self.grad = grad.clone() if self.grad is None else self.grad.add_(grad)

    def clear(self) -> None:
        self.grad = None


def _chunks(nnz: int) -> list[slice]:
    return [slice(start, min(start + CHUNK, nnz)) for start in range(0, nnz, CHUNK)]


def spmm(x: Tensor, values: Tensor, layout: SparseLayout) -> Tensor:
    """y = x W^T for x (M, cols): y[:, r] = sum over the entries p of row r of values[p] x[:, col[p]]."""
    row, col = layout.row.long(), layout.col.long()
    y = x.new_zeros(x.shape[0], layout.shape[0])
    for part in _chunks(layout.nnz):
        y.index_add_(1, row[part], x[:, col[part]] * values[part])
    return y


def spmm_transpose(grad_y: Tensor, values: Tensor, layout: SparseLayout) -> Tensor:
    """grad_x = grad_y W for grad_y (M, rows), through the same entries."""
    row, col = layout.row.long(), layout.col.long()
    grad_x = grad_y.new_zeros(grad_y.shape[0], layout.shape[1])
    for part in _chunks(layout.nnz):
        grad_x.index_add_(1, col[part], grad_y[:, row[part]] * values[part])
    return grad_x


def sddmm(grad_y: Tensor, x: Tensor, layout: SparseLayout) -> Tensor:
    """grad_values[p] = sum_m grad_y[m, row[p]] x[m, col[p]]: (grad_y^T x) sampled at the active entries."""
    row, col = layout.row.long(), layout.col.long()
    grad = grad_y.new_empty(layout.nnz)
    for part in _chunks(layout.nnz):
        grad[part] = (grad_y[:, row[part]] * x[:, col[part]]).sum(dim=0)
    return grad


class ReferenceSparseMM(torch.autograd.Function):
    """y = x W^T with W given by (values, layout); the dense W gradient goes to `dense` when not None."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, layout: SparseLayout, dense: DenseGrad | None) -> Tensor:
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.dense = layout, dense
        return spmm(x, values, layout)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, values = ctx.saved_tensors
        layout = ctx.layout
        grad_x = spmm_transpose(grad_y, values, layout) if ctx.needs_input_grad[0] else None
        grad_values = sddmm(grad_y, x, layout) if ctx.needs_input_grad[1] else None
        if ctx.dense is not None:
            ctx.dense.add(grad_y.t() @ x)
        return grad_x, grad_values, None, None


def sparse_mm(x: Tensor, values: Tensor, layout: SparseLayout, dense: DenseGrad | None = None) -> Tensor:
    """Differentiable y = x W^T for x (..., cols) -> (..., rows)."""
    layout.check_values(values)
    flat = x.reshape(-1, x.shape[-1])
    return ReferenceSparseMM.apply(flat, values, layout, dense).view(*x.shape[:-1], layout.shape[0])
