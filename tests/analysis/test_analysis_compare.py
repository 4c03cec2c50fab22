"""compare(): every statistic equals a direct scipy/statsmodels call; planted effects found, nulls calibrated."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from dynamics.analysis import compare
from dynamics.analysis.resampling import stream


def paired_frame(rng, n_pairs, effects, groups=("DMAX", "IMAX")):
    """One column per effect: b = a + effect + noise, paired by model; columns are independent draws."""
    k = len(effects)
    a = rng.standard_normal((n_pairs, k))
    b = a + np.asarray(effects) + rng.standard_normal((n_pairs, k))
    cols = {f"f{j}/all/mean": np.r_[a[:, j], b[:, j]] for j in range(k)}
    frame = pd.DataFrame(
        {
            "construction": [groups[0]] * n_pairs + [groups[1]] * n_pairs,
            "model": [f"m{i}" for i in range(n_pairs)] * 2,
        }
    )
    return pd.concat([frame, pd.DataFrame(cols)], axis=1)


def test_paired_statistics_equal_direct_scipy_calls():
    rng = np.random.default_rng(0)
    feats = paired_frame(rng, 9, [0.8, 0.0, -0.5])
    res = compare(feats, by="construction", pair_on="model", groups=("DMAX", "IMAX"), n_boot=500, seed=7)
    assert list(res["feature"]) == ["f0/all/mean", "f1/all/mean", "f2/all/mean"]
    for j, row in res.iterrows():
        a = feats.loc[feats.construction == "DMAX", f"f{j}/all/mean"].to_numpy()
        b = feats.loc[feats.construction == "IMAX", f"f{j}/all/mean"].to_numpy()
        d = b - a
        w = stats.wilcoxon(d)
        t = stats.ttest_rel(b, a)
        assert row["paired"] and row["n_pairs"] == 9 and row["test"] == "wilcoxon"
        assert row["statistic"] == pytest.approx(w.statistic) and row["p_value"] == pytest.approx(w.pvalue)
        assert row["t_statistic"] == pytest.approx(t.statistic) and row["p_t"] == pytest.approx(t.pvalue)
        assert row["diff"] == pytest.approx(d.mean()) and row["median_diff"] == pytest.approx(np.median(d))
        assert row["mean_b"] - row["mean_a"] == pytest.approx(d.mean())
        assert row["cohens_dz"] == pytest.approx(d.mean() / d.std(ddof=1))
        ranks = stats.rankdata(np.abs(d))
        assert row["rank_biserial"] == pytest.approx((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())
        assert np.isnan(row["cohens_d"])
    # The first feature's CI is scipy's bootstrap with that feature's stream of the same seed.
    d0 = feats.loc[9:, "f0/all/mean"].to_numpy() - feats.loc[:8, "f0/all/mean"].to_numpy()
    gen = stream(7, "f0/all/mean", "DMAX", "IMAX")
    ref = stats.bootstrap((d0,), np.mean, n_resamples=500, rng=gen).confidence_interval
    assert res.loc[0, "diff_ci_low"] == pytest.approx(ref.low) and res.loc[
        0, "diff_ci_high"
    ] == pytest.approx(ref.high)
    np.testing.assert_allclose(res["p_holm"], multipletests(res["p_value"], method="holm")[1])
    np.testing.assert_allclose(res["p_bh"], multipletests(res["p_value"], method="fdr_bh")[1])
    # 9 pairs: the p the corrections use is exact (all 2^9 sign flips), the approximations are extras.
    assert (res["p_method"] == "exact").all()
    for j, row in res.iterrows():
        d = feats.loc[9:, f"f{j}/all/mean"].to_numpy() - feats.loc[:8, f"f{j}/all/mean"].to_numpy()
        assert row["p_value"] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)
        assert row["p_asymptotic"] == pytest.approx(stats.wilcoxon(d, method="approx").pvalue)
        flips = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf)
        assert row["p_perm"] == pytest.approx(flips.pvalue)
        assert row["p_min"] == pytest.approx(2 / 2**9)
    assert (res["p_min_holm"] == np.minimum(1, 3 * res["p_min"])).all()


def test_a_features_ci_does_not_depend_on_the_other_features_tested():
    feats = paired_frame(np.random.default_rng(3), 10, [0.3, 0.1, 0.0])
    kw = dict(by="construction", pair_on="model", groups=("DMAX", "IMAX"), n_boot=400, seed=1)
    alone = compare(feats, features=["f2/all/mean"], **kw).set_index("feature")
    among = compare(feats, features=["f0/all/mean", "f1/all/mean", "f2/all/mean"], **kw).set_index("feature")
    cols = ["diff", "diff_ci_low", "diff_ci_high", "p_value"]
    pd.testing.assert_series_equal(alone.loc["f2/all/mean", cols], among.loc["f2/all/mean", cols])
    other_seed = compare(feats, features=["f2/all/mean"], **{**kw, "seed": 2}).set_index("feature")
    assert other_seed.loc["f2/all/mean", "diff_ci_low"] != alone.loc["f2/all/mean", "diff_ci_low"]


def test_unpaired_statistics_equal_direct_scipy_calls():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 7), rng.normal(1, 2, 10)
    b[:3] = a[:3]  # ties across groups
    feats = pd.DataFrame({"construction": ["A"] * 7 + ["B"] * 10, "x/all/mean": np.r_[a, b]})
    row = compare(feats, by="construction", pair_on=None, n_boot=300, seed=3).iloc[0]
    u = stats.mannwhitneyu(b, a)
    t = stats.ttest_ind(b, a, equal_var=False)
    assert not row["paired"] and (row["n_a"], row["n_b"]) == (7, 10)
    assert row["test"] == "mannwhitney" and row["t_test"] == "welch"
    assert row["statistic"] == pytest.approx(u.statistic) and row["p_value"] == pytest.approx(u.pvalue)
    assert row["t_statistic"] == pytest.approx(t.statistic) and row["p_t"] == pytest.approx(t.pvalue)
    pooled = np.sqrt((6 * a.var(ddof=1) + 9 * b.var(ddof=1)) / 15)
    assert row["cohens_d"] == pytest.approx((b.mean() - a.mean()) / pooled)
    greater = (b[:, None] > a[None, :]).mean() - (b[:, None] < a[None, :]).mean()  # brute force over pairs
    assert row["rank_biserial"] == pytest.approx(greater)
    assert row["median_diff"] == pytest.approx(np.median(b) - np.median(a))
    ref = stats.bootstrap(
        (a, b),
        lambda x, y, axis: y.mean(axis) - x.mean(axis),
        n_resamples=300,
        rng=stream(3, "x/all/mean", "A", "B"),
    ).confidence_interval
    assert row["diff_ci_low"] == pytest.approx(ref.low) and row["diff_ci_high"] == pytest.approx(ref.high)


def test_planted_paired_effect_is_found_and_nulls_are_not():
    rng = np.random.default_rng(2)
    feats = paired_frame(rng, 12, [2.0] + [0.0] * 9)
    res = compare(feats, by="construction", pair_on="model", n_boot=0).set_index("feature")
    assert res.loc["f0/all/mean", "p_holm"] < 0.01 and res.loc["f0/all/mean", "diff"] > 1
    assert (res.drop("f0/all/mean")["p_bh"] > 0.05).all()


def _rate_bounds(n, level=0.05):
    tol = 3 * np.sqrt(level * (1 - level) / n)
    return level - tol - 0.01, level + tol  # the exact rank tests are slightly conservative


def test_null_features_are_flagged_at_the_nominal_rate_over_repeated_draws():
    """300 independent null features (each one draw of 12 pairs / 2 x 12 runs) in one call each."""
    rng = np.random.default_rng(3)
    n = 300
    paired = compare(paired_frame(rng, 12, [0.0] * n), by="construction", pair_on="model", n_boot=0)
    independent = pd.DataFrame(
        {
            "construction": ["DMAX"] * 12 + ["IMAX"] * 12,
            **{f"f{j}/all/mean": rng.standard_normal(24) for j in range(n)},
        }
    )
    unpaired = compare(independent, by="construction", pair_on=None, n_boot=0)
    low, high = _rate_bounds(n)
    for res in (paired, unpaired):
        for col in ("p_value", "p_t"):
            rate = np.mean(res[col] < 0.05)
            assert low < rate < high, (col, rate)
        assert np.mean(res["p_bh"] < 0.05) <= 3 / n and np.mean(res["p_holm"] < 0.05) <= 3 / n


def test_corrected_p_values_keep_the_family_wise_rate_over_repeated_null_families():
    rng = np.random.default_rng(13)
    n_families = 20
    any_holm, any_bh = [], []
    for _ in range(n_families):
        res = compare(paired_frame(rng, 10, [0.0] * 8), by="construction", pair_on="model", n_boot=0)
        any_holm.append((res["p_holm"] < 0.05).any())
        any_bh.append((res["p_bh"] < 0.05).any())
    # Under the global null both procedures keep P(any rejection) <= 5%; 20 families: allow 3.
    assert sum(any_holm) <= 3 and sum(any_bh) <= 3


def test_planted_effect_has_power_over_repeated_draws():
    """30 independent draws of a d_z = 1.5 paired effect with 10 pairs (one column each)."""
    rng = np.random.default_rng(4)
    res = compare(paired_frame(rng, 10, [1.5] * 30), by="construction", pair_on="model", n_boot=0)
    assert np.mean(res["p_value"] < 0.05) > 0.85 and np.mean(res["p_t"] < 0.05) > 0.85
    assert (res["diff"] > 0).mean() > 0.95


def test_too_few_pairs_or_runs_give_nan_p_values_a_note_and_one_warning():
    rng = np.random.default_rng(5)
    feats = paired_frame(rng, 3, [1.0, 0.0])
    with pytest.warns(UserWarning, match="2 of 2 comparisons have too few observations") as record:
        res = compare(feats, by="construction", pair_on="model", n_boot=100)
    assert len([w for w in record if "too few" in str(w.message)]) == 1
    assert res["p_value"].isna().all() and res["p_t"].isna().all() and res["diff_ci_low"].isna().all()
    assert res["note"].str.contains(r"too few pairs for a test \(3 < 4\)").all()
    assert res["diff"].notna().all()  # effect sizes are still reported
    single = pd.DataFrame({"g": ["a", "b", "b", "b", "b"], "x/all/mean": [1.0, 2, 3, 4, 5]})
    with pytest.warns(UserWarning, match="too few"):
        row = compare(single, by="g", pair_on=None).iloc[0]
    assert np.isnan(row["p_value"]) and "groups of 1 and 4" in row["note"]


def test_ties_and_no_variation():
    feats = pd.DataFrame(
        {
            "g": ["a"] * 6 + ["b"] * 6,
            "model": [f"m{i}" for i in range(6)] * 2,
            "same/all/mean": [1.0] * 12,
            "shift/all/mean": [1.0, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6, 7],
            "ties/all/mean": [1.0, 1, 2, 2, 3, 3, 1, 2, 2, 3, 3, 4],
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no runtime warnings leak out of scipy
        res = compare(feats, by="g", pair_on="model", n_boot=200).set_index("feature")
    assert (
        np.isnan(res.loc["same/all/mean", "p_value"])
        and "every paired difference is 0" in res.loc["same/all/mean", "note"]
    )
    shift = res.loc["shift/all/mean"]
    assert shift["p_value"] == pytest.approx(stats.wilcoxon(np.ones(6)).pvalue)
    assert np.isnan(shift["p_t"]) and "constant paired difference" in shift["note"]
    ties = res.loc["ties/all/mean"]
    d = np.array([0.0, 1, 0, 1, 0, 1])
    assert ties["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert ties["rank_biserial"] == pytest.approx(1.0)


def test_pairing_rules_unmatched_duplicates_no_match_and_many_groups():
    rng = np.random.default_rng(6)
    feats = paired_frame(rng, 6, [1.0])
    extra = pd.DataFrame({"construction": ["IMAX"], "model": ["lonely"], "f0/all/mean": [0.0]})
    res = compare(pd.concat([feats, extra], ignore_index=True), by="construction", pair_on="model", n_boot=0)
    assert (
        res.loc[0, "n_pairs"] == 6
        and res.loc[0, "n_b"] == 7
        and "1 run(s) without a partner" in res.loc[0, "note"]
    )
    # Two seeds per model and construction, paired on model only: seeds are averaged within a cell.
    two_seeds = pd.concat(
        [feats, feats.assign(**{"f0/all/mean": feats["f0/all/mean"] + 1.0})], ignore_index=True
    )
    avg = compare(two_seeds, by="construction", pair_on="model", n_boot=0).iloc[0]
    d = (feats["f0/all/mean"][6:].to_numpy() + 0.5) - (feats["f0/all/mean"][:6].to_numpy() + 0.5)
    assert avg["n_pairs"] == 6 and avg["p_value"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert "averaged" in avg["note"]
    # No run matches: unpaired tests, and the note says so.
    renamed = feats.assign(model=[f"x{i}" for i in range(6)] + [f"y{i}" for i in range(6)])
    un = compare(renamed, by="construction", pair_on="model", n_boot=0).iloc[0]
    assert not un["paired"] and un["test"] == "mannwhitney" and "no runs match" in un["note"]
    three = pd.concat([feats, feats.iloc[:6].assign(construction="MIXED")], ignore_index=True)
    many = compare(three, by="construction", pair_on="model", n_boot=0)
    assert list(zip(many.group_a, many.group_b, strict=True)) == [
        ("DMAX", "IMAX"),
        ("DMAX", "MIXED"),
        ("IMAX", "MIXED"),
    ]
    with pytest.raises(ValueError, match="pair_on.*'seed'"):
        compare(feats, by="construction", pair_on=("model", "seed"))  # a pair_on tag this frame lacks
    assert not compare(feats, by="construction", n_boot=0).loc[0, "paired"]  # default: unpaired
    with pytest.raises(ValueError, match="no run has construction == 'BOTH'"):
        compare(feats, by="construction", pair_on="model", groups=("DMAX", "BOTH"))
    with pytest.raises(ValueError, match="did you mean"):
        compare(feats, by="construction", pair_on="model", features=["f0/all/man"])
