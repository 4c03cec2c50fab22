"""Correlation of every feature with the final score: CI, permutation p-value, correction, partials.

For each feature ``x`` against the target ``y`` (runs where both are known, ``n`` of them):

* ``r``: Spearman's rho, Pearson's r or Kendall's tau-b;
* ``p_value``, the p-value that the corrections use: for ``n <= EXACT_MAX_N`` (10) runs the exact
  permutation p over all ``n!`` pairings (:func:`dynamics.analysis.exact.exact_correlation_p`,
  ``p_method = "exact"``); above, the matching scipy call (``spearmanr``, ``pearsonr``,
  ``kendalltau``; ``p_method = "asymptotic"``). ``p_asymptotic`` is always that scipy call, kept
  for reference: with 4 runs and ``|r| = 1`` it is 0 while the exact p is ``2 / 4! = 0.083``;
* ``p_min``: the smallest p attainable with ``n`` runs (``2 / n!``) and ``p_min_holm`` the smallest
  Holm-adjusted p for this family (see :func:`dynamics.analysis.attainability`);
* ``ci_low``, ``ci_high``: bootstrap CI of ``r`` resampling runs (pairs kept together; BCa,
  ``scipy.stats.bootstrap``);
* ``p_perm``: two-sided permutation p-value (``scipy.stats.permutation_test``, pairings; equal to
  ``p_value`` when that is exact, else ``n_perm`` random pairings);
* ``p_holm``, ``p_bh``: ``p_value`` corrected over all features (Holm; Benjamini-Hochberg).

Partial correlation controlling for tags ``control`` (e.g. the model): both ``x`` and ``y`` are
residualised on an intercept plus dummies of the control tags by least squares, and ``partial_r``
is the Pearson correlation of the residuals (for ``spearman``: of the residualised ranks, ranks
taken over the complete cases). Its test uses ``t = r sqrt(df / (1 - r^2))`` with
``df = n - 2 - k``, ``k`` = number of dummy columns, which is exactly the t-test of ``x`` in the
regression ``y ~ x + C(control)``; it is ``partial_p_asymptotic``. For ``n <= EXACT_MAX_N`` the
``partial_p`` used by the report is exact instead: ``y`` permuted only within the cells of the
control tags, both sides residualised again for each permutation
(:func:`dynamics.analysis.exact.stratified_correlation_p`). With ``control="construction"`` this
is the *within-group* correlation: every value centred on its construction's mean, so a difference
between constructions cannot make a feature "go with the score". Kendall has no such partial and is
refused with ``control``.

With ``mixed_group``, each feature also gets the slope of ``target ~ feature + (1 | group)``
(:func:`dynamics.analysis.mixed.mixed_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from dynamics.analysis._columns import feature_columns, require_columns
from dynamics.analysis._guards import MIN_N, warn_notes
from dynamics.analysis.attainable import min_pvalue
from dynamics.analysis.exact import EXACT_MAX_N, exact_correlation_p, stratified_correlation_p
from dynamics.analysis.mixed import mixed_model
from dynamics.analysis.multiple_testing import adjust_pvalues
from dynamics.analysis.resampling import (
    CORRELATIONS,
    bootstrap_ci,
    permutation_pvalue,
    resample_batch,
    stream,
)

__all__ = ["correlate", "partial_correlation"]

_SCIPY = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}


def _dummies(frame: pd.DataFrame) -> np.ndarray:
    """Intercept plus treatment-coded dummies of every column (first level dropped)."""
    parts = [np.ones((len(frame), 1))]
    for col in frame.columns:
        d = pd.get_dummies(frame[col].astype(str), drop_first=True, dtype=float)
        if d.shape[1]:
            parts.append(d.to_numpy())
    return np.hstack(parts)


def partial_correlation(
    x: np.ndarray, y: np.ndarray, control: pd.DataFrame, method: str = "pearson"
) -> tuple[float, float, int]:
    """``(partial_r, p_value, df)`` of ``x`` and ``y`` given categorical ``control`` columns.

    See the module docstring; ``control`` holds one row per observation.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"partial correlation is defined for 'pearson' and 'spearman', not {method!r}")
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
    z = _dummies(control.reset_index(drop=True))
    rank = np.linalg.matrix_rank(z)
    df = len(x) - 2 - (rank - 1)
    if df < 1:
        return np.nan, np.nan, int(df)
    rx = x - z @ np.linalg.lstsq(z, x, rcond=None)[0]
    ry = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
    scale = max(np.abs(x).max(), np.abs(y).max(), 1.0)
    if np.ptp(rx) <= 1e-12 * scale or np.ptp(ry) <= 1e-12 * scale:
        return np.nan, np.nan, int(df)
    r = float(np.clip(np.corrcoef(rx, ry)[0, 1], -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0, int(df)
    t = r * np.sqrt(df / (1.0 - r * r))
    return r, float(2.0 * stats.t.sf(abs(t), df)), int(df)


def correlate(
    feats: pd.DataFrame,
    target: str = "multitask_score",
    method: str = "spearman",
    features: str | Sequence[str] | None = None,
    control: str | Sequence[str] | None = None,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
    min_n: int = MIN_N,
    mixed_group: str | None = None,
) -> pd.DataFrame:
    """Correlate every feature with ``target`` (statistics in the module docstring).

    Args:
        feats: the output of :func:`dynamics.analysis.features`.
        target: the column to correlate with (default the multi-task score).
        method: ``"spearman"`` (default), ``"pearson"`` or ``"kendall"``.
        features: feature columns or glob patterns (default: all feature columns).
        control: tag(s) to partial out (adds ``partial_r``, ``partial_p``, ``partial_p_asymptotic``,
            ``partial_df``); ``control="construction"`` gives the within-construction correlation.
        n_boot, n_perm: bootstrap and permutation resamples (0 skips them).
        seed: seed of the random generators (one stream per feature, so a feature's CI and
            permutation p do not depend on the other features tested). confidence: CI level.
        min_n: fewest runs for which p-values and CIs are reported (else NaN and a note).
        mixed_group: a tag for the mixed model ``target ~ feature + (1 | group)`` (adds
            ``mixed_coef``, ``mixed_se``, ``mixed_p``, ``mixed_converged``).

    Returns:
        One row per feature: ``feature, n, r, ci_low, ci_high, p_value, p_method, p_min,
        p_asymptotic, p_perm, p_holm, p_bh, p_min_holm`` (+ ``partial_r, partial_p,
        partial_p_asymptotic, partial_df`` with ``control``, ``mixed_*`` with ``mixed_group``), ``note``; in the order of ``features``
        (``.sort_values("p_value")`` ranks them).

    Example:
        >>> import numpy as np, pandas as pd
        >>> from dynamics.analysis import correlate
        >>> rng = np.random.default_rng(0)
        >>> rho = rng.normal(size=30)
        >>> feats = pd.DataFrame({"fisher_rho/all/late": rho, "noise/all/mean": rng.normal(size=30),
        ...                       "multitask_score": 0.8 * rho + 0.5 * rng.normal(size=30)})
        >>> res = correlate(feats, n_boot=200, n_perm=200).set_index("feature")
        >>> print(res.loc["fisher_rho/all/late", "p_bh"] < 0.001, res.loc["noise/all/mean", "p_bh"] > 0.05)
        True True
    """
    if method not in CORRELATIONS:
        raise ValueError(f"method must be one of {sorted(CORRELATIONS)}, got {method!r}")
    require_columns(feats, [target], "target")
    control_cols = [control] if isinstance(control, str) else list(control or [])
    require_columns(feats, control_cols, "control")
    if control_cols and method == "kendall":
        raise ValueError(
            "partial correlation (control=...) is available for 'spearman' and 'pearson', not 'kendall'"
        )
    if mixed_group is not None:
        require_columns(feats, [mixed_group], "mixed_group")
    cols = [c for c in feature_columns(feats, features) if c != target]
    if not cols:
        raise ValueError("no feature columns to correlate; pass features=[...] naming numeric columns")
    stat = CORRELATIONS[method]
    y_all = pd.to_numeric(feats[target], errors="coerce").to_numpy(dtype=float)
    ctrl_ok = (
        feats[control_cols].notna().all(axis=1).to_numpy() if control_cols else np.ones(len(feats), bool)
    )
    rows = []
    for col in cols:
        rng = stream(seed, col, target)
        x_all = pd.to_numeric(feats[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(x_all) & np.isfinite(y_all)
        x, y = x_all[ok], y_all[ok]
        row = {
            "feature": col,
            "n": int(ok.sum()),
            "r": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "p_value": np.nan,
            "p_method": "",
            "p_min": min_pvalue(method, int(ok.sum())),
            "p_asymptotic": np.nan,
            "p_perm": np.nan,
            "note": "",
        }
        if control_cols:
            row.update(partial_r=np.nan, partial_p=np.nan, partial_p_asymptotic=np.nan, partial_df=np.nan)
        if mixed_group is not None:
            row.update(mixed_coef=np.nan, mixed_se=np.nan, mixed_p=np.nan, mixed_converged=False)
        n = x.size
        if n >= 2 and (np.ptp(x) == 0 or np.ptp(y) == 0):
            row["note"] = (
                "no variation: " + ("the feature" if np.ptp(x) == 0 else "the target") + " is constant"
            )
        elif n < min_n:
            row["note"] = f"too few runs for a test ({n} < {min_n})"
            if n >= 3:
                row["r"] = float(stat(x, y))
        else:
            res = _SCIPY[method](x, y)
            row["r"], row["p_asymptotic"] = float(res.statistic), float(res.pvalue)
            batch = resample_batch(n, method)
            row["ci_low"], row["ci_high"] = bootstrap_ci(
                (x, y), stat, n_resamples=n_boot, rng=rng, paired=True, confidence=confidence, batch=batch
            )
            if n <= EXACT_MAX_N:
                row["p_value"] = row["p_perm"] = exact_correlation_p(x, y, method)
                row["p_method"] = "exact"
            else:
                row["p_value"], row["p_method"] = row["p_asymptotic"], "asymptotic"
                if method == "spearman":  # ranks only move with the permutation: rank once, then Pearson
                    row["p_perm"] = permutation_pvalue(
                        stats.rankdata(x), stats.rankdata(y), CORRELATIONS["pearson"], n_resamples=n_perm,
                        rng=rng,
                    )  # fmt: skip
                else:
                    row["p_perm"] = permutation_pvalue(x, y, stat, n_resamples=n_perm, rng=rng, batch=batch)
            if control_cols:
                both = ok & ctrl_ok
                ctrl = feats.loc[both, control_cols]
                pr, pp, pdf = partial_correlation(x_all[both], y_all[both], ctrl, method=method)
                row.update(partial_r=pr, partial_p=pp, partial_p_asymptotic=pp, partial_df=pdf)
                if np.isfinite(pr) and both.sum() <= EXACT_MAX_N:
                    cells = ctrl.astype(str).agg("\x1f".join, axis=1).to_numpy()
                    row["partial_p"], _ = stratified_correlation_p(
                        x_all[both], y_all[both], _dummies(ctrl.reset_index(drop=True)), cells,
                        method=method, rng=rng,
                    )  # fmt: skip
            if mixed_group is not None:
                mm = mixed_model(feats, target=target, feature=col, group=mixed_group, min_n=min_n)
                row.update(
                    mixed_coef=mm.coef, mixed_se=mm.se, mixed_p=mm.p_value, mixed_converged=mm.converged
                )
                if mm.note:
                    row["note"] = f"mixed model: {mm.note}"
        rows.append(row)
    out = pd.DataFrame(rows)
    out.insert(out.columns.get_loc("p_perm") + 1, "p_holm", adjust_pvalues(out["p_value"], "holm"))
    out.insert(out.columns.get_loc("p_holm") + 1, "p_bh", adjust_pvalues(out["p_value"], "bh"))
    family = int(np.isfinite(out["p_value"].to_numpy(dtype=float)).sum()) or len(out)
    out.insert(
        out.columns.get_loc("p_bh") + 1, "p_min_holm", np.minimum(1.0, family * out["p_min"].to_numpy(float))
    )
    out.attrs["method"] = method
    out = out[[c for c in out.columns if c != "note"] + ["note"]]
    warn_notes(out["note"].tolist(), "correlations")
    return out
