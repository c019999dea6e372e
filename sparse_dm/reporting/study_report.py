"""The study layout of sparse_dm.report (`--config-name study`): a multi-seed comparison of arms
(method, S, p) with the dense reference, written as OUT/report.md, OUT/report.csv and OUT/plots/.

The header records the commands that made the sweep (rebuilt from Hydra's multirun.yaml) and the
report, so the committed report says how to regenerate itself.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sparse_dm.reporting.seed_stats import SeedStats
from sparse_dm.reporting.study import (
    SKETCH_KEYS,
    ArmRow,
    Curve,
    SweepRecord,
    arm_curve,
    arm_rows,
    data_sketch,
    final_sample,
    sweep_records,
)
from sparse_dm.reporting.study_plots import (
    plot_learning_curves,
    plot_loss_vs_sparsity,
    plot_p_comparison,
    plot_sample_grids,
)
from sparse_dm.reporting.tables import METRIC_KEYS, METRICS, Group, group_runs, load_summaries

LOSS_DIGITS = 4
STAT_DIGITS = 3
GAP_DIGITS = 1
SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class StudyOptions:
    """conf/study.yaml's `study` block, validated (see study_options)."""

    primary: str
    secondary: str
    confidence: float
    main_prune_rate: float
    grid_sparsity: float
    grid_seed: int
    sketch: tuple[str, ...]


def study_options(cfg: DictConfig) -> StudyOptions:
    """Validate the `study` block before any file is read; errors name the key and allowed values."""
    losses = sorted(METRIC_KEYS)
    for key in ("primary", "secondary"):
        if cfg[key] not in METRIC_KEYS:
            raise ValueError(f"invalid config: study.{key}={cfg[key]!r}; allowed: one of {losses}")
    if not 0.0 < float(cfg.confidence) < 1.0:
        raise ValueError(f"invalid config: study.confidence={cfg.confidence}; allowed: 0 < confidence < 1")
    for key in ("main_prune_rate", "grid_sparsity"):
        if not 0.0 <= float(cfg[key]) < 1.0:
            raise ValueError(f"invalid config: study.{key}={cfg[key]}; allowed: 0 <= value < 1")
    unknown = sorted(set(cfg.sketch) - set(SKETCH_KEYS))
    if unknown:
        raise ValueError(f"invalid config: study.sketch has {unknown}; allowed: {list(SKETCH_KEYS)}")
    return StudyOptions(
        cfg.primary,
        cfg.secondary,
        float(cfg.confidence),
        float(cfg.main_prune_rate),
        float(cfg.grid_sparsity),
        int(cfg.grid_seed),
        tuple(cfg.sketch),
    )


# ----- cells ------------------------------------------------------------------------------------------
def _stat(s: SeedStats, digits: int) -> str:
    if s.n == 0:
        return "n/a"
    sd = "n/a (1 seed)" if math.isnan(s.sd) else f"{s.sd:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {sd}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _difference_cells(row: ArmRow) -> list[str]:
    """Δ, interval, whether it excludes 0, and the gap in dense SDs."""
    if row.group.method == "dense":
        return ["reference", "", "", ""]
    d = row.vs_dense
    if d is None:
        return ["no dense reference", "", "", ""]
    if d.low is None or d.high is None:
        interval, excludes = f"none: {d.reason}", "n/a"
    else:
        interval = f"[{_signed(d.low, LOSS_DIGITS)}, {_signed(d.high, LOSS_DIGITS)}]"
        excludes = "yes" if d.excludes_zero else "no"
    gap = "n/a (dense SD undefined)" if row.gap_dense_sds is None else f"{row.gap_dense_sds:+.{GAP_DIGITS}f}"
    return [_signed(d.mean, LOSS_DIGITS), interval, excludes, gap]


def _distinct(values: Sequence[Any]) -> str:
    unique = sorted(set(values))
    text = ", ".join(str(v) for v in unique)
    return text if len(unique) == 1 else f"{text} (differs between runs)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _minutes(seconds: float) -> str:
    return f"{seconds / SECONDS_PER_MINUTE:.1f} min"


def _sweep_lines(record: SweepRecord) -> list[str]:
    where = "runs outside any Hydra multirun folder" if record.root is None else str(record.root)
    if record.wall_s is None:
        reason = f"{record.missing_start} of {record.runs} runs lack .hydra/hydra.yaml"
        wall = f"not measured ({reason}); summed run time {_minutes(record.job_seconds)}"
    else:
        wall = (
            f"{_minutes(record.wall_s)} from the first job's start to the last job's end "
            f"(summed run time {_minutes(record.job_seconds)}, "
            f"{record.job_seconds / record.wall_s:.2f} jobs in parallel on average)"
        )
    planned = "an uncounted number of" if record.planned is None else str(record.planned)
    return [f"  - `{where}`: {record.runs} finished of {planned} planned runs; wall time {wall}"]


# ----- report -----------------------------------------------------------------------------------------
def _header(
    summaries: list[dict[str, Any]], records: list[SweepRecord], command: str | None, groups: list[Group]
) -> list[str]:
    commands = [r.command or "(not recorded: some runs have no multirun.yaml above them)" for r in records]
    report_cmd = command or "(not recorded: the report was not made from the command line)"
    model, dataset = groups[0].model, groups[0].dataset
    seeds = sorted({int(s["seed"]) for s in summaries})
    lines = [
        "# Sparse-to-sparse diffusion: multi-seed study",
        "",
        "Made by (sweep, then report; run from the repository root):",
        "",
        "```sh",
        *commands,
        report_cmd,
        "```",
        "",
        f"- Model / dataset: {model} / {dataset}; "
        f"{_count(len(summaries), 'run')} in {_count(len(groups), 'arm')}",
        f"- Training steps: {_distinct([int(s['train_steps']) for s in summaries])}",
        f"- Mask update interval Te: {_distinct([int(s['update_interval']) for s in summaries])} steps",
        f"- Seeds: {', '.join(map(str, seeds))}",
        "- Sweep wall time (a job starts when Hydra writes its .hydra/hydra.yaml and ends wall_time_s "
        "later, the run's own timer from config validation to summary.json):",
        *[line for r in records for line in _sweep_lines(r)],
        "",
    ]
    return lines


def _loss_table(rows: list[ArmRow], opts: StudyOptions) -> list[str]:
    level = f"{opts.confidence:.0%}"
    lines = [
        f"| Arm | n | {METRICS[opts.primary]} ± SD | {METRICS[opts.secondary]} ± SD | Δ vs dense | "
        f"{level} Welch interval | Excludes 0 | Gap (dense SDs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r.label,
            str(r.primary.n),
            _stat(r.primary, LOSS_DIGITS),
            _stat(r.secondary, LOSS_DIGITS),
            *_difference_cells(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sketch_table(rows: list[ArmRow], data: dict[str, SeedStats], opts: StudyOptions) -> list[str]:
    keys = opts.sketch
    lines = [
        "| Arm | n | " + " | ".join(keys) + " | Exploration rate | Mask updates |",
        "|---|---|" + "---|" * (len(keys) + 2),
        "| Data (reference drawings) | | " + " | ".join(_stat(data[k], STAT_DIGITS) for k in keys) + " | | |",
    ]
    for r in rows:
        cells = [r.label, str(len(r.group.runs))]
        cells += [_stat(r.sketch[k], STAT_DIGITS) for k in keys]
        cells += [_stat(r.exploration, STAT_DIGITS), f"{r.mask_updates.mean:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _csv(rows: list[ArmRow], opts: StudyOptions, path: Path) -> None:
    p, s = opts.primary, opts.secondary
    fields = [
        "model", "dataset", "arm", "method", "sparsity", "prune_rate", "n", "seeds",
        f"{p}_mean", f"{p}_sd", f"{s}_mean", f"{s}_sd",
        "diff_vs_dense", "ci_low", "ci_high", "welch_df", "ci_excludes_zero", "ci_note", "gap_dense_sds",
        *(f"sample_{k}_{stat}" for k in opts.sketch for stat in ("mean", "sd")),
        "exploration_rate_mean", "mask_updates_mean",
    ]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            g, d = r.group, r.vs_dense
            record = {
                "model": g.model,
                "dataset": g.dataset,
                "arm": r.label,
                "method": g.method,
                "sparsity": g.sparsity,
                "prune_rate": g.prune_rate,
                "n": r.primary.n,
                "seeds": " ".join(str(seed) for seed in sorted(g.runs)),
                f"{p}_mean": r.primary.mean,
                f"{p}_sd": r.primary.sd,
                f"{s}_mean": r.secondary.mean,
                f"{s}_sd": r.secondary.sd,
                "diff_vs_dense": None if d is None else d.mean,
                "ci_low": None if d is None else d.low,
                "ci_high": None if d is None else d.high,
                "welch_df": None if d is None else d.df,
                "ci_excludes_zero": None if d is None else d.excludes_zero,
                "ci_note": None if d is None else d.reason,
                "gap_dense_sds": r.gap_dense_sds,
                "exploration_rate_mean": r.exploration.mean,
                "mask_updates_mean": r.mask_updates.mean,
            }
            for k in opts.sketch:
                record[f"sample_{k}_mean"] = r.sketch[k].mean
                record[f"sample_{k}_sd"] = r.sketch[k].sd
            writer.writerow(record)


def _sample_panels(rows: list[ArmRow], opts: StudyOptions) -> list[tuple[str, Path | None]]:
    """Dense and every arm at grid_sparsity: that arm's grid_seed run's final sample grid."""
    chosen = [
        r for r in rows if r.group.method == "dense" or math.isclose(r.group.sparsity, opts.grid_sparsity)
    ]
    panels = []
    for r in chosen:
        run = r.group.runs.get(opts.grid_seed)
        if run is None:
            panels.append((f"{r.label}\nseed {opts.grid_seed} not run", None))
            continue
        png = final_sample(run)
        note = f"seed {opts.grid_seed}, {png.stem}" if png else f"seed {opts.grid_seed}: no samples"
        panels.append((f"{r.label}\n{note}", png))
    return panels


def _figures(
    rows: list[ArmRow], curves: list[tuple[ArmRow, Curve]], opts: StudyOptions, plot_dir: Path
) -> list[tuple[str, Path | None]]:
    """The four study figures as (title, path); the p comparison is None when it has nothing to show."""
    s = f"{opts.grid_sparsity:g}"
    return [
        (
            "Validation loss vs sparsity",
            plot_loss_vs_sparsity(
                rows, opts.main_prune_rate, opts.primary, plot_dir / "loss_vs_sparsity.png"
            ),
        ),
        (
            "Learning curves",
            plot_learning_curves(
                curves, opts.main_prune_rate, METRICS[opts.primary], plot_dir / "learning_curves.png"
            ),
        ),
        (
            f"Prune rate p at S = {s}",
            plot_p_comparison(rows, opts.grid_sparsity, opts.primary, plot_dir / "prune_rate.png"),
        ),
        (
            f"Samples at S = {s} (and dense)",
            plot_sample_grids(_sample_panels(rows, opts), plot_dir / "samples.png"),
        ),
    ]


def _figure(title: str, path: Path | None, out: Path) -> list[str]:
    if path is None:
        return [f"### {title}", "", "Not drawn: no DST method was run at two prune rates at this S.", ""]
    return [f"### {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]


def make_study_report(dirs: list[Path], out: Path, opts: StudyOptions, command: str | None = None) -> Path:
    """Write report.md, report.csv and plots/ for the study below dirs; returns the report path."""
    summaries = load_summaries(dirs)
    if not summaries:
        raise FileNotFoundError(f"no summary.json found below {', '.join(map(str, dirs))}")
    groups, notes = group_runs(summaries, opts.primary)
    tasks = sorted({(g.model, g.dataset) for g in groups})
    if len(tasks) > 1:
        raise ValueError(
            f"the study layout compares arms of one (model, dataset); found {tasks}: "
            "report each task's sweep_dir separately, or use layout=paper"
        )
    rows = arm_rows(groups, opts.primary, opts.secondary, opts.confidence, opts.sketch)
    has_dense = any(r.group.method == "dense" and r.primary.n for r in rows)
    records = sweep_records(summaries)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r.primary.n]
    curves = [(r, arm_curve(r.group, METRIC_KEYS[opts.primary])) for r in scored]
    figures = _figures(rows, curves, opts, plot_dir)
    dropped = [
        f"{r.label}: {c.dropped_steps} logged steps lack a seed; curve uses the rest"
        for r, c in curves
        if c.dropped_steps
    ]
    lines = _header(summaries, records, command, groups)
    if not has_dense:
        lines += ["> No dense reference: no dense run has the primary metric; no differences to dense.", ""]
    lines += [f"> Note: {n}" for n in [*notes, *dropped]] + ([""] if notes or dropped else [])
    lines += [
        "## Validation loss per arm",
        "",
        f"Primary metric: {METRICS[opts.primary]} (summary `{METRIC_KEYS[opts.primary]}`, fixed timesteps "
        "and noise, at the last step; lower is better), mean ± sample SD over seeds. Δ is arm − dense with "
        f"Welch's {opts.confidence:.0%} t-interval (unequal variances); the gap is Δ in dense seed SDs.",
        "",
        *_loss_table(rows, opts),
        "",
        "## Samples and sparse-training statistics per arm",
        "",
        "Sketch statistics of the final samples (mean ± SD over seeds) against the reference drawings; "
        "exploration rate: fraction of prunable weights ever active; mask updates: per run.",
        "",
        *_sketch_table(rows, data_sketch(groups, opts.sketch), opts),
        "",
        "## Figures",
        "",
    ]
    for title, path in figures:
        lines += _figure(title, path, out)
    _csv(rows, opts, out / "report.csv")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
