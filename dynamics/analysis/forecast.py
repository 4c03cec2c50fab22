"""Forecast the final score from the first part of training, validated across groups (e.g. models).

For each fraction ``f``, every run's metrics are cut at step ``f * H`` (``H`` = the run's last logged
step), :func:`dynamics.analysis.features` summarises what is left, and a ridge regression on a
handful of those early features predicts the final ``target``. Predictions are out-of-fold under
leave-one-group-out cross-validation: the runs of one model are predicted by a fit on the other
models only, so a good score means the early signal carries over to a model never seen.

Ridge, fitted on the training fold only (standardised features ``X``, centred target)::

    beta = argmin ||y - ybar - X beta||^2 + alpha ||beta||^2 = (X^T X + alpha I)^{-1} X^T (y - ybar)

with NaN features imputed by the training mean, and constant or all-missing columns dropped. Reported
per fraction, over the out-of-fold predictions ``yhat`` of all runs:

* ``r2 = 1 - sum (y - yhat)^2 / sum (y - mean(y))^2`` (can be negative: worse than the mean);
* ``spearman``: rank correlation of ``yhat`` with ``y`` (does the forecast order the runs?);
* ``mae = mean |y - yhat|`` and ``baseline_mae``: the same for predicting each fold's training mean.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from dynamics.analysis._columns import feature_columns
from dynamics.analysis._guards import MIN_N, warn_notes
from dynamics.analysis.features import features as compute_features

if TYPE_CHECKING:  # pragma: no cover
    from dynamics.store.reader import RunSet

__all__ = ["forecast", "ridge_fit_predict", "truncate_runset", "DEFAULT_STATS"]

DEFAULT_STATS = ("mean", "final", "slope")
"""Statistics of each signal's overall (``all``) series used as predictors by default."""


def ridge_fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, alpha: float = 1.0
) -> np.ndarray:
    """Ridge predictions for ``x_test`` from a fit on ``(x_train, y_train)`` (formula in the module docstring).

    ``alpha = 0`` is ordinary least squares with an intercept (minimum-norm if rank deficient).
    """
    x_train = np.asarray(x_train, float)
    x_test = np.asarray(x_test, float)
    y_train = np.asarray(y_train, float)
    ybar = y_train.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.nanmean(x_train, axis=0)
        sd = np.nanstd(x_train, axis=0)
    usable = np.isfinite(mu) & (sd > 0)
    if not usable.any():
        return np.full(x_test.shape[0], ybar)
    mu, sd = mu[usable], sd[usable]
    xtr = np.where(np.isfinite(x_train[:, usable]), x_train[:, usable], mu)
    xte = np.where(np.isfinite(x_test[:, usable]), x_test[:, usable], mu)
    xtr = (xtr - mu) / sd
    xte = (xte - mu) / sd
    k = xtr.shape[1]
    a = np.vstack([xtr, np.sqrt(alpha) * np.eye(k)])
    b = np.concatenate([y_train - ybar, np.zeros(k)])
    beta = np.linalg.lstsq(a, b, rcond=None)[0]
    return ybar + xte @ beta


def truncate_runset(runset: RunSet, fraction: float) -> RunSet:
    """The same runs with only the metrics logged up to ``fraction`` of each run's last step."""
    m = runset.metrics
    last = m.groupby("run_id", sort=False)["step"].transform("max")
    keep = m["step"].to_numpy() <= fraction * last.to_numpy()
    return type(runset)(runset.runs, m[keep].reset_index(drop=True), runset.scores)


def forecast(
    runset: RunSet,
    *,
    target: str = "multitask_score",
    fractions: Sequence[float] = (0.1, 0.25, 0.5),
    group: str | None = None,
    features: str | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    stats_used: Sequence[str] = DEFAULT_STATS,
    alpha: float = 1.0,
    feature_kwargs: Mapping[str, Any] | None = None,
    min_n: int = MIN_N,
) -> pd.DataFrame:
    """How well the first ``fraction`` of training predicts the final ``target`` (see the module docstring).

    Args:
        runset: the runs (a :class:`dynamics.store.reader.RunSet`), finished, with scores.
        target: the score column of :func:`features` to predict (default ``multitask_score``).
        fractions: parts of training to look at, each in ``(0, 1]``.
        group: the tag whose values are left out one at a time, e.g. ``"model"`` (default ``None``:
            leave one run out).
        features: predictor columns or glob patterns of the early features frame; default: the
            ``stats_used`` statistics of every signal's overall series (``<name>/all/<stat>``).
        names: signals to summarise (default: all).
        alpha: ridge penalty on standardised features.
        feature_kwargs: extra keyword arguments for :func:`features` (e.g. ``target_directions``).
        min_n: fewest runs with a known target for a forecast.

    Returns:
        One row per fraction: ``fraction, n_runs, n_groups, n_features, r2, spearman, mae,
        baseline_mae, note``. ``attrs["predictions"]`` holds the out-of-fold predictions
        (``run_id, group, fraction, actual, predicted, baseline``).

    Example:
        >>> import numpy as np, pandas as pd
        >>> from dynamics.store.reader import RunSet
        >>> from dynamics.analysis import forecast
        >>> rng = np.random.default_rng(0)
        >>> steps = np.arange(1, 201)
        >>> runs, rows, scores = [], [], []
        >>> for i in range(24):
        ...     floor = rng.uniform(0.2, 1.0)  # sets both the loss curve and the final score
        ...     loss = floor + 2 * np.exp(-steps / 20) + 0.02 * rng.normal(size=200)
        ...     rows.append(pd.DataFrame({"run_id": f"r{i}", "step": steps, "name": "loss",
        ...                               "task": "", "task_b": "", "value": loss}))
        ...     runs.append({"run_id": f"r{i}", "model": f"m{i % 4}"})
        ...     scores.append({"run_id": f"r{i}", "task": "t", "metric": "acc", "value": 1 - floor})
        >>> rs = RunSet.from_frames(pd.DataFrame(runs), pd.concat(rows), pd.DataFrame(scores))
        >>> res = forecast(rs, fractions=(0.5,), group="model")
        >>> print(res.loc[0, "n_groups"], res.loc[0, "r2"] > 0.8)
        4 True
    """
    fractions = [float(f) for f in fractions]
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"fractions must lie in (0, 1], got {bad}")
    kwargs = dict(feature_kwargs or {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*end well before the longest.*")
        full = compute_features(runset, names=[], **kwargs)
    if target not in full.columns:
        raise ValueError(
            f"target {target!r} is not a column of the features frame; score columns are {full.attrs['score_columns']}"
        )
    if group is not None and group not in full.columns:
        raise ValueError(f"group {group!r} is not a tag of these runs; tags are {full.attrs['tag_columns']}")
    y_all = pd.to_numeric(full[target], errors="coerce").to_numpy(dtype=float)
    has_y = np.isfinite(y_all)
    run_ids = full["run_id"].to_numpy()
    groups = full[group].astype(str).to_numpy() if group is not None else run_ids.astype(str)

    rows, predictions = [], []
    for frac in fractions:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*end well before the longest.*")
            early = compute_features(truncate_runset(runset, frac), names=names, **kwargs)
        if features is None:
            cols = [
                c
                for c in early.attrs["feature_columns"]
                if c.split("/")[-2] == "all" and c.split("/")[-1] in stats_used
            ]
        else:
            cols = feature_columns(early, features)
        x_all = early.reindex(full.index)[cols].to_numpy(dtype=float)
        sel = has_y
        x, y, g = x_all[sel], y_all[sel], groups[sel]
        levels = pd.unique(g)
        row = {
            "fraction": frac,
            "n_runs": int(sel.sum()),
            "n_groups": len(levels),
            "n_features": len(cols),
            "r2": np.nan,
            "spearman": np.nan,
            "mae": np.nan,
            "baseline_mae": np.nan,
            "note": "",
        }
        if y.size < min_n or len(levels) < 2:
            row["note"] = f"too few runs or groups to cross-validate ({y.size} runs, {len(levels)} groups)"
            rows.append(row)
            continue
        if not cols:
            row["note"] = "no predictor columns; check names / features"
        pred = np.full(y.size, np.nan)
        base = np.full(y.size, np.nan)
        for level in levels:
            test = g == level
            train = ~test
            base[test] = y[train].mean()
            pred[test] = ridge_fit_predict(x[train], y[train], x[test], alpha) if cols else y[train].mean()
        ss_tot = np.sum((y - y.mean()) ** 2)
        row["r2"] = 1.0 - np.sum((y - pred) ** 2) / ss_tot if ss_tot > 0 else np.nan
        if np.ptp(pred) > 0 and np.ptp(y) > 0:
            row["spearman"] = float(stats.spearmanr(pred, y).statistic)
        row["mae"] = float(np.mean(np.abs(y - pred)))
        row["baseline_mae"] = float(np.mean(np.abs(y - base)))
        rows.append(row)
        predictions.append(
            pd.DataFrame(
                {
                    "run_id": run_ids[sel],
                    "group": g,
                    "fraction": frac,
                    "actual": y,
                    "predicted": pred,
                    "baseline": base,
                }
            )
        )
    out = pd.DataFrame(rows)
    warn_notes(out["note"].tolist(), "forecasts", nan_what="scores")
    out.attrs["predictions"] = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    return out
