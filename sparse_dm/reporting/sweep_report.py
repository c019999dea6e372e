"""The paper-layout report of finished runs: Table 1/2 and the full grid as markdown and CSV, Fig. 2/3/8
plots and Table 8 (DDIM steps), from every summary.json below the given folders.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from sparse_dm.reporting.plots import plot_prune_rate, plot_section
from sparse_dm.reporting.tables import (
    METRICS,
    Group,
    Section,
    build_sections,
    choose_metric,
    group_runs,
    load_summaries,
)
from sparse_dm.run.summary import STEPS_KEY

METRIC_DIGITS = {"fid": 2, "val_loss": 4, "val_loss_raw": 4, "val_loss_ema": 4}


MIN_RATES_FOR_P_PLOT = 3  # Appendix H sweeps p over 5 values; two rates are just Fig. 2 vs Fig. 9




def _mark(text: str, bold: bool, underline: bool) -> str:
    """The paper's marks: bold beats dense, underline is the top sparse model."""
    text = f"<u>{text}</u>" if underline else text
    return f"**{text}**" if bold else text


def _params(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{round(n):,}"


def _score(g: Group, metric: str) -> str:
    digits = METRIC_DIGITS[metric]
    return f"{g.mean:.{digits}f} ± {g.sd:.{digits}f}" if g.values else "n/a"


def _seeds(g: Group) -> str:
    return ",".join(str(s) for s in sorted(g.runs))


def _sparse_row(section: Section, g: Group, metric: str, first: str) -> str:
    top = section.top_sparse()
    score = _mark(_score(g, metric), section.beats_dense(g), g is top)
    return (
        f"| {first} | {score} | {_seeds(g)} | {g.params_ratio:.2f} | "
        f"{g.cost('flops_train_ratio'):.2f} | {g.cost('flops_test_ratio'):.2f} |"
    )


def _dense_row(section: Section, metric: str) -> str:
    """Absolute dense costs (from the dense runs, or the dense figures every sparse summary records)."""
    ref = section.dense or section.sparse[0]
    score = _score(section.dense, metric) if section.dense else "missing"
    seeds = _seeds(section.dense) if section.dense else "-"
    return (
        f"| Dense | {score} | {seeds} | {_params(ref.cost('params_total'))} | "
        f"{ref.cost('flops_train_dense'):.2e} | {ref.cost('flops_test_per_sample_dense'):.2e} |"
    )


def section_markdown(section: Section, metric: str, plot: Path, out: Path) -> list[str]:
    """Best-per-method table (Table 1/2), the full grid, and the figure for one section."""
    name = METRICS[metric]
    header = f"| Approach | {name} ± SD | Seeds | Params | Train FLOPs | Test FLOPs |"
    rule = "|---|---|---|---|---|---|"
    lines = [f"## {section.title}", ""]
    if section.dense is None:
        lines += [
            "> Dense baseline missing: no run is marked as beating it; sparse costs are normalised "
            "with the dense figures recorded in their own summaries.",
            "",
        ]
    lines += [
        "Best sparsity per method (paper Table 1/2 layout):",
        "",
        header,
        rule,
        _dense_row(section, metric),
    ]
    lines += [_sparse_row(section, g, metric, g.label) for g in section.best_per_method()]
    lines += ["", "All configurations:", "", header.replace("Approach", "Method, S"), rule]
    lines += [_sparse_row(section, g, metric, g.label) for g in section.sparse]
    lines += ["", f"![{section.title}]({plot.relative_to(out).as_posix()})", ""]
    return lines


def steps_markdown(sections: list[Section]) -> list[str]:
    """Table 8: FID of each configuration at several DDIM step counts (mean over evaluated seeds)."""
    lines: list[str] = []
    for section in sections:
        groups = [
            g for g in [section.dense, *section.sparse] if g and any(STEPS_KEY in s for s in g.runs.values())
        ]
        steps = sorted({int(k) for g in groups for s in g.runs.values() for k in s.get(STEPS_KEY, {})})
        if len(steps) < 2:
            continue

        def fid_at(g: Group, n: int) -> float | None:
            vals = [s[STEPS_KEY][str(n)]["fid"] for s in g.runs.values() if str(n) in s.get(STEPS_KEY, {})]
            return statistics.fmean(vals) if vals else None

        dense = {n: fid_at(section.dense, n) for n in steps} if section.dense else {}
        lines += [
            f"## FID by DDIM sampling steps (Table 8): {section.title}",
            "",
            "| Approach | " + " | ".join(f"{n} steps" for n in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for g in groups:
            cells = []
            for n in steps:
                v, d = fid_at(g, n), dense.get(n)
                text = "n/a" if v is None else f"{v:.2f}"
                cells.append(_mark(text, g.method != "dense" and None not in (v, d) and v < d, False))
            lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def prune_rate_plots(groups: list[Group], metric: str, plot_dir: Path) -> list[Path]:
    """Fig. 8 (Appendix H) for each (model, dataset, S) whose DST runs cover several prune rates."""
    by_key: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        if g.prune_rate is not None and g.values:
            by_key[(g.model, g.dataset, g.sparsity)].append(g)
    dense = {(g.model, g.dataset): g for g in groups if g.method == "dense"}
    paths = []
    for (model, dataset, _), series in sorted(by_key.items()):
        if len({g.prune_rate for g in series}) >= MIN_RATES_FOR_P_PLOT:
            paths.append(plot_prune_rate(series, dense.get((model, dataset)), metric, plot_dir))
    return paths


def write_csv(sections: list[Section], metric: str, path: Path) -> None:
    """Every row of every section, with the paper's marks as boolean columns."""
    fields = [
        "model",
        "dataset",
        "section_prune_rate",
        "method",
        "sparsity",
        "prune_rate",
        "seeds",
        "metric",
        "mean",
        "sd",
        "params_active",
        "params_ratio",
        "flops_train",
        "flops_train_ratio",
        "flops_test_per_sample",
        "flops_test_ratio",
        "best_of_method",
        "beats_dense",
        "top_sparse",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for section in sections:
            best = section.best_per_method()
            top = section.top_sparse()
            for g in [section.dense, *section.sparse]:
                if g is None:
                    continue
                writer.writerow(
                    {
                        "model": g.model,
                        "dataset": g.dataset,
                        "section_prune_rate": section.prune_rate,
                        "method": g.method,
                        "sparsity": g.sparsity,
                        "prune_rate": g.prune_rate,
                        "seeds": _seeds(g),
                        "metric": metric,
                        "mean": g.mean,
                        "sd": g.sd,
                        "params_active": g.cost("params_active"),
                        "params_ratio": g.params_ratio,
                        "flops_train": g.cost("flops_train"),
                        "flops_train_ratio": g.cost("flops_train_ratio"),
                        "flops_test_per_sample": g.cost("flops_test_per_sample"),
                        "flops_test_ratio": g.cost("flops_test_ratio"),
                        "best_of_method": g in best,
                        "beats_dense": section.beats_dense(g),
                        "top_sparse": g is top,
                    }
                )


def make_report(dirs: list[Path], out: Path, metric: str | None = None) -> Path:
    """Write report.md, report.csv and plots/ under out; returns the report path."""
    summaries = load_summaries(dirs)
    if not summaries:
        raise FileNotFoundError(f"no summary.json found below {', '.join(map(str, dirs))}")
    metric = choose_metric(summaries, metric)
    groups, notes = group_runs(summaries, metric)
    sections = build_sections(groups)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sparse-to-sparse diffusion: results",
        "",
        f"Metric: {METRICS[metric]} (lower is better), mean ± SD over seeds, from {len(summaries)} "
        "runs. Sparse Params / FLOPs are normalised to Dense; Test FLOPs are per sample. "
        "**Bold**: beats Dense; <u>underlined</u>: top sparse model.",
        "",
    ]
    lines += [f"> Note: {n}" for n in notes] + ([""] if notes else [])
    for section in sections:
        lines += section_markdown(section, metric, plot_section(section, metric, plot_dir), out)
    lines += steps_markdown(sections)
    p_plots = prune_rate_plots(groups, metric, plot_dir)
    if p_plots:
        lines += ["## Prune and regrowth rate (Appendix H, Fig. 8)", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in p_plots] + [""]
    write_csv(sections, metric, out / "report.csv")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
