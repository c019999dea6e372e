"""Build and load one C source as a shared library.

Why this way: it needs only a C compiler (no Python or torch headers), builds in about a second, and
the library is cached per (source, compiler, flags, CPU) under `<cache_dir>/kernels/`, because
-march=native code must not run on another CPU. Every failure is a `KernelUnavailable` naming why.
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
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
# Threads: torch's own OpenMP workers where the compiler has OpenMP (the process then holds one
# libgomp.so.1, torch's), else pthreads (e.g. Apple clang).
THREADING = {"openmp": ("-fopenmp",), "pthreads": ()}


class KernelUnavailable(RuntimeError):
    """A compiled kernel cannot be built or loaded here (the message says why)."""


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


def library_path(cache_dir: Path, source: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), compiler_version(compiler).encode(),
                 " ".join(flags).encode(), cpu_identity().encode()):  # fmt: skip
        digest.update(part)
    return cache_dir / "kernels" / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def build(target: Path, source: Path, compiler: str, flags: tuple[str, ...]) -> None:
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
    command = [compiler, *flags, "-o", temporary, str(source)]
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


def load_library(
    source: Path, cache_dir: Path, flags: tuple[str, ...] = FLAGS
) -> tuple[ctypes.CDLL, Path, str]:
    """(library, its path, threading) for `source`, built on first use; OpenMP first, then pthreads.
    Raises KernelUnavailable with every reason."""
    compiler = find_compiler()
    errors = []
    for threading, extra in THREADING.items():
        path = library_path(cache_dir, source, compiler, (*flags, *extra))
        try:
            if not path.is_file():
                log.info("compiling %s (%s): %s", source.name, threading, path)
                build(path, source, compiler, (*flags, *extra))
            try:
                return ctypes.CDLL(str(path)), path, threading
            except OSError as error:
                raise KernelUnavailable(f"cannot load {path}: {error}") from error
        except KernelUnavailable as error:
            errors.append(str(error))
    raise KernelUnavailable("\n".join(errors))
