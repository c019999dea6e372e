"""Which inference form runs `auto`: the model's own candidate forms timed on its sampling workload.

`threshold_linear` / `threshold_gru` set to `auto` are not measured on a proxy shape: every distinct
form the fixed choices could give this model (threshold values at the densities where a matrix's
kernel flips, see `convert.candidate_forms`) is timed running a few whole DDIM steps of the real
workload - the sampling batch, the data's sequence lengths - against the all-dense form, in rounds
whose order is shuffled afresh. The candidate with the best median ratio wins (the all-dense form
itself is a candidate, so `auto` is never slower than dense beyond timing noise). Why not a proxy:
a one-layer GRU at a made-up shape, timed with its 385-row input packing inside the sparse side,
kept `nn.GRU` on an Intel Xeon where the compiled loop samples the real model 3x faster at S = 0.9
(docs/benchmarks.md).

The choice is cached in `<cache_dir>/calibration.json` (default `$XDG_CACHE_HOME/sparse_dm`, else
`~/.cache/sparse_dm`) under a key naming everything it depends on: this method's version, torch,
threads, the CPU (model and flags), the compiled kernel (its library is named by a hash of source,
compiler, flags and CPU), the protocol, the model (parameter shapes and every matrix's density) and
the workload (shapes and integer values, e.g. lengths, of the denoiser's inputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_dm.inference.compiled import KernelUnavailable, Recurrence, load_recurrence
from sparse_dm.kernels.build import cpu_identity

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
METHOD = 3  # bump when what is timed changes, so choices measured the old way are not reused
AUTO = "auto"
GRU_LOOPS = (AUTO, "compiled", "torch")

Workload = Callable[[nn.Module], object]  # runs a few DDIM steps of the sampling workload with a net


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
    """How `auto` times its candidates (conf/inference/default.yaml `calibration`)."""

    rounds: int
    runs_per_sample: int
    ddim_steps: int
    linear_candidates: int
    seed: int

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> CalibrationProtocol:
        values = {}
        for key in ("rounds", "runs_per_sample", "ddim_steps", "linear_candidates", "seed"):
            if key not in cfg:
                raise ValueError(f"inference.calibration.{key} is missing")
            values[key] = int(cfg[key])
        for key in ("rounds", "runs_per_sample", "ddim_steps"):
            if values[key] < 1:
                raise ValueError(f"inference.calibration.{key} must be >= 1, got {cfg[key]}")
        if values["linear_candidates"] < 2:
            raise ValueError(
                f"inference.calibration.linear_candidates must be >= 2 (0 and at least one density), "
                f"got {cfg['linear_candidates']}"
            )
        return cls(**values)


@dataclass(frozen=True)
class InferenceSettings:
    """The `inference` config, checked: fixed thresholds (None where `auto`), the GRU loop that
    runs (compiled or torch ops), how `auto` measures and where it caches."""

    linear: float | None
    gru: float | None
    recurrence: Recurrence | None
    protocol: CalibrationProtocol
    cache_dir: Path

    @property
    def fixed(self) -> Thresholds | None:
        """The thresholds when nothing is `auto`, else None (calibrate on the workload)."""
        if self.linear is None or self.gru is None:
            return None
        return Thresholds(self.linear, self.gru, self.recurrence)


@dataclass(frozen=True)
class Calibration:
    """What `auto` chose: the thresholds and the record it cached (the chosen form's label and every
    candidate's speedup over the all-dense form: median, min and max over rounds); `measured` is
    False when the record was read from the cache."""

    thresholds: Thresholds
    record: dict[str, Any]
    measured: bool


@dataclass(frozen=True)
class Candidate:
    """One form `auto` may choose: the thresholds that build it, the form, what it runs (`label`)
    and `signature`, its matrices' names, densities and kernels plus its GRU loop (equal signatures
    are the same form)."""

    thresholds: Thresholds
    form: nn.Module
    label: str
    signature: str


def _fixed_threshold(value: Any, key: str) -> float | None:
    if value == AUTO:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{key} must be '{AUTO}' or a density in [0, 1], got {value!r}")
    return number


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparse_dm"


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


def resolve_settings(cfg: Mapping[str, Any]) -> InferenceSettings:
    """The `inference` config group -> InferenceSettings (invalid values refused, naming the key)."""
    linear = _fixed_threshold(cfg["threshold_linear"], "inference.threshold_linear")
    gru = _fixed_threshold(cfg["threshold_gru"], "inference.threshold_gru")
    cache_dir = Path(cfg["cache_dir"]).expanduser() if cfg.get("cache_dir") else default_cache_dir()
    protocol = CalibrationProtocol.from_mapping(cfg["calibration"])
    recurrence = resolve_recurrence(str(cfg.get("gru_loop", AUTO)), cache_dir)
    return InferenceSettings(linear, gru, recurrence, protocol, cache_dir)


def best_time(fn: Callable[[], Any], runs: int) -> float:
    """Fastest of `runs` calls after one untimed call: a shared CPU only ever adds time, so the
    minimum filters preemption, and the first call after another candidate ran pays for caches and
    thread wake-ups a sampler running one form for many steps does not."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_candidates(
    forms: list[nn.Module], workload: Workload, protocol: CalibrationProtocol
) -> list[list[float]]:
    """Per form after the first (the reference), its time ratios reference / form, one per round it
    ran. Every round times the reference and every form still in the race, in an order shuffled
    afresh (seeded by the protocol), so no form keeps one neighbour or one position.
    From the second round on, a form whose best ratio is below the worst ratio of the leader (the
    best median; the reference, ratio 1, while no median exceeds 1) leaves the race: no round saw it
    as fast as the leader."""
    ratios: list[list[float]] = [[] for _ in forms[1:]]
    racing = list(range(len(forms)))
    shuffler = random.Random(protocol.seed)
    for round_ in range(protocol.rounds):
        order = shuffler.sample(racing, len(racing))
        times = {i: best_time(lambda form=forms[i]: workload(form), protocol.runs_per_sample) for i in order}
        for i in racing[1:]:
            ratios[i - 1].append(times[0] / times[i])
        if round_ >= 1:
            medians = {i: statistics.median(ratios[i - 1]) for i in racing[1:]}
            best = max(medians, key=medians.__getitem__, default=None)
            # the reference's ratio is 1 in every round: it leads while no median beats 1
            floor = 1.0 if best is None or medians[best] < 1.0 else min(ratios[best - 1])
            racing = [0] + [i for i in racing[1:] if max(ratios[i - 1]) >= floor]
    return ratios


def call_signature(net: nn.Module, workload: Workload) -> str:
    """What the denoiser is called with in `workload`: every call's tensor shapes and dtypes, and the
    values of its integer tensors (lengths, timesteps, labels); float values (noise) are left out."""
    calls: list[list[str]] = []

    def describe(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            if value.dtype.is_floating_point:
                return f"{value.dtype}{tuple(value.shape)}"
            return f"{value.dtype}{tuple(value.shape)}={value.tolist()}"
        return repr(value)

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append([describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in sorted(kwargs.items())])

    handle = net.register_forward_pre_hook(record, with_kwargs=True)
    try:
        workload(net)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("the calibration workload never called the net")
    return json.dumps(calls)


def machine_key(settings: InferenceSettings) -> str:
    """Everything about this machine and build a timing depends on."""
    cpu = hashlib.sha256(cpu_identity().encode()).hexdigest()[:12]
    loop = Thresholds(0.0, 0.0, settings.recurrence).gru_loop
    threads = torch.get_num_threads()
    return f"torch={torch.__version__}|threads={threads}|cpu={cpu}|gru_loop={loop}|method={METHOD}"


def calibration_key(
    settings: InferenceSettings, reference: Candidate, candidates: list[Candidate], model: str, workload: str
) -> str:
    parts = {
        "protocol": asdict(settings.protocol),
        "fixed": [settings.linear, settings.gru],
        "model": model,
        "forms": [reference.signature, *(c.signature for c in candidates)],
        "workload": workload,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{machine_key(settings)}|forms={digest}"


def calibrate(
    reference: Candidate,
    candidates: list[Candidate],
    workload: Workload,
    model: str,
    settings: InferenceSettings,
) -> Calibration:
    """The thresholds of the fastest candidate on `workload` (cached; see the module docstring).
    `reference` is the all-dense form every ratio is taken against; `model` names the model's
    parameter shapes and masks (part of the cache key)."""
    if not candidates:
        raise ValueError("no candidate forms to calibrate")
    path = settings.cache_dir / CACHE_FILE
    cache: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    key = calibration_key(settings, reference, candidates, model, call_signature(reference.form, workload))
    if key in cache:
        chosen = cache[key]["thresholds"]
        thresholds = Thresholds(chosen["linear"], chosen["gru"], settings.recurrence)
        return Calibration(thresholds, cache[key], measured=False)
    log.info("calibrating %d candidate forms on the sampling workload (cached in %s)", len(candidates), path)
    distinct = [c for c in candidates if c.signature != reference.signature]
    start = time.perf_counter()
    measured = time_candidates([reference.form, *(c.form for c in distinct)], workload, settings.protocol)
    ratios = dict(zip((c.signature for c in distinct), measured, strict=True))
    table = []
    for candidate in candidates:
        mine = ratios.get(candidate.signature, [1.0])  # the reference itself: 1 by definition
        table.append({
            "label": candidate.label,
            "thresholds": {"linear": candidate.thresholds.linear, "gru": candidate.thresholds.gru},
            "speedup_median": statistics.median(mine),
            "speedup_min": min(mine),
            "speedup_max": max(mine),
        })  # fmt: skip
    best = max(range(len(candidates)), key=lambda i: table[i]["speedup_median"])
    for row in table:
        log.info("calibration: %.2fx (%.2f-%.2f) %s", row["speedup_median"], row["speedup_min"],
                 row["speedup_max"], row["label"])  # fmt: skip
    log.info("calibration chose %s (%.1f s)", candidates[best].label, time.perf_counter() - start)
    record = {
        "thresholds": table[best]["thresholds"],
        "chosen": candidates[best].label,
        "speedup_vs_dense": table,
        "seconds": time.perf_counter() - start,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cache = json.loads(path.read_text()) if path.is_file() else {}  # another process may have written
    cache[key] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(cache, indent=2))
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    thresholds = Thresholds(**table[best]["thresholds"], recurrence=settings.recurrence)
    return Calibration(thresholds, record, measured=True)
