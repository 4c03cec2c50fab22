"""The first page: which runs, how they were set up, and the key findings in words and numbers."""

from __future__ import annotations

import textwrap
import time

import numpy as np
from matplotlib.figure import Figure

from dynamics.report.context import PHASES, ReportContext
from dynamics.report.pages_stats import draw_table
from dynamics.report.style import PAGE_SIZE, fmt
from dynamics.report.tables import runs_table

__all__ = ["build_overview", "setup_lines"]

_PROBE_METRICS = (
    "grad_norm",
    "grad_cosine",
    "conflict_rate",
    "fisher_se",
    "fisher_rho",
    "fisher_eff_rank",
    "fisher_trace",
    "noise_scale",
    "update_cosine",
    "hessian_top",
)


def _spacing(ctx: ReportContext, names: tuple[str, ...]) -> float | None:
    m = ctx.runset.metrics
    rows = m[m["name"].isin(names)]
    if rows.empty:
        return None
    gaps = rows.groupby("run_id")["step"].apply(
        lambda s: np.median(np.diff(np.unique(s))) if s.nunique() > 1 else np.nan
    )
    gaps = gaps.dropna()
    return float(gaps.median()) if not gaps.empty else None


def _steps(gap: float) -> str:
    if gap == 1:
        return "step"
    return f"{int(gap)} steps" if float(gap).is_integer() else f"~{fmt(gap, 2)} steps"


def setup_lines(ctx: ReportContext) -> list[str]:
    """The setup in short lines: runs, tasks, signals, grouping, pairing, target, statistics."""
    runs = ctx.runset.runs
    names = ctx.metric_names
    steps = runs["n_steps"]
    lines = [
        f"Runs: {len(runs)}; steps per run: "
        + (str(steps.iloc[0]) if steps.nunique() == 1 else f"{steps.min()} to {steps.max()}"),
        f"Tasks ({len(ctx.tasks)}): {', '.join(ctx.tasks) if ctx.tasks else 'none'}",
    ]
    if runs["tasks"].map(lambda t: tuple(t)).nunique() > 1:
        lines.append(
            "Task sets differ between runs: each per-task panel averages the runs that have the task."
        )
    probes = [n for n in _PROBE_METRICS if n in names]
    if "loss" in names:
        gap = _spacing(ctx, ("loss",))
        lines.append("Losses: per task" + (f", every {_steps(gap)}" if gap else ""))
    else:
        lines.append("Losses: none logged")
    if probes:
        gap = _spacing(ctx, tuple(probes))
        lines.append(f"Probe signals ({'every ' + _steps(gap) if gap else 'sparse'}): {', '.join(probes)}")
    else:
        lines.append("Probe signals: none (losses only): geometry and spectrum pages are left out")
    sizes = ctx.group_sizes()
    if ctx.group:
        lines.append(f"Grouped by {ctx.group}: " + ", ".join(f"{g} ({n} runs)" for g, n in sizes.items()))
    else:
        lines.append("Grouping: none (pass --group TAG to compare groups of runs)")
    if ctx.group:
        lines.append(
            f"Paired on: {', '.join(ctx.pair)}" if ctx.pair else "Paired on: nothing (unpaired comparison)"
        )
    has_scores = not ctx.runset.scores.empty
    lines.append(f"Target score: {ctx.target}" + ("" if has_scores else " (no final scores in these runs)"))
    lines.append(
        f"Phases: early / middle / late = thirds of each run's steps (cut at {fmt(PHASES[0], 2)}, {fmt(PHASES[1], 2)})"
    )
    if len(runs) <= 6:
        lines.append("Run ids: " + ", ".join(runs["run_id"]))
    return lines


def _wrapped_block(
    fig: Figure,
    x: float,
    y: float,
    items: list[str],
    *,
    width: int,
    size: float,
    bullet: str,
    color: str,
    gap: float = 0.45,
) -> float:
    """Draw wrapped items from (x, y) downwards; returns the y below the block."""
    line_h = size * 1.45 / 72 / PAGE_SIZE[1]
    for item in items:
        lines = textwrap.wrap(item, width=width, break_long_words=True, break_on_hyphens=False) or [""]
        for i, line in enumerate(lines):
            prefix = bullet if i == 0 else " " * len(bullet)
            fig.text(
                x, y, prefix + line, fontsize=size, color=color, ha="left", va="top", family="DejaVu Sans"
            )
            y -= line_h
        y -= line_h * gap
    return y


def _fit(
    items: list[str], height: float, width_in: float, size: float, min_size: float = 7.5, gap: float = 0.45
) -> tuple[float, int]:
    """The largest font size (<= size) at which wrapped ``items`` fit into ``height`` (figure fraction)."""
    while True:
        width = int(width_in * 72 / (size * 0.55))
        lines = sum(len(textwrap.wrap(t, width=width)) + gap for t in items)
        needed = lines * size * 1.45 / 72 / PAGE_SIZE[1]
        if needed <= height or size <= min_size:
            return size, width
        size -= 0.5


def build_overview(
    ctx: ReportContext, findings: list[str], skipped: dict[str, str], *, title: str | None = None
) -> Figure:
    """The first page. ``skipped`` maps left-out page titles to the reason."""
    fig = Figure(figsize=PAGE_SIZE)
    groups = f" | grouped by {ctx.group}" if ctx.group else ""
    fig.text(0.03, 0.965, title or "Training-dynamics report", fontsize=22, fontweight="bold", va="top")
    fig.text(
        0.03,
        0.905,
        f"{len(ctx.runset.runs)} run(s){groups} | target: {ctx.target} | {time.strftime('%Y-%m-%d')}",
        fontsize=12,
        color="#555555",
        va="top",
    )
    fig.add_artist(_rule(fig, 0.875))

    bottom = 0.2 if skipped else 0.03
    # Left column: the lead figure (score per group and pair, and the signal that best separates
    # the groups), then the runs and the setup; right column: the findings in words.
    y = 0.85
    if _lead_figure(fig, ctx, top=0.85, bottom=0.50):
        y = 0.45
    fig.text(0.03, y, "Runs", fontsize=13, fontweight="bold", va="top")
    table = runs_table(ctx)
    n = len(table) + 1
    height = min(0.04 * n, 0.3 if y > 0.8 else 0.12)
    ax = fig.add_axes((0.03, y - 0.04 - height, 0.43, height))
    draw_table(ax, table, fontsize=8.5)
    for cell in ax.tables[0].get_celld().values():
        cell.set_height(1.0 / n)
    y = y - 0.04 - height - 0.03
    fig.text(0.03, y, "Setup", fontsize=13, fontweight="bold", va="top")
    setup = setup_lines(ctx)
    size, width = _fit(setup, y - 0.04 - bottom, 5.0, 10, min_size=6, gap=0.2)
    _wrapped_block(fig, 0.03, y - 0.035, setup, width=width, size=size, bullet="", color="#222222", gap=0.2)

    # Right column: key findings.
    fig.text(0.50, 0.85, "Key findings", fontsize=14, fontweight="bold", va="top")
    items = findings or ["No statistical findings: see the notes below for why."]
    size, width = _fit(items, 0.80 - bottom - 0.01, 5.6, 11, min_size=6)
    _wrapped_block(fig, 0.50, 0.80, items, width=width, size=size, bullet="• ", color="#111111")

    # Bottom band: what was left out and why.
    if skipped:
        fig.add_artist(_rule(fig, 0.19))
        notes = [f"{page}: {reason}" for page, reason in skipped.items()]
        size, width = _fit(notes, 0.15, 10.8, 9, min_size=6, gap=0.15)
        fig.text(0.03, 0.18, "Pages left out", fontsize=10, fontweight="bold", va="top", color="#666666")
        _wrapped_block(
            fig, 0.03, 0.155, notes, width=width, size=size, bullet="– ", color="#666666", gap=0.15
        )
    return fig


def _separating_feature(ctx: ReportContext) -> str | None:
    """The training signal whose group comparison has the smallest p (then the largest effect)."""
    if not ctx.comparison.ok:
        return None
    from dynamics.report.tables import sorted_comparison

    rows = sorted_comparison(ctx, exploratory_only=True)
    rows = rows[rows["diff"].notna()]
    if rows.empty:
        return None
    # Smallest p first; where p cannot rank (ties, untested), the difference in run-to-run sds.
    feats = ctx.features.frame
    spread = rows["feature"].map(lambda f: float(feats[f].std())) if len(rows) else rows["diff"]
    with np.errstate(invalid="ignore", divide="ignore"):
        standardised = (rows["diff"].abs() / spread).replace(np.inf, np.nan).fillna(0.0)
    rows = rows.assign(_p=rows["p_value"].fillna(1.0), _s=-standardised).sort_values(["_p", "_s"])
    return str(rows.iloc[0]["feature"])


def _lead_figure(fig: Figure, ctx: ReportContext, *, top: float, bottom: float) -> bool:
    """Two panels: the target per group (pairs joined) and the best-separating signal. False if
    there is nothing to draw (no groups or no target values)."""
    feats = ctx.features.frame if ctx.features.ok else None
    if feats is None or ctx.group is None or len(ctx.groups) < 2:
        return False
    if ctx.target not in feats or feats[ctx.target].notna().sum() == 0:
        return False
    from dynamics.plot import score_by_group
    from dynamics.report.findings import test_suffix

    data = feats.assign(**{ctx.group: feats["run_id"].map(ctx.run_group)})
    feature = _separating_feature(ctx)
    panels = [(ctx.target, "final score")] + ([(feature, "best-separating signal")] if feature else [])
    width = 0.43 / len(panels)
    for i, (column, label) in enumerate(panels):
        ax = fig.add_axes((0.03 + 0.045 + i * width, bottom + 0.07, width - 0.075, top - bottom - 0.12))
        score_by_group(data, by=ctx.group, target=column, pair_on=ctx.pair, palette=ctx.palette, ax=ax)
        ax.set_xlabel(ctx.group, fontsize=9)
        ax.set_ylabel(textwrap.shorten(column, 34, placeholder="..."), fontsize=8.5)
        ax.tick_params(labelsize=8)
        verdict = test_suffix(ctx, column).strip(" ()")
        ax.set_title(f"{label}\n{textwrap.shorten(verdict, 40, placeholder='...')}", fontsize=8.5)
    return True


def _rule(fig: Figure, y: float):
    from matplotlib.lines import Line2D

    return Line2D([0.03, 0.97], [y, y], transform=fig.transFigure, color="#cccccc", lw=1)
