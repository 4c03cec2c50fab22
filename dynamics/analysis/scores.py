"""Multi-task scores: per-task metrics put on one direction and averaged; Delta-m% against a baseline.

Two conventions, both common:

* **Average over tasks** (what the IMAX paper reports): every metric ``m`` of task ``t`` is mapped
  to "higher is better" and, where a range ``(lo, hi)`` is known, to ``[0, 1]``::

      z[t, m] = (v - lo) / (hi - lo)     if higher is better
      z[t, m] = (hi - v) / (hi - lo)     if lower is better
      z[t, m] = v                        if higher is better and no range is given

  then ``score[t] = mean_m z[t, m]`` and ``multitask_score = mean_t score[t]``: each task weighs the
  same however many metrics it reports. A lower-is-better metric needs a range (or
  ``ranges="observed"``, the min and max over the runs given), since ``-v`` would not average
  meaningfully with accuracies.
* **Delta-m%** (Maninis et al. 2019; Vandenhende et al. 2021), relative to a baseline ``B``::

      Delta_m = (100 / K) * sum_k s_k * (M_k - B_k) / |B_k|

  over all ``K`` task metrics, with ``s_k = +1`` if higher is better and ``-1`` otherwise. Positive
  means better than the baseline on average, in percent.

Declared ranges (``run.json``'s ``meta["score_ranges"]``, written by ``RunWriter(meta=...)`` or
``attach(..., meta=...)``) have the form ``{"<task>": {"<metric>": [worst, best]}}`` and map a value
to ``clip((v - worst) / (best - worst), 0, 1)``, so ``[2.0, 0.0]`` declares a lower-is-better metric
on ``[0, 2]`` (an MAE whose natural range is 2) and ``[0, 1]`` an accuracy. A task with declared
ranges is scored by exactly its declared metrics (its other metrics stay in the score columns but
do not enter the average); a task without one by every metric it logged, as above. This is the one
definition of the overall score: a run that stores its own run-level score can declare its
per-task metrics and get the same number here.

Whether a metric is lower-is-better is read from ``directions`` (keys ``"task/metric"`` or
``"metric"``, values ``"higher"``/``"lower"`` or ``+1``/``-1``), and otherwise guessed from its name:
:data:`LOWER_IS_BETTER` names and names ending in ``loss`` or ``error`` are lower-is-better,
everything else higher-is-better.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "multitask_score",
    "delta_m",
    "metric_direction",
    "LOWER_IS_BETTER",
    "scores_long",
    "declared_score_ranges",
    "SCORE_RANGES_KEY",
]

SCORE_RANGES_KEY = "score_ranges"
"""The ``run.json`` ``meta`` key of declared per-task score ranges (see the module docstring)."""

LOWER_IS_BETTER = frozenset(
    {"loss", "nll", "error", "err", "wer", "cer", "ter", "mae", "mse", "rmse", "perplexity", "ppl", "fid"}
)
"""Metric names taken as lower-is-better when ``directions`` does not say otherwise."""

_DIRECTION_WORDS = {"higher": 1, "max": 1, "up": 1, "lower": -1, "min": -1, "down": -1}


def _lookup(mapping: Mapping[str, Any] | None, task: str, metric: str) -> Any:
    if not mapping:
        return None
    for key in (f"{task}/{metric}", metric):
        if key in mapping:
            return mapping[key]
    return None


def metric_direction(metric: str, task: str = "", directions: Mapping[str, Any] | None = None) -> int:
    """+1 if higher is better for this metric, -1 if lower is better (see the module docstring)."""
    given = _lookup(directions, task, metric)
    if given is not None:
        if isinstance(given, str):
            if given.lower() not in _DIRECTION_WORDS:
                raise ValueError(
                    f"direction {given!r} for {task}/{metric} is not understood; use 'higher' or 'lower'"
                )
            return _DIRECTION_WORDS[given.lower()]
        if given in (1, -1):
            return int(given)
        raise ValueError(f"direction {given!r} for {task}/{metric} must be 'higher', 'lower', +1 or -1")
    name = metric.lower()
    if name in LOWER_IS_BETTER or name.endswith(("loss", "error")):
        return -1
    return 1


def _check_declared(ranges: Mapping[str, Any], where: str) -> dict[str, dict[str, tuple[float, float]]]:
    out: dict[str, dict[str, tuple[float, float]]] = {}
    if not isinstance(ranges, Mapping):
        raise ValueError(f"{where}: score_ranges must be {{task: {{metric: [worst, best]}}}}, got {ranges!r}")
    for task, metrics in ranges.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"{where}: score_ranges[{task!r}] must map metric names to [worst, best], got {metrics!r}"
            )
        for metric, pair in metrics.items():
            try:
                worst, best = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: score_ranges[{task!r}][{metric!r}] must be [worst, best], got {pair!r}"
                ) from None
            if worst == best:
                raise ValueError(f"{where}: score_ranges[{task!r}][{metric!r}] has worst == best ({worst})")
            out.setdefault(str(task), {})[str(metric)] = (worst, best)
    return out


def is_declared_format(ranges: Any) -> bool:
    """True for ``{task: {metric: [worst, best]}}`` (the metadata format), False for ``ranges``."""
    return (
        isinstance(ranges, Mapping) and bool(ranges) and all(isinstance(v, Mapping) for v in ranges.values())
    )


def declared_score_ranges(runset: Any) -> dict[str, dict[str, tuple[float, float]]]:
    """The score ranges the runs declare in ``run.json`` ``meta["score_ranges"]`` (merged over runs).

    Read from each run's ``run.json`` (``runs["path"]``), or from a ``meta`` / ``score_ranges`` column of
    ``runs`` for run sets built in memory. Runs declaring different ranges for the same metric get a
    warning and the first run's range (scores on different scales are not comparable).
    """
    runs = runset.runs
    merged: dict[str, dict[str, tuple[float, float]]] = {}
    conflicts: set[str] = set()
    for _, run in runs.iterrows():
        declared = None
        if SCORE_RANGES_KEY in runs.columns and isinstance(run[SCORE_RANGES_KEY], Mapping):
            declared = run[SCORE_RANGES_KEY]
        elif "meta" in runs.columns and isinstance(run["meta"], Mapping):
            declared = run["meta"].get(SCORE_RANGES_KEY)
        elif "path" in runs.columns and isinstance(run["path"], str) and run["path"]:
            info_path = Path(run["path"]) / "run.json"
            if info_path.is_file():
                try:
                    info = json.loads(info_path.read_text())
                except (OSError, ValueError):
                    info = {}
                declared = (info.get("meta") or {}).get(SCORE_RANGES_KEY)
        if not declared:
            continue
        for task, metrics in _check_declared(declared, f"run {run['run_id']}").items():
            for metric, pair in metrics.items():
                have = merged.setdefault(task, {}).setdefault(metric, pair)
                if have != pair:
                    conflicts.add(f"{task}/{metric}")
    if conflicts:
        warnings.warn(
            f"runs declare different score ranges for {sorted(conflicts)}; the first run's are used",
            stacklevel=2,
        )
    return merged


def scores_long(scores: pd.DataFrame) -> pd.DataFrame:
    """Scores as a long frame ``run_id, task, metric, value`` from either accepted layout.

    Accepts ``RunSet.scores`` (long) or a wide frame with ``score/<task>/<metric>`` columns (the
    output of :func:`dynamics.analysis.features`, whose overall task is spelled ``all``).
    """
    if not isinstance(scores, pd.DataFrame):
        raise TypeError(f"scores must be a pandas DataFrame, got {type(scores).__name__}")
    if {"task", "metric", "value"} <= set(scores.columns):
        if "run_id" not in scores.columns:
            raise ValueError("long scores need a 'run_id' column next to task, metric, value")
        out = scores[["run_id", "task", "metric", "value"]].copy()
        out["task"] = out["task"].astype(str)
        return out
    cols = [c for c in scores.columns if isinstance(c, str) and c.startswith("score/") and c.count("/") >= 2]
    if not cols:
        raise ValueError(
            "no scores found: pass RunSet.scores (columns run_id, task, metric, value) or a features "
            "frame with 'score/<task>/<metric>' columns"
        )
    run_ids = scores["run_id"] if "run_id" in scores.columns else pd.Series(scores.index, index=scores.index)
    parts = []
    for col in cols:
        _, task, metric = col.split("/", 2)
        parts.append(
            pd.DataFrame(
                {
                    "run_id": run_ids.to_numpy(),
                    "task": "" if task == "all" else task,
                    "metric": metric,
                    "value": scores[col].to_numpy(dtype=float),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def multitask_score(
    scores: pd.DataFrame,
    *,
    directions: Mapping[str, Any] | None = None,
    ranges: Mapping[str, Any] | tuple[float, float] | str | None = None,
    metrics: str | Sequence[str] | None = None,
    missing: str = "nan",
    score_ranges: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.Series:
    """The multi-task score of each run: normalised per-task metrics averaged over tasks.

    ``z[t, m]`` as in the module docstring, ``score[t] = mean_m z[t, m]``,
    ``multitask_score = mean_t score[t]``. Overall scores (task ``""``, or ``all`` in a features
    frame) are left out of the average.

    Args:
        scores: ``RunSet.scores`` (``run_id, task, metric, value``) or a features frame.
        directions: per ``"task/metric"`` or ``"metric"``: ``"higher"``/``"lower"`` (or +1/-1);
            unnamed metrics are guessed from their name (:func:`metric_direction`).
        ranges: ``(lo, hi)`` for every metric (e.g. ``(0, 100)`` for percentages), a mapping
            ``{"task/metric" or "metric": (lo, hi) or "observed"}``, or ``"observed"`` for the
            min/max over the runs given (then the score depends on which runs are in the set; a
            metric with no spread maps to 0.5).
        metrics: only these metric names (default: every metric logged).
        missing: ``"nan"`` (default): a run lacking any task metric that other runs have gets NaN;
            ``"mean"``: average whatever it has.
        score_ranges: declared ranges ``{task: {metric: [worst, best]}}`` (the ``run.json`` metadata
            format, see the module docstring; :func:`declared_score_ranges` reads them from runs).
            A declared task is scored by its declared metrics only; they win over ``ranges``.

    Returns:
        A Series named ``multitask_score`` indexed by run id.

    Example:
        >>> import pandas as pd
        >>> from dynamics.analysis import multitask_score
        >>> s = pd.DataFrame({"run_id": ["r1", "r1", "r1", "r2", "r2", "r2"],
        ...                   "task": ["vqa", "cls", "cls", "vqa", "cls", "cls"],
        ...                   "metric": ["accuracy", "f1", "accuracy", "accuracy", "f1", "accuracy"],
        ...                   "value": [0.6, 0.8, 0.9, 0.7, 0.6, 0.7]})
        >>> multitask_score(s).round(3).to_dict()  # (0.6 + (0.8 + 0.9) / 2) / 2, ...
        {'r1': 0.725, 'r2': 0.675}
    """
    if missing not in ("nan", "mean"):
        raise ValueError(f"missing must be 'nan' or 'mean', got {missing!r}")
    long = scores_long(scores)
    long = long[long["task"] != ""]
    if metrics is not None:
        wanted = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = sorted(set(wanted) - set(long["metric"]))
        if unknown:
            raise ValueError(
                f"metrics {unknown} are not among the scores' metrics {sorted(set(long['metric']))}"
            )
        long = long[long["metric"].isin(wanted)]
    run_order = pd.unique(scores_long(scores)["run_id"])
    if long.empty:
        return pd.Series(np.nan, index=pd.Index(run_order, name="run_id"), name="multitask_score")
    declared = _check_declared(score_ranges, "multitask_score") if score_ranges else {}
    if declared:
        keep = [
            (t not in declared) or (m in declared[t])
            for t, m in zip(long["task"].astype(str), long["metric"].astype(str), strict=True)
        ]
        long = long[np.asarray(keep, dtype=bool)]
        if long.empty:
            return pd.Series(np.nan, index=pd.Index(run_order, name="run_id"), name="multitask_score")
    table = long.pivot_table(index="run_id", columns=["task", "metric"], values="value", aggfunc="mean")
    normalised = {}
    for task, metric in table.columns:
        v = table[(task, metric)].astype(float)
        if task in declared:
            worst, best = declared[task][metric]
            normalised[(task, metric)] = ((v - worst) / (best - worst)).clip(0.0, 1.0)
            continue
        sign = metric_direction(metric, task, directions)
        rng = _lookup(ranges, task, metric) if isinstance(ranges, Mapping) else ranges
        if isinstance(rng, str):
            if rng != "observed":
                raise ValueError(f"range {rng!r} for {task}/{metric}: use (lo, hi) or 'observed'")
            lo, hi = float(v.min()), float(v.max())
            if not hi > lo:
                normalised[(task, metric)] = pd.Series(np.where(v.notna(), 0.5, np.nan), index=v.index)
                continue
        elif rng is not None:
            lo, hi = (float(r) for r in rng)
            if not hi > lo:
                raise ValueError(f"range for {task}/{metric} must have lo < hi, got {rng!r}")
        else:
            if sign < 0:
                raise ValueError(
                    f"{task}/{metric} is lower-is-better and has no range, so it cannot be averaged with "
                    f"other metrics; declare it in the runs' metadata (RunWriter(meta={{'score_ranges': "
                    f"{{'{task}': {{'{metric}': [worst, best]}}}}}})), pass score_ranges= or "
                    f"ranges={{'{metric}': (lo, hi)}} or ranges='observed', declare "
                    f"directions={{'{metric}': 'higher'}} if that is wrong, or leave it out with metrics=[...]"
                )
            normalised[(task, metric)] = v
            continue
        normalised[(task, metric)] = (v - lo) / (hi - lo) if sign > 0 else (hi - v) / (hi - lo)
    z = pd.DataFrame(normalised)
    z.columns = pd.MultiIndex.from_tuples(z.columns, names=["task", "metric"])
    per_task = z.T.groupby(level="task").mean().T  # mean over each task's available metrics
    complete = z.notna().all(axis=1)
    score = per_task.mean(axis=1, skipna=True)
    if missing == "nan":
        score = score.where(complete)
    score = score.reindex(run_order)
    score.index.name = "run_id"
    score.name = "multitask_score"
    return score


def delta_m(
    feats: pd.DataFrame,
    *,
    by: str,
    baseline: Any,
    pair_on: str | Sequence[str] | None = None,
    directions: Mapping[str, Any] | None = None,
    score_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Delta-m% of every non-baseline run against the baseline group (formula in the module docstring).

    ``B_k`` is the mean of metric ``k`` over the baseline group's runs, or, with ``pair_on``, over
    the baseline runs that share the run's ``pair_on`` tags (e.g. the same model and seed). A run
    missing any task metric, or without a matching baseline, gets NaN.

    Args:
        feats: a features frame (``score/<task>/<metric>`` columns plus tag columns).
        by: the tag that names the groups; ``baseline``: its baseline value.
        pair_on: tags to match each run with its own baseline runs (optional).
        directions: as in :func:`multitask_score`.
        score_columns: which score columns enter (default: every per-task score column).

    Returns:
        One row per non-baseline run: ``run_id``, ``by``, the ``pair_on`` tags, ``delta_m`` (percent)
        and ``n_metrics`` (``K``).

    Example:
        >>> import pandas as pd
        >>> from dynamics.analysis import delta_m
        >>> f = pd.DataFrame({"run_id": ["a", "b"], "construction": ["DMAX", "IMAX"],
        ...                   "score/vqa/accuracy": [0.50, 0.55], "score/rep/error": [0.20, 0.18]})
        >>> delta_m(f, by="construction", baseline="DMAX")["delta_m"].round(2).tolist()  # (10% + 10%) / 2
        [10.0]
    """
    if by not in feats.columns:
        raise ValueError(f"column {by!r} not in the features frame; its tag columns are {_tags(feats)}")
    pair_cols = [pair_on] if isinstance(pair_on, str) else list(pair_on or [])
    missing = [c for c in pair_cols if c not in feats.columns]
    if missing:
        raise ValueError(f"pair_on columns {missing} are not in the features frame; tags are {_tags(feats)}")
    if score_columns is None:
        score_columns = [
            c
            for c in feats.columns
            if isinstance(c, str)
            and c.startswith("score/")
            and c.count("/") >= 2
            and c.split("/")[1] != "all"
        ]
    if not score_columns:
        raise ValueError("no per-task score columns ('score/<task>/<metric>') in the features frame")
    if not (feats[by] == baseline).any():
        raise ValueError(
            f"no run has {by} == {baseline!r}; the values present are {sorted(map(str, feats[by].unique()))}"
        )
    signs = np.array(
        [metric_direction(c.split("/", 2)[2], c.split("/", 2)[1], directions) for c in score_columns], float
    )
    values = feats[score_columns].to_numpy(dtype=float)
    is_base = (feats[by] == baseline).to_numpy()
    if pair_cols:
        keys = feats[pair_cols].astype(str).agg("\x1f".join, axis=1)
        base_means = pd.DataFrame(values[is_base], index=keys[is_base].to_numpy()).groupby(level=0).mean()
        base = base_means.reindex(keys[~is_base].to_numpy()).to_numpy()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a metric no baseline run has: NaN
            base = np.broadcast_to(np.nanmean(values[is_base], axis=0), values[~is_base].shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = signs * (values[~is_base] - base) / np.abs(base)
    rel[~np.isfinite(rel)] = np.nan
    if np.any(base == 0):
        warnings.warn(
            "a baseline metric is 0, so Delta-m is undefined for it; those runs get NaN", stacklevel=2
        )
    out = feats.loc[~is_base, [c for c in ("run_id",) if c in feats.columns] + [by, *pair_cols]].copy()
    if "run_id" not in out.columns:
        out.insert(0, "run_id", feats.index[~is_base])
    out["delta_m"] = 100.0 * rel.mean(axis=1)  # NaN if any metric (or its baseline) is missing
    out["n_metrics"] = len(score_columns)
    return out.reset_index(drop=True)


def _tags(feats: pd.DataFrame) -> list[str]:
    tags = feats.attrs.get("tag_columns")
    return list(tags) if tags is not None else [c for c in feats.columns if "/" not in str(c)]
