"""The training kernels (kernels/csrc/sparse_train.c), loaded with ctypes, behind checked tensor wrappers.

The C code reads by index and with whole-vector loads, so every wrapper checks dtype, shape, contiguity,
alignment and the row stride before a pointer reaches it: a wrong tensor raises here instead of being
read out of bounds. Building and caching is `sparse_dm.kernels.build` (per source, compiler, flags, CPU).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_dm.kernels.build import CSRC, FLAGS, KernelUnavailable, load_library
from sparse_dm.sparse_backend.layout import SparseLayout

SOURCE = CSRC / "sparse_train.c"
ALIGNMENT = 64  # bytes: every activation buffer starts on this (torch's CPU allocator guarantees it)
P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
SIGNATURES: dict[str, tuple[Any, ...]] = {
    # rows, ptr, idx, val, perm, bias, X, ldx, Y, ldy, width, accumulate, threads
    "sdm_spmm": (I32, P, P, P, P, P, P, I64, P, I64, I64, I32, I32),
    # nnz, row, col, A, lda, B, ldb, width, out, accumulate, threads
    "sdm_sddmm": (I32, P, P, P, I64, P, I64, I64, P, I32, I32),
    # hidden, steps, offsets, sizes, ld, gi, (crow, col, val, bias) x 2, out, hprev, saved, threads
    "sdm_gru_forward": (I32, I32, P, P, I64, P, P, P, P, P, P, P, P, P, P, P, P, I32),
    # hidden, steps, offsets, sizes, ld, grad_out, hprev, saved, (ccol, row, perm, val) x 2, dgi, dgh,
    # bias_grad, threads
    "sdm_gru_backward": (I32, I32, P, P, I64, P, P, P, P, P, P, P, P, P, P, P, P, P, P, I32),
}


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass(frozen=True)
class TrainKernels:
    """The loaded library. Activations are feature-major float32 (rows, ld), ld a multiple of `lanes`."""

    functions: dict[str, Any]
    lanes: int
    library: Path  # named by a hash of source, compiler, flags and CPU
    threading: str  # a key of sparse_dm.kernels.build.THREADING

    def check(self, tensor: Tensor, rows: int, name: str) -> int:
        """The row stride of a valid activation buffer of `rows` rows (raises otherwise)."""
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise ValueError(
                f"{name}: the compiled kernels take float32 CPU tensors, got {tensor.dtype} {tensor.device}"
            )
        if tensor.dim() != 2 or tensor.shape[0] != rows or not tensor.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous ({rows}, ld) tensor, got {tuple(tensor.shape)}")
        if tensor.shape[1] % self.lanes or tensor.data_ptr() % ALIGNMENT:
            raise ValueError(f"{name}: columns must be a multiple of {self.lanes}, {ALIGNMENT}-byte aligned")
        return int(tensor.shape[1])

    def spmm(
        self,
        layout: SparseLayout,
        values: Tensor,
        x: Tensor,
        out: Tensor,
        bias: Tensor | None = None,
        transpose: bool = False,
        accumulate: bool = False,
    ) -> Tensor:
        """out = [bias +] W x (or W^T x with `transpose`), or out += ...; W from (values, layout)."""
        rows, cols = layout.shape[::-1] if transpose else layout.shape
        ld = self.check(x, cols, "spmm input")
        if self.check(out, rows, "spmm output") != ld:
            raise ValueError(f"spmm: input and output columns differ ({ld} vs {out.shape[1]})")
        check_values(values, layout)
        if bias is not None and (
            bias.shape != (rows,) or bias.dtype != torch.float32 or not bias.is_contiguous()
        ):
            raise ValueError(f"spmm: bias must be a contiguous float32 ({rows},) tensor")
        ptr, idx, perm = (
            (layout.ccol, layout.csc_row, layout.csc_perm) if transpose else (layout.crow, layout.col, None)
        )
        self.functions["sdm_spmm"](
            rows,
            ptr.data_ptr(),
            idx.data_ptr(),
            values.data_ptr(),
            _ptr(perm),
            _ptr(bias),
            x.data_ptr(),
            ld,
            out.data_ptr(),
            ld,
            ld,
            int(accumulate),
            torch.get_num_threads(),
        )
        return out

    def sddmm(
        self, layout: SparseLayout, a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False
    ) -> Tensor:
        """out[p] (+)= a[row[p]] . b[col[p]]: (a b^T) sampled at the active entries."""
        ld = self.check(a, layout.shape[0], "sddmm left")
        if self.check(b, layout.shape[1], "sddmm right") != ld:
            raise ValueError("sddmm: operands have different columns")
        check_values(out, layout)
        self.functions["sdm_sddmm"](
            layout.nnz,
            layout.row.data_ptr(),
            layout.col.data_ptr(),
            a.data_ptr(),
            ld,
            b.data_ptr(),
            ld,
            ld,
            out.data_ptr(),
            int(accumulate),
            torch.get_num_threads(),
        )
        return out

    def gru_forward(
        self,
        plan: Any,
        gi: Tensor,
        recurrent: list[tuple[SparseLayout, Tensor, Tensor]],
        out: Tensor,
        hprev: Tensor,
        saved: Tensor,
    ) -> None:
        """One layer's recurrence, both directions: gi (6H, ld) -> out, hprev (2H, ld), saved (8H, ld).
        `recurrent`: (layout, values, bias_hh) of W_hh per direction."""
        hidden = recurrent[0][0].shape[1]
        ld = self.check(gi, 6 * hidden, "gru input projection")
        for tensor, rows, name in (
            (out, 2 * hidden, "gru output"),
            (hprev, 2 * hidden, "gru hprev"),
            (saved, 8 * hidden, "gru saved"),
        ):
            if self.check(tensor, rows, name) != ld:
                raise ValueError(f"{name}: {tensor.shape[1]} columns, the layer has {ld}")
        plan.check(ld)
        weights = []
        for layout, values, bias in recurrent:
            check_recurrent(layout, values, bias, hidden)
            weights += [layout.crow.data_ptr(), layout.col.data_ptr(), values.data_ptr(), bias.data_ptr()]
        status = self.functions["sdm_gru_forward"](
            hidden,
            plan.steps,
            plan.offsets.data_ptr(),
            plan.sizes.data_ptr(),
            ld,
            gi.data_ptr(),
            *weights,
            out.data_ptr(),
            hprev.data_ptr(),
            saved.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError("the compiled GRU forward could not allocate its scratch or start its thread")

    def gru_backward(
        self,
        plan: Any,
        grad_out: Tensor,
        hprev: Tensor,
        saved: Tensor,
        recurrent: list[tuple[SparseLayout, Tensor]],
        dgi: Tensor,
        dgh: Tensor,
    ) -> Tensor:
        """Backward through time of `gru_forward`: grad_out (2H, ld) -> dgi, dgh (2 * 3H, ld); returns the
        column sums (2, 4H): per direction the b_ih gradient (r, z, n rows of dgi), then dgh's n rows."""
        hidden = recurrent[0][0].shape[1]
        ld = self.check(grad_out, 2 * hidden, "gru output grad")
        for tensor, rows, name in (
            (hprev, 2 * hidden, "gru hprev"),
            (saved, 8 * hidden, "gru saved"),
            (dgi, 6 * hidden, "gru dgi"),
            (dgh, 6 * hidden, "gru dgh"),
        ):
            if self.check(tensor, rows, name) != ld:
                raise ValueError(f"{name}: {tensor.shape[1]} columns, the layer has {ld}")
        plan.check(ld)
        bias_grad = torch.empty(2, 4 * hidden)
        weights = []
        for layout, values in recurrent:
            check_recurrent(layout, values, None, hidden)
            weights += [
                layout.ccol.data_ptr(),
                layout.csc_row.data_ptr(),
                layout.csc_perm.data_ptr(),
                values.data_ptr(),
            ]
        status = self.functions["sdm_gru_backward"](
            hidden,
            plan.steps,
            plan.offsets.data_ptr(),
            plan.sizes.data_ptr(),
            ld,
            grad_out.data_ptr(),
            hprev.data_ptr(),
            saved.data_ptr(),
            *weights,
            dgi.data_ptr(),
            dgh.data_ptr(),
            bias_grad.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError("the compiled GRU backward could not allocate its scratch or start its thread")
        return bias_grad


def check_values(values: Tensor, layout: SparseLayout) -> None:
    layout.check_values(values)
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError(f"values must be contiguous float32, got {values.dtype}")


def check_recurrent(layout: SparseLayout, values: Tensor, bias: Tensor | None, hidden: int) -> None:
    if layout.shape != (3 * hidden, hidden):
        raise ValueError(f"a recurrent weight must be ({3 * hidden}, {hidden}), got {layout.shape}")
    check_values(values, layout)
    if bias is not None and (
        bias.shape != (3 * hidden,) or bias.dtype != torch.float32 or not bias.is_contiguous()
    ):
        raise ValueError(f"a recurrent bias must be a contiguous float32 ({3 * hidden},) tensor")


@cache
def load_train_kernels(cache_dir: Path, flags: tuple[str, ...] = FLAGS) -> TrainKernels:
    """The kernels, built on first use into `<cache_dir>/kernels/`. Raises KernelUnavailable naming why
    (no compiler, a failed build, a library that does not load): there is no slower fallback."""
    library, path, threading = load_library(SOURCE, cache_dir, flags)
    functions = {}
    try:
        for name, argtypes in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int if name.startswith("sdm_gru") else None
            functions[name] = function
        lanes = library.sdm_train_lanes
    except AttributeError as error:
        raise KernelUnavailable(f"cannot load {path}: {error}") from error
    lanes.argtypes, lanes.restype = (), ctypes.c_int
    return TrainKernels(functions, lanes(), path, threading)


__all__ = ["ALIGNMENT", "SOURCE", "KernelUnavailable", "TrainKernels", "load_train_kernels"]
