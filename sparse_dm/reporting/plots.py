"""Fig. 2/3-style plots: metric vs sparsity per method, the dense level as a horizontal line.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so reports render on headless
cluster nodes and never touch global backend state.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sparse_dm.reporting.tables import METHOD_LABELS, METRICS, Group, Section

FIGSIZE = (6.0, 4.0)
DPI = 120
BAND_ALPHA = 0.2
DENSE_COLOR = "black"
METHOD_STYLE = {"static": ("tab:blue", "o"), "rigl": ("tab:orange", "s"), "magran": ("tab:green", "^")}
DEFAULT_STYLE = ("tab:gray", "x")


def slug(text: str) -> str:
    """A file-name-safe version of a section title."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _new_axes() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _draw_series(ax, x: list[float], groups: list[Group], label: str, style: tuple[str, str]) -> None:
    """Mean with error bars (SD over seeds) and a shaded ± SD band."""
    color, marker = style
    means = [g.mean for g in groups]
    sds = [g.sd for g in groups]
    ax.errorbar(x, means, yerr=sds, color=color, marker=marker, capsize=3, label=label)
    ax.fill_between(
        x,
        [m - s for m, s in zip(means, sds, strict=True)],
        [m + s for m, s in zip(means, sds, strict=True)],
        color=color,
        alpha=BAND_ALPHA,
    )


def _draw_dense(ax, dense: Group | None) -> str:
    """The dense level as a line with its ± SD band; returns a title suffix when it is missing."""
    if dense is None or not dense.values:
        return " (dense baseline missing)"
    ax.axhline(dense.mean, color=DENSE_COLOR, linestyle="--", label=METHOD_LABELS["dense"])
    ax.axhspan(dense.mean - dense.sd, dense.mean + dense.sd, color=DENSE_COLOR, alpha=BAND_ALPHA / 2)
    return ""


def _plot(
    groups: list[Group],
    x_of: Callable[[Group], float],
    dense: Group | None,
    title: str,
    xlabel: str,
    metric: str,
    path: Path,
) -> Path:
    """One series per method over x, plus the dense level; written as PNG to path."""
    fig, ax = _new_axes()
    by_method: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        if g.values:
            by_method[g.method].append(g)
    for method, series in by_method.items():
        series.sort(key=x_of)
        label = METHOD_LABELS.get(method, method)
        _draw_series(ax, [x_of(g) for g in series], series, label, METHOD_STYLE.get(method, DEFAULT_STYLE))
    note = _draw_dense(ax, dense)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRICS[metric])
    ax.set_title(title + note, fontsize="medium")
    ax.grid(alpha=BAND_ALPHA)
    ax.legend(fontsize="small")
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_section(section: Section, metric: str, out_dir: Path) -> Path:
    """Fig. 2/3: metric vs sparsity for every sparse method of one (model, dataset, p) section."""
    path = out_dir / f"{slug(section.title)}_{metric}.png"
    return _plot(
        section.sparse, lambda g: g.sparsity, section.dense, section.title, "sparsity S", metric, path
    )


def plot_prune_rate(groups: list[Group], dense: Group | None, metric: str, out_dir: Path) -> Path:
    """Appendix H (Fig. 8): metric vs prune rate p of DST runs sharing one (model, dataset, S)."""
    first = groups[0]
    title = f"{first.model} / {first.dataset}, S = {first.sparsity:g}"
    path = out_dir / f"{slug(title)}_vs_p_{metric}.png"
    return _plot(groups, lambda g: g.prune_rate, dense, title, "prune and regrowth rate p", metric, path)
