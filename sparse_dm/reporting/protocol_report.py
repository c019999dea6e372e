"""The report of a study spec: per-arm numbers and every pre-declared contrast with its interval,
Holm-adjusted p and verdict, written as <out>/contrasts.md, contrasts.csv, arms.csv and plots/, and the
cross-study docs/results.md. It formats what protocol_records reads and protocol_contrasts computes; the
figures are protocol_plots'.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_dm.reporting.contrasts import Estimate
from sparse_dm.reporting.protocol import CONTRASTS_FIGURE, ArmSchedule, StudySpec
from sparse_dm.reporting.protocol_contrasts import ContrastRow, contrast_rows, selection_result
from sparse_dm.reporting.protocol_plots import plot_contrasts, plot_figure
from sparse_dm.reporting.protocol_records import ArmData, csv_stats, load_committed, number, run_value
from sparse_dm.reporting.seed_stats import SeedStats

REPORT = "contrasts.md"
CONTRASTS_CSV = "contrasts.csv"
ARMS_CSV = "arms.csv"
DIGITS = 4
P_DIGITS = 3
CONFIG_DIFF_SHOWN = 5


# ----- tables --------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = DIGITS, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{P_DIGITS}f}" if x >= 10**-P_DIGITS else f"< {10**-P_DIGITS:g}"


def _interval(est: Estimate | None) -> str:
    if est is None or est.low is None:
        return "n/a"
    return f"[{est.low:+.{DIGITS}f}, {est.high:+.{DIGITS}f}]"


def _n(est: Estimate | None) -> str:
    if est is None:
        return "n/a"
    return f"{est.n_pairs} pairs" if est.n_pairs is not None else f"{est.n_a} vs {est.n_b}"


def contrast_table(rows: Sequence[ContrastRow], confidence: float, with_claims: bool) -> list[str]:
    level = f"{confidence:.0%}"
    head = [
        "#",
        "Contrast A − B (metric)",
        "step",
        "test",
        "n",
        "Δ",
        f"{level} CI",
        "df",
        "p",
        "Holm p",
        "Verdict",
    ]
    if with_claims:
        head.append("Earlier claim")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r.estimate
        cells = [
            str(r.index),
            r.label,
            "final" if r.spec.step is None else str(r.spec.step),
            "n/a" if e is None else e.test,
            _n(e),
            "n/a" if e is None else _fmt(e.difference, signed=True),
            _interval(e),
            "n/a" if e is None or e.df is None else f"{e.df:.1f}",
            _p(None if e is None else e.p),
            _p(r.p_holm),
            f"**{r.verdict}**",
        ]
        if with_claims:
            cells.append(r.spec.claim or "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _stat(s: SeedStats) -> str:
    if s.n == 0:
        return "n/a"
    return f"{s.mean:.{DIGITS}f} ± {'n/a' if math.isnan(s.sd) else f'{s.sd:.{DIGITS}f}'}"


def _metrics_used(spec: StudySpec) -> list[str]:
    named = [m for c in spec.contrasts for m in (c.metric, c.metric_b)] + list(spec.report_metrics)
    return list(dict.fromkeys(named))


def _recovery(spec: StudySpec, arm: str, schedules: Sequence[ArmSchedule]) -> str:
    """Last mask update before each evaluation the arm's contrasts read, and the steps after it."""
    if not schedules:
        return "n/a"
    cells = set()
    for s in schedules:
        for e in spec.evaluation_steps(arm) or [spec.budget_steps]:
            last = s.last_update_before(e)
            cells.add(f"none before {e}" if last is None else f"{last} → {e}: {e - last} steps")
    return "; ".join(sorted(cells))


def arm_rows(spec: StudySpec, data: Mapping[str, ArmData]) -> list[dict[str, str]]:
    metrics = _metrics_used(spec)
    rows = []
    for name, arm in spec.arms.items():
        d = data[name]
        row = {"arm": arm.label, "name": name}
        if d.csv_row is not None:
            row["runs"] = d.csv_row["n"]
            for m in metrics:
                s = csv_stats(d.csv_row, m)
                row[m] = "n/a" if s is None else _stat(s)
            row["mask updates"] = (
                f"{float(d.csv_row['mask_updates_mean']):g} (composed config: {len(d.composed.updates)})"
            )
            row["last update → evaluation"] = _recovery(spec, name, [d.composed])
            row["exploration rate"] = _fmt(number(float(d.csv_row["exploration_rate_mean"])), 3)
            rows.append(row)
            continue
        seeds = sorted(d.runs)
        row["runs"] = f"{len(seeds)} of {len(spec.seeds)}"
        for m in metrics:
            vals = [
                v
                for s in seeds
                if (v := run_value(d.runs[s], d.summaries[s], m, None, spec.budget_steps)) is not None
            ]
            row[m] = _stat(SeedStats.of(vals))
        summaries = [d.summaries[s] for s in seeds]
        row["mask updates"] = ", ".join(sorted({str(s.get("mask_updates")) for s in summaries})) or "n/a"
        row["last update → evaluation"] = _recovery(spec, name, list(d.schedules.values()))
        row["exploration rate"] = _stat(SeedStats.of([float(s["exploration_rate"]) for s in summaries]))
        for key in ("params_active", "params_stored"):
            found = sorted({s[key] for s in summaries if s.get(key) is not None})
            row[key] = (
                ", ".join(f"{v:,}" for v in found)
                if found
                else ("not in summary.json" if summaries else "n/a")
            )
        row["backend"] = ", ".join(sorted({str(s.get("backend", "dense")) for s in summaries})) or "n/a"
        row["config drift"] = ", ".join(d.config_drift[:CONFIG_DIFF_SHOWN]) + (
            f" (+{len(d.config_drift) - CONFIG_DIFF_SHOWN} more)"
            if len(d.config_drift) > CONFIG_DIFF_SHOWN
            else ""
        )
        rows.append(row)
    return rows


def _markdown(rows: Sequence[Mapping[str, str]]) -> list[str]:
    head = [k for k in rows[0] if k != "name"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.get(k, "") for k in head) + " |" for r in rows]
    return lines


# ----- the report ----------------------------------------------------------------------------------------
def verdict_rule(spec: StudySpec) -> str:
    level = f"{spec.confidence:.0%}"
    return (
        f'Verdicts: "A < B" or "A > B" when the Holm-adjusted p over this study\'s {len(spec.contrasts)} '
        f'declared contrasts is below {spec.alpha:.2g}, else "no difference detected"; the {level} interval '
        'is per contrast (unadjusted), so an interval that excludes 0 can still read "no difference '
        'detected" after the correction. Paired t over the seeds both arms ran; Welch t otherwise.'
    )


def status_line(spec: StudySpec, data: Mapping[str, ArmData]) -> str:
    if spec.source_csv is not None:
        return f"Per-arm statistics from `{spec.source_csv}` (per-seed records were not committed)."
    done = sum(len(d.runs) for d in data.values())
    planned = len(spec.arms) * len(spec.seeds)
    missing = spec.missing_inputs()
    waiting = f"; waiting for {', '.join(missing)}" if missing else ""
    return f"Runs committed: {done} of {planned} planned{waiting}."


@dataclass(frozen=True)
class StudyReport:
    spec: StudySpec
    rows: list[ContrastRow]
    status: str
    path: Path


def make_protocol_report(spec: StudySpec, command: str | None = None) -> StudyReport:
    """Write the spec's contrasts.md, contrasts.csv, arms.csv and plots under spec.out."""
    data = load_committed(spec)
    rows = contrast_rows(spec, data)
    arms = arm_rows(spec, data)
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    status = status_line(spec, data)
    lines = [
        f"# {spec.title}",
        "",
        "Generated from the committed records by the command below; do not edit (verdicts are computed in "
        "`sparse_dm/reporting/contrasts.py`).",
        "",
        "```sh",
        *(
            []
            if spec.source_csv is not None
            else [f"python -m sparse_dm.study specs={spec.path}   # runs what is missing"]
        ),
        command or f"python -m sparse_dm.report --config-name study_results specs=[{spec.path}] results=null",
        "```",
        "",
        f"- Spec: `{spec.path}`",
        f"- Status: {status}",
        f"- Seeds (shared by every arm): {', '.join(map(str, spec.seeds))}; budget: {spec.budget_steps:,} "
        f"optimizer steps; recovery window W = {spec.recovery_window} steps",
        "",
    ]
    if spec.description:
        lines += [spec.description, ""]
    lines += ["## Contrasts", "", verdict_rule(spec), ""]
    lines += contrast_table(rows, spec.confidence, any(r.spec.claim for r in rows))
    notes = _grouped_notes(rows)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    intervals = plot_contrasts(rows, spec.confidence, out / "plots" / f"{CONTRASTS_FIGURE}.png")
    if intervals is not None:
        lines += ["", f"![Every tested contrast with its interval]({intervals.relative_to(out).as_posix()})"]
    if spec.selection is not None:
        result = selection_result(spec, rows)
        lines += ["", "## Selection", ""]
        rule = (
            f"Rule (fixed in the spec before the runs): the value of `{spec.selection.factor}` whose "
            "contrasts "
            f"have the lowest mean difference A − B; it feeds {spec.selection.feeds}."
        )
        if isinstance(result, str):
            lines += [rule, "", f"Result: {result}."]
        else:
            best, means = result
            per_value = ", ".join(f"{v}: {m:+.{DIGITS}f}" for v, m in means.items())
            lines += [
                rule,
                "",
                f"Result: **{spec.selection.factor} = {best}** (mean differences {per_value}).",
            ]
    figures = [
        (f, plot_figure(f, rows, spec.confidence, out / "plots" / f"{f.name}.png")) for f in spec.figures
    ]
    for fig_spec, path in figures:
        lines += ["", f"## {fig_spec.title}", ""]
        lines.append(
            f"![{fig_spec.title}]({path.relative_to(out).as_posix()})"
            if path
            else "Not drawn: no contrast of it has an interval yet."
        )
    lines += ["", "## Arms", "", *_markdown(arms)]
    if spec.limits:
        lines += ["", "## What this study cannot answer", "", *[f"- {x}" for x in spec.limits]]
    report = out / REPORT
    report.write_text("\n".join(lines) + "\n")
    _write_csv(out / CONTRASTS_CSV, _contrast_records(rows, spec))
    _write_csv(out / ARMS_CSV, arms)
    return StudyReport(spec, rows, status, report)


def _grouped_notes(rows: Sequence[ContrastRow]) -> list[str]:
    """The notes of tested contrasts, each once with the contrasts it applies to (an untested
    contrast's reasons are already its verdict)."""
    by_note: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.estimate is not None:
            for n in r.notes:
                if n:
                    by_note[n].append(r.index)
    return [f"#{', #'.join(map(str, idx))}: {n}" for n, idx in by_note.items()]


def _contrast_records(rows: Sequence[ContrastRow], spec: StudySpec) -> list[dict[str, Any]]:
    records = []
    for r in rows:
        e = r.estimate
        records.append(
            {
                "index": r.index, "a": r.spec.a, "b": r.spec.b, "metric": r.spec.metric,
                "metric_b": r.spec.metric_b, "step": r.spec.step or spec.budget_steps,
                "test": None if e is None else e.test, "n_a": None if e is None else e.n_a,
                "n_b": None if e is None else e.n_b, "n_pairs": None if e is None else e.n_pairs,
                "difference": None if e is None else e.difference, "ci_low": None if e is None else e.low,
                "ci_high": None if e is None else e.high, "df": None if e is None else e.df,
                "t": None if e is None else e.t, "p": None if e is None else e.p, "p_holm": r.p_holm,
                "verdict": r.verdict, "factors": json.dumps(dict(r.spec.factors)), "claim": r.spec.claim,
                "notes": "; ".join(r.notes),
            }
        )  # fmt: skip
    return records


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def write_results(reports: Sequence[StudyReport], path: Path, command: str) -> Path:
    """docs/results.md: every study's contrast table, verdicts as computed, linked to its report."""
    lines = [
        "# Results",
        "",
        "Generated from the committed study records by the command below; do not edit. Every verdict is "
        "computed from a pre-declared contrast (difference, interval, Holm-adjusted p) in "
        "`sparse_dm/reporting/contrasts.py`; none is typed by hand. Each study's full report (arms, "
        "notes, figures) is linked under its title.",
        "",
        "```sh",
        command,
        "```",
    ]
    for rep in reports:
        spec = rep.spec
        link = os.path.relpath(rep.path, path.parent)
        lines += ["", f"## {spec.title}", "", f"[Full report]({Path(link).as_posix()}). {rep.status}", ""]
        if spec.description:
            lines += [spec.description, ""]
        lines += [verdict_rule(spec), ""]
        lines += contrast_table(rep.rows, spec.confidence, any(r.spec.claim for r in rep.rows))
        if spec.limits:
            lines += ["", "Cannot be answered by this study:", "", *[f"- {x}" for x in spec.limits]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
