"""Gradient-geometry pages: task-cosine heatmaps by training phase, and the conflict rate over time."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dynamics.report.aggregate import PROBE_BINS, binned_curves
from dynamics.report.context import ReportContext
from dynamics.report.findings import test_suffix
from dynamics.report.page import NoData, Page
from dynamics.report.pages_curves import draw_band, group_legend
from dynamics.report.style import fmt, new_page, page_note, page_title

__all__ = ["COSINE", "CONFLICT", "cosine_matrix"]

GROUPS_PER_PAGE = 3
_ANNOTATE_MAX_TASKS = 8


def cosine_matrix(phase_rows: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """:func:`dynamics.plot.cosine_matrix` (imported on use: dynamics.plot imports the report package)."""
    from dynamics.plot import cosine_matrix as matrix

    return matrix(phase_rows, tasks)


def build_cosine(ctx: ReportContext) -> list[Figure]:
    from dynamics.plot import cosine_means

    try:
        means, _ = cosine_means(ctx)
    except ValueError as err:
        raise NoData(str(err)) from None
    by_phase = means.groupby("phase", observed=True)["value"].mean()
    early, late = by_phase.get("early", np.nan), by_phase.get("late", np.nan)
    trend = "falls" if late < early else "rises"
    title = (
        f"Observed: the mean cosine between task gradients {trend} from {fmt(early, 2)} early "
        f"to {fmt(late, 2)} late in training"
    )
    groups = [g for g in ctx.groups if g in set(means["group"])]
    chunks = [groups[i : i + GROUPS_PER_PAGE] for i in range(0, len(groups), GROUPS_PER_PAGE)]
    from dynamics.plot import cosine_heatmaps

    figs = []
    for page_no, chunk in enumerate(chunks):
        fig = cosine_heatmaps(ctx, groups=chunk)
        suffix = f" ({page_no + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        page_title(
            fig,
            title + suffix,
            "Mean cosine between task gradients in the first, middle and last third of training"
            + (f", by {ctx.group}" if ctx.group else ""),
        )
        page_note(
            fig,
            "Each cell: per run, the mean cosine over the probes in that third of its steps; then the mean over runs. "
            "Blue: tasks pull together, red: they conflict. Blank: pair not logged.",
        )
        figs.append(fig)
    return figs


def build_conflict(ctx: ReportContext) -> list[Figure]:
    rows = ctx.metric("conflict_rate")
    if rows.empty:
        raise NoData(
            "no 'conflict_rate' rows in the run stores (no probe was recorded: probes off, failed, or none reached disk)"
        )
    global_rows = rows[rows["task"] == ""]
    note = "line: mean over runs, band: +-1 sd over runs. "
    if global_rows.empty:
        # Only per-task rates were logged: average them per run and step into one curve.
        global_rows = rows.groupby(["run_id", "group", "step"], as_index=False)["value"].mean()
        note += "Per-task conflict rates averaged over tasks. "
    curves = binned_curves(global_rows, n_bins=PROBE_BINS, by=())
    level = global_rows.groupby("group")["value"].mean()
    as_pct = float(global_rows["value"].max()) <= 1.0

    def show(v: float) -> str:
        return f"{fmt(100 * v, 2)}%" if as_pct else fmt(v)

    if len(level) >= 2:
        hi, lo = level.idxmax(), level.idxmin()
        title = (
            f"Observed: {hi} has the most gradient conflicts, {show(level[hi])} vs {show(level[lo])} for {lo}"
            + test_suffix(ctx, "conflict_rate/all/mean")
        )
    else:
        title = f"Gradient conflicts average {show(level.iloc[0])} over training"
    fig, axes = new_page(1, 1)
    ax = axes[0, 0]
    for g in ctx.groups:
        c = curves[curves["group"] == g]
        if not c.empty:
            draw_band(ax, c, ctx.palette[g])
    ax.set_xlabel("step")
    ax.set_ylabel("conflict rate (share of task pairs with negative cosine)" if as_pct else "conflict rate")
    if as_pct:
        ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    page_title(fig, title, "Share of task pairs whose gradients point in opposing directions, over steps")
    group_legend(fig, ctx)
    page_note(fig, note + "Headline values: mean over all probes and runs of each group.")
    return [fig]


COSINE = Page("cosine", "Task-cosine heatmaps", build_cosine)
CONFLICT = Page("conflict", "Conflict rate over time", build_conflict)
