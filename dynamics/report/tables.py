"""The key tables, as formatted string frames shared by the PDF pages and the terminal summary.

Every number comes from the run set (descriptive counts) or unchanged from the statistics layer's
frames; this module only selects rows and formats them.
"""

from __future__ import annotations

import pandas as pd

from dynamics.report.context import ALPHA, ReportContext
from dynamics.report.style import fmt, fmt_p

__all__ = [
    "runs_table",
    "comparison_table",
    "correlation_table",
    "forecast_table",
    "effect_size",
    "test_name",
    "signal_features",
    "sorted_comparison",
    "sorted_correlation",
    "key_correlations",
    "ALPHA",
]

_TEST_NAMES = {
    "wilcoxon": "Wilcoxon signed-rank",
    "mannwhitney": "Mann-Whitney U",
    "paired_t": "paired t",
    "welch": "Welch t",
}


def test_name(name: str) -> str:
    """The statistics layer's test id as a reader knows it (``wilcoxon`` -> ``Wilcoxon signed-rank``)."""
    return _TEST_NAMES.get(str(name), str(name))


def effect_size(row: pd.Series) -> float:
    """Cohen's d of a comparison row: ``cohens_dz`` for paired rows, ``cohens_d`` for unpaired ones."""
    col = "cohens_dz" if bool(row.get("paired", False)) else "cohens_d"
    return float(row.get(col, float("nan")))


def signal_features(ctx: ReportContext, frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``frame`` about training signals: not scores, not the target itself."""
    feats = ctx.features.frame
    declared = feats.attrs.get("feature_columns") if feats is not None else None
    keep = frame["feature"].ne(ctx.target) & ~frame["feature"].astype(str).str.startswith("score/")
    keep &= frame["feature"].ne("multitask_score")
    if declared:
        keep &= frame["feature"].isin(set(declared))
    return frame[keep]


def runs_table(ctx: ReportContext) -> pd.DataFrame:
    """One row per group: runs, models, seeds, steps, tasks."""
    runs = ctx.runset.runs.assign(_group=ctx.runset.runs["run_id"].map(ctx.run_group))
    rows = []
    for g in ctx.groups:
        sub = runs[runs["_group"] == g]
        tasks = sorted({t for ts in sub["tasks"] for t in ts}, key=ctx.tasks.index)
        steps = sub["n_steps"]
        row = {ctx.group or "group": g, "runs": str(len(sub))}
        for tag in ("model", "seed"):
            if tag in sub.columns and tag != ctx.group:
                vals = sorted(sub[tag].dropna().astype(str).unique())
                row[tag + "s"] = ", ".join(vals) if len(vals) <= 4 else f"{len(vals)} values"
        row["steps"] = str(steps.iloc[0]) if steps.nunique() == 1 else f"{steps.min()}-{steps.max()}"
        row["tasks"] = ", ".join(tasks) if len(tasks) <= 5 else f"{len(tasks)} tasks"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def sorted_comparison(ctx: ReportContext, *, exploratory_only: bool = False) -> pd.DataFrame:
    """The pre-specified family's rows first, then the other signal rows by Holm-adjusted p.

    ``exploratory_only``: only the exploratory family's rows (every signal feature, including the
    pre-specified ones, with the exploratory Holm correction).
    """
    parts = []
    primary = set()
    if ctx.primary.ok and not exploratory_only:
        parts.append(ctx.primary.frame)
        primary = set(ctx.primary.frame["feature"])
    if ctx.comparison.ok:
        rest = signal_features(ctx, ctx.comparison.frame)
        rest = rest[~rest["feature"].isin(primary)]
        # Many features tie at the smallest attainable p (rank tests): the larger effect first.
        effect = rest.apply(effect_size, axis=1).abs().fillna(0.0) if len(rest) else pd.Series(dtype=float)
        rest = rest.assign(_effect=-effect).sort_values(["p_holm", "p_value", "_effect"], na_position="last")
        parts.append(rest.drop(columns="_effect"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def comparison_table(ctx: ReportContext, max_rows: int = 20) -> tuple[pd.DataFrame, list[bool], int]:
    """The group comparison: the target first, then features by Holm-adjusted p.

    Returns (formatted frame, per-row "significant after Holm in its family" flags, number of
    signal features in the exploratory family). The first rows are the pre-specified family (target,
    Fisher SE and rho), Holm-corrected together; the others are Holm-corrected over every signal.
    """
    rows = sorted_comparison(ctx).head(max_rows)
    pairs = rows[["group_a", "group_b"]].drop_duplicates()
    out = pd.DataFrame({"feature": rows["feature"].astype(str)})
    if len(pairs) > 1:
        out["groups (b vs a)"] = rows["group_b"].astype(str) + " vs " + rows["group_a"].astype(str)
        out["mean b"] = rows["mean_b"].map(fmt)
        out["mean a"] = rows["mean_a"].map(fmt)
        diff = "b - a"
    else:
        a, b = pairs.iloc[0]["group_a"], pairs.iloc[0]["group_b"]
        out[f"mean {b}"] = rows["mean_b"].map(fmt)
        out[f"mean {a}"] = rows["mean_a"].map(fmt)
        diff = f"{b} - {a}"
    out[f"diff {diff} [95% CI]"] = [
        f"{fmt(d)} [{fmt(lo)}, {fmt(hi)}]"
        for d, lo, hi in zip(rows["diff"], rows["diff_ci_low"], rows["diff_ci_high"], strict=True)
    ]
    out["n"] = [
        f"{int(p)} pairs" if bool(paired) and pd.notna(p) else f"{_int(na)}+{_int(nb)}"
        for paired, p, na, nb in zip(rows["paired"], rows["n_pairs"], rows["n_a"], rows["n_b"], strict=True)
    ]
    out["test"] = rows["test"].map(test_name)
    out["p"] = rows["p_value"].map(fmt_p)
    out["p (Holm)"] = rows["p_holm"].map(fmt_p)
    out["min p at n"] = rows["p_min"].map(fmt_p) if "p_min" in rows else "n/a"
    out["Cohen's d"] = [fmt(effect_size(r), 2) for _, r in rows.iterrows()]
    significant = [bool(p < ALPHA) for p in rows["p_holm"].fillna(1.0)]
    n_tested = (
        int(signal_features(ctx, ctx.comparison.frame)["feature"].nunique()) if ctx.comparison.ok else 0
    )
    return out.reset_index(drop=True), significant, n_tested


def _int(v) -> str:
    return "?" if pd.isna(v) else str(int(v))


def sorted_correlation(ctx: ReportContext) -> pd.DataFrame:
    frame = signal_features(ctx, ctx.correlation.frame)
    frame = frame[frame["r"].notna()]
    return (
        frame.assign(_abs=frame["r"].abs())
        .sort_values(["_abs", "p_value"], ascending=[False, True])
        .drop(columns="_abs")
    )


def correlation_table(ctx: ReportContext, max_rows: int = 15) -> tuple[pd.DataFrame, list[bool], int]:
    """Features most associated with the target (by |r|), with CI and adjusted p-values."""
    full = sorted_correlation(ctx)
    rows = full.head(max_rows)
    out = pd.DataFrame(
        {
            "feature": rows["feature"].astype(str),
            "n": rows["n"].map(_int),
            "r [95% CI]": [
                f"{fmt(r, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                for r, lo, hi in zip(rows["r"], rows["ci_low"], rows["ci_high"], strict=True)
            ],
            "p": rows["p_value"].map(fmt_p),
            "p (Holm)": rows["p_holm"].map(fmt_p),
            "min p at n": rows["p_min"].map(fmt_p) if "p_min" in rows else "n/a",
        }
    )
    if "partial_r" in rows and ctx.group:
        out[f"r within {ctx.group}"] = rows["partial_r"].map(lambda v: fmt(v, 2))
        out["p within"] = rows["partial_p"].map(fmt_p)
    significant = [bool(p < ALPHA) for p in rows["p_holm"].fillna(1.0)]
    return out.reset_index(drop=True), significant, int(full["feature"].nunique())


def key_correlations(ctx: ReportContext, k: int = 6) -> pd.DataFrame:
    """The k strongest correlations, at most one per metric name (so the page shows k different signals)."""
    full = sorted_correlation(ctx)
    family = full["feature"].astype(str).str.split("/").str[0]
    return full[~family.duplicated()].head(k)


def forecast_table(ctx: ReportContext) -> pd.DataFrame:
    """The early-forecast result, one row per fraction of training."""
    f = ctx.forecast.frame.sort_values("fraction")
    out = pd.DataFrame(
        {
            "first % of training": (100 * f["fraction"]).map(lambda v: f"{v:g}%"),
            "runs": f["n_runs"].map(_int),
            "Spearman": f["spearman"].map(lambda v: fmt(v, 2)),
            "R²": f["r2"].map(lambda v: fmt(v, 2)),
            "MAE": f["mae"].map(fmt),
            "baseline MAE": f["baseline_mae"].map(fmt),
        }
    )
    if "note" in f and f["note"].fillna("").astype(str).str.len().gt(0).any():
        out["note"] = f["note"].fillna("").astype(str)
    return out.reset_index(drop=True)
