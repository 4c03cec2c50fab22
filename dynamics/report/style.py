"""One look for every report page: seaborn theme, page size, group colours, number formats.

Group colours are assigned once per report (:func:`group_palette`) and passed to every page, so
that IMAX is the same colour on the loss curves, the spectrum page and the scatter plots.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib as mpl
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

__all__ = [
    "PAGE_SIZE",
    "apply_theme",
    "group_palette",
    "fmt",
    "fmt_p",
    "new_page",
    "page_title",
    "page_legend",
    "PLOT_TOP",
    "page_note",
]

# A4 landscape: the shape of a slide and of a printed page.
PAGE_SIZE = (11.69, 8.27)
PLOT_TOP = 0.82  # plots live below this fraction of the page height; the headline band above it
_BASE_FONT = 11
_TITLE_SIZE = 16
_TITLE_CHARS = 88
_TITLE_LINE = _TITLE_SIZE * 1.25 / 72 / PAGE_SIZE[1]


def apply_theme() -> None:
    """Set the seaborn theme used by every page (white grid, readable fonts, no top/right spines)."""
    sns.set_theme(
        context="paper",
        style="whitegrid",
        font_scale=1.0,
        rc={
            "font.size": _BASE_FONT,
            "axes.titlesize": _BASE_FONT + 1,
            "axes.labelsize": _BASE_FONT,
            "xtick.labelsize": _BASE_FONT - 1,
            "ytick.labelsize": _BASE_FONT - 1,
            "legend.fontsize": _BASE_FONT - 1,
            "legend.title_fontsize": _BASE_FONT,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "grid.color": "#e6e6e6",
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "pdf.fonttype": 42,  # embed TrueType so text stays selectable / extractable
            "svg.fonttype": "none",
            "lines.linewidth": 1.8,
        },
    )


def group_palette(groups: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per group label, in the given (sorted) order; colour-blind-safe for <= 8."""
    groups = list(groups)
    colors = sns.color_palette("colorblind", n_colors=max(len(groups), 1))
    if len(groups) > 10:
        colors = sns.color_palette("husl", n_colors=len(groups))
    return {g: tuple(colors[i]) for i, g in enumerate(groups)}


def fmt(x: float, digits: int = 3) -> str:
    """A number rounded to ``digits`` significant digits; scientific only for very large / small values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    # Round first, so that 0.09999 -> 0.1 decides the magnitude (and prints "0.100", not "0.1000").
    x = float(f"{x:.{digits}g}")
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -4:
        return f"{x:.{digits - 1}e}"
    decimals = max(digits - 1 - mag, 0)
    return f"{x:.{decimals}f}"


def fmt_p(p: float) -> str:
    """A p-value with two significant digits (``3.1e-05`` below 1e-3)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    p = float(p)
    if p < 1e-3:
        return f"{p:.1e}"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def new_page(nrows: int = 1, ncols: int = 1, *, top: float = PLOT_TOP, bottom: float = 0.04, **kwargs):
    """A page-sized figure with a grid of axes below a reserved headline band.

    A bare :class:`~matplotlib.figure.Figure` (no pyplot state): report pages never pop up in a
    notebook and building them is safe outside the main thread. Constrained layout keeps the axes
    inside ``[bottom, top]`` of the page height, so the headline, subtitle and legend
    (:func:`page_title`, :func:`page_legend`) and the footnote (:func:`page_note`) never overlap them.
    """
    fig = Figure(figsize=PAGE_SIZE, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)
    engine.set(rect=(0.0, bottom, 1.0, top - bottom), h_pad=0.12, w_pad=0.12)
    return fig, axes


def page_title(fig: mpl.figure.Figure, title: str, subtitle: str | None = None) -> None:
    """A page headline (ideally the finding, wrapped to two lines at most) and a lighter subtitle."""
    lines = textwrap.wrap(title, width=_TITLE_CHARS)
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), width=_TITLE_CHARS, placeholder=" ...")]
    fig.text(0.015, 0.975, "\n".join(lines), fontsize=_TITLE_SIZE, fontweight="bold", ha="left", va="top",
             linespacing=1.25)  # fmt: skip
    if subtitle:
        y = 0.975 - len(lines) * _TITLE_LINE - 0.012
        fig.text(0.015, y, subtitle, fontsize=_BASE_FONT + 1, color="#555555", ha="left", va="top")


def page_legend(fig: mpl.figure.Figure, handles: list, labels: list[str]) -> None:
    """One horizontal legend for the page, left-aligned just above the plots."""
    fig.legend(
        handles,
        labels,
        loc="lower left",
        bbox_to_anchor=(0.01, PLOT_TOP + 0.002),
        ncol=min(len(labels), 6),
        frameon=False,
        handlelength=2.2,
        columnspacing=1.6,
    )


def page_note(fig: mpl.figure.Figure, note: str) -> None:
    """A footnote at the bottom left (data caveats, what the bands mean)."""
    fig.text(0.01, 0.005, note, fontsize=_BASE_FONT - 2, color="#666666", ha="left", va="bottom", wrap=True)
