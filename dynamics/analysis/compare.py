"""Group comparison of every feature: paired when runs can be matched, unpaired otherwise.

For two groups ``a`` and ``b`` of the tag ``by`` (e.g. DMAX and IMAX), every difference is
``b - a``. With ``pair_on`` tags (e.g. model and seed), runs of ``a`` and ``b`` that share them form
pairs (several runs in one cell are averaged first, and the note says so) and, for the ``n`` pairs
with ``d_i = b_i - a_i``:

* Wilcoxon signed-rank test on ``d`` (``scipy.stats.wilcoxon``, zero differences dropped) in
  ``test / statistic / p_value``: exact for ``n <= EXACT_MAX_N`` pairs (all ``2^n`` sign flips,
  :mod:`dynamics.analysis.exact`), scipy's default method above; ``p_asymptotic`` is the normal
  approximation (``method="approx"``), shown for reference only;
* ``p_perm``: sign-flip permutation test of ``mean(d)`` (``scipy.stats.permutation_test``, all
  ``2^n`` flips for ``n <= EXACT_MAX_N``, else ``n_perm`` random ones);
* the paired t-test (``scipy.stats.ttest_rel(b, a)``) in ``t_test / t_statistic / p_t``
  (parametric, uncorrected, for reference);
* ``diff = mean(d)`` with a bootstrap CI (BCa, ``scipy.stats.bootstrap``), ``median_diff = median(d)``;
* Cohen's ``d_z = mean(d) / sd(d)`` (sd with ``n - 1``);
* matched-pairs rank-biserial ``r = (R+ - R-) / (R+ + R-)`` over the signed ranks of the non-zero
  ``|d|`` (Kerby 2014): +1 when every pair has ``b > a``.

Without pairs (``pair_on=None``, or no run matches):

* Mann-Whitney U (``scipy.stats.mannwhitneyu(b, a)``, ``statistic`` = ``U_b``), exact (all splits)
  for ``n_a + n_b <= EXACT_MAX_N``; ``p_asymptotic`` its normal approximation; ``p_perm`` the
  two-sample permutation test of ``mean(b) - mean(a)``; Welch's t-test
  (``scipy.stats.ttest_ind(b, a, equal_var=False)``) in ``p_t``;
* ``diff = mean(b) - mean(a)`` with a bootstrap CI resampling each group independently,
  ``median_diff = median(b) - median(a)``;
* Cohen's ``d = (mean(b) - mean(a)) / s_pooled``,
  ``s_pooled^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)``;
* rank-biserial ``r = 2 U_b / (n_a n_b) - 1 = P(b > a) - P(b < a)``.

``p_holm`` / ``p_bh`` correct ``p_value`` (the exact rank test) over all rows of the table (every
feature and group pair) with Holm and Benjamini-Hochberg. ``p_min`` is the smallest p the rank test
can reach with the row's sample (:func:`dynamics.analysis.min_pvalue`) and ``p_min_holm`` the
smallest Holm-adjusted p for this family: when it exceeds ``alpha`` no row can be significant,
whatever the data (:func:`dynamics.analysis.attainability` says it in words).
Fewer than ``min_n`` pairs (paired) or a group with fewer than 2 runs or fewer than ``min_n`` runs in
all (unpaired) give NaN p-values and CI, a ``note`` and one warning; so does a feature with no
variation at all. Effect sizes (``cohens_dz``, ``cohens_d``, ``rank_biserial``) need at least
``MIN_EFFECT_N`` pairs (or runs per group); with fewer they are NaN (an ``sd`` from two
differences makes ``d_z`` of +-100 routine).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dynamics.analysis._columns import feature_columns, require_columns
from dynamics.analysis._guards import MIN_EFFECT_N, MIN_N, warn_notes
from dynamics.analysis.attainable import min_pvalue
from dynamics.analysis.exact import EXACT_MAX_N, exact_method, exact_wilcoxon
from dynamics.analysis.multiple_testing import adjust_pvalues
from dynamics.analysis.resampling import bootstrap_ci, stream

__all__ = ["compare", "paired_rank_biserial", "DEFAULT_N_PERM"]

DEFAULT_N_PERM = 1999
"""Random permutations for ``p_perm`` above ``EXACT_MAX_N`` (below it every permutation is used)."""


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def _mean(d: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(d, axis=axis)


def paired_rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of differences ``d`` (zeros dropped)."""
    d = np.asarray(d, float)
    d = d[d != 0]
    if d.size == 0:
        return np.nan
    ranks = stats.rankdata(np.abs(d))
    r_plus, r_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((r_plus - r_minus) / (r_plus + r_minus))


def _row(feature: str, a: Any, b: Any) -> dict[str, Any]:
    return {
        "feature": feature,
        "group_a": a,
        "group_b": b,
        "n_a": 0,
        "n_b": 0,
        "n_pairs": 0,
        "paired": False,
        "mean_a": np.nan,
        "mean_b": np.nan,
        "diff": np.nan,
        "diff_ci_low": np.nan,
        "diff_ci_high": np.nan,
        "median_diff": np.nan,
        "test": "",
        "statistic": np.nan,
        "p_value": np.nan,
        "p_method": "",
        "p_min": np.nan,
        "p_asymptotic": np.nan,
        "p_perm": np.nan,
        "t_test": "",
        "t_statistic": np.nan,
        "p_t": np.nan,
        "cohens_dz": np.nan,
        "cohens_d": np.nan,
        "rank_biserial": np.nan,
        "note": "",
    }


def _paired(
    row: dict, a: np.ndarray, b: np.ndarray, *, min_n: int, n_boot: int, n_perm: int, rng, confidence: float
) -> None:
    d = b - a
    n = d.size
    row.update(paired=True, n_pairs=n, test="wilcoxon", t_test="paired_t", p_min=min_pvalue("wilcoxon", n))
    if n == 0:
        row["note"] = "too few pairs: none of the runs match on pair_on"
        return
    row.update(mean_a=a.mean(), mean_b=b.mean(), diff=d.mean(), median_diff=float(np.median(d)))
    if n >= MIN_EFFECT_N:
        if d.std(ddof=1) > 0:
            row["cohens_dz"] = d.mean() / d.std(ddof=1)
        row["rank_biserial"] = paired_rank_biserial(d)
    if n < min_n:
        row["note"] = f"too few pairs for a test ({n} < {min_n})"
        return
    if np.all(d == 0):
        row["note"] = "no variation: every paired difference is 0"
        return
    exact = n <= EXACT_MAX_N
    perm_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])  # leaves rng to the bootstrap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w_stat, w_p = exact_wilcoxon(d) if exact else tuple(stats.wilcoxon(d))
        approx = stats.wilcoxon(d, method="approx")
        t = stats.ttest_rel(b, a)
        perm = stats.permutation_test(
            (d,), _mean, permutation_type="samples", vectorized=True,
            n_resamples=np.inf if exact else n_perm, rng=perm_rng,
        )  # fmt: skip
    row.update(statistic=float(w_stat), p_value=float(w_p), p_method="exact" if exact else "scipy")
    row.update(p_asymptotic=float(approx.pvalue), p_perm=float(perm.pvalue))
    row.update(t_statistic=float(t.statistic), p_t=float(t.pvalue))
    if np.all(d == d[0]):
        row.update(t_statistic=np.nan, p_t=np.nan, note="constant paired difference: the t-test is undefined")
    lo, hi = bootstrap_ci((d,), _mean, n_resamples=n_boot, rng=rng, confidence=confidence)
    row.update(diff_ci_low=lo, diff_ci_high=hi)


def _unpaired(
    row: dict, a: np.ndarray, b: np.ndarray, *, min_n: int, n_boot: int, n_perm: int, rng, confidence: float
) -> None:
    na, nb = a.size, b.size
    row.update(paired=False, test="mannwhitney", t_test="welch", p_min=min_pvalue("mannwhitney", (na, nb)))
    if na == 0 or nb == 0:
        row["note"] = f"too few runs: group sizes {na} and {nb}"
        return
    row.update(
        mean_a=a.mean(),
        mean_b=b.mean(),
        diff=b.mean() - a.mean(),
        median_diff=float(np.median(b) - np.median(a)),
    )
    if min(na, nb) >= MIN_EFFECT_N:
        pooled = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
        if pooled > 0:
            row["cohens_d"] = (b.mean() - a.mean()) / pooled
        row["rank_biserial"] = 2.0 * float(stats.mannwhitneyu(b, a).statistic) / (na * nb) - 1.0
    if min(na, nb) < 2 or na + nb < min_n:
        row["note"] = (
            f"too few runs for a test (groups of {na} and {nb}; need >= 2 each and >= {min_n} in all)"
        )
        return
    if np.ptp(np.r_[a, b]) == 0:
        row["note"] = "no variation: every run has the same value"
        return
    exact = na + nb <= EXACT_MAX_N
    perm_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])  # leaves rng to the bootstrap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        u = stats.mannwhitneyu(b, a, method=exact_method()) if exact else stats.mannwhitneyu(b, a)
        approx = stats.mannwhitneyu(b, a, method="asymptotic")
        t = stats.ttest_ind(b, a, equal_var=False)
        perm = stats.permutation_test(
            (a, b), _mean_diff, permutation_type="independent", vectorized=True,
            n_resamples=np.inf if exact else n_perm, rng=perm_rng,
        )  # fmt: skip
    row.update(statistic=float(u.statistic), p_value=float(u.pvalue), p_method="exact" if exact else "scipy")
    row.update(p_asymptotic=float(approx.pvalue), p_perm=float(perm.pvalue))
    row.update(t_statistic=float(t.statistic), p_t=float(t.pvalue))
    lo, hi = bootstrap_ci((a, b), _mean_diff, n_resamples=n_boot, rng=rng, confidence=confidence)
    row.update(diff_ci_low=lo, diff_ci_high=hi)


def _group_pairs(feats: pd.DataFrame, by: str, groups: Sequence[Any] | None) -> list[tuple[Any, Any]]:
    levels = [v for v in pd.unique(feats[by]) if not pd.isna(v)]
    if groups is None:
        if len(levels) < 2:
            raise ValueError(
                f"column {by!r} has {len(levels)} level(s) {levels}; a comparison needs two groups"
            )
        return list(itertools.combinations(sorted(levels, key=str), 2))
    groups = list(groups)
    if len(groups) != 2:
        raise ValueError(f"groups must name exactly two values of {by!r} as (a, b), got {groups!r}")
    for g in groups:
        if g not in levels:
            raise ValueError(f"no run has {by} == {g!r}; the values present are {levels}")
    return [(groups[0], groups[1])]


def compare(
    feats: pd.DataFrame,
    by: str,
    pair_on: str | Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
    features: str | Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    *,
    n_perm: int = DEFAULT_N_PERM,
    confidence: float = 0.95,
    min_n: int = MIN_N,
) -> pd.DataFrame:
    """Compare two groups of runs on every feature (tests and effect sizes in the module docstring).

    Args:
        feats: the output of :func:`dynamics.analysis.features` (or any frame with a ``by`` column).
        by: the tag whose values define the groups (e.g. ``"construction"``).
        pair_on: tags that identify matching runs across groups, e.g. ``("model", "seed")``
            (default ``None``: unpaired). Every column named must exist.
        groups: ``(a, b)``, the two values of ``by`` to compare (``diff = b - a``). Default: every
            pair of values, in sorted order.
        features: feature columns or glob patterns (default: all feature columns).
        n_boot: bootstrap resamples for the CI of ``diff`` (0 skips the CI).
        seed: seed of the bootstrap's random generator (each feature and group pair draws from
            its own stream, so its CI does not depend on the other features tested).
        n_perm: random permutations for ``p_perm`` when the sample is above ``EXACT_MAX_N``.
        confidence: CI level. min_n: fewest observations for which p-values are reported.

    Returns:
        One row per feature and group pair with the columns ``feature, group_a, group_b, n_a, n_b,
        n_pairs, paired, mean_a, mean_b, diff, diff_ci_low, diff_ci_high, median_diff, test,
        statistic, p_value, p_method, p_min, p_asymptotic, p_perm, t_test, t_statistic, p_t,
        cohens_dz, cohens_d, rank_biserial, p_holm, p_bh, p_min_holm, note``. ``p_method`` is
        ``"exact"`` (every permutation) or ``"scipy"`` (scipy's default method, above
        ``EXACT_MAX_N``).

    Example:
        >>> import numpy as np, pandas as pd
        >>> from dynamics.analysis import compare
        >>> rng = np.random.default_rng(0)
        >>> se = rng.normal(size=8)
        >>> feats = pd.DataFrame({"construction": ["DMAX"] * 8 + ["IMAX"] * 8,
        ...                       "model": [f"m{i}" for i in range(8)] * 2,
        ...                       "fisher_se/all/mean": np.r_[se, se - 1 + 0.1 * rng.normal(size=8)]})
        >>> res = compare(feats, by="construction", pair_on="model", groups=("DMAX", "IMAX"), n_boot=200)
        >>> row = res.iloc[0]
        >>> print(row["test"], row["n_pairs"], round(row["diff"], 1), row["p_method"], row["p_value"])
        wilcoxon 8 -1.1 exact 0.0078125
        >>> print(row["p_min"] == row["p_value"], row["p_min_holm"])  # 2 / 2**8: all 8 pairs agree
        True 0.0078125
    """
    require_columns(feats, [by], "by")
    pair_cols = [pair_on] if isinstance(pair_on, str) else list(pair_on or [])
    require_columns(feats, pair_cols, "pair_on (pass pair_on=None for unpaired tests)")
    cols = feature_columns(feats, features)
    if not cols:
        raise ValueError("no feature columns to compare; pass features=[...] naming numeric columns")
    rows = []
    for a_level, b_level in _group_pairs(feats, by, groups):
        in_a = (feats[by] == a_level).to_numpy()
        in_b = (feats[by] == b_level).to_numpy()
        values = feats[cols].to_numpy(dtype=float)
        cell_note = ""
        if pair_cols:
            key_frame = feats[pair_cols]
            keyed = key_frame.notna().all(axis=1).to_numpy()
            keys = key_frame.astype(str).agg("\x1f".join, axis=1).to_numpy()
            ka = pd.DataFrame(values[in_a & keyed], index=keys[in_a & keyed])
            kb = pd.DataFrame(values[in_b & keyed], index=keys[in_b & keyed])
            if ka.index.has_duplicates or kb.index.has_duplicates:
                cell_note = f"runs sharing {pair_cols} were averaged within each group"
            cell_a = ka.groupby(level=0).mean()
            cell_b = kb.groupby(level=0).mean()
            shared = cell_a.index.intersection(cell_b.index)
        for j, col in enumerate(cols):
            row = _row(col, a_level, b_level)
            rng = stream(seed, col, a_level, b_level)
            a_all = values[in_a, j]
            b_all = values[in_b, j]
            a_all, b_all = a_all[np.isfinite(a_all)], b_all[np.isfinite(b_all)]
            row.update(n_a=a_all.size, n_b=b_all.size)
            notes = [cell_note] if cell_note else []
            if pair_cols and len(shared):
                pa = cell_a.loc[shared, j].to_numpy()
                pb = cell_b.loc[shared, j].to_numpy()
                ok = np.isfinite(pa) & np.isfinite(pb)
                unmatched = int(a_all.size + b_all.size - 2 * ok.sum())
                _paired(
                    row,
                    pa[ok],
                    pb[ok],
                    min_n=min_n,
                    n_boot=n_boot,
                    n_perm=n_perm,
                    rng=rng,
                    confidence=confidence,
                )
                if unmatched > 0 and not cell_note:
                    notes.append(f"{unmatched} run(s) without a partner left out")
            else:
                if pair_cols:
                    notes.append(f"no runs match on {pair_cols}: unpaired tests")
                _unpaired(
                    row,
                    a_all,
                    b_all,
                    min_n=min_n,
                    n_boot=n_boot,
                    n_perm=n_perm,
                    rng=rng,
                    confidence=confidence,
                )
            if row["note"]:
                notes.insert(0, row["note"])
            row["note"] = "; ".join(notes)
            rows.append(row)
    out = pd.DataFrame(rows)
    out["p_holm"] = adjust_pvalues(out["p_value"], "holm")
    out["p_bh"] = adjust_pvalues(out["p_value"], "bh")
    family = int(np.isfinite(out["p_value"].to_numpy(dtype=float)).sum()) or len(out)
    out["p_min_holm"] = np.minimum(1.0, family * out["p_min"].to_numpy(dtype=float))
    order = [c for c in out.columns if c != "note"] + ["note"]
    warn_notes(out["note"].tolist(), "comparisons")
    return out[order]
