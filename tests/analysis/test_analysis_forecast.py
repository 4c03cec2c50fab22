"""forecast(): ridge equals a direct fit; a planted early signal is forecast, noise is not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from dynamics.analysis import forecast
from dynamics.analysis.forecast import ridge_fit_predict, truncate_runset
from dynamics.store.reader import RunSet


def test_ridge_equals_statsmodels_ols_at_zero_penalty_and_the_closed_form_otherwise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)) * [1, 10, 0.1, 5] + [0, 3, -1, 2]
    y = x @ [0.5, -0.1, 2.0, 0.0] + rng.normal(size=30)
    xt = rng.normal(size=(7, 4))
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    np.testing.assert_allclose(
        ridge_fit_predict(x, y, xt, alpha=0.0), ols.predict(sm.add_constant(xt)), rtol=1e-9
    )
    # Closed form on standardised columns (population sd), centred target.
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    beta = np.linalg.solve(z.T @ z + 3.0 * np.eye(4), z.T @ (y - y.mean()))
    np.testing.assert_allclose(
        ridge_fit_predict(x, y, xt, alpha=3.0), y.mean() + ((xt - mu) / sd) @ beta, rtol=1e-9
    )
    # A constant or all-missing column is dropped; a missing test value takes the training mean.
    x2 = np.c_[x, np.ones(30), np.full(30, np.nan)]
    xt2 = np.c_[xt, np.ones(7), np.ones(7)]
    np.testing.assert_allclose(
        ridge_fit_predict(x2, y, xt2, alpha=3.0), ridge_fit_predict(x, y, xt, alpha=3.0)
    )
    xt3 = xt.copy()
    xt3[0, 1] = np.nan
    filled = xt.copy()
    filled[0, 1] = mu[1]
    np.testing.assert_allclose(
        ridge_fit_predict(x, y, xt3, alpha=3.0), ridge_fit_predict(x, y, filled, alpha=3.0)
    )


def runs_with_early_signal(seed, *, signal: bool, n_models=5, per_model=6, n_steps=300):
    """Each run's loss decays to a floor; with ``signal`` the floor (visible early) sets the score."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n_steps + 1)
    n = n_models * per_model
    floor = rng.uniform(0.2, 1.0, n)
    model_shift = np.repeat(rng.normal(0, 0.05, n_models), per_model)
    loss = floor[:, None] + 2 * np.exp(-steps[None, :] / 15) + 0.05 * rng.standard_normal((n, n_steps))
    score = (1 - floor if signal else rng.uniform(0, 0.8, n)) + model_shift + 0.02 * rng.standard_normal(n)
    ids = [f"r{i}" for i in range(n)]
    metrics = pd.DataFrame(
        {
            "run_id": np.repeat(ids, n_steps),
            "step": np.tile(steps, n),
            "name": "loss",
            "task": "a",
            "task_b": "",
            "value": loss.ravel(),
        }
    )
    runs = pd.DataFrame({"run_id": ids, "model": np.repeat([f"m{k}" for k in range(n_models)], per_model)})
    scores = pd.DataFrame({"run_id": ids, "task": "a", "metric": "accuracy", "value": score})
    return RunSet.from_frames(runs, metrics, scores)


def test_planted_early_signal_is_forecast_across_held_out_models():
    res = forecast(runs_with_early_signal(1, signal=True), fractions=(0.1, 0.5), group="model")
    assert list(res["fraction"]) == [0.1, 0.5]
    assert (res["n_runs"] == 30).all() and (res["n_groups"] == 5).all() and (res["n_features"] == 3).all()
    assert (res["r2"] > 0.7).all() and (res["spearman"] > 0.8).all()
    assert (res["mae"] < 0.5 * res["baseline_mae"]).all()
    pred = res.attrs["predictions"]
    assert len(pred) == 60 and set(pred.columns) >= {"run_id", "group", "fraction", "actual", "predicted"}
    # Out of fold: recompute one held-out model's predictions by hand.
    rs = runs_with_early_signal(1, signal=True)
    from dynamics.analysis import features

    early = features(truncate_runset(rs, 0.5), names=["loss"])
    cols = ["loss/all/mean", "loss/all/final", "loss/all/slope"]
    y = early["multitask_score"].to_numpy()
    test = (early["model"] == "m0").to_numpy()
    want = ridge_fit_predict(
        early.loc[~test, cols].to_numpy(), y[~test], early.loc[test, cols].to_numpy(), 1.0
    )
    got = pred[(pred.fraction == 0.5) & (pred.group == "m0")]["predicted"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_noise_is_not_forecast_over_repeated_draws():
    r2 = [forecast(runs_with_early_signal(s, signal=False), fractions=(0.25,)).loc[0, "r2"] for s in range(6)]
    # Out of fold, a signal-free predictor does no better than the training mean (R^2 <= ~0).
    assert np.mean(r2) < 0.05 and max(r2) < 0.25


def test_truncation_and_small_or_bad_input():
    rs = runs_with_early_signal(2, signal=True, n_models=2, per_model=2, n_steps=100)
    cut = truncate_runset(rs, 0.25)
    assert cut.metrics.groupby("run_id")["step"].max().eq(25).all()
    res = forecast(rs, fractions=(0.5,), group="model")
    assert np.isfinite(res.loc[0, "r2"]) and res.loc[0, "n_runs"] == 4  # 4 runs in 2 models: enough
    with pytest.warns(UserWarning, match="1 of 1 forecasts have too few observations"):
        one_model = forecast(rs.subset(["r0", "r1"]), fractions=(0.5,), group="model")
    assert np.isnan(one_model.loc[0, "r2"]) and "too few" in one_model.loc[0, "note"]
    loo = forecast(rs, fractions=(0.5,), group=None)
    assert loo.loc[0, "n_groups"] == 4
    with pytest.raises(ValueError, match="fractions"):
        forecast(rs, fractions=(0.0,))
    with pytest.raises(ValueError, match="target"):
        forecast(rs, target="score/zzz/acc")
    with pytest.raises(ValueError, match="group"):
        forecast(rs, group="seed")
