"""The study figures are readable: every title, label and legend lies inside the saved figure, and no legend
covers the plotted data (the heat map of a single length once clipped its title and axis label)."""

import numpy as np
import pytest

from selmerge_jax.evaluation import plots

LONG = "passkey retrieval (ms, RoPE ntk x272, log-n 2048) after a CRD NTK fine-tune"


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions build, drawn, instead of being written and closed."""
    built = []

    def keep(fig, path):
        fig.canvas.draw()
        built.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield built
    plots._pyplot().close("all")


def _texts(fig):
    """Titles, axis labels, the tick labels inside the view limits, and legend entries."""
    for ax in fig.axes:
        yield from (ax.title, ax.xaxis.label, ax.yaxis.label)
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            yield from (t.label1 for t in axis.get_major_ticks() if low <= t.get_loc() <= high)
    for legend in fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]:
        yield from legend.get_texts()


def _check(fig):
    box, renderer = fig.bbox, fig.canvas.get_renderer()
    for text in _texts(fig):
        if not text.get_text() or not text.get_visible():
            continue
        ext = text.get_window_extent(renderer)
        inside = (box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1
                  and box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1)
        assert inside, f"{text.get_text()!r} is clipped: {ext} outside {box}"
    axes = fig.axes[0].get_window_extent(renderer)
    for legend in fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]:
        assert not legend.get_window_extent(renderer).overlaps(axes), "the legend covers the plot"
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()


def test_every_figure_kind_is_readable(figures):
    plots.heatmap("x.png", [[0.5]], rows=[0.5], cols=[288], row_label="key depth (0 = start)",
                  col_label="context tokens", title=LONG)
    x = [256, 512, 1024]
    plots.lines("x.png", {f"series {i}: a long name": (x, [3.0 + i, 2.0, 1.0 + i]) for i in range(4)},
                xlabel="context tokens", ylabel="perplexity", title=LONG, logx=True)
    plots.curves("x.png", {f"run_{i}": ([0, 1, 2], [3, 2, 1]) for i in range(6)}, {"run_0": ([2], [1.5])},
                 title=LONG)
    plots.bars("x.png", ["streaming r=0.2", "h2o r=0.2 merge=nearest"],
               {"kept": [0.2, 0.2], "jaccard": [1.0, 0.9], "rouge-L": [1.0, 1.0]}, xlabel="setting",
               ylabel="mean", title=LONG)
    assert len(figures) == 4
    for fig in figures:
        _check(fig)
    assert np.all([fig.get_figwidth() >= 4.5 for fig in figures])
