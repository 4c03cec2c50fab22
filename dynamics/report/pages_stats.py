"""Statistics pages: the group comparison table, feature-vs-score scatter plots, the early forecast.

All numbers are the statistics layer's (:mod:`dynamics.analysis`); the scatter plots' fitted line and
band are seaborn's least-squares fit with its bootstrap 95% band, drawn as a visual guide next to the
layer's Spearman r, CI and Holm-adjusted p-value.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from dynamics.report.context import ALPHA, ReportContext
from dynamics.report.findings import best_forecast_row, comparison_power
from dynamics.report.page import NoData, Page
from dynamics.report.style import fmt, new_page, page_note, page_title
from dynamics.report.tables import comparison_table, key_correlations, signal_features

__all__ = ["COMPARISON", "CORRELATION", "FORECAST", "draw_table"]

_SIG_COLOR = "#e3f2e1"
_HEADER_COLOR = "#eaeaf2"


_MAX_CELL = 44


def _middle_ellipsis(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = limit - 3
    return text[: keep - keep // 2] + "..." + text[-(keep // 2) :]


def draw_table(
    ax, frame: pd.DataFrame, highlight: list[bool] | None = None, *, fontsize: float = 9.5, bold_rows: int = 0
) -> None:
    """A plain table filling ``ax``: grey header, highlighted rows, left-aligned first column.

    The first ``bold_rows`` rows are set in bold (a family of tests that belongs together).
    """
    ax.axis("off")
    if frame.empty:
        return
    cells = frame.astype(str).to_numpy().tolist()
    for row in cells:  # long feature names keep their head and tail: "grad_cosine/a...|b/mean"
        row[0] = _middle_ellipsis(row[0], _MAX_CELL)
    # Shrink the font until the estimated table width fits the axes (no text off the page).
    widths = [max(len(str(h)), *(len(r[c]) for r in cells)) + 2 for c, h in enumerate(frame.columns)]
    fig_width = ax.figure.get_size_inches()[0] * ax.get_position().width
    while fontsize > 5.5 and sum(widths) * fontsize * 0.6 / 72 > fig_width:
        fontsize -= 0.5
    table = ax.table(cellText=cells, colLabels=list(frame.columns), loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(fontsize)
    table.auto_set_column_width(list(range(frame.shape[1])))
    n_rows = len(cells) + 1
    height = min(0.95 / n_rows, 0.08)
    for (r, c), cell in table.get_celld().items():
        cell.set_height(height)
        cell.set_edgecolor("#dddddd")
        if r == 0:
            cell.set_facecolor(_HEADER_COLOR)
            cell.set_text_props(fontweight="bold")
        elif highlight and highlight[r - 1]:
            cell.set_facecolor(_SIG_COLOR)
        if 0 < r <= bold_rows:
            cell.set_text_props(fontweight="bold")
        if c == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.02


def build_comparison(ctx: ReportContext) -> list[Figure]:
    if not ctx.comparison.ok and not ctx.primary.ok:
        raise NoData(ctx.comparison.note or "no group comparison")
    table, significant, n_tested = comparison_table(ctx, max_rows=20)
    pairs = table.columns[1:3] if "groups (b vs a)" not in table.columns else None
    if ctx.comparison.ok:
        signals = signal_features(ctx, ctx.comparison.frame)
        n_sig = int(signals.loc[signals["p_holm"] < ALPHA, "feature"].nunique())
        between = (
            f"{pairs[0].removeprefix('mean ')} and {pairs[1].removeprefix('mean ')}"
            if pairs is not None
            else f"{ctx.group} groups"
        )
        title = f"{n_sig} of {n_tested} training signals differ between {between} after Holm correction"
        power = comparison_power(ctx)
        if power is not None and not power.possible:
            title += f"; with {power.n} {power.unit} none can"
    else:
        title = f"Final score by {ctx.group} (no training-signal comparison: {ctx.comparison.note})"
    fig, axes = new_page(1, 1)
    n_primary = len(ctx.primary.frame) if ctx.primary.ok else 0
    draw_table(axes[0, 0], table, significant, bold_rows=n_primary)
    page_title(
        fig,
        title,
        f"Group comparison by {ctx.group}"
        + (f", paired on {', '.join(ctx.pair)}" if ctx.pair else "")
        + f": {ctx.target} first, then the signals with the smallest Holm-adjusted p",
    )
    shown = int((table["feature"] != ctx.target).sum())
    prespecified = ", ".join([ctx.target, *ctx.primary_features])
    power = comparison_power(ctx)
    page_note(
        fig,
        f"Green: p (Holm) < {ALPHA}. Bold rows: the pre-specified tests ({prespecified}), "
        f"Holm-adjusted together; other rows: Holm-adjusted over all {n_tested} signal features (the exploratory family). "
        f"p: exact for n <= 10; min p at n: the smallest p the test can reach with this sample. "
        f"diff: mean difference with its bootstrap 95% CI; Cohen's d: d_z for paired rows (n/a below 4 pairs). "
        f"Showing {shown} rows." + (f" {power.sentence}" if power is not None and not power.possible else ""),
    )
    return [fig]


def build_correlation(ctx: ReportContext) -> list[Figure]:
    if not ctx.correlation.ok:
        raise NoData(ctx.correlation.note or "no correlation with the score")
    key = key_correlations(ctx, k=6)
    if key.empty:
        raise NoData(
            "no feature has a defined correlation with the score: "
            + (_layer_note(ctx.correlation.frame) or "constant features or too few runs")
        )
    from dynamics.plot import feature_scatter

    feats = ctx.features.frame.assign(_group=ctx.features.frame["run_id"].map(ctx.run_group))
    n = len(key)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = new_page(nrows, ncols)
    for ax, (_, row) in zip(axes.flat, key.iterrows(), strict=False):
        feature_scatter(
            feats, row["feature"], target=ctx.target, by="_group", correlation=row, palette=ctx.palette, ax=ax
        )
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    top = key.iloc[0]
    if top["p_holm"] < ALPHA:
        title = f"{top['feature']} goes with {ctx.target} most closely (Spearman r = {fmt(top['r'], 2)})"
    else:
        title = (
            f"No training signal is associated with {ctx.target} after Holm correction "
            f"(strongest observed: {top['feature']}, r = {fmt(top['r'], 2)})"
        )
    page_title(fig, title, f"The strongest signal of each kind against the final score {ctx.target}")
    from dynamics.report.pages_curves import group_legend

    group_legend(fig, ctx)
    page_note(
        fig,
        "Panel titles: Spearman r with 95% CI (within: the correlation within each group), the exact p "
        "for n <= 10 and the Holm-adjusted p, from the statistics layer. "
        "Line and band: least-squares fit with a bootstrap 95% confidence band (visual guide).",
    )
    return [fig]


def build_forecast(ctx: ReportContext) -> list[Figure]:
    if not ctx.forecast.ok:
        raise NoData(ctx.forecast.note or "no early forecast")
    f = ctx.forecast.frame.sort_values("fraction")
    if f["mae"].notna().sum() == 0:
        raise NoData(f"the forecast has no result at any fraction ({_layer_note(f) or 'no data'})")
    row, beats = best_forecast_row(f)
    pct = f"{100 * row['fraction']:g}%"
    if beats:
        title = (
            f"Observed: from the first {pct} of training, {ctx.target} is forecast with a lower error than "
            f"the baseline (MAE {fmt(row['mae'])} vs {fmt(row['baseline_mae'])}; {int(row['n_runs'])} runs)"
        )
    else:
        title = (
            f"Up to {pct} of training, early signals do not forecast {ctx.target} better than the baseline"
        )
    from dynamics.plot import forecast_curves

    fig = forecast_curves(f, target=ctx.target)
    labels = [f"{v:g}%" for v in 100 * f["fraction"].to_numpy(dtype=float)]
    page_title(fig, title, f"Forecasting {ctx.target} from the signals of the first part of training")
    n_runs = ", ".join(f"{lab}: {_n(v)}" for lab, v in zip(labels, f["n_runs"], strict=True))
    page_note(
        fig, f"Numbers from the statistics layer's out-of-sample forecast; runs per fraction: {n_runs}."
    )
    return [fig]


def _layer_note(frame: pd.DataFrame) -> str | None:
    """The statistics layer's most frequent note in ``frame`` (why values are missing), if any."""
    if "note" not in frame:
        return None
    notes = frame["note"].fillna("").astype(str)
    notes = notes[notes != ""]
    return str(notes.value_counts().index[0]) if len(notes) else None


def _n(v) -> str:
    return "?" if pd.isna(v) else str(int(v))


COMPARISON = Page("comparison", "Group comparison table", build_comparison)
CORRELATION = Page("correlation", "Feature-score correlations", build_correlation)
FORECAST = Page("forecast", "Early forecast", build_forecast)
