"""Exact small-sample p-values: equal to scipy's exact / full-permutation results, never below what
the sample can attain (planted perfect effects at every n up to 10)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dynamics.analysis import attainability, compare, correlate, min_pvalue
from dynamics.analysis.exact import all_permutations, exact_correlation_p, stratified_correlation_p
from dynamics.analysis.resampling import CORRELATIONS

SCIPY = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}


def test_all_permutations_are_distinct_and_complete():
    for n in range(1, 7):
        perms = all_permutations(n)
        assert perms.shape == (math.factorial(n), n)
        assert len({tuple(p) for p in perms}) == math.factorial(n)
        assert (np.sort(perms, axis=1) == np.arange(n)).all()


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall"])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_correlation_p_equals_scipys_full_permutation_test(method, ties):
    rng = np.random.default_rng(1)
    for n in (4, 5, 6):
        x = rng.standard_normal(n)
        y = x + rng.standard_normal(n)
        if ties:
            x[:2] = x[0]
        ref = stats.permutation_test(
            (x,),
            lambda a, y=y: SCIPY[method](a, y).statistic,
            permutation_type="pairings",
            n_resamples=np.inf,
        )
        assert exact_correlation_p(x, y, method) == pytest.approx(ref.pvalue, rel=1e-12), (n, method)


def test_exact_kendall_without_ties_equals_scipy_method_exact():
    rng = np.random.default_rng(2)
    for n in (4, 6, 9):
        x, y = rng.standard_normal(n), rng.standard_normal(n)
        assert exact_correlation_p(x, y, "kendall") == pytest.approx(
            stats.kendalltau(x, y, method="exact").pvalue
        )


def test_stratified_p_equals_brute_force_over_within_group_permutations():
    rng = np.random.default_rng(3)
    cells = np.array(["a", "a", "a", "b", "b", "b", "b"])
    x = rng.standard_normal(7) + (cells == "b")
    y = x + rng.standard_normal(7) + 2 * (cells == "b")
    design = np.c_[np.ones(7), cells == "b"].astype(float)
    p, exact = stratified_correlation_p(x, y, design, cells, method="pearson")
    assert exact
    ia, ib = np.flatnonzero(cells == "a"), np.flatnonzero(cells == "b")

    def centred(v):
        return v - np.where(cells == "a", v[ia].mean(), v[ib].mean())

    obs = CORRELATIONS["pearson"](centred(x), centred(y))
    null = []
    for pa in itertools.permutations(ia):
        for pb in itertools.permutations(ib):
            idx = np.arange(7)
            idx[ia], idx[ib] = pa, pb
            null.append(CORRELATIONS["pearson"](centred(x), centred(y[idx])))
    null = np.array(null)
    ref = min(1.0, 2 * min(np.mean(null <= obs + 1e-12), np.mean(null >= obs - 1e-12)))
    assert p == pytest.approx(ref)


def test_min_pvalue_formulas():
    assert min_pvalue("spearman", 4) == pytest.approx(2 / 24)
    assert min_pvalue("wilcoxon", 10) == pytest.approx(0.001953125)
    assert min_pvalue("mannwhitney", (3, 3)) == pytest.approx(0.1)
    assert min_pvalue("within", (2, 2)) == pytest.approx(0.5)
    a = attainability(test="wilcoxon", n=10, family_size=582)
    assert not a.possible and a.threshold == pytest.approx(0.05 / 582) and a.n_needed == 15
    assert "no finding can be significant" in a.sentence and "15 pairs" in a.sentence
    assert attainability(test="wilcoxon", n=15, family_size=582).possible


def _perfect(n_pairs: int) -> pd.DataFrame:
    """n_pairs models x {DMAX, IMAX}; IMAX better on every pair; features perfectly ordered with the score."""
    score = np.r_[np.arange(n_pairs), np.arange(n_pairs) + n_pairs + 0.5] / (2 * n_pairs)
    frame = pd.DataFrame(
        {
            "construction": ["DMAX"] * n_pairs + ["IMAX"] * n_pairs,
            "model": [f"m{i}" for i in range(n_pairs)] * 2,
            "multitask_score": score,
        }
    )
    for j in range(5):
        frame[f"f{j}/all/mean"] = (-1) ** j * (3 * score + j)  # |r| = 1 with the score
    return frame


P_COLUMNS = ("p_value", "p_perm", "p_holm", "p_bh")


@pytest.mark.parametrize("n_runs", [4, 5, 6, 7, 8, 9, 10])
def test_no_p_value_falls_below_what_the_sample_can_attain(n_runs):
    feats = _perfect(math.ceil(n_runs / 2)).iloc[:n_runs]  # odd n: one IMAX run without a partner
    with pytest.warns(UserWarning) if n_runs < 8 else _nothing():
        cmp = compare(feats, by="construction", pair_on="model", n_boot=0)
    n_pairs = int(cmp["n_pairs"].max())
    floor_cmp = min_pvalue("wilcoxon", n_pairs)
    for col in P_COLUMNS:
        vals = cmp[col].dropna()
        assert (vals >= floor_cmp * (1 - 1e-9)).all(), (col, vals.min(), floor_cmp)
    unp = compare(feats, by="construction", pair_on=None, n_boot=0)
    na, nb = int(unp["n_a"].iloc[0]), int(unp["n_b"].iloc[0])
    for col in P_COLUMNS:
        assert (unp[col].dropna() >= min_pvalue("mannwhitney", (na, nb)) * (1 - 1e-9)).all(), col
    for method in ("spearman", "pearson", "kendall"):
        cor = correlate(feats, method=method, n_boot=0, n_perm=100)
        assert (cor["r"].abs() > 0.999).all() and (cor["p_method"] == "exact").all()
        floor = 2 / math.factorial(n_runs)
        for col in P_COLUMNS:
            assert (cor[col] >= floor * (1 - 1e-9)).all(), (method, col, cor[col].min(), floor)
        if method != "kendall" and n_runs <= 6:  # scipy's Kendall is exact at small n already
            assert (cor["p_asymptotic"] < floor).all()  # the approximation would overclaim
        assert (cor["p_holm"] >= cor["p_min_holm"] * (1 - 1e-9)).all()
    within = correlate(feats, control="construction", n_boot=0, n_perm=0)
    sizes = feats["construction"].value_counts().tolist()
    assert (within["partial_p"].dropna() >= min_pvalue("within", sizes) * (1 - 1e-9)).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_four_runs_two_pairs_say_nothing_can_be_significant():
    feats = _perfect(2)
    cor = correlate(feats, n_boot=0)
    assert cor["p_value"].iloc[0] == pytest.approx(2 / 24) and cor["p_asymptotic"].iloc[0] < 1e-6
    a = attainability(cor)
    assert not a.possible and a.n == 4 and a.family_size == 5
    assert "no finding can be significant" in a.sentence
    with pytest.warns(UserWarning, match="too few"):
        cmp = compare(feats, by="construction", pair_on="model", n_boot=0)
    assert cmp["p_value"].isna().all() and cmp["cohens_dz"].isna().all() and cmp["rank_biserial"].isna().all()
    assert (cmp["p_min"] == 0.5).all() and not attainability(cmp).possible
