"""Where CSR starts to pay on this machine: density thresholds measured once, then cached.

Two thresholds, because the kernels differ: `linear` for a single CSR x dense matmul over many
columns (input projections, Linear layers) and `gru` for a whole recurrent layer, whose per-step
matmuls are small and overhead-bound. Each is the highest density on the protocol's grid (scanned
upwards, stopping at the first loss) where the median of paired, order-alternating timing ratios
favours CSR; 0 when CSR never wins. Results are cached per (torch, MKL, threads, CPU, protocol) in
`<cache_dir>/calibration.json` (default `$XDG_CACHE_HOME/sparse_dm`, else `~/.cache/sparse_dm`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from sparse_dm.inference.compiled import KernelUnavailable, Recurrence, load_recurrence
from sparse_dm.inference.kernels import matmul_into, to_csr
from sparse_dm.inference.packing import pack_columns, paired_input
from sparse_dm.inference.sparse_gru import SparseBiGRU

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
METHOD = 2  # bump when what is timed changes, so cached thresholds measured the old way are not reused
AUTO = "auto"
GRU_LOOPS = (AUTO, "compiled", "torch")


@dataclass(frozen=True)
class Thresholds:
    """Store a matrix as CSR when its density <= `linear`; run a GRU as SparseBiGRU when every
    recurrent matrix has density <= `gru`, with the compiled `recurrence` (None: the torch-op loop)."""

    linear: float
    gru: float
    recurrence: Recurrence | None = field(default=None, compare=False)

    @property
    def gru_loop(self) -> str:
        """The loop that runs, named precisely enough to key a calibration by."""
        return "torch" if self.recurrence is None else f"compiled:{self.recurrence.library.stem}"


@dataclass(frozen=True)
class CalibrationProtocol:
    """What is timed (conf/inference/default.yaml `calibration`)."""

    densities: tuple[float, ...]
    repeats: int
    runs_per_sample: int
    linear_shape: tuple[int, int, int]  # rows, inner, columns of W @ X
    gru_shape: tuple[int, int, int, int]  # input size, hidden size, max length, batch
    seed: int

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> CalibrationProtocol:
        densities = tuple(float(d) for d in cfg["densities"])
        if not densities or any(not 0.0 < d <= 1.0 for d in densities):
            raise ValueError(f"inference.calibration.densities must be in (0, 1], got {list(densities)}")
        for key in ("repeats", "runs_per_sample"):
            if int(cfg[key]) < 1:
                raise ValueError(f"inference.calibration.{key} must be >= 1, got {cfg[key]}")
        return cls(
            densities=tuple(sorted(densities)),
            repeats=int(cfg["repeats"]),
            runs_per_sample=int(cfg["runs_per_sample"]),
            linear_shape=tuple(int(v) for v in cfg["linear_shape"]),  # type: ignore[arg-type]
            gru_shape=tuple(int(v) for v in cfg["gru_shape"]),  # type: ignore[arg-type]
            seed=int(cfg["seed"]),
        )


def best_time(fn: Callable[[], Any], runs: int) -> float:
    """Fastest of `runs` calls after one untimed call: a shared CPU only ever adds time, so the
    minimum filters preemption, and the first call after the other side ran pays for caches and
    thread wake-ups a sampler running one side for many steps does not."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired_speedup(
    dense: Callable[[], Any], sparse: Callable[[], Any], protocol: CalibrationProtocol
) -> float:
    """Median of dense/sparse time ratios; which side runs first alternates between pairs."""
    dense(), sparse()  # warm-up (allocations, MKL handles)
    ratios = []
    for i in range(protocol.repeats):
        sides = (("dense", dense), ("sparse", sparse))[:: 1 if i % 2 == 0 else -1]
        times = {name: best_time(fn, protocol.runs_per_sample) for name, fn in sides}
        ratios.append(times["dense"] / times["sparse"])
    return statistics.median(ratios)


def random_sparse(shape: tuple[int, ...], density: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    return values * (torch.rand(shape, generator=generator) < density)


def linear_speedup(protocol: CalibrationProtocol, density: float, generator: torch.Generator) -> float:
    rows, inner, columns = protocol.linear_shape
    weight = random_sparse((rows, inner), density, generator)
    csr = to_csr(weight)
    x = torch.randn(inner, columns, generator=generator)
    out = torch.empty(rows, columns)
    return paired_speedup(lambda: matmul_into(weight, x, out), lambda: matmul_into(csr, x, out), protocol)


@torch.no_grad()
def gru_speedup(
    protocol: CalibrationProtocol, density: float, generator: torch.Generator, recurrence: Recurrence | None
) -> float:
    inputs, hidden, length, batch = protocol.gru_shape
    gru = nn.GRU(inputs, hidden, batch_first=True, bidirectional=True)
    for name, param in gru.named_parameters():
        if name.startswith("weight"):
            param.copy_(random_sparse(tuple(param.shape), density, generator))
    sparse_gru = SparseBiGRU(gru, [True], [True], recurrence)
    x = torch.randn(batch, length, inputs, generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    lengths[0] = length

    def dense() -> None:
        gru(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))

    columns = pack_columns(lengths, batch, length, sparse_gru.lanes)  # a sampler packs once, not per step

    def sparse() -> None:
        sparse_gru(paired_input(x, columns), columns)

    return paired_speedup(dense, sparse, protocol)


def crossover(speedups: dict[float, float]) -> float:
    """Highest density, scanning upwards, before CSR first stops winning (0: it never wins)."""
    best = 0.0
    for density in sorted(speedups):
        if speedups[density] <= 1.0:
            break
        best = density
    return best


def measure_thresholds(
    protocol: CalibrationProtocol, recurrence: Recurrence | None
) -> tuple[Thresholds, dict[str, dict[float, float]]]:
    generator = torch.Generator().manual_seed(protocol.seed)
    speedups = {
        "linear": {d: linear_speedup(protocol, d, generator) for d in protocol.densities},
        "gru": {d: gru_speedup(protocol, d, generator, recurrence) for d in protocol.densities},
    }
    thresholds = Thresholds(crossover(speedups["linear"]), crossover(speedups["gru"]), recurrence)
    return thresholds, speedups


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparse_dm"


def machine_key(protocol: CalibrationProtocol, gru_loop: str) -> str:
    """Everything a measured threshold depends on."""
    digest = hashlib.sha256(json.dumps(asdict(protocol), sort_keys=True).encode()).hexdigest()[:12]
    cpu = platform.processor() or platform.machine()
    return (
        f"torch={torch.__version__}|threads={torch.get_num_threads()}|cpu={cpu}|gru_loop={gru_loop}"
        f"|protocol={digest}|method={METHOD}"
    )


def cached_thresholds(
    protocol: CalibrationProtocol, recurrence: Recurrence | None, cache_dir: Path | None = None
) -> Thresholds:
    """Measured thresholds for this machine and GRU loop, from the cache file or measured now (and
    cached)."""
    path = (cache_dir or default_cache_dir()) / CACHE_FILE
    cache: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    key = machine_key(protocol, Thresholds(0.0, 0.0, recurrence).gru_loop)
    if key in cache:
        return Thresholds(**cache[key]["thresholds"], recurrence=recurrence)
    log.info("calibrating CSR vs dense on this machine (cached in %s)", path)
    thresholds, speedups = measure_thresholds(protocol, recurrence)
    cache[key] = {
        "thresholds": {"linear": thresholds.linear, "gru": thresholds.gru},
        "speedup_by_density": {kind: {str(d): s for d, s in v.items()} for kind, v in speedups.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=2))
    log.info("CSR thresholds: linear <= %.2f, gru <= %.2f", thresholds.linear, thresholds.gru)
    return thresholds


def _fixed_threshold(value: Any, key: str) -> float | None:
    if value == AUTO:
        return None
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{key} must be '{AUTO}' or a density in [0, 1], got {value!r}")
    return number


def resolve_recurrence(gru_loop: str, cache_dir: Path) -> Recurrence | None:
    """`inference.gru_loop` -> the compiled recurrence, or None for the torch-op loop. 'auto' takes
    the compiled loop when it builds here and otherwise warns (naming why) and takes the torch one."""
    if gru_loop not in GRU_LOOPS:
        raise ValueError(f"inference.gru_loop must be one of {GRU_LOOPS}, got {gru_loop!r}")
    if gru_loop == "torch":
        return None
    try:
        return load_recurrence(cache_dir)
    except KernelUnavailable as error:
        if gru_loop == "compiled":
            raise KernelUnavailable(f"inference.gru_loop=compiled: {error}") from error
        log.warning("inference.gru_loop=auto: the compiled GRU loop is unavailable, so the slower torch-op "
                    "loop runs. %s", error)  # fmt: skip
        return None


def resolve_thresholds(cfg: Mapping[str, Any]) -> Thresholds:
    """`inference` config -> thresholds and GRU loop: fixed numbers as given, 'auto' measured
    (cached) with the loop that will run."""
    linear = _fixed_threshold(cfg["threshold_linear"], "inference.threshold_linear")
    gru = _fixed_threshold(cfg["threshold_gru"], "inference.threshold_gru")
    cache_dir = Path(cfg["cache_dir"]).expanduser() if cfg.get("cache_dir") else default_cache_dir()
    recurrence = resolve_recurrence(str(cfg.get("gru_loop", AUTO)), cache_dir)
    if linear is None or gru is None:
        protocol = CalibrationProtocol.from_mapping(cfg["calibration"])
        measured = cached_thresholds(protocol, recurrence, cache_dir)
        linear = measured.linear if linear is None else linear
        gru = measured.gru if gru is None else gru
    return Thresholds(linear, gru, recurrence)
