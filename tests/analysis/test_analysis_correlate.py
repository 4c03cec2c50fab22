"""correlate() and mixed_model(): agreement with scipy/statsmodels, planted strength found, nulls calibrated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.multitest import multipletests

from dynamics.analysis import correlate, mixed_model, partial_correlation
from dynamics.analysis.resampling import kendall_tau_b, pearson_r, spearman_r, stream

SCIPY = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}


def frame(rng, n, strengths, n_models=None):
    """Target = standard normal; feature j has correlation ``strengths[j]`` with it (Gaussian)."""
    y = rng.standard_normal(n)
    cols = {}
    for j, r in enumerate(strengths):
        cols[f"f{j}/all/mean"] = r * y + np.sqrt(1 - r * r) * rng.standard_normal(n)
    out = pd.DataFrame({**cols, "multitask_score": y})
    if n_models:
        out.insert(0, "model", [f"m{i % n_models}" for i in range(n)])
    return out


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall"])
def test_r_p_ci_and_permutation_p_equal_direct_scipy_calls(method):
    rng = np.random.default_rng(0)
    feats = frame(rng, 25, [0.6, 0.0])
    feats["f0/all/mean"] = np.round(feats["f0/all/mean"], 1)  # ties
    res = correlate(feats, method=method, n_boot=300, n_perm=300, seed=11)
    x, y = feats["f0/all/mean"].to_numpy(), feats["multitask_score"].to_numpy()
    ref = SCIPY[method](x, y)
    row = res.iloc[0]
    assert row["n"] == 25
    assert row["r"] == pytest.approx(ref.statistic) and row["p_value"] == pytest.approx(ref.pvalue)
    # The feature's own stream of the seed, in the same order of use: bootstrap, then permutations.
    gen = stream(11, "f0/all/mean", "multitask_score")

    def stat(a, b, axis=-1):
        return np.apply_along_axis(
            lambda v: SCIPY[method](v[: len(v) // 2], v[len(v) // 2 :]).statistic,
            axis,
            np.concatenate([a, b], axis=axis),
        )

    ci = stats.bootstrap(
        (x, y), stat, paired=True, n_resamples=300, rng=gen, vectorized=True
    ).confidence_interval
    assert row["ci_low"] == pytest.approx(ci.low, rel=1e-6) and row["ci_high"] == pytest.approx(
        ci.high, rel=1e-6
    )
    perm = stats.permutation_test(
        (x,), lambda a: SCIPY[method](a, y).statistic, permutation_type="pairings", n_resamples=300, rng=gen
    )
    assert row["p_perm"] == pytest.approx(perm.pvalue)
    np.testing.assert_allclose(res["p_holm"], multipletests(res["p_value"], method="holm")[1])
    np.testing.assert_allclose(res["p_bh"], multipletests(res["p_value"], method="fdr_bh")[1])


def test_a_features_ci_and_permutation_p_do_not_depend_on_the_other_features():
    feats = frame(np.random.default_rng(5), 20, [0.5, 0.2, 0.4])
    kw = dict(n_boot=300, n_perm=300, seed=4)
    alone = correlate(feats, features=["f2/all/mean"], **kw).set_index("feature")
    among = correlate(feats, **kw).set_index("feature")
    cols = ["r", "ci_low", "ci_high", "p_perm"]
    pd.testing.assert_series_equal(alone.loc["f2/all/mean", cols], among.loc["f2/all/mean", cols])


def test_vectorised_correlations_equal_scipy_with_ties_and_batches():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, size=(50, 15)).astype(float)
    y = rng.integers(0, 5, size=(50, 15)).astype(float)
    for fn, ref in (
        (pearson_r, stats.pearsonr),
        (spearman_r, stats.spearmanr),
        (kendall_tau_b, stats.kendalltau),
    ):
        got = fn(x, y, axis=-1)
        want = [ref(a, b).statistic for a, b in zip(x, y, strict=True)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_partial_correlation_equals_the_regression_t_test():
    """Pearson partial r given dummies of model == the t-test of x in OLS y ~ x + C(model)."""
    rng = np.random.default_rng(2)
    n_models = 5
    feats = frame(rng, 40, [0.5], n_models=n_models)
    offsets = dict(zip([f"m{i}" for i in range(n_models)], rng.normal(0, 3, n_models), strict=True))
    feats["multitask_score"] += feats["model"].map(offsets)  # a model effect that confounds the raw r
    res = correlate(feats, method="pearson", control="model", n_boot=0, n_perm=0).iloc[0]
    data = pd.DataFrame({"y": feats["multitask_score"], "x": feats["f0/all/mean"], "g": feats["model"]})
    ols = smf.ols("y ~ x + C(g)", data).fit()
    t, df = ols.tvalues["x"], ols.df_resid
    assert res["partial_df"] == df
    assert res["partial_p"] == pytest.approx(ols.pvalues["x"], rel=1e-8)
    assert res["partial_r"] == pytest.approx(np.sign(t) * np.sqrt(t * t / (t * t + df)), rel=1e-8)
    # Spearman partial: the same identity on ranks.
    sp = correlate(feats, method="spearman", control="model", n_boot=0, n_perm=0).iloc[0]
    ranked = data.assign(y=stats.rankdata(data.y), x=stats.rankdata(data.x))
    ols_r = smf.ols("y ~ x + C(g)", ranked).fit()
    assert sp["partial_p"] == pytest.approx(ols_r.pvalues["x"], rel=1e-8)
    with pytest.raises(ValueError, match="kendall"):
        correlate(feats, method="kendall", control="model")
    # Too few observations for the dummies: NaN, not a number.
    r, p, dof = partial_correlation(np.arange(3.0), np.arange(3.0), pd.DataFrame({"g": ["a", "b", "c"]}))
    assert np.isnan(r) and np.isnan(p) and dof < 1


def test_mixed_model_equals_a_direct_statsmodels_fit_and_is_exposed_in_correlate():
    rng = np.random.default_rng(3)
    n_models = 6
    feats = frame(rng, 36, [0.0], n_models=n_models)
    offset = feats["model"].map(
        dict(zip([f"m{i}" for i in range(n_models)], rng.normal(0, 2, n_models), strict=True))
    )
    feats["multitask_score"] = 0.7 * feats["f0/all/mean"] + offset + 0.3 * rng.standard_normal(36)
    res = mixed_model(feats, feature="f0/all/mean", group="model")
    data = pd.DataFrame({"y": feats["multitask_score"], "x": feats["f0/all/mean"], "g": feats["model"]})
    direct = smf.mixedlm("y ~ x", data, groups=data["g"]).fit(reml=True)
    assert res.coef == pytest.approx(direct.params["x"], rel=1e-6)
    assert res.se == pytest.approx(direct.bse["x"], rel=1e-6)
    assert res.p_value == pytest.approx(direct.pvalues["x"], rel=1e-6)
    assert (res.ci_low, res.ci_high) == pytest.approx(tuple(direct.conf_int().loc["x"]), rel=1e-6)
    assert res.converged and res.n == 36 and res.n_groups == 6
    assert res.coef == pytest.approx(0.7, abs=0.1)
    cor = correlate(feats, method="pearson", n_boot=0, n_perm=0, mixed_group="model").iloc[0]
    assert cor["mixed_coef"] == pytest.approx(res.coef) and cor["mixed_p"] == pytest.approx(res.p_value)
    few = mixed_model(feats.iloc[:6], feature="f0/all/mean", group="model")
    assert np.isnan(few.p_value) and "one run per group" in few.note
    tiny = mixed_model(feats.iloc[:3], feature="f0/all/mean", group="model")
    assert np.isnan(tiny.coef) and "too few runs" in tiny.note


def test_planted_correlation_is_found_and_null_features_are_calibrated():
    """One planted feature (rho = 0.6) among 300 independent null features, each a fresh draw of n = 60."""
    rng = np.random.default_rng(4)
    n, n_null = 60, 300
    y = rng.standard_normal(n)
    cols = {"planted/all/mean": 0.6 * y + 0.8 * rng.standard_normal(n)}
    cols.update({f"null{j}/all/mean": rng.standard_normal(n) for j in range(n_null)})
    feats = pd.DataFrame({**cols, "multitask_score": y})
    res = correlate(feats, method="spearman", n_boot=0, n_perm=0).set_index("feature")
    assert res.loc["planted/all/mean", "p_bh"] < 0.05 and res.loc["planted/all/mean", "r"] > 0.3
    null = res.drop("planted/all/mean")
    tol = 3 * np.sqrt(0.05 * 0.95 / n_null)
    assert 0.05 - tol < np.mean(null["p_value"] < 0.05) < 0.05 + tol
    assert np.mean(null["p_bh"] < 0.05) <= 3 / n_null
    # The permutation p-value is calibrated too (fewer features: it resamples).
    perm = correlate(feats.iloc[:, 1:61].assign(multitask_score=y), n_boot=0, n_perm=199, seed=1)
    assert np.mean(perm["p_perm"] < 0.05) < 0.05 + 3 * np.sqrt(0.05 * 0.95 / 60)


def test_planted_strength_lies_in_the_bootstrap_interval_most_of_the_time():
    rng = np.random.default_rng(5)
    cover = []
    for _ in range(20):
        feats = frame(rng, 60, [0.5])
        row = correlate(feats, method="pearson", n_boot=400, n_perm=0, seed=int(rng.integers(1 << 30))).iloc[
            0
        ]
        cover.append(row["ci_low"] <= 0.5 <= row["ci_high"])
    assert np.mean(cover) >= 0.8


def test_small_n_constant_and_missing_values():
    feats = pd.DataFrame(
        {
            "few/all/mean": [1.0, 2.0, 3.0, np.nan, np.nan, np.nan],
            "flat/all/mean": [1.0] * 6,
            "gappy/all/mean": [1.0, np.nan, 3.0, 2.0, 5.0, 4.0],
            "multitask_score": [0.1, 0.3, 0.2, 0.5, 0.4, 0.6],
        }
    )
    with pytest.warns(UserWarning, match="too few observations"):
        res = correlate(feats, n_boot=50, n_perm=50).set_index("feature")
    assert np.isnan(res.loc["few/all/mean", "p_value"]) and res.loc["few/all/mean", "n"] == 3
    assert "too few runs for a test (3 < 4)" in res.loc["few/all/mean", "note"]
    assert np.isnan(res.loc["flat/all/mean", "r"]) and "constant" in res.loc["flat/all/mean", "note"]
    g = res.loc["gappy/all/mean"]
    ok = feats["gappy/all/mean"].notna()
    ref = stats.spearmanr(feats.loc[ok, "gappy/all/mean"], feats.loc[ok, "multitask_score"])
    assert (
        g["n"] == 5
        and g["r"] == pytest.approx(ref.statistic)
        and g["p_asymptotic"] == pytest.approx(ref.pvalue)
    )
    # n = 5 <= EXACT_MAX_N: the p the corrections use is the full permutation test (5! pairings).
    exact = stats.permutation_test(
        (feats.loc[ok, "gappy/all/mean"].to_numpy(),),
        lambda a: stats.spearmanr(a, feats.loc[ok, "multitask_score"]).statistic,
        permutation_type="pairings",
        n_resamples=np.inf,
    )
    assert g["p_method"] == "exact" and g["p_value"] == pytest.approx(exact.pvalue) == g["p_perm"]
    with pytest.raises(ValueError, match="method"):
        correlate(feats, method="distance")
    with pytest.raises(ValueError, match="target"):
        correlate(feats, target="score/vqa/acc")
