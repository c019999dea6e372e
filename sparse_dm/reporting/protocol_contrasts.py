"""Every pre-declared contrast of a study from its committed evidence: the estimate (paired over
shared seeds, Welch otherwise), the Holm-adjusted p over the whole declared family, and the verdict;
refused with the reason when a run broke the recovery window. Also the spec's selection rule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sparse_dm.reporting.contrasts import Estimate, estimate, holm, verdict, welch_from_stats
from sparse_dm.reporting.protocol import ContrastSpec, StudySpec, recovery_violations
from sparse_dm.reporting.protocol_records import ArmData, csv_stats, metric_key, run_value


@dataclass(frozen=True)
class ContrastRow:
    index: int
    spec: ContrastSpec
    label: str
    estimate: Estimate | None
    p_holm: float | None
    verdict: str
    notes: tuple[str, ...]


def _window_problems(spec: StudySpec, arm: str, data: ArmData, step: int) -> list[str]:
    schedules = list(data.schedules.values()) or ([data.composed] if data.composed else [])
    return sorted({p for s in schedules for p in recovery_violations(arm, s, [step], spec.recovery_window)})


def _estimate_of(
    spec: StudySpec, c: ContrastSpec, data: Mapping[str, ArmData]
) -> tuple[Estimate | None, list[str]]:
    """The contrast's estimate from what was committed, or None with the reasons it cannot be made."""
    step = c.step or spec.budget_steps
    problems = _window_problems(spec, c.a, data[c.a], step) + _window_problems(spec, c.b, data[c.b], step)
    if problems:
        return None, [f"recovery window violated: {p}" for p in problems]
    if spec.source_csv is not None:
        if c.a == c.b:
            return None, ["one arm's two metrics need per-seed values (paired), which this CSV lacks"]
        sa, sb = csv_stats(data[c.a].csv_row, c.metric), csv_stats(data[c.b].csv_row, c.metric_b)
        if sa is None or sb is None:
            return None, [f"{c.metric} / {c.metric_b} not in {spec.source_csv}"]
        return welch_from_stats(sa, sb, spec.confidence), [
            "Welch from per-arm mean, SD, n (per-seed values not committed)"
        ]
    values = []
    notes = []
    for arm, metric in ((c.a, c.metric), (c.b, c.metric_b)):
        d = data[arm]
        got = {
            s: v
            for s in d.runs
            if (v := run_value(d.runs[s], d.summaries[s], metric, c.step, spec.budget_steps)) is not None
        }
        absent = len(d.runs) - len(got)
        if absent:
            notes.append(f"{metric_key(metric)} absent from {absent} of {len(d.runs)} runs of {arm}")
        if len(d.runs) < len(spec.seeds):
            notes.append(f"{arm}: {len(d.runs)} of {len(spec.seeds)} seeds committed")
        values.append(got)
    if not values[0] or not values[1]:
        return None, notes or ["no runs committed"]
    return estimate(values[0], values[1], spec.confidence), notes


def contrast_rows(spec: StudySpec, data: Mapping[str, ArmData]) -> list[ContrastRow]:
    """Every declared contrast, Holm-adjusted over the whole declared family."""
    made = [_estimate_of(spec, c, data) for c in spec.contrasts]
    adjusted = holm([e.p if e is not None else None for e, _ in made])
    rows = []
    for i, (c, (est, notes), p_holm) in enumerate(zip(spec.contrasts, made, adjusted, strict=True), start=1):
        a, b = spec.arms[c.a].label, spec.arms[c.b].label
        if est is None:
            text = f"not tested ({'; '.join(notes)})"
        else:
            text = verdict(est, p_holm, spec.alpha, a, b)
            if not est.tested:
                notes = [*notes, est.reason or ""]
        rows.append(ContrastRow(i, c, c.label(spec.arms), est, p_holm, text, tuple(notes)))
    return rows


def selection_result(spec: StudySpec, rows: Sequence[ContrastRow]) -> tuple[Any, dict[Any, float]] | str:
    """The selection rule's choice and the mean difference per factor value, or why it cannot be made."""
    sel = spec.selection
    assert sel is not None
    chosen = [r for r in rows if sel.factor in r.spec.factors]
    lacking = [r.index for r in chosen if r.estimate is None or math.isnan(r.estimate.difference)]
    if lacking:
        return f"not yet: contrasts {lacking} have no estimate"
    by_value: dict[Any, list[float]] = defaultdict(list)
    for r in chosen:
        by_value[r.spec.factors[sel.factor]].append(r.estimate.difference)
    means = {v: math.fsum(d) / len(d) for v, d in sorted(by_value.items())}
    return min(means, key=means.__getitem__), means
