"""The training kernels for tests: built once per session into a temporary cache (never ~/.cache)."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest

from sparse_dm.sparse_backend import KernelUnavailable, TrainKernels, load_train_kernels

IMPLS = ["reference", "compiled"]


@cache
def _build() -> TrainKernels | str:
    try:
        return load_train_kernels(Path(tempfile.mkdtemp(prefix="sparse_dm_train_kernels_")))
    except KernelUnavailable as error:
        return str(error)


def kernels_for(impl: str) -> TrainKernels | None:
    """None for the pure-torch reference; the compiled kernels, or a visible skip saying why not."""
    if impl == "reference":
        return None
    built = _build()
    if isinstance(built, str):
        pytest.skip(f"compiled training kernels unavailable here: {built}")
    return built
