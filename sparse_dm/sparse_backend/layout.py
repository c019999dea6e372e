"""The compact layout of one masked weight: CSR indices plus a values tensor of exactly nnz entries.

Values are stored in CSR order, which is row-major order over the mask: `values = dense[mask]`, so
dense -> compact -> dense is a gather and a scatter (bit-exact both ways). The engine's exact
per-layer counts fix nnz, so at a mask update only the indices change and a values tensor (and any
per-value optimizer state) keeps its size. The transpose product (grad_x = W^T grad_y) walks the same
values column by column through `csc_perm` (the CSR position of each CSC entry), so one values tensor
serves both directions and nothing is duplicated per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SparseLayout:
    """Indices of the active positions of a (rows, cols) weight; int32 (the C kernels read them)."""

    shape: tuple[int, int]
    crow: Tensor  # (rows + 1,) CSR row pointers
    col: Tensor  # (nnz,) column of each CSR entry
    row: Tensor  # (nnz,) row of each CSR entry (the sampled product reads it)
    ccol: Tensor  # (cols + 1,) CSC column pointers
    csc_row: Tensor  # (nnz,) row of each CSC entry
    csc_perm: Tensor  # (nnz,) CSR position of each CSC entry: values[csc_perm] is the CSC values array

    @classmethod
    def from_mask(cls, mask: Tensor) -> SparseLayout:
        """The layout of a 2-D bool mask (any device; indices are built on the CPU)."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"a layout needs a 2-D bool mask, got {mask.dim()}-D {mask.dtype}")
        mask = mask.detach().cpu()
        rows, cols = mask.shape
        row, col = mask.nonzero(as_tuple=True)  # row-major: CSR order
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(mask.sum(dim=1), 0)
        # CSC order: by column, then row (a stable sort of the CSR entries by column keeps rows ascending)
        csc_perm = torch.sort(col, stable=True).indices
        ccol = torch.zeros(cols + 1, dtype=torch.int64)
        ccol[1:] = torch.cumsum(mask.sum(dim=0), 0)
        if mask.numel() >= 2**31:  # every index and pointer is below numel
            raise ValueError(f"a {rows}x{cols} layout does not fit int32 indices")
        as_int = (crow, col, row, ccol, row[csc_perm], csc_perm)
        crow, col, row, ccol, csc_row, csc_perm = (t.to(torch.int32).contiguous() for t in as_int)
        return cls((rows, cols), crow, col, row, ccol, csc_row, csc_perm)

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(self.shape[0] * self.shape[1], 1)

    def mask(self) -> Tensor:
        """The bool mask this layout was built from."""
        dense = torch.zeros(self.shape, dtype=torch.bool)
        dense[self.row.long(), self.col.long()] = True
        return dense

    def compact(self, dense: Tensor) -> Tensor:
        """The active entries of `dense` in CSR order (a new contiguous tensor, bit-exact)."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(dense.shape)} for a layout of shape {self.shape}")
        return dense.detach()[self.row.long().to(dense.device), self.col.long().to(dense.device)].contiguous()

    def expand(self, values: Tensor) -> Tensor:
        """The dense matrix with `values` at the active positions and exact zeros elsewhere."""
        self.check_values(values)
        dense = values.new_zeros(self.shape)
        dense[self.row.long().to(values.device), self.col.long().to(values.device)] = values.detach()
        return dense

    def check_values(self, values: Tensor) -> None:
        if values.dim() != 1 or values.numel() != self.nnz:
            raise ValueError(f"values must be 1-D with nnz={self.nnz} entries, got {tuple(values.shape)}")
