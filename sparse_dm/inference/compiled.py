"""The compiled GRU loop (csrc/bigru_recurrence.c): built with the system C compiler, loaded with
ctypes.

Why compiled: the torch-op loop pays MKL's per-call set-up and six tensor ops per step, and MKL's
CSR product runs at ~11 GFMA/s on a 64-column operand; the C loop runs a whole layer in one call.
It needs only a C compiler (no Python or torch headers), builds in about a second, and is cached
per (source, compiler, flags, CPU) in `<cache_dir>/kernels/`, because -march=native code must not
run on another CPU. Without a compiler, `gru_loop: auto` falls back to the torch loop and says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "bigru_recurrence.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
# Threads for the two directions: torch's own OpenMP workers where the compiler has OpenMP (the
# process then holds one libgomp.so.1, torch's), else pthreads (e.g. Apple clang).
THREADING = {"openmp": ("-fopenmp",), "pthreads": ()}
ARGTYPES = (
    ctypes.c_int,  # hidden
    ctypes.c_int,  # steps
    ctypes.c_void_p,  # offsets: first padded column of each step (int32)
    ctypes.c_void_p,  # active: real columns of each step (int32)
    ctypes.c_void_p,  # x: the paired input (float32, K x Np)
    ctypes.c_void_p,  # input weight crow (int32)
    ctypes.c_void_p,  # input weight col (int32)
    ctypes.c_void_p,  # input weight values (float32)
    ctypes.c_void_p,  # gates_in: scratch (float32, 6H x Np)
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


class KernelUnavailable(RuntimeError):
    """The compiled recurrence cannot be built or loaded here (the message says why)."""


def find_compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise KernelUnavailable("no C compiler found (install gcc or clang, or set CC)")


def cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(wanted))
    return f"{platform.machine()} {platform.processor()}"


def compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout


def library_path(cache_dir: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), compiler_version(compiler).encode(),
                 " ".join(flags).encode(), cpu_identity().encode()):  # fmt: skip
        digest.update(part)
    return cache_dir / "kernels" / f"bigru_recurrence-{digest.hexdigest()[:16]}.so"


def build(target: Path, compiler: str, flags: tuple[str, ...]) -> None:
    """Compile into a temporary file in the cache, then rename: concurrent builders never see (or
    load) a half-written library. A failure is remembered next to the target (not retried)."""
    failure = target.with_suffix(".failed")
    if failure.is_file():
        raise KernelUnavailable(failure.read_text())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as error:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent}: {error}") from error
    os.close(handle)
    command = [compiler, *flags, "-o", temporary, str(SOURCE)]
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"`{' '.join(command)}` did not run: {error}") from error
        if done.returncode != 0:
            message = f"`{' '.join(command)}` failed:\n{done.stderr.strip()}"
            failure.write_text(message)
            raise KernelUnavailable(message)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@cache
def load_recurrence(cache_dir: Path) -> Recurrence:
    """The kernel (built on first use). Raises KernelUnavailable with the reason."""
    compiler = find_compiler()
    errors = []
    for threading, extra in THREADING.items():
        path = library_path(cache_dir, compiler, (*FLAGS, *extra))
        try:
            if not path.is_file():
                log.info("compiling the GRU loop (%s): %s", threading, path)
                build(path, compiler, (*FLAGS, *extra))
            return _load(path, threading)
        except KernelUnavailable as error:
            errors.append(str(error))
    raise KernelUnavailable("\n".join(errors))


def _load(path: Path, threading: str) -> Recurrence:
    try:
        library = ctypes.CDLL(str(path))
        run, lanes = library.sdm_bigru_layer, library.sdm_bigru_lanes
    except (OSError, AttributeError) as error:
        raise KernelUnavailable(f"cannot load {path}: {error}") from error
    run.argtypes, run.restype = ARGTYPES, ctypes.c_int
    lanes.argtypes, lanes.restype = (), ctypes.c_int
    return Recurrence(run, lanes(), path, threading)
