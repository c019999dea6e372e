"""A multi-seed study's numbers: one row per arm (method, S, p) against the dense reference, the
learning curves from each run's csv/metrics.csv, and where the sweep came from (command, wall time).

Arms are the report's Groups (sparse_dm.reporting.tables); this module adds what a seed study needs on
top: SDs that are undefined (not 0) for one seed, Welch intervals to dense, and the sweep's provenance.
"""

from __future__ import annotations

import csv
import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sparse_dm.reporting.seed_stats import Difference, SeedStats, welch_difference
from sparse_dm.reporting.tables import METHOD_LABELS, Group, _method_rank, metric_value

SKETCH_KEYS = ("delta_std", "pen_up_rate", "one_point_stroke_fraction", "strokes_per_drawing")
CURVES_FILE = Path("csv") / "metrics.csv"
MULTIRUN_FILE = "multirun.yaml"
JOB_START_FILE = Path(".hydra") / "hydra.yaml"  # Hydra writes it as the job begins
MODULE_PREFIX = "sparse_dm."  # the CLIs are `python -m sparse_dm.<hydra job name>`
BASIC_SWEEPER = "BasicSweeper"  # the sweeper whose params are choice lists we can count


def arm_label(g: Group) -> str:
    """Method, S and (for methods that use it) p: the study's arms differ in p at one S."""
    name = METHOD_LABELS.get(g.method, g.method)
    if g.method == "dense":
        return name
    p = "" if g.prune_rate is None else f", p = {g.prune_rate:g}"
    return f"{name}, S = {g.sparsity:g}{p}"


def arm_order(g: Group) -> tuple:
    """Dense first, then paper method order, S ascending, p descending (the paper's p = 0.5 first)."""
    p = -1.0 if g.prune_rate is None else g.prune_rate
    return (_method_rank(g.method), g.sparsity, -p)


def seed_values(g: Group, metric: str) -> list[float]:
    """The metric of every seed that has it, in seed order."""
    values = (metric_value(g.runs[seed], metric) for seed in sorted(g.runs))
    return [v for v in values if v is not None]


def _sketch(summary: dict[str, Any], side: str, key: str) -> float | None:
    value = ((summary.get("sketch_stats") or {}).get(side) or {}).get(key)
    return None if value is None else float(value)


@dataclass(frozen=True)
class ArmRow:
    """One arm's numbers: primary/secondary metric over seeds, the difference to dense, and
    the run statistics that explain it (sample sketch statistics, exploration, mask updates)."""

    group: Group
    primary: SeedStats
    secondary: SeedStats
    vs_dense: Difference | None  # None for the dense arm itself and when no dense runs exist
    gap_dense_sds: float | None  # (arm - dense) / dense seed SD; None without a dense SD
    sketch: dict[str, SeedStats]
    exploration: SeedStats
    mask_updates: SeedStats

    @property
    def label(self) -> str:
        return arm_label(self.group)


def _dense_gap(primary: SeedStats, dense: SeedStats | None) -> float | None:
    if dense is None or dense.n < 2 or not dense.sd > 0.0:
        return None
    return (primary.mean - dense.mean) / dense.sd


def arm_rows(
    groups: Sequence[Group], primary: str, secondary: str, confidence: float, sketch_keys: Sequence[str]
) -> list[ArmRow]:
    """Every arm in report order; differences are to the dense arm's seeds (None without one)."""
    dense = next((g for g in groups if g.method == "dense"), None)
    dense_values = seed_values(dense, primary) if dense else []
    dense_stats = SeedStats.of(dense_values) if dense_values else None
    rows = []
    for g in sorted(groups, key=arm_order):
        values = seed_values(g, primary)
        stats = SeedStats.of(values)
        is_reference = g is dense or dense_stats is None
        runs = [g.runs[s] for s in sorted(g.runs)]
        rows.append(
            ArmRow(
                group=g,
                primary=stats,
                secondary=SeedStats.of(seed_values(g, secondary)),
                vs_dense=None if is_reference else welch_difference(values, dense_values, confidence),
                gap_dense_sds=None if is_reference else _dense_gap(stats, dense_stats),
                sketch={
                    k: SeedStats.of([v for s in runs if (v := _sketch(s, "samples", k)) is not None])
                    for k in sketch_keys
                },
                exploration=SeedStats.of([float(s["exploration_rate"]) for s in runs]),
                mask_updates=SeedStats.of([float(s["mask_updates"]) for s in runs]),
            )
        )
    return rows


def data_sketch(groups: Sequence[Group], sketch_keys: Sequence[str]) -> dict[str, SeedStats]:
    """The reference drawings' sketch statistics, over every run that recorded them."""
    runs = [s for g in groups for s in g.runs.values()]
    return {
        k: SeedStats.of([v for s in runs if (v := _sketch(s, "data", k)) is not None]) for k in sketch_keys
    }


# ----- learning curves --------------------------------------------------------------------------------
def read_curve(path: Path, column: str) -> dict[int, float]:
    """step -> value of one column of a Lightning CSV log (rows where it is empty are other metrics).
    A step logged twice (a resumed run replays its history) keeps the later value."""
    if not path.is_file():
        raise FileNotFoundError(f"learning curve: {path} not found (the run needs logger.csv=true)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"learning curve: {path} has no '{column}' and 'step' columns")
        return {int(row["step"]): float(row[column]) for row in reader if row[column] not in ("", None)}


@dataclass(frozen=True)
class Curve:
    """An arm's learning curve: mean and SD over seeds at the steps every seed logged."""

    steps: list[int]
    stats: list[SeedStats]
    dropped_steps: int  # steps some seed lacks (left out so each point averages the same seeds)


def arm_curve(g: Group, column: str) -> Curve:
    per_seed = [read_curve(Path(s["_path"]).parent / CURVES_FILE, column) for s in g.runs.values()]
    common = sorted(set.intersection(*(set(c) for c in per_seed)))
    every = set().union(*(set(c) for c in per_seed))
    stats = [SeedStats.of([c[step] for c in per_seed]) for step in common]
    return Curve(common, stats, len(every) - len(common))


# ----- provenance: which command made the sweep, and how long it ran ------------------------------------
def _run_dir(summary: dict[str, Any]) -> Path:
    return Path(summary["_path"]).parent


def sweep_root(run_dir: Path) -> Path | None:
    """The nearest folder above a run holding Hydra's multirun.yaml (the sweep's own folder)."""
    return next((p for p in run_dir.parents if (p / MULTIRUN_FILE).is_file()), None)


def sweep_command(hydra: DictConfig) -> str:
    """The command line that started a Hydra multirun, rebuilt from what Hydra recorded in it."""
    cwd = Path(hydra.runtime.cwd)
    args = [f"python -m {MODULE_PREFIX}{hydra.job.name}"]
    hydra_overrides = list(hydra.overrides.hydra)
    if "hydra.mode=MULTIRUN" in hydra_overrides:
        hydra_overrides.remove("hydra.mode=MULTIRUN")
        args.append("-m")
    for source in hydra.runtime.config_sources:
        if source.provider == "command-line":
            path = Path(source.path)
            args.append(f"--config-dir {path.relative_to(cwd) if path.is_relative_to(cwd) else path}")
    args.append(f"--config-name {hydra.job.config_name}")
    args += [shlex.quote(o) for o in (*hydra_overrides, *hydra.overrides.task)]
    return " ".join(args)


def planned_runs(hydra: DictConfig) -> int | None:
    """How many jobs the multirun launched: the product of its sweep sizes (the config's
    hydra.sweeper.params, overridden per key by the command line). None for other sweepers."""
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith(BASIC_SWEEPER):
        return None
    params = {str(k): f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()}
    overrides = OverridesParser.create().parse_overrides([*params.values(), *hydra.overrides.task])
    sizes = {o.key_or_group: len(list(o.sweep_iterator())) if o.is_sweep_override() else 1 for o in overrides}
    return math.prod(sizes.values())


@dataclass(frozen=True)
class SweepRecord:
    """One sweep folder: its command, its runs, and its wall time.

    Wall time runs from the first job's start to the last job's end. A job starts when Hydra writes its
    .hydra/hydra.yaml (file mtime) and ends wall_time_s later (summary.json's timer: config validation
    to summary). job_seconds sums wall_time_s; job_seconds / wall_s is the parallelism achieved.
    """

    root: Path | None
    command: str | None
    runs: int
    planned: int | None  # jobs the sweep launched (None: not countable); runs counts finished ones
    wall_s: float | None
    job_seconds: float
    missing_start: int  # runs without .hydra/hydra.yaml: no wall time when any lacks it


def sweep_records(summaries: Sequence[dict[str, Any]]) -> list[SweepRecord]:
    by_root: dict[Path | None, list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        by_root[sweep_root(_run_dir(s))].append(s)
    records = []
    for root, runs in sorted(by_root.items(), key=lambda kv: str(kv[0])):
        starts = [
            (p.stat().st_mtime, float(s["wall_time_s"]))
            for s in runs
            if (p := _run_dir(s) / JOB_START_FILE).is_file()
        ]
        missing = len(runs) - len(starts)
        wall = None if missing or not starts else max(a + w for a, w in starts) - min(a for a, _ in starts)
        hydra = OmegaConf.load(root / MULTIRUN_FILE).hydra if root is not None else None
        command = sweep_command(hydra) if hydra is not None else None
        planned = planned_runs(hydra) if hydra is not None else None
        job_seconds = math.fsum(float(s["wall_time_s"]) for s in runs)
        records.append(SweepRecord(root, command, len(runs), planned, wall, job_seconds, missing))
    return records


# ----- sample grids -------------------------------------------------------------------------------------
def final_sample(summary: dict[str, Any]) -> Path | None:
    """The run's last sample grid, looked up beside its summary (so a moved sweep still resolves)."""
    names = sorted(Path(p).name for p in summary.get("samples", []))
    if not names:
        return None
    path = _run_dir(summary) / "samples" / names[-1]
    return path if path.is_file() else None
