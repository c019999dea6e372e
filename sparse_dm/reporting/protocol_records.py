"""A study's committed evidence: the run records <out>/runs/<arm>/seed_<n>/ (summary.json, config.yaml,
csv/metrics.csv) the study runner copies there, or, for a study made before the protocol whose per-seed
records were not kept, its per-arm CSV row (mean, SD, n). Folders that are not runs of the spec are
refused, and a record whose config differs from what the spec composes today is flagged as drift.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse_dm.reporting.protocol import (
    EXECUTION_KEYS,
    ArmSchedule,
    ProtocolError,
    StudySpec,
    arm_schedule,
    compose_arm,
)
from sparse_dm.reporting.seed_stats import SeedStats
from sparse_dm.reporting.study import read_curve
from sparse_dm.reporting.tables import METRIC_KEYS

RUNS = "runs"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
CURVE = Path("csv") / "metrics.csv"
ABSENT = "<absent>"


def metric_key(metric: str) -> str:
    """The summary / CSV key of a metric: the study short names (val_loss_raw -> val/loss_raw), or a
    key as logged (val/loss_raw_band0) or as summary.json has it at top level (fsd_kanjivg)."""
    return METRIC_KEYS.get(metric, metric)


@dataclass
class ArmData:
    """One arm's committed evidence: run records by seed, or (per-arm CSV studies) its CSV row."""

    runs: dict[int, Path] = field(default_factory=dict)  # seed -> record folder
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)
    schedules: dict[int, ArmSchedule] = field(default_factory=dict)  # from each run's config.yaml
    csv_row: dict[str, str] | None = None
    composed: ArmSchedule | None = None  # per-arm CSV studies: from the spec as it stands
    config_drift: list[str] = field(default_factory=list)


def _seed_of(folder: Path) -> int:
    name = folder.name
    if not name.startswith("seed_") or not name[5:].isdigit():
        raise ProtocolError(f"{folder}: run record folders are named seed_<n>")
    return int(name[5:])


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def _config_drift(spec: StudySpec, arm: str, record: DictConfig) -> list[str]:
    """Keys whose value in a committed run's config differs from the config the spec composes today
    for the same run (changed defaults or overrides since it ran), so an old record is never silently
    taken as current."""
    try:
        current = compose_arm(spec, arm, int(record.seed), Path(record.paths.output_dir))
    except ProtocolError as err:
        return [f"(cannot compose the arm now: {err})"]
    now = _flat(OmegaConf.to_container(current, resolve=True))
    then = _flat(OmegaConf.to_container(record, resolve=True))
    keys = (set(now) | set(then)) - set(EXECUTION_KEYS)
    return sorted(k for k in keys if now.get(k, ABSENT) != then.get(k, ABSENT))


def load_committed(spec: StudySpec) -> dict[str, ArmData]:
    """Every arm's committed records (refusing folders that are not runs of this spec), or its row of
    the per-arm CSV for studies without records."""
    data = {arm: ArmData() for arm in spec.arms}
    if spec.source_csv is not None:
        with spec.source_csv.open(newline="") as f:
            rows = {row["arm"]: row for row in csv.DictReader(f)}
        for name, arm in spec.arms.items():
            if arm.csv_arm not in rows:
                raise ProtocolError(
                    f"{spec.path}: arms.{name}.csv_arm={arm.csv_arm!r} is not a row of {spec.source_csv}"
                )
            data[name].csv_row = rows[arm.csv_arm]
            data[name].composed = arm_schedule(compose_arm(spec, name, spec.seeds[0], spec.runs_dir / name))
        return data
    root = spec.out / RUNS
    for summary_path in sorted(root.glob(f"*/*/{SUMMARY}")) if root.is_dir() else []:
        folder = summary_path.parent
        arm, seed = folder.parent.name, _seed_of(folder)
        if arm not in spec.arms or seed not in spec.seeds:
            raise ProtocolError(
                f"{folder} is not a run of study {spec.name}: arms {list(spec.arms)}, "
                f"seeds {list(spec.seeds)}"
            )
        summary = json.loads(summary_path.read_text())
        record = OmegaConf.load(folder / CONFIG)
        if int(summary["seed"]) != seed or int(summary["train_steps"]) != spec.budget_steps:
            raise ProtocolError(
                f"{folder}: summary says seed {summary['seed']}, {summary['train_steps']} steps; the spec "
                f"declares seed {seed} (its folder) and budget_steps {spec.budget_steps}"
            )
        entry = data[arm]
        entry.runs[seed] = folder
        entry.summaries[seed] = summary
        entry.schedules[seed] = arm_schedule(record)
        for key in _config_drift(spec, arm, record):
            if key not in entry.config_drift:
                entry.config_drift.append(key)
    return data


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_value(
    folder: Path, summary: Mapping[str, Any], metric: str, step: int | None, budget: int
) -> float | None:
    """A run's metric at the final evaluation (summary.json) or at an earlier one (its CSV curve);
    None when the run did not log it."""
    key = metric_key(metric)
    if step is None or step == budget:
        metrics = summary.get("metrics") or {}
        return number(metrics[key]) if key in metrics else number(summary.get(key))
    try:
        return read_curve(folder / CURVE, key).get(step)
    except ValueError:  # the column does not exist: the run never logged this metric
        return None


def csv_stats(row: Mapping[str, str], metric: str) -> SeedStats | None:
    mean, sd = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
    if not mean:
        return None
    return SeedStats(int(row["n"]), float(mean), float(sd) if sd else math.nan)
