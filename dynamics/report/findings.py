"""The key findings in words, quoting the statistics layer's numbers as they are.

Each sentence is built from one row of :func:`dynamics.analysis.compare`,
:func:`dynamics.analysis.correlate` or :func:`dynamics.analysis.forecast` and formats that row's
values with :func:`dynamics.report.style.fmt` / :func:`fmt_p`; no statistic is computed here.
"""

from __future__ import annotations

import pandas as pd

from dynamics.analysis.attainable import Attainability, attainability
from dynamics.report.context import ALPHA, ReportContext
from dynamics.report.style import fmt, fmt_p
from dynamics.report.tables import signal_features, sorted_comparison, sorted_correlation, test_name

__all__ = [
    "findings",
    "comparison_sentence",
    "correlation_sentence",
    "forecast_sentence",
    "best_forecast_row",
    "verdict",
    "test_suffix",
    "comparison_power",
    "correlation_power",
]

MAX_PAIRS = 3


def _n_text(row: pd.Series) -> str:
    if bool(row.get("paired", False)) and pd.notna(row.get("n_pairs")):
        return f"n = {int(row['n_pairs'])} pairs"
    return f"n = {int(row['n_a'])} vs {int(row['n_b'])} runs"


def verdict(p_holm: float, *, alpha: float = ALPHA) -> str:
    """How a Holm-adjusted p reads: significant, not significant, or not tested."""
    if pd.isna(p_holm):
        return "not tested"
    return "significant" if p_holm < alpha else "not significant"


def test_suffix(ctx: ReportContext, feature: str) -> str:
    """`` (difference: p_holm = .., not significant)`` for a feature of the group comparison, the
    pre-specified family first; ``" (descriptive, not tested)"`` when the feature was not compared."""
    for stat in (ctx.primary, ctx.comparison):
        if stat.ok:
            rows = stat.frame[stat.frame["feature"] == feature]
            if len(rows):
                row = rows.sort_values("p_holm", na_position="last").iloc[0]
                if pd.isna(row["p_holm"]):
                    return f" (difference not tested: {row['note'] or 'too few runs'})"
                return f" (difference: p_holm = {fmt_p(row['p_holm'])}, {verdict(row['p_holm'])})"
    return " (descriptive, not tested)"


def comparison_sentence(row: pd.Series, label: str | None = None, *, family: str = "") -> str:
    """``label: observed B mean_b vs A mean_a (difference diff, 95% CI lo to hi; test, n; p = p,
    p_holm = p[, family]): verdict.``

    The statistics layer's ``diff`` is ``b - a``, so group b is named first; ``family`` says over
    which tests ``p_holm`` was corrected; ``p`` is the exact p where the sample is small.
    """
    label = label or str(row["feature"])
    p = f"p = {fmt_p(row['p_value'])}, p_holm = {fmt_p(row['p_holm'])}" + (f", {family}" if family else "")
    if pd.isna(row["diff_ci_low"]) or pd.isna(row["diff_ci_high"]):
        ci = "no CI with this few pairs"
    else:
        ci = f"95% CI {fmt(row['diff_ci_low'])} to {fmt(row['diff_ci_high'])}"
    return (
        f"{label}: observed {row['group_b']} {fmt(row['mean_b'])} vs {row['group_a']} {fmt(row['mean_a'])} "
        f"(difference {fmt(row['diff'])}, {ci}; "
        f"{test_name(row['test'])}, {_n_text(row)}; {p}): {verdict(row['p_holm'])}."
    )


def correlation_sentence(row: pd.Series, target: str, *, by: str | None = None) -> str:
    """``feature and target: observed Spearman r = r (95% CI lo to hi; n = n; p = p, p_holm = p)
    [; within each by: r = .., p = ..]: verdict.``"""
    within = ""
    if by is not None and "partial_r" in row and pd.notna(row["partial_r"]):
        within = f"; within each {by}: r = {fmt(row['partial_r'], 2)}, p = {fmt_p(row['partial_p'])}"
    return (
        f"Strongest observed association, {row['feature']} with {target}: Spearman r = {fmt(row['r'], 2)} "
        f"(95% CI {fmt(row['ci_low'], 2)} to {fmt(row['ci_high'], 2)}; n = {int(row['n'])}; "
        f"p = {fmt_p(row['p_value'])}, p_holm = {fmt_p(row['p_holm'])}{within}): {verdict(row['p_holm'])}."
    )


def best_forecast_row(frame: pd.DataFrame) -> tuple[pd.Series, bool]:
    """The earliest fraction whose forecast beats the baseline (MAE), else the latest fraction.

    Returns the row and whether it beats the baseline.
    """
    f = frame.sort_values("fraction")
    valid = f[f["mae"].notna()]
    if valid.empty:
        return f.iloc[-1], False
    beats = valid[valid["mae"] < valid["baseline_mae"]]
    if not beats.empty:
        return beats.iloc[0], True
    return valid.iloc[-1], False


def forecast_sentence(frame: pd.DataFrame, target: str) -> str:
    row, beats = best_forecast_row(frame)
    pct = f"{100 * row['fraction']:g}%"
    if pd.isna(row["mae"]):
        return f"No early forecast of {target} could be made ({row.get('note') or 'no data'})."
    numbers = (
        f"Spearman {fmt(row['spearman'], 2)}, R² {fmt(row['r2'], 2)}, "
        f"MAE {fmt(row['mae'])} vs {fmt(row['baseline_mae'])} for the baseline; n = {int(row['n_runs'])} runs"
    )
    if beats:
        return (
            f"Observed: from the first {pct} of training, the out-of-sample forecast of {target} has a lower "
            f"error than the baseline ({numbers}; descriptive, not a test)."
        )
    return (
        f"Observed: up to the first {pct} of training, the forecast of {target} does not beat the baseline "
        f"({numbers})."
    )


def _pairs_shown(frame: pd.DataFrame) -> pd.DataFrame:
    pairs = frame[["group_a", "group_b"]].drop_duplicates().head(MAX_PAIRS)
    keep = set(map(tuple, pairs.to_numpy()))
    return frame[[(a, b) in keep for a, b in zip(frame["group_a"], frame["group_b"], strict=True)]]


def comparison_power(ctx: ReportContext, *, exploratory: bool = True) -> Attainability | None:
    """Can any comparison of the report's exploratory (or pre-specified) family be significant?"""
    stat = ctx.comparison if exploratory else ctx.primary
    if not stat.ok:
        return None
    frame = signal_features(ctx, stat.frame) if exploratory else stat.frame
    return attainability(frame, alpha=ALPHA) if not frame.empty else None


def correlation_power(ctx: ReportContext) -> Attainability | None:
    """Can any correlation of the report's family be significant?"""
    if not ctx.correlation.ok:
        return None
    frame = signal_features(ctx, ctx.correlation.frame)
    return attainability(frame, alpha=ALPHA) if not frame.empty else None


def _comparison_findings(ctx: ReportContext) -> list[str]:
    out: list[str] = []
    mentioned = {ctx.target}
    if ctx.primary.ok:
        rows = _pairs_shown(ctx.primary.frame)
        k = rows["feature"].nunique()
        family = f"Holm over the {k} pre-specified tests" if k > 1 else ""
        for _, row in rows[rows["feature"] == ctx.target].iterrows():
            out.append(comparison_sentence(row, f"Final score {ctx.target}", family=family))
        for feature in ctx.primary_features:
            for _, row in rows[rows["feature"] == feature].iterrows():
                out.append(comparison_sentence(row, feature, family=family))
                mentioned.add(feature)
        power = comparison_power(ctx, exploratory=False)
        if power is not None and not power.possible:
            out.append("Pre-specified tests: " + power.sentence)
    if not ctx.comparison.ok:
        return out
    signals = sorted_comparison(ctx, exploratory_only=True)
    n_tested = signals["feature"].nunique()
    significant = signals[signals["p_holm"] < ALPHA]
    others = significant[~significant["feature"].isin(mentioned)]
    power = comparison_power(ctx)
    if not significant.empty:
        out.append(
            f"{significant['feature'].nunique()} of {n_tested} training-signal features differ between "
            f"{ctx.group} groups after Holm correction (p_holm < {ALPHA})."
        )
        if not others.empty:
            out.append("Strongest other difference: " + comparison_sentence(others.iloc[0]))
    elif not signals.empty and signals["p_value"].isna().all():
        out.append(
            f"No {ctx.group} comparison could be tested ({n_tested} features): "
            f"{_most_common_note(signals) or 'no p-values'}."
        )
    elif not signals.empty:
        top = signals.iloc[0]
        out.append(
            f"No training-signal feature differs between {ctx.group} groups after Holm correction "
            f"({n_tested} tested; smallest p_holm = {fmt_p(top['p_holm'])}, {top['feature']})."
        )
    if power is not None and not power.possible:
        out.append("Training-signal comparisons: " + power.sentence)
    return out


def _most_common_note(frame: pd.DataFrame) -> str | None:
    notes = frame["note"].fillna("").astype(str) if "note" in frame else pd.Series(dtype=str)
    notes = notes[notes != ""]
    return str(notes.value_counts().index[0]) if len(notes) else None


def _correlation_findings(ctx: ReportContext) -> list[str]:
    ranked = sorted_correlation(ctx)
    if ranked.empty:
        return []
    n_sig = int((ranked["p_holm"] < ALPHA).sum())
    by = ctx.group if "partial_r" in ranked.columns else None
    out = [correlation_sentence(ranked.iloc[0], ctx.target, by=by)]
    out.append(
        f"{n_sig} of {ranked['feature'].nunique()} features correlate with {ctx.target} after Holm correction "
        f"(p_holm < {ALPHA})."
    )
    power = correlation_power(ctx)
    if power is not None and not power.possible:
        out.append("Correlations: " + power.sentence)
    return out


def findings(ctx: ReportContext) -> list[str]:
    """The key findings, in order: group comparison, correlation with the target, early forecast.

    Each sentence reports what was observed with its uncertainty and ends with its verdict after
    correction; when the sample cannot reach significance at all, a sentence says so and how many
    runs would be needed (:func:`dynamics.analysis.attainability`). A statistic that is missing
    contributes its reason instead of a number.
    """
    out: list[str] = []
    if ctx.comparison.ok or ctx.primary.ok:
        out += _comparison_findings(ctx)
    if ctx.correlation.ok:
        out += _correlation_findings(ctx)
    if ctx.forecast.ok and ctx.forecast.frame["mae"].notna().any():
        out.append(forecast_sentence(ctx.forecast.frame, ctx.target))
    return out
