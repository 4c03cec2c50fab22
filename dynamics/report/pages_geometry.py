"""Gradient-geometry pages: task-cosine heatmaps by training phase, and the conflict rate over time."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from dynamics.report.aggregate import PHASE_NAMES, PROBE_BINS, binned_curves, phase_means
from dynamics.report.context import PHASES, ReportContext
from dynamics.report.findings import test_suffix
from dynamics.report.page import NoData, Page
from dynamics.report.pages_curves import draw_band, group_legend
from dynamics.report.style import fmt, new_page, page_note, page_title

__all__ = ["COSINE", "CONFLICT", "cosine_matrix"]

GROUPS_PER_PAGE = 3
_ANNOTATE_MAX_TASKS = 8


def cosine_matrix(phase_rows: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """The strict lower triangle of the task x task cosine matrix (cosine is symmetric).

    Rows are ``tasks[1:]``, columns ``tasks[:-1]``: the diagonal (always 1) and the upper triangle
    carry no information. A pair logged in either order fills the same cell; pairs never logged stay NaN.
    """
    mat = pd.DataFrame(np.nan, index=tasks, columns=tasks)
    order = {t: i for i, t in enumerate(tasks)}
    for a, b, v in zip(phase_rows["task"], phase_rows["task_b"], phase_rows["value"], strict=True):
        if a not in order or b not in order or a == b:
            continue
        lo, hi = (a, b) if order[a] > order[b] else (b, a)
        mat.loc[lo, hi] = v
    return mat.iloc[1:, :-1]


def _heatmap(mat: pd.DataFrame, ax, limit: float, annotate: bool) -> None:
    # "-0.00" reads as a conflict that is not there: print it as 0.00.
    labels = mat.map(lambda v: "" if np.isnan(v) else f"{v:.2f}".replace("-0.00", "0.00"))
    sns.heatmap(
        mat,
        ax=ax,
        vmin=-limit,
        vmax=limit,
        center=0,
        cmap="vlag_r",
        annot=labels.to_numpy() if annotate else False,
        fmt="",
        annot_kws={"fontsize": 9 if len(mat) <= 4 else 7.5},
        square=True,
        cbar=False,
        linewidths=0.5,
        linecolor="white",
    )


def build_cosine(ctx: ReportContext) -> list[Figure]:
    rows = ctx.metric("grad_cosine")
    rows = rows[(rows["task"] != "") & (rows["task_b"] != "")]
    if rows.empty:
        raise NoData("no 'grad_cosine' rows (runs logged without probes, or with a single task)")
    n_steps = ctx.runset.runs.set_index("run_id")["n_steps"]
    means = phase_means(rows, n_steps, by=("task", "task_b"), phases=PHASES)
    present = set(rows["task"]) | set(rows["task_b"])
    tasks = [t for t in ctx.tasks if t in present]
    by_phase = means.groupby("phase", observed=True)["value"].mean()
    early, late = by_phase.get("early", np.nan), by_phase.get("late", np.nan)
    trend = "falls" if late < early else "rises"
    title = (
        f"Observed: the mean cosine between task gradients {trend} from {fmt(early, 2)} early "
        f"to {fmt(late, 2)} late in training"
    )
    groups = [g for g in ctx.groups if g in set(means["group"])]
    chunks = [groups[i : i + GROUPS_PER_PAGE] for i in range(0, len(groups), GROUPS_PER_PAGE)]
    annotate = len(tasks) <= _ANNOTATE_MAX_TASKS
    # A symmetric colour range around 0 that the data fill (cosines of task gradients are often
    # small): the largest |cosine| rounded up to 0.1, at least 0.1.
    finite = means["value"].abs()
    limit = float(np.clip(np.ceil(10 * finite.max()) / 10, 0.1, 1.0)) if finite.notna().any() else 1.0
    figs = []
    for page_no, chunk in enumerate(chunks):
        fig, axes = new_page(len(chunk), 3)
        for r, g in enumerate(chunk):
            for c, phase in enumerate(PHASE_NAMES):
                ax = axes[r, c]
                sub = means[(means["group"] == g) & (means["phase"] == phase)]
                mat = cosine_matrix(sub, tasks)
                with warnings.catch_warnings():
                    # seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 plans to deprecate.
                    warnings.simplefilter("ignore", PendingDeprecationWarning)
                    _heatmap(mat, ax, limit, annotate)
                ax.grid(False)
                ax.tick_params(length=0, labelsize=9 if len(tasks) <= 5 else 8)
                ax.tick_params(axis="y", labelrotation=0)
                ax.tick_params(axis="x", labelrotation=45)
                ax.set_xlabel("")
                if r == 0:
                    ax.set_title(f"{phase} training", fontweight="bold")
                if c == 0 and ctx.group:
                    ax.set_ylabel(g, fontweight="bold", color=ctx.palette[g], fontsize=13, labelpad=8)
                else:
                    ax.set_ylabel("")
        mappable = axes[0, 0].collections[0] if axes[0, 0].collections else None
        if mappable is not None:
            fig.colorbar(mappable, ax=axes, shrink=0.6, label="cosine between task gradients")
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
        raise NoData("no 'conflict_rate' rows (runs logged without probes)")
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
