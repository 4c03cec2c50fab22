"""Plots for notebooks, the same drawing code the report pages use.

Every function takes runs (run directories, a :class:`~dynamics.store.reader.RunSet`, or a report
context from :func:`dynamics.report.context.build_context`) or a statistics frame, and returns a
matplotlib :class:`~matplotlib.figure.Figure` (or the :class:`~matplotlib.axes.Axes` it drew on,
when one is passed in). No pyplot state is touched: in a notebook, display the returned figure.

    from dynamics import plot
    plot.loss_curves("runs/", by="construction")
    plot.cosine_heatmaps("runs/", by="construction")
    plot.fisher_curves("runs/", by="construction")
    plot.feature_scatter(feats, "fisher_rho/all/late", target="multitask_score", by="construction")
    plot.forecast_curves(forecast(runset, group="model"))
    plot.score_by_group(feats, by="construction", pair_on=("model", "seed"))

Curves are the mean over the runs of a group with a +-1 sd band (steps binned, each run averaged
within a bin first, :mod:`dynamics.report.aggregate`); heatmaps the mean task-gradient cosine per
phase (the statistics layer's phase rule).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dynamics.report.aggregate import LOSS_BINS, PHASE_NAMES, PROBE_BINS, binned_curves, phase_means
from dynamics.report.context import PHASES, ReportContext, build_context
from dynamics.report.style import fmt, fmt_p, group_palette, new_page

__all__ = [
    "loss_curves",
    "task_curves",
    "cosine_heatmaps",
    "fisher_curves",
    "feature_scatter",
    "forecast_curves",
    "score_by_group",
    "draw_band",
    "cosine_matrix",
    "cosine_means",
]

FISHER_PANELS = (
    ("fisher_se", "spectral entropy SE", "lower: gradient energy in fewer directions"),
    ("fisher_rho", "dominant eigenvalue ratio ρ", "higher: one direction dominates"),
)


def _context(runs: Any, by: str | None) -> ReportContext:
    if isinstance(runs, ReportContext):
        return runs
    return build_context(runs, by=by, statistics=False)


def draw_band(ax: Axes, curve: pd.DataFrame, color: Any, label: str | None = None) -> None:
    """A mean line with a +-1 sd band (no band where only one run contributes)."""
    x = curve["step"].to_numpy(dtype=float)
    mean = curve["mean"].to_numpy(dtype=float)
    sd = np.nan_to_num(curve["sd"].to_numpy(dtype=float))
    ax.plot(x, mean, color=color, label=label)
    if np.any(sd > 0):
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)


def _group_handles(ax_or_fig: Any, ctx: ReportContext) -> None:
    if isinstance(ax_or_fig, Axes) and len(ctx.groups) > 1:
        ax_or_fig.legend(
            [ax_or_fig.lines[i] for i in range(min(len(ax_or_fig.lines), len(ctx.groups)))],
            ctx.groups,
            frameon=False,
        )


def task_curves(
    runs: Any,
    name: str = "loss",
    *,
    by: str | None = None,
    tasks: Sequence[str] | None = None,
    ylabel: str | None = None,
    n_bins: int | None = None,
) -> Figure:
    """One panel per task: the per-task series ``name`` over steps, one line (mean +- sd) per group."""
    ctx = _context(runs, by)
    rows = ctx.metric(name)
    rows = rows[rows["task"] != ""]
    if rows.empty:
        raise ValueError(f"no per-task {name!r} rows in these runs")
    present = set(rows["task"])
    chunk = [t for t in (tasks or ctx.tasks) if t in present]
    bins = n_bins or (LOSS_BINS if name in ("loss", "train_loss") else PROBE_BINS)
    curves = binned_curves(rows, n_bins=bins, by=("task",))
    ncols = min(4, len(chunk))
    nrows = math.ceil(len(chunk) / ncols)
    fig, axes = new_page(nrows, ncols, sharex=True)
    for ax, task in zip(axes.flat, chunk, strict=False):
        sub = curves[curves["task"] == task]
        for g in ctx.groups:
            c = sub[sub["group"] == g]
            if not c.empty:
                draw_band(ax, c, ctx.palette[g], label=g)
        ax.set_title(task, fontweight="bold")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel or name)
    for ax in list(axes.flat)[len(chunk) :]:
        ax.set_visible(False)
    return fig


def loss_curves(runs: Any, *, by: str | None = None, tasks: Sequence[str] | None = None) -> Figure:
    """Per-task training loss over steps by group (mean +- sd over runs)."""
    return task_curves(runs, "loss", by=by, tasks=tasks, ylabel="loss")


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


def _heatmap(mat: pd.DataFrame, ax: Axes, limit: float, annotate: bool) -> None:
    # "-0.00" reads as a conflict that is not there: print it as 0.00.
    labels = mat.map(lambda v: "" if np.isnan(v) else f"{v:.2f}".replace("-0.00", "0.00"))
    with warnings.catch_warnings():
        # seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 plans to deprecate.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sns.heatmap(
            mat, ax=ax, vmin=-limit, vmax=limit, center=0, cmap="vlag_r",
            annot=labels.to_numpy() if annotate else False, fmt="",
            annot_kws={"fontsize": 9 if len(mat) <= 4 else 7.5}, square=True, cbar=False,
            linewidths=0.5, linecolor="white",
        )  # fmt: skip


def cosine_means(ctx: ReportContext) -> tuple[pd.DataFrame, list[str]]:
    """Per (group, phase, task pair): the mean task-gradient cosine, and the tasks that have one."""
    rows = ctx.metric("grad_cosine")
    rows = rows[(rows["task"] != "") & (rows["task_b"] != "")]
    if rows.empty:
        raise ValueError("no 'grad_cosine' rows (runs logged without probes, or with a single task)")
    n_steps = ctx.runset.runs.set_index("run_id")["n_steps"]
    means = phase_means(rows, n_steps, by=("task", "task_b"), phases=PHASES)
    present = set(rows["task"]) | set(rows["task_b"])
    return means, [t for t in ctx.tasks if t in present]


def cosine_heatmaps(runs: Any, *, by: str | None = None, groups: Sequence[str] | None = None) -> Figure:
    """Task-cosine heatmaps over training: one row per group, one column per phase (early / middle / late)."""
    ctx = _context(runs, by)
    means, tasks = cosine_means(ctx)
    shown = [g for g in (groups or ctx.groups) if g in set(means["group"])]
    annotate = len(tasks) <= 8
    # A symmetric colour range around 0 that the data fill: the largest |cosine| rounded up to 0.1.
    finite = means["value"].abs()
    limit = float(np.clip(np.ceil(10 * finite.max()) / 10, 0.1, 1.0)) if finite.notna().any() else 1.0
    fig, axes = new_page(len(shown), 3)
    for r, g in enumerate(shown):
        for c, phase in enumerate(PHASE_NAMES):
            ax = axes[r, c]
            sub = means[(means["group"] == g) & (means["phase"] == phase)]
            _heatmap(cosine_matrix(sub, tasks), ax, limit, annotate)
            ax.grid(False)
            ax.tick_params(length=0, labelsize=9 if len(tasks) <= 5 else 8)
            ax.tick_params(axis="y", labelrotation=0)
            ax.tick_params(axis="x", labelrotation=45)
            ax.set_xlabel("task")
            if r == 0:
                ax.set_title(f"{phase} training", fontweight="bold")
            if c == 0 and ctx.group:
                ax.set_ylabel(f"{g}\ntask", fontweight="bold", color=ctx.palette[g], fontsize=12, labelpad=6)
            else:
                ax.set_ylabel("task")
    mappable = axes[0, 0].collections[0] if axes[0, 0].collections else None
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.6, label="cosine between task gradients")
    return fig


def fisher_curves(runs: Any, *, by: str | None = None) -> Figure:
    """Fisher spectral entropy SE and dominant eigenvalue ratio rho over steps, by group."""
    ctx = _context(runs, by)
    panels = []
    for name, label, hint in FISHER_PANELS:
        rows = ctx.metric(name)
        rows = rows[rows["task"] == ""] if (rows["task"] == "").any() else rows
        if not rows.empty:
            panels.append((label, hint, rows))
    if not panels:
        raise ValueError("no 'fisher_se' or 'fisher_rho' rows (runs logged without probes)")
    fig, axes = new_page(1, len(panels))
    for ax, (label, hint, rows) in zip(axes.flat, panels, strict=True):
        curves = binned_curves(rows, n_bins=PROBE_BINS, by=())
        for g in ctx.groups:
            c = curves[curves["group"] == g]
            if not c.empty:
                draw_band(ax, c, ctx.palette[g], label=g)
        ax.set_title(f"{label}\n({hint})", fontweight="bold")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    return fig


def feature_scatter(
    feats: pd.DataFrame,
    feature: str,
    *,
    target: str = "multitask_score",
    by: str | None = None,
    correlation: pd.Series | None = None,
    palette: dict[str, Any] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Feature against score, one colour per group, with a least-squares line and its bootstrap 95% band.

    ``correlation``: a row of :func:`dynamics.analysis.correlate` for this feature; its r, CI, n
    and p-values (exact for small n) go into the title. The line and band are seaborn's, a visual
    guide only.
    """
    if ax is None:
        ax = Figure(figsize=(5, 4), layout="constrained").subplots()
    group = feats[by].astype(str) if by is not None else pd.Series("all runs", index=feats.index)
    data = pd.DataFrame({"x": feats[feature], "y": feats[target], "group": group}).dropna()
    data = data[np.isfinite(data["x"]) & np.isfinite(data["y"])]
    if data["x"].nunique() > 1:
        sns.regplot(
            data=data, x="x", y="y", ax=ax, scatter=False, ci=95, n_boot=400, seed=0,
            color="#444444", line_kws={"lw": 1.5},
        )  # fmt: skip
    levels = sorted(data["group"].unique())
    colors = palette or group_palette(levels)
    for g in levels:
        sub = data[data["group"] == g]
        ax.scatter(sub["x"], sub["y"], s=36, color=colors[g], edgecolor="white", linewidth=0.5, zorder=3)
    ax.set_xlabel(feature)
    ax.set_ylabel(target)
    if correlation is not None:
        within = ""
        if "partial_r" in correlation and pd.notna(correlation["partial_r"]):
            within = f"; within: {fmt(correlation['partial_r'], 2)}"
        ax.set_title(
            f"r = {fmt(correlation['r'], 2)} [{fmt(correlation['ci_low'], 2)}, {fmt(correlation['ci_high'], 2)}]"
            f"{within}\np = {fmt_p(correlation['p_value'])}, p_holm = {fmt_p(correlation['p_holm'])}, "
            f"n = {int(correlation['n'])}",
            fontsize=10,
        )
    return ax


def forecast_curves(
    frame: pd.DataFrame, *, target: str = "multitask_score", fig: Figure | None = None
) -> Figure:
    """The early forecast (:func:`dynamics.analysis.forecast`): rank and R² per fraction, and its error
    against the baseline's. Legends sit below the panels, never over the data."""
    f = frame.sort_values("fraction")
    x = 100 * f["fraction"].to_numpy(dtype=float)
    labels = [f"{v:g}%" for v in x]
    if fig is None:
        fig, axes = new_page(1, 2)
    else:
        axes = np.asarray(fig.subplots(1, 2, squeeze=False))
    ax = axes[0, 0]
    ax.plot(labels, f["spearman"], marker="o", lw=2, label="Spearman (forecast vs actual)", color="#0173b2")
    ax.plot(labels, f["r2"], marker="s", lw=2, label="R² (out of sample)", color="#de8f05")
    ax.axhline(0, color="#999999", lw=1)
    low = np.nanmin(f[["spearman", "r2"]].to_numpy(dtype=float)) if f["r2"].notna().any() else 0.0
    ax.set_ylim(min(-0.1, float(low) - 0.05), 1.02)
    ax.set_xlabel("first part of training used")
    ax.set_ylabel("Spearman ρ / R² of the forecast")
    ax.set_title("How well early signals rank and explain the final score", fontweight="bold")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax = axes[0, 1]
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, f["mae"], width=0.4, color="#0173b2", label="forecast")
    ax.bar(pos + 0.2, f["baseline_mae"], width=0.4, color="#bbbbbb", label="baseline")
    ax.set_xticks(pos, labels)
    ax.set_xlabel("first part of training used")
    ax.set_ylabel(f"mean absolute error in {target}")
    ax.set_title("Forecast error against the baseline", fontweight="bold")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return fig


def score_by_group(
    feats: pd.DataFrame,
    *,
    by: str,
    target: str = "multitask_score",
    pair_on: Sequence[str] = (),
    palette: dict[str, Any] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """``target`` per group: one dot per run, runs sharing ``pair_on`` joined by a grey line, group means
    as bars. A picture of every number a paired comparison rests on."""
    if ax is None:
        ax = Figure(figsize=(5, 4), layout="constrained").subplots()
    data = feats[[by, target, *pair_on]].dropna(subset=[by, target]).copy()
    data[by] = data[by].astype(str)
    levels = sorted(data[by].unique())
    colors = palette or group_palette(levels)
    pos = {g: i for i, g in enumerate(levels)}
    means = data.groupby(by)[target].mean()
    ax.bar(
        [pos[g] for g in levels], [means[g] for g in levels], width=0.55,
        color=[colors[g] for g in levels], alpha=0.25, edgecolor="none",
    )  # fmt: skip
    if pair_on:
        key = data[list(pair_on)].astype(str).agg("/".join, axis=1)
        for _, sub in data.assign(_key=key).groupby("_key"):
            if sub[by].nunique() > 1:
                sub = sub.sort_values(by, key=lambda s: s.map(pos))
                ax.plot(sub[by].map(pos), sub[target], color="#999999", lw=1, zorder=2)
    for g in levels:
        sub = data[data[by] == g]
        jitter = np.linspace(-0.06, 0.06, len(sub)) if len(sub) > 1 else np.zeros(1)
        ax.scatter(pos[g] + jitter, sub[target], s=40, color=colors[g], edgecolor="white", zorder=3)
    ax.set_xticks(range(len(levels)), [f"{g}\n(n={int((data[by] == g).sum())})" for g in levels])
    ax.set_xlabel(by)
    ax.set_ylabel(target)
    return ax
