"""PNG figures of the studies (matplotlib, Agg backend: works headless on CI, TPU VMs and GPU boxes).

Every function takes plain Python data (what the study wrote to JSON), so a figure can be redrawn from a
result file alone, and returns the path it wrote.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["bars", "curves", "heatmap", "heatmaps", "lines"]


def _pyplot():
    import matplotlib  # optional dependency: only figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency: only figures need it

    return plt


def _wrap(text: str, width: int) -> str:
    """A title broken into lines of at most ``width`` characters: long titles overrun their neighbours."""
    return textwrap.fill(text, width=width, break_long_words=False)


def _figure(width: float, height: float):
    """A figure with constrained layout: titles, labels and an outside legend get room, nothing is clipped."""
    plt = _pyplot()
    return plt.subplots(figsize=(width, height), layout="constrained")


def _title(ax, title: str, width_in: float) -> None:
    """A title wrapped to the axes' figure width (about 9 characters per inch at the default size)."""
    ax.set_title(_wrap(title, max(24, int(9 * width_in))))


def _legend_outside(fig, ax) -> None:
    """The legend to the right of the plot, where it can cover no bar or curve."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def heatmap(path: str, values, *, rows: Sequence, cols: Sequence, row_label: str, col_label: str, title: str,
            vmin: float = 0.0, vmax: float = 1.0, fmt: str = "{:.0%}") -> str:
    """``values [len(rows), len(cols)]`` as a coloured grid with each cell's value printed (passkey
    accuracy)."""
    values = np.asarray(values, np.float64)
    if values.shape != (len(rows), len(cols)):
        raise ValueError(f"values has shape {values.shape}, expected "
                         f"(len(rows)={len(rows)}, len(cols)={len(cols)})")
    width = max(4.5, 1.5 + 0.9 * len(cols))  # a one-length grid still has room for its title and labels
    fig, ax = _figure(width, max(2.5, 1.2 + 0.5 * len(rows)))
    im = _grid(ax, values, rows, cols, vmin, vmax, fmt)
    ax.set(xlabel=col_label, ylabel=row_label)
    _title(ax, title, width)
    fig.colorbar(im, ax=ax, label="accuracy" if fmt == "{:.0%}" else None)
    return _save(fig, path)


def _grid(ax, values, rows, cols, vmin, vmax, fmt):
    """One heat map on ``ax``, each cell's value printed; returns the image (for a colour bar)."""
    im = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8)
    return im


def heatmaps(path: str, panels: Mapping[str, tuple[Sequence, Sequence]], *, rows: Sequence, row_label: str,
             col_label: str, title: str, vmin: float = 0.0, vmax: float = 1.0, fmt: str = "{:.0%}") -> str:
    """Heat maps side by side, sharing their rows and colour scale: ``panels`` maps a panel title to
    ``(values [len(rows)][len(cols)], cols)`` (a model with and without CRD NTK, each at its own lengths)."""
    if not panels:
        raise ValueError("heatmaps: panels must hold at least one (values, cols) pair, got none")
    grids = {name: (np.asarray(v, np.float64), list(c)) for name, (v, c) in panels.items()}
    for name, (values, cols) in grids.items():
        if values.shape != (len(rows), len(cols)):
            raise ValueError(f"heatmaps: panel {name!r} has shape {values.shape}, expected "
                             f"(len(rows)={len(rows)}, len(cols)={len(cols)})")
    plt = _pyplot()
    widths = [len(cols) for _, cols in grids.values()]
    fig, axes = plt.subplots(1, len(grids), squeeze=False, gridspec_kw={"width_ratios": widths},
                             figsize=(1.5 + 0.9 * sum(widths) + 0.6 * len(grids), 1.4 + 0.5 * len(rows)))
    titles = [_wrap(name, max(14, 8 * len(cols))) for name, (_, cols) in grids.items()]  # a panel's width
    for ax, panel_title, (values, cols) in zip(axes[0], titles, grids.values(), strict=True):
        im = _grid(ax, values, rows, cols, vmin, vmax, fmt)
        ax.set(xlabel=col_label, title=panel_title)
    axes[0][0].set_ylabel(row_label)
    for ax in axes[0][1:]:  # the rows are shared: labels on the first panel only, none crowding the gaps
        ax.tick_params(labelleft=False)
    fig.suptitle(title, y=1.0 + 0.04 * max(t.count("\n") for t in titles))  # above the tallest panel title
    fig.colorbar(im, ax=list(axes[0]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # tight_layout cannot place a colorbar shared by panels
    plt.close(fig)
    return path


def lines(path: str, series: Mapping[str, tuple[Sequence, Sequence]], *, xlabel: str, ylabel: str, title: str,
          logx: bool = False, logy: bool = False) -> str:
    """One line per named ``(x, y)`` series (perplexity vs context, prefill time vs length)."""
    fig, ax = _figure(6.5, 4)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), "o-", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(ax, title, 6.5)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return _save(fig, path)


def curves(path: str, train: Mapping[str, tuple[Sequence, Sequence]],
           val: Mapping[str, tuple[Sequence, Sequence]],
           *, title: str) -> str:
    """Overlaid training curves (thin) with validation points (markers) in the same colour per run."""
    fig, ax = _figure(8, 4.5)
    for i, name in enumerate(sorted(set(train) | set(val))):
        color = f"C{i % 10}"
        if name in train:
            ax.plot(list(train[name][0]), list(train[name][1]), color=color, lw=1, alpha=0.8, label=name)
        if name in val:
            ax.plot(list(val[name][0]), list(val[name][1]), "o--", color=color, ms=4)
    ax.set(xlabel="optimizer step (same tokens per step for every run)",
           ylabel="loss (nats/token; line: train, dots: validation)")
    _title(ax, title, 6.5)  # the plot area: the legend takes the rest
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return _save(fig, path)


def bars(path: str, groups: Sequence[str], values: Mapping[str, Sequence[float]], *, ylabel: str,
         title: str, xlabel: str = "") -> str:
    """Grouped bars: one group per entry of ``groups``, one bar per metric in ``values`` (fidelity)."""
    for name, v in values.items():
        if len(v) != len(groups):
            raise ValueError(f"values[{name!r}] has {len(v)} entries, expected one per group ({len(groups)})")
    fig_width = max(5.0, 1.5 + 1.4 * len(groups))
    fig, ax = _figure(fig_width + 1.8, 4.5)  # + the legend beside the bars
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (name, v) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, list(v), width, label=name)
    ax.set_xticks(x, list(groups), rotation=20, ha="right")
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.05))
    _title(ax, title, fig_width)
    _legend_outside(fig, ax)
    return _save(fig, path)
