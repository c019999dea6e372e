"""Aggregate run summaries over seeds into the paper's Table 1/2 rows (metric mean ± SD, cost ratios).

Dense and Static-DM do not depend on the prune rate p, so they join every p's section (Fig. 9/10 plot
Static-DM at p = 0.5 next to DST at p = 0.05); their p is recorded as None.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_NAME = "summary.json"
P_INDEPENDENT = frozenset({"dense", "static"})
METHOD_ORDER = ("dense", "static", "rigl", "magran")
METHOD_LABELS = {"dense": "Dense", "static": "Static-DM", "rigl": "RigL-DM", "magran": "MagRan-DM"}
METRICS = {
    "fid": "FID",
    "val_loss": "validation loss",
    "val_loss_raw": "validation loss (raw weights)",
    "val_loss_ema": "validation loss (EMA weights)",
}
METRIC_KEYS = {"val_loss": "val/loss", "val_loss_raw": "val/loss_raw", "val_loss_ema": "val/loss_ema"}
KEY_DIGITS = 6  # sparsity / p are config floats; round so 0.1 and 0.1000000001 group together


def load_summaries(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """Every summary.json below the given directories, each with its path under "_path"."""
    out = []
    for root in dirs:
        for path in sorted(Path(root).rglob(SUMMARY_NAME)):
            summary = json.loads(path.read_text())
            summary["_path"] = str(path)
            out.append(summary)
    return out


def metric_value(summary: dict[str, Any], metric: str) -> float | None:
    """The run's score: its FID, or a fixed-seed validation loss; None when the run lacks it."""
    value = summary.get("fid") if metric == "fid" else summary.get("metrics", {}).get(METRIC_KEYS[metric])
    return None if value is None else float(value)


def choose_metric(summaries: list[dict[str, Any]], requested: str | None) -> str:
    """FID as soon as any run has it (the paper's metric), else the validation loss."""
    if requested is not None:
        if requested not in METRICS:
            allowed = f"one of {sorted(METRICS)} or null"
            raise ValueError(f"invalid config: metric={requested!r}; allowed: {allowed}")
        return requested
    return "fid" if any(s.get("fid") is not None for s in summaries) else "val_loss"


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), KEY_DIGITS)


@dataclass
class Group:
    """One (model, dataset, method, S, p) configuration aggregated over its seeds."""

    model: str
    dataset: str
    method: str
    sparsity: float
    prune_rate: float | None
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> summary
    metric: str = "fid"

    @property
    def values(self) -> list[float]:
        return [v for s in self.runs.values() if (v := metric_value(s, self.metric)) is not None]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        """Sample SD over seeds (0 for a single seed), as the paper's ± columns."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def cost(self, key: str) -> float:
        """A cost figure from the summaries, averaged over seeds (identical across seeds in practice)."""
        return statistics.fmean(float(s[key]) for s in self.runs.values())

    @property
    def params_ratio(self) -> float:
        """Active prunable weights over the dense model's prunable weights (the paper's sparse "Params":
        exactly 1 - S; biases and norms are dense in both and left out, as in the paper's ratios)."""
        return self.cost("params_active") / self.cost("params_prunable")

    @property
    def label(self) -> str:
        name = METHOD_LABELS.get(self.method, self.method)
        return name if self.method == "dense" else f"{name}, S = {self.sparsity:g}"


@dataclass
class Section:
    """One table / figure: a (model, dataset) at one DST prune rate, with dense and static included."""

    model: str
    dataset: str
    prune_rate: float | None
    dense: Group | None
    sparse: list[Group]

    @property
    def title(self) -> str:
        p = "n/a" if self.prune_rate is None else f"{self.prune_rate:g}"
        return f"{self.model} / {self.dataset}, p = {p}"

    def best_per_method(self) -> list[Group]:
        """The paper's Table 1/2 rows: the lowest-metric sparsity level of each sparse method."""
        best: dict[str, Group] = {}
        for g in self.sparse:
            if g.values and (g.method not in best or g.mean < best[g.method].mean):
                best[g.method] = g
        return [best[m] for m in _method_sorted(best)]

    def top_sparse(self) -> Group | None:
        """The single best sparse configuration (underlined in the paper)."""
        scored = [g for g in self.sparse if g.values]
        return min(scored, key=lambda g: g.mean) if scored else None

    def beats_dense(self, group: Group) -> bool:
        """Bold in the paper: a sparse model whose mean metric is below the dense mean."""
        return self.dense is not None and bool(self.dense.values) and group.mean < self.dense.mean


def _method_rank(method: str) -> tuple[int, str]:
    """Paper order (Dense, Static, RigL, MagRan), unknown methods last by name."""
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return order, method


def _method_sorted(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=_method_rank)


def group_runs(summaries: list[dict[str, Any]], metric: str) -> tuple[list[Group], list[str]]:
    """Group by (model, dataset, method, S, p) over seeds; a repeated seed keeps its newest summary."""
    groups: dict[tuple, Group] = {}
    notes = []
    for s in sorted(summaries, key=lambda s: Path(s["_path"]).stat().st_mtime):
        method = s["method"]
        p = None if method in P_INDEPENDENT else _round(s.get("prune_rate"))
        sparsity = 0.0 if method == "dense" else _round(s["sparsity"])
        key = (s["model"], s["dataset"], method, sparsity, p)
        group = groups.setdefault(key, Group(*key, metric=metric))
        seed = int(s["seed"])
        if seed in group.runs:
            notes.append(
                f"seed {seed} of {group.label} ({s['model']}/{s['dataset']}) appears twice; "
                f"using the newer {s['_path']} over {group.runs[seed]['_path']}"
            )
        group.runs[seed] = s
    for g in groups.values():
        missing = [seed for seed, s in g.runs.items() if metric_value(s, metric) is None]
        if missing:
            notes.append(
                f"{g.model}/{g.dataset} {g.label}: seeds {sorted(missing)} have no {metric}; left out"
            )
    return list(groups.values()), notes


def build_sections(groups: list[Group]) -> list[Section]:
    """One section per (model, dataset, DST prune rate); p-independent methods join each of them."""
    by_task: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        by_task[(g.model, g.dataset)].append(g)
    sections = []
    for (model, dataset), task_groups in sorted(by_task.items()):
        dense = next((g for g in task_groups if g.method == "dense"), None)
        rates = sorted({g.prune_rate for g in task_groups if g.prune_rate is not None}) or [None]
        for p in rates:
            sparse = [g for g in task_groups if g.method != "dense" and g.prune_rate in (p, None)]
            sparse.sort(key=lambda g: (_method_rank(g.method), g.sparsity))
            sections.append(Section(model, dataset, p, dense, sparse))
    return sections
