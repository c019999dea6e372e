"""Weights for inference: masked values, CSR or dense storage, and the one matmul both share.

Activations in the sparse inference form are feature-major, (features, columns): MKL's CSR x dense
product is fast only with the dense operand laid out that way (../docs/benchmarks.md). A bias is
folded into the matrix as one extra column that multiplies a constant row of ones in the input, so
every layer is exactly one `torch.mm` whether its weight is CSR or dense.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.masks import MASK_SUFFIX


def masked_weight(module: nn.Module, attr: str) -> Tensor:
    """The weight as inference sees it: zero outside its `<attr>_mask` buffer (if it has one)."""
    weight = getattr(module, attr).detach()
    mask = getattr(module, attr + MASK_SUFFIX, None)
    return weight if mask is None else torch.where(mask, weight, torch.zeros_like(weight))


def density(matrix: Tensor) -> float:
    """Fraction of nonzero entries (what a CSR matrix would store)."""
    return float(torch.count_nonzero(matrix)) / max(matrix.numel(), 1)


def to_csr(matrix: Tensor) -> Tensor:
    """A dense 2-D float matrix as torch.sparse CSR (int32 indices: MKL's fast path)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        csr = matrix.contiguous().to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            csr.shape,
        )


def storage(matrix: Tensor, sparse: bool) -> Tensor:
    """CSR when `sparse`, else a contiguous dense copy; either one goes straight into `torch.mm`."""
    return to_csr(matrix) if sparse else matrix.contiguous().clone()


def is_csr(matrix: Tensor) -> bool:
    return matrix.layout == torch.sparse_csr


def with_bias_column(weight: Tensor, bias: Tensor | None) -> Tensor:
    """[W | b]: multiplies an input with a trailing row of ones (zeros column without a bias)."""
    column = torch.zeros(weight.shape[0], 1, dtype=weight.dtype) if bias is None else bias.detach()[:, None]
    return torch.cat([weight, column.to(weight)], dim=1)


def matmul_into(weight: Tensor, dense: Tensor, out: Tensor) -> Tensor:
    """out = weight @ dense without allocating or copying: CSR via the in-place `addmm_(beta=0)` (MKL
    writes `out` directly; torch's CSR `mm(out=)` zero-fills a temporary and copies it, and the
    functional `addmm(out=)` copies `out` onto itself first), dense via `mm(out=)` (dense addmm with
    beta=0 is ~3x slower here)."""
    if is_csr(weight):
        return out.addmm_(weight, dense, beta=0.0)
    return torch.mm(weight, dense, out=out)
