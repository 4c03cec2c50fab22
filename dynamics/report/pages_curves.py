"""Pages of per-task curves over training: losses and gradient norms, by group, mean +- sd over runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dynamics.report.aggregate import PROBE_BINS, binned_curves
from dynamics.report.context import ReportContext
from dynamics.report.page import NoData, Page
from dynamics.report.style import fmt, page_legend, page_note, page_title

__all__ = ["LOSS", "GRAD_NORM", "draw_band", "group_legend"]


def draw_band(ax, curve: pd.DataFrame, color, label: str | None = None) -> None:
    """:func:`dynamics.plot.draw_band` (imported on use: dynamics.plot imports the report package)."""
    from dynamics.plot import draw_band as draw

    draw(ax, curve, color, label)


TASKS_PER_PAGE = 8
_TAIL = 0.1  # "final" on a curve page = the mean of the last 10% of its bins


def group_legend(fig: Figure, ctx: ReportContext) -> None:
    """The page's group legend with the run count of each group."""
    from matplotlib.lines import Line2D

    sizes = ctx.group_sizes()
    handles = [Line2D([0], [0], color=ctx.palette[g], lw=3) for g in ctx.groups]
    page_legend(fig, handles, [f"{g} (n={sizes[g]})" for g in ctx.groups])


def _tasks_with(rows: pd.DataFrame, ctx: ReportContext) -> list[str]:
    present = set(rows["task"].unique()) - {""}
    return [t for t in ctx.tasks if t in present]


def _final_by_group(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (task, group): the mean of the curve over the last ``_TAIL`` of its bins."""

    def tail(df: pd.DataFrame) -> float:
        k = max(1, math.ceil(len(df) * _TAIL))
        return float(df.sort_values("step")["mean"].iloc[-k:].mean())

    out = [
        {"task": task, "group": group, "final": tail(df)}
        for (task, group), df in curves.groupby(["task", "group"], observed=True)
    ]
    return pd.DataFrame(out, columns=["task", "group", "final"])


def _facet_pages(
    ctx: ReportContext,
    name: str,
    tasks: list[str],
    *,
    title: str,
    subtitle: str,
    ylabel: str,
    note: str,
) -> list[Figure]:
    from dynamics.plot import task_curves

    figs = []
    chunks = [tasks[i : i + TASKS_PER_PAGE] for i in range(0, len(tasks), TASKS_PER_PAGE)]
    for page_no, chunk in enumerate(chunks):
        fig = task_curves(ctx, name, tasks=chunk, ylabel=ylabel)
        suffix = f" ({page_no + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        page_title(fig, title + suffix, subtitle)
        group_legend(fig, ctx)
        page_note(fig, note)
        figs.append(fig)
    return figs


def _bin_note(curves: pd.DataFrame, rows: pd.DataFrame, ctx: ReportContext) -> str:
    binned = curves["step"].nunique() < rows["step"].nunique()
    steps = np.sort(curves["step"].unique())
    spacing = (
        f"steps averaged in bins of {fmt(np.median(np.diff(steps)), 2)}; "
        if binned and len(steps) > 1
        else "one point per logged step; "
    )
    missing = [
        f"{rid} lacks {', '.join(sorted(set(ctx.tasks) - set(tasks)))}"
        for rid, tasks in zip(ctx.runset.runs["run_id"], ctx.runset.runs["tasks"], strict=True)
        if set(ctx.tasks) - set(tasks)
    ]
    text = spacing + "line: mean over the runs of a group, band: +-1 sd over runs."
    if missing:
        shown = "; ".join(missing[:4]) + ("; ..." if len(missing) > 4 else "")
        text += f" Runs have different task sets ({shown}): each panel averages the runs that have its task."
    return text


def build_loss(ctx: ReportContext) -> list[Figure]:
    rows = ctx.metric("loss")
    rows = rows[rows["task"] != ""]
    if rows.empty:
        raise NoData("no per-task 'loss' rows in these runs")
    tasks = _tasks_with(rows, ctx)
    curves = binned_curves(rows, by=("task",))
    finals = _final_by_group(curves)
    if len(ctx.groups) >= 2:
        best = finals.loc[finals.groupby("task")["final"].idxmin()]
        wins = best["group"].value_counts()
        leader = wins.index[0]
        title = (
            f"Observed: {leader} ends with the lowest mean loss on {wins.iloc[0]} of {len(tasks)} tasks "
            "(descriptive, not tested)"
        )
    else:
        first = curves.sort_values("step").groupby("task")["mean"].first()
        drop = 1 - finals.set_index("task")["final"] / first
        title = f"Training loss falls by {fmt(100 * drop.mean(), 2)}% on average over {len(tasks)} task(s)"
    return _facet_pages(
        ctx,
        "loss",
        tasks,
        title=title,
        subtitle="Per-task training loss over steps" + (f", by {ctx.group}" if ctx.group else ""),
        ylabel="loss",
        note=_bin_note(curves, rows, ctx) + f" 'Ends' = mean of the last {int(_TAIL * 100)}% of each curve.",
    )


def build_grad_norm(ctx: ReportContext) -> list[Figure]:
    rows = ctx.metric("grad_norm")
    rows = rows[rows["task"] != ""]
    if rows.empty:
        raise NoData(
            "no per-task 'grad_norm' rows in the run stores (no probe was recorded: probes off, failed, or none reached disk)"
        )
    tasks = _tasks_with(rows, ctx)
    curves = binned_curves(rows, n_bins=PROBE_BINS, by=("task",))
    level = rows.groupby("task")["value"].mean().reindex(tasks)
    if len(tasks) >= 2 and level.min() > 0:
        title = (
            f"'{level.idxmax()}' has the largest task gradients: "
            f"{fmt(level.max() / level.min(), 2)}x those of '{level.idxmin()}'"
        )
    else:
        title = "Task gradient norm over training"
    return _facet_pages(
        ctx,
        "grad_norm",
        tasks,
        title=title,
        subtitle="Norm of each task's gradient on the probe batch, over steps",
        ylabel="gradient norm",
        note=_bin_note(curves, rows, ctx)
        + " Ratio in the headline: mean gradient norm over all probes and runs.",
    )


LOSS = Page("loss", "Per-task loss curves", build_loss)
GRAD_NORM = Page("grad_norm", "Per-task gradient norms", build_grad_norm)
