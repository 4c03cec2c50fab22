"""features(): every statistic equals a direct numpy/scipy computation on the same series."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from dynamics import RunWriter, load_runs
from dynamics.analysis import features, loss_curvature
from dynamics.store.reader import RunSet
from tests.analysis.analysis_synthetic import long_metrics, make_runset


def _reference_stats(steps, values, horizon, phases=(1 / 3, 2 / 3)):
    """Direct per-series computation (the definitions in dynamics.analysis.series)."""
    order = np.argsort(steps, kind="stable")
    x, y = np.asarray(steps, float)[order], np.asarray(values, float)[order]
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    b1, b2 = phases
    f = x / horizon

    def m(mask):
        return y[mask].mean() if mask.any() else np.nan

    return {
        "mean": y.mean(),
        "early": m(f <= b1),
        "middle": m((f > b1) & (f <= b2)),
        "late": m((f > b2) & (f <= 1)),
        "final": y[-1],
        "auc": integrate.trapezoid(y, x) if y.size > 1 else np.nan,
        "slope": stats.linregress(x, y).slope if np.ptp(x) > 0 else np.nan,
    }


def test_every_statistic_matches_a_direct_computation():
    rs = make_runset(n_models=2, n_seeds=2)
    feats = features(rs)
    m = rs.metrics
    checked = 0
    for (rid, name, task, task_b), g in m.groupby(["run_id", "name", "task", "task_b"]):
        horizon = m.loc[m.run_id == rid, "step"].max()
        ref = _reference_stats(g["step"].to_numpy(), g["value"].to_numpy(), horizon)
        label = "all" if task == "" else (f"{task}|{task_b}" if task_b else task)
        for stat, value in ref.items():
            np.testing.assert_allclose(
                feats.loc[rid, f"{name}/{label}/{stat}"], value, rtol=1e-10, atol=1e-12
            )
            checked += 1
    assert checked > 100
    # Overall for a per-task signal = mean over tasks of the per-task statistic; "pairs" likewise.
    for stat in ("mean", "late", "slope", "auc", "curv_mean"):
        per_task = feats[[f"loss/{t}/{stat}" for t in ("cls", "vqa", "report")]].mean(axis=1)
        np.testing.assert_allclose(feats[f"loss/all/{stat}"], per_task, rtol=1e-12)
    pair_cols = [
        c for c in feats.columns if c.startswith("grad_cosine/") and "|" in c and c.endswith("/final")
    ]
    assert len(pair_cols) == 3
    np.testing.assert_allclose(feats["grad_cosine/pairs/final"], feats[pair_cols].mean(axis=1), rtol=1e-12)


def test_curvature_columns_equal_the_public_estimator_averaged_over_the_grid():
    rs = make_runset(n_models=1, n_seeds=1, constructions=("IMAX",))
    feats = features(rs, curvature_bandwidth=20.0)
    g = rs.metrics.query("name == 'loss' and task == 'vqa'")
    # The grid of the public estimator with the same bandwidth, evaluated at its own grid centres.
    x = g["step"].to_numpy(float)
    delta = 20.0 / 10
    centers = x.min() + (np.arange(int((x.max() - x.min()) // delta) + 1) + 0.5) * delta
    curv = loss_curvature(x, g["value"].to_numpy(), bandwidth=20.0, at=np.minimum(centers, x.max()))
    rid = rs.runs.run_id[0]
    np.testing.assert_allclose(feats.loc[rid, "loss/vqa/curv_mean"], np.nanmean(curv), rtol=1e-6)
    frac = centers / x.max()
    late = curv[(frac > 2 / 3) & np.isfinite(curv)]
    np.testing.assert_allclose(feats.loc[rid, "loss/vqa/curv_late"], late.mean(), rtol=1e-6)
    # Exponential decay towards a floor: log-loss is convex, so the early curvature is positive.
    assert feats.loc[rid, "loss/vqa/curv_early"] > 0


def test_columns_tags_scores_and_attrs():
    rs = make_runset(n_models=2, n_seeds=1)
    feats = features(rs)
    assert list(feats.index) == list(rs.runs.run_id)
    assert (feats["run_id"] == feats.index).all()
    assert feats.attrs["tag_columns"] == ["construction", "model", "seed"]
    assert feats.attrs["score_columns"] == [
        "score/cls/accuracy",
        "score/report/accuracy",
        "score/vqa/accuracy",
        "multitask_score",
    ]
    expected = {
        "loss/all/curv_late",
        "fisher_se/all/slope",
        "grad_cosine/cls|vqa/mean",
        "grad_cosine/pairs/auc",
    }
    assert expected <= set(feats.attrs["feature_columns"])
    assert not any("curv" in c for c in feats.columns if c.startswith(("grad_cosine", "fisher_se")))
    np.testing.assert_allclose(
        feats["multitask_score"],
        feats[["score/cls/accuracy", "score/report/accuracy", "score/vqa/accuracy"]].mean(axis=1),
    )
    for col in feats.attrs["feature_columns"]:
        name, task, stat = col.split("/")
        assert name and task and stat


def test_custom_phases_and_fixed_horizon():
    steps = np.arange(1, 101)
    m = long_metrics("r", steps, "fisher_rho", steps.astype(float))
    rs = RunSet.from_frames(pd.DataFrame({"run_id": ["r"]}), m)
    feats = features(rs, phases={"warmup": (0.0, 0.1), "tail": (0.9, 1.0), "wide": (0.0, 1.0)})
    assert feats.loc["r", "fisher_rho/all/warmup"] == pytest.approx(np.mean(np.arange(1, 11)))
    assert feats.loc["r", "fisher_rho/all/tail"] == pytest.approx(np.mean(np.arange(91, 101)))
    assert feats.loc["r", "fisher_rho/all/wide"] == pytest.approx(50.5)
    # A fixed horizon of 200 steps: this 100-step run has no "late" points.
    fixed = features(rs, horizon=200)
    assert np.isnan(fixed.loc["r", "fisher_rho/all/late"])
    assert fixed.loc["r", "fisher_rho/all/early"] == pytest.approx(np.mean(np.arange(1, 67)))
    with pytest.raises(ValueError, match="two boundaries"):
        features(rs, phases=(0.5,))
    with pytest.raises(ValueError, match="horizon"):
        features(rs, horizon="longest")


def test_real_collections_crashed_run_missing_task_missing_signal_unsorted_nan():
    rs = make_runset(n_models=2, n_seeds=1)
    m = rs.metrics
    crashed = "IMAX-m1-s0"
    # The crashed run stops at step 50 and never logged the 'report' task nor fisher_se.
    m = m[~((m.run_id == crashed) & ((m.step > 50) | (m.task == "report") | (m.name == "fisher_se")))]
    m = m.sample(frac=1.0, random_state=0)  # rows in any order
    m.loc[m.index[:5], "value"] = np.nan  # a few non-finite logs
    scores = rs.scores[rs.scores.run_id != crashed]
    rs2 = RunSet.from_frames(rs.runs.drop(columns=["n_steps", "tasks"]), m, scores)
    with pytest.warns(UserWarning, match="end well before the longest"):
        with pytest.warns(UserWarning, match=r"no run logged \['never_logged'\]"):
            feats = features(rs2, names=["loss", "fisher_se", "never_logged"])
    assert np.isnan(feats.loc[crashed, "loss/report/mean"])
    assert np.isnan(feats.loc[crashed, "fisher_se/all/mean"])
    assert np.isnan(feats.loc[crashed, "multitask_score"])
    assert feats["never_logged/all/mean"].isna().all()
    assert feats.loc[crashed, "n_steps"] == 50
    # The crashed run's "late" covers its own steps 34..50; with horizon="max" it has no late phase.
    g = m[(m.run_id == crashed) & (m.name == "loss") & (m.task == "cls")].dropna()
    assert feats.loc[crashed, "loss/cls/late"] == pytest.approx(g.loc[g.step > 50 * 2 / 3, "value"].mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats_max = features(rs2, horizon="max", names=["loss"])
    assert np.isnan(feats_max.loc[crashed, "loss/cls/late"])
    assert np.isfinite(feats_max.loc[crashed, "loss/cls/early"])
    # Shuffled rows give the same numbers as sorted ones.
    with pytest.warns(UserWarning, match="end well before"):
        sorted_feats = features(
            RunSet.from_frames(rs2.runs, m.sort_values(["run_id", "step"]), scores), names=["loss"]
        )
    cols = [c for c in sorted_feats.columns if c.startswith("loss/")]
    pd.testing.assert_frame_equal(feats_max[cols].iloc[:0], sorted_feats[cols].iloc[:0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shuffled = features(rs2, names=["loss"])
    np.testing.assert_allclose(shuffled[cols].to_numpy(), sorted_feats[cols].to_numpy(), rtol=1e-12)


def test_single_point_series_and_lower_is_better_score_without_range():
    m = pd.concat(
        [
            long_metrics("a", np.array([5]), "loss", np.array([1.0])),
            long_metrics("b", np.arange(1, 6), "loss", np.ones(5)),
        ]
    )
    scores = pd.DataFrame({"run_id": ["a", "b"], "task": "t", "metric": "error", "value": [0.2, 0.3]})
    rs = RunSet.from_frames(pd.DataFrame({"run_id": ["a", "b"]}), m, scores)
    with pytest.warns(UserWarning, match="lower-is-better"):
        feats = features(rs)
    assert feats["multitask_score"].isna().all()
    assert feats.loc["a", "loss/all/mean"] == 1.0 and np.isnan(feats.loc["a", "loss/all/auc"])
    assert np.isnan(feats.loc["a", "loss/all/slope"]) and np.isnan(feats.loc["a", "loss/all/curv_mean"])
    assert feats.loc["b", "loss/all/slope"] == 0.0
    ranged = features(rs, score_ranges={"error": (0, 1)})
    np.testing.assert_allclose(ranged["multitask_score"], [0.8, 0.7])


def test_round_trip_through_the_store(tmp_path):
    for i, construction in enumerate(["DMAX", "IMAX"]):
        with RunWriter(
            tmp_path / f"run{i}", tasks=["a", "b"], tags={"construction": construction, "model": "m"}
        ) as w:
            steps = np.arange(1, 31)
            w.log_many(steps, "loss", np.exp(-steps / 10) + i, "a")
            w.log_many(steps, "loss", np.exp(-steps / 20) + i, "b")
            w.log_many(steps[::5], "grad_cosine", np.full(6, 0.1 * i), "a", "b")
            w.log_scores({"a": {"accuracy": 0.5 + 0.1 * i}, "b": {"accuracy": 0.7}})
    rs = load_runs(tmp_path)
    feats = features(rs)
    assert set(feats.attrs["tag_columns"]) == {"construction", "model"}
    rid = rs.runs.set_index("construction").loc["IMAX", "run_id"]
    assert feats.loc[rid, "grad_cosine/a|b/mean"] == pytest.approx(0.1)
    assert feats.loc[rid, "loss/a/final"] == pytest.approx(np.exp(-3) + 1)
    assert feats.loc[rid, "multitask_score"] == pytest.approx(0.65)


def test_bad_input_is_refused():
    rs = make_runset(n_models=1, n_seeds=1)
    dup = RunSet(pd.concat([rs.runs, rs.runs]), rs.metrics, rs.scores)
    with pytest.raises(ValueError, match="duplicate run ids"):
        features(dup)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        features(rs, phases={"mean": (0.0, 0.5)})
