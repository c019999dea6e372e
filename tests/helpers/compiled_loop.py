"""The compiled GRU loop for tests: built once per session into a temporary cache (never ~/.cache),
for this CPU (-march=native) or for a baseline x86-64 level, to show the code needs no one
instruction set."""

from __future__ import annotations

import platform
import tempfile
from functools import cache
from pathlib import Path

import pytest

from sparse_dm.inference.compiled import KernelUnavailable, Recurrence, load_recurrence
from sparse_dm.kernels.build import FLAGS, cpu_identity

LOOPS = ["torch", "compiled"]
# x86-64 micro-architecture levels (the psABI's list) and the /proc/cpuinfo flags each needs: a
# build for a level the CPU lacks would die of SIGILL, so it is skipped instead.
V2 = {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"}
X86_LEVELS = {
    "x86-64-v2": V2,
    "x86-64-v3": V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
}
# Vector lanes (floats per register) the kernel picks for each level: 16-byte SSE, 32-byte AVX2.
X86_LANES = {"x86-64-v2": 4, "x86-64-v3": 8}


def cpu_flags() -> set[str]:
    for line in cpu_identity().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@cache
def _build(march: str) -> Recurrence | str:
    flags = tuple(f"-march={march}" if flag == "-march=native" else flag for flag in FLAGS)
    try:
        return load_recurrence(Path(tempfile.mkdtemp(prefix="sparse_dm_kernels_")), flags)
    except KernelUnavailable as error:
        return str(error)


def compiled_loop_available() -> bool:
    return isinstance(_build("native"), Recurrence)


def recurrence_for(loop: str) -> Recurrence | None:
    """None for the torch-op loop; the compiled loop, or a visible skip saying why it cannot build."""
    if loop == "torch":
        return None
    built = _build("native")
    if isinstance(built, str):
        pytest.skip(f"compiled GRU loop unavailable here: {built}")
    return built


def skip_unless_level_runs(level: str) -> None:
    """A visible skip where this machine cannot run code built for an x86-64 level (a key of X86_LEVELS)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"{level} is an x86-64 level; this machine is {platform.machine()}")
    if missing := X86_LEVELS[level] - cpu_flags():
        pytest.skip(f"this CPU cannot run {level} code (lacks {sorted(missing)})")


def recurrence_for_level(level: str) -> Recurrence:
    """The compiled loop built for an x86-64 level, or a visible skip where it cannot build or run."""
    skip_unless_level_runs(level)
    built = _build(level)
    if isinstance(built, str):
        pytest.skip(f"compiled GRU loop unavailable for {level}: {built}")
    return built
