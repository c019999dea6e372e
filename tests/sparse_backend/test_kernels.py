"""The compiled training kernels one by one against the pure-torch reference (tolerances: oracle.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from sparse_dm.sparse_backend import KernelUnavailable, SparseLayout, load_train_kernels, reference
from tests.sparse_backend.kernels import kernels_for
from tests.sparse_backend.oracle import exact_mask, tolerance

# Widths: one vector, a partial column block, several blocks, more than one SDDMM block (1024).
WIDTHS = [16, 48, 208, 1040]


def operands(density: float, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    mask = exact_mask((45, 37), density, generator)
    layout = SparseLayout.from_mask(mask)
    values = torch.randn(layout.nnz, generator=generator)
    x = torch.randn(37, width, generator=generator)
    y = torch.randn(45, width, generator=generator)
    return layout, values, x, y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("density", [0.05, 0.4, 1.0])
def test_spmm_transpose_and_sddmm_match_reference(density: float, width: int, threads: int) -> None:
    kernels = kernels_for("compiled")
    layout, values, x, y = operands(density, width, seed=width)
    bias = torch.randn(45)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_y = kernels.spmm(layout, values, x, torch.empty(45, width), bias=bias)
        got_x = kernels.spmm(layout, values, y, torch.full((37, width), 2.0), transpose=True, accumulate=True)
        got_v = kernels.sddmm(layout, y, x, torch.empty(layout.nnz))
    finally:
        torch.set_num_threads(previous)
    # float64 reference; scale = the largest sum of |terms| (the same products on absolute values)
    x64, y64, v64, b64 = x.double(), y.double(), values.double(), bias.double()[:, None]
    want_y = reference.spmm(x64.t(), v64, layout).t() + b64
    want_x = reference.spmm_transpose(y64.t(), v64, layout).t() + 2.0
    want_v = reference.sddmm(y64.t(), x64.t(), layout)
    abs_y = float((reference.spmm(x64.abs().t(), v64.abs(), layout).t() + b64.abs()).max())
    abs_x = float(reference.spmm_transpose(y64.abs().t(), v64.abs(), layout).t().max()) + 2.0
    abs_v = float(reference.sddmm(y64.abs().t(), x64.abs().t(), layout).max())
    torch.testing.assert_close(got_y.double(), want_y, rtol=0, atol=tolerance(38, abs_y))
    torch.testing.assert_close(got_x.double(), want_x, rtol=0, atol=tolerance(46, abs_x))
    torch.testing.assert_close(got_v.double(), want_v, rtol=0, atol=tolerance(width, abs_v))


def test_wrong_tensors_are_refused_before_the_kernel_reads_them() -> None:
    kernels = kernels_for("compiled")
    layout, values, x, _ = operands(0.3, 32, seed=1)
    with pytest.raises(ValueError, match="multiple of"):
        kernels.spmm(layout, values, x[:, :20].contiguous(), torch.empty(45, 20))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.spmm(layout, values, x.t().contiguous().t(), torch.empty(45, 32))
    with pytest.raises(ValueError, match=r"\(37, ld\)"):
        kernels.spmm(layout, values, torch.empty(36, 32), torch.empty(45, 32))
    with pytest.raises(ValueError, match="nnz"):
        kernels.sddmm(layout, torch.empty(45, 32), x, torch.empty(layout.nnz + 1))
    with pytest.raises(ValueError, match="float32"):
        kernels.spmm(layout, values, x.double(), torch.empty(45, 32))


def test_no_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", tempfile.mkdtemp(prefix="no_compiler_"))
    with pytest.raises(KernelUnavailable, match="no C compiler"):
        load_train_kernels(Path(tempfile.mkdtemp(prefix="sparse_dm_no_cc_")))
