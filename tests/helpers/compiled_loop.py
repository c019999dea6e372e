"""The compiled GRU loop for tests: built once per session into a temporary cache (never ~/.cache)."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest

from sparse_dm.inference.compiled import KernelUnavailable, Recurrence, load_recurrence

LOOPS = ["torch", "compiled"]


@cache
def _build() -> Recurrence | str:
    try:
        return load_recurrence(Path(tempfile.mkdtemp(prefix="sparse_dm_kernels_")))
    except KernelUnavailable as error:
        return str(error)


def compiled_loop_available() -> bool:
    return isinstance(_build(), Recurrence)


def recurrence_for(loop: str) -> Recurrence | None:
    """None for the torch-op loop; the compiled loop, or a visible skip saying why it cannot build."""
    if loop == "torch":
        return None
    built = _build()
    if isinstance(built, str):
        pytest.skip(f"compiled GRU loop unavailable here: {built}")
    return built
