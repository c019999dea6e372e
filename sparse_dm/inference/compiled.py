"""The compiled GRU loop (kernels/csrc/bigru_recurrence.c), loaded with ctypes.

Why compiled: the torch-op loop pays MKL's per-call set-up and six tensor ops per step, and MKL's
CSR product runs at ~11 GFMA/s on a 64-column operand; the C loop runs a whole layer in one call.
Building and caching (per source, compiler, flags and CPU) is `sparse_dm.kernels.build`. Without a
compiler, `gru_loop: auto` falls back to the torch loop and says so.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sparse_dm.kernels.build import CSRC, FLAGS, KernelUnavailable, load_library

SOURCE = CSRC / "bigru_recurrence.c"
ARGTYPES = (
    ctypes.c_int,  # hidden
    ctypes.c_int,  # steps
    ctypes.c_void_p,  # offsets: first padded column of each step (int32)
    ctypes.c_void_p,  # active: real columns of each step (int32)
    ctypes.c_void_p,  # x: the paired input (float32, K x Np)
    ctypes.c_void_p,  # input weight crow (int32)
    ctypes.c_void_p,  # input weight col (int32)
    ctypes.c_void_p,  # input weight values (float32)
    ctypes.c_int64,  # Np: padded columns
    ctypes.c_void_p,  # recurrent weight crow (int32)
    ctypes.c_void_p,  # recurrent weight col (int32)
    ctypes.c_void_p,  # recurrent weight values (float32)
    ctypes.c_void_p,  # out (float32, 4H + 1 x Np)
    ctypes.c_void_p,  # mirror: source column of each padded column of the mirrored rows (int32)
    ctypes.c_float,  # initial shifted state
    ctypes.c_int,  # threads
)
ALIGNMENT = 64  # bytes: every buffer the kernel reads with vector loads starts on this


@dataclass(frozen=True)
class Recurrence:
    """The loaded kernel: `run(*ARGTYPES)` runs one bidirectional layer and returns 0 on success;
    columns of each step are padded to a multiple of `lanes`."""

    run: Callable[..., int]
    lanes: int
    library: Path  # named by a hash of source, compiler, flags and CPU
    threading: str  # a key of THREADING


@cache
def load_recurrence(cache_dir: Path, flags: tuple[str, ...] = FLAGS) -> Recurrence:
    """The kernel (built on first use). Raises KernelUnavailable with the reason."""
    library, path, threading = load_library(SOURCE, cache_dir, flags)
    try:
        run, lanes = library.sdm_bigru_layer, library.sdm_bigru_lanes
    except AttributeError as error:
        raise KernelUnavailable(f"cannot load {path}: {error}") from error
    run.argtypes, run.restype = ARGTYPES, ctypes.c_int
    lanes.argtypes, lanes.restype = (), ctypes.c_int
    return Recurrence(run, lanes(), path, threading)


__all__ = ["ALIGNMENT", "ARGTYPES", "SOURCE", "KernelUnavailable", "Recurrence", "load_recurrence"]
