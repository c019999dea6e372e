"""The figures of a study report: each tested contrast's difference with its interval (one panel per
metric), and a spec's factor figures (difference against a factor such as Te, one line per series).

Built on matplotlib's Agg canvas directly (no pyplot), as reporting/plots.py, so reports render headless.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from sparse_dm.reporting.contrasts import NO_DIFFERENCE
from sparse_dm.reporting.plots import DPI, FIGSIZE
from sparse_dm.reporting.protocol import FigureSpec
from sparse_dm.reporting.protocol_contrasts import ContrastRow

LOG_X_RATIO = 4.0  # factor values spanning this ratio or more (Te 16 .. 160) are drawn on a log axis
DODGE = 0.2  # series spread over this fraction of the smallest gap between factor values
ROW_INCHES = 0.32  # height of one contrast in the contrasts figure
PANEL_INCHES = 0.9  # a panel's title and axis
LABEL_INCHES = 4.0  # room for the contrast labels beside the panels
X_TICKS = 6
DETECTED_COLOR, NOT_DETECTED_COLOR = "tab:red", "tab:gray"


def _metric_of(r: ContrastRow) -> str:
    return r.spec.metric if r.spec.metric_b == r.spec.metric else f"{r.spec.metric} − {r.spec.metric_b}"


def _detected(r: ContrastRow) -> bool:
    """A verdict "A < B" / "A > B": the Holm-adjusted p is below the spec's alpha."""
    return r.estimate is not None and r.p_holm is not None and r.verdict != NO_DIFFERENCE


def plot_contrasts(rows: Sequence[ContrastRow], confidence: float, path: Path) -> Path | None:
    """Every contrast with an interval, one panel per metric: the difference A − B with its unadjusted
    interval, filled where the Holm-adjusted verdict detects it. None: no contrast has an interval yet."""
    panels: dict[str, list[ContrastRow]] = defaultdict(list)
    for r in rows:
        if r.estimate is not None and r.estimate.low is not None:
            panels[_metric_of(r)].append(r)
    if not panels:
        return None
    heights = [len(group) * ROW_INCHES + PANEL_INCHES for group in panels.values()]
    fig = Figure(figsize=(FIGSIZE[0] + LABEL_INCHES, sum(heights)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (metric, group) in zip(axes, panels.items(), strict=True):
        y = list(range(len(group)))[::-1]  # the spec's order, top to bottom
        for yi, r in zip(y, group, strict=True):
            e = r.estimate
            color = DETECTED_COLOR if _detected(r) else NOT_DETECTED_COLOR
            ax.errorbar(
                [e.difference], [yi], xerr=[[e.difference - e.low], [e.high - e.difference]], fmt="o",
                capsize=3, color=color, markerfacecolor=color if _detected(r) else "white",
            )  # fmt: skip
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [f"#{r.index} {r.label.removesuffix(f' ({r.spec.metric})')}" for r in group])
        ax.set_ylim(-0.7, len(group) - 0.3)
        ax.set_title(metric, fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=X_TICKS))  # readable however small the differences
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(
        f"difference A − B, {confidence:.0%} interval (unadjusted); filled red: detected after Holm"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _series_label(factors: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k} = {factors[k]}" for k in keys)


def _dodged(x: float, i: int, n: int, xs: Sequence[float], log_x: bool) -> float:
    """Series i of n drawn beside the others at the same factor value, so intervals do not hide each
    other: a shift of up to DODGE of the smallest gap between factor values (a ratio on a log axis)."""
    offset = (i - (n - 1) / 2) * DODGE / max(n - 1, 1)
    if log_x:
        gap = min((b / a for a, b in pairwise(xs)), default=2.0)
        return x * gap**offset
    gap = min((b - a for a, b in pairwise(xs)), default=1.0)
    return x + gap * offset


def plot_figure(
    fig_spec: FigureSpec, rows: Sequence[ContrastRow], confidence: float, path: Path
) -> Path | None:
    """Differences with their intervals against the factor, one line per series; None: nothing to draw."""
    keys = (fig_spec.x, *fig_spec.series)
    series: dict[str, list[ContrastRow]] = defaultdict(list)
    for r in rows:
        if all(k in r.spec.factors for k in keys) and r.estimate is not None and r.estimate.low is not None:
            series[_series_label(r.spec.factors, fig_spec.series)].append(r)
    if not series:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = sorted({float(r.spec.factors[fig_spec.x]) for group in series.values() for r in group})
    log_x = xs[0] > 0 and xs[-1] / xs[0] >= LOG_X_RATIO
    for i, (label, group) in enumerate(sorted(series.items())):
        group.sort(key=lambda r: float(r.spec.factors[fig_spec.x]))
        x = [_dodged(float(r.spec.factors[fig_spec.x]), i, len(series), xs, log_x) for r in group]
        y = [r.estimate.difference for r in group]
        err = [[d - r.estimate.low for d, r in zip(y, group, strict=True)],
               [r.estimate.high - d for d, r in zip(y, group, strict=True)]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # only the factor's own values are labelled
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(fig_spec.x)
    ax.set_ylabel(f"difference A − B ({confidence:.0%} interval, unadjusted)")
    ax.set_title(fig_spec.title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data, never on it
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
