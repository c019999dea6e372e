"""The training kernels for tests: built once per session into a temporary cache (never ~/.cache), for
this CPU (-march=native) or, as `compiled@<level>`, for a baseline x86-64 level, to show the code needs
no one instruction set."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import pytest
from helpers.compiled_loop import X86_LEVELS, skip_unless_level_runs

from sparse_dm.kernels.build import FLAGS
from sparse_dm.sparse_backend import KernelUnavailable, TrainKernels, load_train_kernels

IMPLS = ["reference", "compiled"]
BASELINE_IMPLS = [f"compiled@{level}" for level in X86_LEVELS]


@cache
def _build(march: str = "native") -> TrainKernels | str:
    flags = tuple(f"-march={march}" if flag == "-march=native" else flag for flag in FLAGS)
    try:
        return load_train_kernels(Path(tempfile.mkdtemp(prefix="sparse_dm_train_kernels_")), flags)
    except KernelUnavailable as error:
        return str(error)


def _kernels_for_level(level: str) -> TrainKernels:
    skip_unless_level_runs(level)
    built = _build(level)
    if isinstance(built, str):
        pytest.skip(f"training kernels unavailable for {level}: {built}")
    return built


def kernels_for(impl: str) -> TrainKernels | None:
    """None for the pure-torch reference; the compiled kernels, or a visible skip saying why not."""
    if impl == "reference":
        return None
    if impl.startswith("compiled@"):
        return _kernels_for_level(impl.split("@", 1)[1])
    built = _build()
    if isinstance(built, str):
        pytest.skip(f"compiled training kernels unavailable here: {built}")
    return built
