"""The study's figures: loss vs S per method, learning curves, p comparison at one S, sample grids.

Every loss figure draws the dense reference as its mean (dashed) with a ± SD band, so a sparse arm's
distance to dense reads off in seed SDs. Agg canvas only, as sparse_dm.reporting.plots.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from sparse_dm.reporting.plots import BAND_ALPHA, DENSE_COLOR, DPI, FIGSIZE, METHOD_STYLE
from sparse_dm.reporting.seed_stats import SeedStats
from sparse_dm.reporting.study import ArmRow, Curve
from sparse_dm.reporting.tables import METHOD_LABELS, METRICS

P_OFFSET = 0.012  # x shift of other-p markers so they do not hide the main-p point at the same S
OTHER_P_LINE = ":"
GRID_COLUMNS = 3
GRID_PANEL_INCHES = 4.0


def _sd(s: SeedStats) -> float:
    """Error bar half-width: the SD, or none for a single seed (undefined SD)."""
    return 0.0 if math.isnan(s.sd) else s.sd


def _dense_band(ax, dense: ArmRow | None) -> None:
    if dense is None or dense.primary.n == 0:
        ax.text(0.02, 0.98, "no dense reference", transform=ax.transAxes, va="top", fontsize="small")
        return
    m, sd = dense.primary.mean, _sd(dense.primary)
    ax.axhline(m, color=DENSE_COLOR, linestyle="--", label=f"Dense (n = {dense.primary.n})")
    ax.axhspan(m - sd, m + sd, color=DENSE_COLOR, alpha=BAND_ALPHA / 2)


def _finish(ax, fig, title: str, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=BAND_ALPHA)
    ax.legend(fontsize="small")
    fig.savefig(path, bbox_inches="tight")
    return path


def _style(method: str) -> tuple[str, str]:
    return METHOD_STYLE.get(method, ("tab:gray", "x"))


def _dense_row(rows: Sequence[ArmRow]) -> ArmRow | None:
    return next((r for r in rows if r.group.method == "dense"), None)


def plot_loss_vs_sparsity(rows: Sequence[ArmRow], main_p: float, metric: str, path: Path) -> Path:
    """Fig. 2/3 for the study: a line per method over S at the main p (static has no p), SD error
    bars; arms at other p as separate open markers beside their S."""
    fig = _panels(1, FIGSIZE)
    ax = fig.axes[0]
    lines: dict[str, list[ArmRow]] = defaultdict(list)
    for r in rows:
        if r.group.method == "dense" or r.primary.n == 0:
            continue
        p = r.group.prune_rate
        if p is None or math.isclose(p, main_p):
            lines[r.group.method].append(r)
        else:
            color, marker = _style(r.group.method)
            ax.errorbar(
                [r.group.sparsity + P_OFFSET],
                [r.primary.mean],
                yerr=[_sd(r.primary)],
                color=color,
                marker=marker,
                markerfacecolor="none",
                linestyle="none",
                capsize=3,
                label=f"{METHOD_LABELS.get(r.group.method, r.group.method)}, p = {p:g}",
            )
    for method, series in lines.items():
        series.sort(key=lambda r: r.group.sparsity)
        color, marker = _style(method)
        ax.errorbar(
            [r.group.sparsity for r in series],
            [r.primary.mean for r in series],
            yerr=[_sd(r.primary) for r in series],
            color=color,
            marker=marker,
            capsize=3,
            label=METHOD_LABELS.get(method, method) + _p_suffix(series[0].group.prune_rate),
        )
    _dense_band(ax, _dense_row(rows))
    title = f"{METRICS[metric]} vs sparsity (mean ± SD over seeds)"
    return _finish(ax, fig, title, "sparsity S", METRICS[metric], path)


def plot_learning_curves(
    curves: Sequence[tuple[ArmRow, Curve]], main_p: float, ylabel: str, path: Path
) -> Path:
    """One panel per sparsity level, each with the dense curve: mean line and ± SD band per arm."""
    dense = [(r, c) for r, c in curves if r.group.method == "dense"]
    levels = sorted({r.group.sparsity for r, _ in curves if r.group.method != "dense"}) or [0.0]
    fig = _panels(len(levels), FIGSIZE)
    for ax, level in zip(fig.axes, levels, strict=True):
        for row, curve in [*dense, *((r, c) for r, c in curves if r.group.sparsity == level)]:
            if not curve.steps:
                continue
            method = row.group.method
            color = DENSE_COLOR if method == "dense" else _style(method)[0]
            p = row.group.prune_rate
            line = "--" if method == "dense" else "-"
            line = OTHER_P_LINE if p is not None and not math.isclose(p, main_p) else line
            mean = np.array([s.mean for s in curve.stats])
            sd = np.array([_sd(s) for s in curve.stats])
            label = "Dense" if method == "dense" else row.label.split(", S = ")[0] + _p_suffix(p)
            ax.plot(curve.steps, mean, color=color, linestyle=line, label=f"{label} (n = {row.primary.n})")
            ax.fill_between(curve.steps, mean - sd, mean + sd, color=color, alpha=BAND_ALPHA)
        ax.set_title(f"S = {level:g}", fontsize="medium")
        ax.set_yscale("log")  # the untrained step-0 loss would otherwise flatten the gaps that matter
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=BAND_ALPHA)
        ax.legend(fontsize="x-small")
    fig.savefig(path, bbox_inches="tight")
    return path


def _p_suffix(p: float | None) -> str:
    return "" if p is None else f", p = {p:g}"


def _panels(count: int, size: tuple[float, float], columns: int | None = None) -> Figure:
    """A figure of count panels of the given size each, columns wide."""
    columns = columns or count
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    for i in range(count):
        fig.add_subplot(rows, columns, i + 1)
    return fig


def plot_p_comparison(rows: Sequence[ArmRow], sparsity: float, metric: str, path: Path) -> Path | None:
    """Fig. 10 at one S: each DST method's prune rates side by side (mean ± SD), dense band and
    Static-DM at the same S (p-independent) as references. None when no method has two p there."""
    at_s = [r for r in rows if math.isclose(r.group.sparsity, sparsity) and r.primary.n]
    by_method: dict[str, list[ArmRow]] = defaultdict(list)
    for r in at_s:
        if r.group.prune_rate is not None:
            by_method[r.group.method].append(r)
    methods = [m for m, rs in by_method.items() if len({r.group.prune_rate for r in rs}) > 1]
    if not methods:
        return None
    fig = _panels(1, FIGSIZE)
    ax = fig.axes[0]
    rates = sorted({r.group.prune_rate for m in methods for r in by_method[m]})
    width = 0.8 / len(rates)
    markers = "os^Dv<>"
    for j, p in enumerate(rates):
        xs, ms, sds = [], [], []
        for i, m in enumerate(methods):
            hit = [r for r in by_method[m] if r.group.prune_rate == p]
            if hit:
                xs.append(i + (j - (len(rates) - 1) / 2) * width)
                ms.append(hit[0].primary.mean)
                sds.append(_sd(hit[0].primary))
        marker = markers[j % len(markers)]
        ax.errorbar(xs, ms, yerr=sds, marker=marker, linestyle="none", capsize=4, label=f"p = {p:g}")
    static = next((r for r in at_s if r.group.method == "static"), None)
    if static is not None:
        label = f"Static-DM, S = {sparsity:g}"
        ax.axhline(static.primary.mean, color=_style("static")[0], linestyle=":", label=label)
    _dense_band(ax, _dense_row(rows))
    ax.set_xticks(range(len(methods)), [METHOD_LABELS.get(m, m) for m in methods])
    ax.set_xlim(-0.5, len(methods) - 0.5)
    title = f"Prune rate p at S = {sparsity:g} (mean ± SD over seeds)"
    return _finish(ax, fig, title, "method", METRICS[metric], path)


def plot_sample_grids(panels: Sequence[tuple[str, Path | None]], path: Path) -> Path:
    """The given sample-grid PNGs side by side, each titled; a missing grid is a labelled blank panel."""
    columns = min(GRID_COLUMNS, len(panels))
    fig = _panels(len(panels), (GRID_PANEL_INCHES, GRID_PANEL_INCHES), columns)
    for ax, (title, png) in zip(fig.axes, panels, strict=True):
        ax.set_axis_off()
        ax.set_title(title, fontsize="small")
        if png is None:
            ax.text(0.5, 0.5, "no sample grid", ha="center", va="center", transform=ax.transAxes)
            continue
        with Image.open(png) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
    fig.savefig(path, bbox_inches="tight")
    return path
