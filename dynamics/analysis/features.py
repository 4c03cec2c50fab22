"""One row per run: tags, summaries of every logged signal, final scores and the multi-task score.

Column naming: ``<name>/<task>/<stat>``.

* ``task`` is the task name, ``a|b`` for a pairwise metric (``grad_cosine`` between tasks a and b),
  ``all`` for the overall value and ``pairs`` for the across-pairs summary.
* ``all`` is the globally logged series (``task=""``) when the run logged one; otherwise, for a
  per-task signal, the mean over the run's tasks of the per-task statistic. ``pairs`` is the mean
  over the run's task pairs of the per-pair statistic. Every statistic below except the curvature
  ones is linear in the series, so for tasks logged at the same steps this equals the statistic of
  the task-averaged curve.
* ``stat`` is one of ``mean``, ``early``, ``middle``, ``late`` (or the names of custom ``phases``),
  ``final``, ``auc``, ``slope`` (formulas in :mod:`dynamics.analysis.series`), and for loss-like
  signals (``curvature_names``) ``curv_mean``, ``curv_early``, ... : the mean smoothed second
  derivative of ``log(loss)`` per step^2 over training and over each phase
  (:mod:`dynamics.analysis.loss_curvature`).

Phases are fractions of a horizon ``H``: ``horizon="run"`` (default) uses each run's own last
logged step, ``"max"`` the longest run's, an integer a fixed step count. A run that crashed early is
then summarised over its own (short) training under ``"run"``, or has NaN late-phase features under
``"max"``; a warning names runs much shorter than the longest.

Scores: ``score/<task>/<metric>`` (``all`` for overall scores) and ``multitask_score``
(:func:`dynamics.analysis.multitask_score`). A signal or task a run did not log is NaN, never an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dynamics.analysis.loss_curvature import DEFAULT_BANDWIDTH_FRACTION
from dynamics.analysis.scores import declared_score_ranges, is_declared_format, multitask_score
from dynamics.analysis.series import (
    DEFAULT_PHASES,
    basic_summaries,
    curvature_summaries,
    phase_windows,
    sort_series,
)

if TYPE_CHECKING:  # pragma: no cover
    from dynamics.store.reader import RunSet

__all__ = ["features", "score_labels", "stat_names"]

CURVATURE_NAMES = ("loss", "train_loss")
_SHORT_RUN = 0.9  # a run ending before this fraction of the longest run's steps gets a warning


def stat_names(phases: tuple[float, ...] | Mapping[str, tuple[float, float]] = DEFAULT_PHASES) -> list[str]:
    """The per-series statistic names, in column order, for these phases (no curvature)."""
    return ["mean", *phase_windows(phases), "final", "auc", "slope"]


def _horizons(last_step: np.ndarray, run_ids: pd.Index, horizon: str | int) -> np.ndarray:
    """Phase horizon H per run from each run's last logged step (NaN for a run with no rows)."""
    per_run = last_step
    if isinstance(horizon, str):
        if horizon == "run":
            out = per_run
        elif horizon == "max":
            out = np.full(len(run_ids), np.nanmax(per_run) if np.isfinite(per_run).any() else np.nan)
        else:
            raise ValueError(f"horizon must be 'run', 'max' or a number of steps, got {horizon!r}")
    elif isinstance(horizon, (int, float, np.integer, np.floating)) and horizon > 0:
        out = np.full(len(run_ids), float(horizon))
    else:
        raise ValueError(f"horizon must be 'run', 'max' or a positive number of steps, got {horizon!r}")
    if horizon == "run" and np.isfinite(per_run).sum() > 1:
        longest = np.nanmax(per_run)
        short = run_ids[per_run < _SHORT_RUN * longest].tolist()
        if short:
            shown = ", ".join(map(str, short[:5])) + (" ..." if len(short) > 5 else "")
            warnings.warn(
                f"{len(short)} run(s) end well before the longest ({shown}; longest: {int(longest)} steps). "
                "Their phase features cover their own, shorter training; pass horizon='max' to put every "
                "run on the longest run's step scale (a crashed run then has NaN late-phase features).",
                stacklevel=3,
            )
    return np.maximum(np.nan_to_num(out, nan=1.0), 1.0)


def features(
    runset: RunSet,
    *,
    phases: tuple[float, ...] | Mapping[str, tuple[float, float]] = DEFAULT_PHASES,
    names: Sequence[str] | None = None,
    target_directions: Mapping[str, Any] | None = None,
    score_ranges: Mapping[str, Any] | tuple[float, float] | str | None = None,
    score_metrics: Sequence[str] | None = None,
    horizon: str | int = "run",
    curvature_names: Sequence[str] = CURVATURE_NAMES,
    curvature_bandwidth: float | None = None,
    curvature_degree: int = 3,
) -> pd.DataFrame:
    """Summarise every run of ``runset`` into one row of features (naming in the module docstring).

    Args:
        runset: a :class:`dynamics.store.reader.RunSet` (``load_runs(...)`` or ``RunSet.from_frames``).
        phases: two boundaries as fractions of the horizon, ``(1/3, 2/3)`` by default, giving
            ``early = (0, 1/3]``, ``middle = (1/3, 2/3]``, ``late = (2/3, 1]``; or a mapping
            ``{name: (lo, hi)}`` for custom windows.
        names: signals to summarise (default: every logged name). A requested name that no run
            logged gives NaN ``<name>/all/<stat>`` columns and a warning.
        target_directions, score_metrics: passed to :func:`multitask_score` as ``directions`` and
            ``metrics``. score_ranges: declared ranges ``{task: {metric: [worst, best]}}`` (default:
            what the runs declare in ``run.json`` ``meta["score_ranges"]``), or the older
            ``ranges`` forms of :func:`multitask_score` (``(lo, hi)``, ``{"metric": (lo, hi)}``,
            ``"observed"``). If the score cannot be formed (say a lower-is-better metric without
            a range) the column is NaN and a warning says why.
        horizon: ``"run"``, ``"max"`` or a step count (see the module docstring).
        curvature_names: signals that also get loss-curve curvature statistics (per task and global).
        curvature_bandwidth: kernel half-width in steps, the same for every run so that runs are
            comparable; default ``0.1 *`` the longest horizon.
        curvature_degree: local polynomial degree of the curvature fit.

    Returns:
        A DataFrame indexed by run id (also a ``run_id`` column), with the tag columns, ``n_steps``
        (last logged step), the feature columns, the score columns and ``multitask_score``.
        ``attrs["feature_columns"]``, ``attrs["tag_columns"]`` and ``attrs["score_columns"]`` list them.

    Example:
        >>> import numpy as np, pandas as pd
        >>> from dynamics.store.reader import RunSet
        >>> from dynamics.analysis import features
        >>> steps = np.arange(1, 101)
        >>> metrics = pd.DataFrame({"run_id": "r1", "step": np.tile(steps, 2), "name": "loss",
        ...                         "task": np.repeat(["vqa", "cls"], 100), "task_b": "",
        ...                         "value": np.r_[2 / np.sqrt(steps), 1 / np.sqrt(steps)]})
        >>> runs = pd.DataFrame({"run_id": ["r1"], "model": ["tiny"]})
        >>> scores = pd.DataFrame({"run_id": "r1", "task": ["vqa", "cls"], "metric": "accuracy",
        ...                        "value": [0.5, 0.7]})
        >>> feats = features(RunSet.from_frames(runs, metrics, scores))
        >>> print(round(feats.loc["r1", "loss/vqa/final"], 3), round(feats.loc["r1", "multitask_score"], 2))
        0.2 0.6
        >>> print(round(feats.loc["r1", "loss/all/final"], 2))  # mean over the two tasks
        0.15
    """
    runs = runset.runs
    if "run_id" not in runs.columns:
        raise ValueError(
            "runset.runs needs a 'run_id' column; build run sets with load_runs or RunSet.from_frames"
        )
    windows = phase_windows(phases)
    stats = ["mean", *windows, "final", "auc", "slope"]
    curv_stats = ["curv_mean", *(f"curv_{w}" for w in windows)]
    run_ids = pd.Index(runs["run_id"].astype(str))
    if run_ids.has_duplicates:
        raise ValueError(
            f"duplicate run ids in runset.runs: {sorted(run_ids[run_ids.duplicated()].unique())}"
        )
    tag_cols = list(runset.tag_columns)

    metrics = runset.metrics
    # Factorise the label columns once; everything below works on integer codes.
    run_raw, run_u = pd.factorize(metrics["run_id"])
    run_code = run_ids.get_indexer(pd.Index(run_u).astype(str))[run_raw] if len(run_u) else run_raw
    step_all = metrics["step"].to_numpy()
    last_step = np.full(len(run_ids), -np.inf)
    if step_all.size:
        np.maximum.at(
            last_step, np.where(run_code >= 0, run_code, 0), np.where(run_code >= 0, step_all, -np.inf)
        )
    last_step[~np.isfinite(last_step)] = np.nan
    h_run = _horizons(last_step, run_ids, horizon)

    name_code, name_u = pd.factorize(metrics["name"])
    keep = run_code >= 0
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        absent = sorted(set(names) - set(name_u))
        if absent:
            warnings.warn(f"no run logged {absent}; their feature columns are NaN", stacklevel=2)
        keep &= np.isin(name_code, np.flatnonzero(pd.Index(name_u).isin(names)))
    if not keep.all():
        metrics = metrics[keep]
        run_code, name_code, step_all = run_code[keep], name_code[keep], step_all[keep]
    task_code, task_u = pd.factorize(metrics["task"])
    tb_code, tb_u = pd.factorize(metrics["task_b"])
    n_name, n_task, n_tb = len(name_u), max(len(task_u), 1), max(len(tb_u), 1)
    key = ((run_code.astype(np.int64) * n_name + name_code) * n_task + task_code) * n_tb + tb_code
    series, key_u = pd.factorize(key)
    n_series = len(key_u)
    rest, s_tb = np.divmod(np.asarray(key_u, np.int64), n_tb)
    rest, s_task = np.divmod(rest, n_task)
    s_run, s_name = np.divmod(rest, n_name)

    ss = sort_series(series, step_all, metrics["value"].to_numpy(), n_series)
    horizon_s = h_run[s_run]
    summary = basic_summaries(ss, horizon_s, windows)

    s_task_name = np.asarray(task_u, dtype=object)[s_task] if n_series else np.array([], object)
    s_tb_name = np.asarray(tb_u, dtype=object)[s_tb] if n_series else np.array([], object)
    s_name_str = np.asarray(name_u, dtype=object)[s_name] if n_series else np.array([], object)
    is_pair = s_tb_name != ""
    is_global = (s_task_name == "") & ~is_pair
    curv_wanted = np.isin(s_name_str, list(curvature_names)) & ~is_pair
    if curv_wanted.any():
        bandwidth = curvature_bandwidth
        if bandwidth is None:
            bandwidth = DEFAULT_BANDWIDTH_FRACTION * float(np.max(h_run))
        rows = curv_wanted[ss.series]
        sub_ids, sub_series = np.unique(ss.series[rows], return_inverse=True)
        sub = type(ss)(sub_series, ss.x[rows], ss.y[rows], len(sub_ids))
        curv = curvature_summaries(
            sub, horizon_s[sub_ids], windows, bandwidth=bandwidth, degree=curvature_degree
        )
        for k, v in curv.items():
            full = np.full(n_series, np.nan)
            full[sub_ids] = v
            summary[k] = full
    task_label = np.where(is_global, "all", np.where(is_pair, s_task_name + "|" + s_tb_name, s_task_name))
    all_stats = stats + (curv_stats if curv_wanted.any() else [])

    table = pd.DataFrame(
        {"run": s_run, "name": s_name_str, "task": task_label, **{k: summary[k] for k in all_stats}}
    )
    table = table.astype({"name": object, "task": object})
    feat_frame = _widen(
        _add_overall(table, is_global, is_pair, all_stats), run_ids, all_stats, names, curvature_names
    )
    columns = list(feat_frame.columns)

    out = pd.DataFrame({"run_id": run_ids.to_numpy()}, index=run_ids)
    for tag in tag_cols:
        out[tag] = runs[tag].to_numpy()
    out["n_steps"] = np.nan_to_num(last_step, nan=0.0).astype(np.int64)  # 0 = nothing logged, as load_runs
    score_frame, score_cols = _score_columns(runset.scores, run_ids)
    if score_ranges is None:
        declared = declared_score_ranges(runset) if runset.scores is not None and len(runset.scores) else {}
        ranges, score_ranges = None, (declared or None)
    elif is_declared_format(score_ranges):
        ranges = None
    else:
        ranges, score_ranges = score_ranges, None
    mts = _multitask(runset.scores, run_ids, target_directions, ranges, score_metrics, score_ranges)
    out = pd.concat([out, feat_frame, score_frame, mts.to_frame()], axis=1)
    out.index.name = None
    out.attrs["feature_columns"] = columns
    out.attrs["tag_columns"] = tag_cols
    out.attrs["score_columns"] = [*score_cols, "multitask_score"]
    out.attrs["phases"] = list(windows)
    return out


def _add_overall(
    table: pd.DataFrame, is_global: np.ndarray, is_pair: np.ndarray, stats: list[str]
) -> pd.DataFrame:
    """Append the ``all`` rows of per-task signals that have no global series, and the ``pairs`` rows.

    Whether ``all`` is the logged global series or the mean over tasks is decided per signal name
    for the whole collection, so one column never mixes the two definitions.
    """
    global_names = set(table.loc[is_global, "name"])
    derived = []
    per_task = table[~is_global & ~is_pair & ~table["name"].isin(global_names).to_numpy()]
    if len(per_task):
        derived.append(
            per_task.groupby(["run", "name"], sort=False)[stats].mean().reset_index().assign(task="all")
        )
    pairs = table[is_pair]
    if len(pairs):
        derived.append(
            pairs.groupby(["run", "name"], sort=False)[stats].mean().reset_index().assign(task="pairs")
        )
    return pd.concat([table, *derived], ignore_index=True) if derived else table


def _widen(
    table: pd.DataFrame,
    run_ids: pd.Index,
    stats: list[str],
    names: Sequence[str] | None,
    curvature_names: Sequence[str],
) -> pd.DataFrame:
    """One row per run, columns ``name/task/stat`` ordered by name, then all / tasks / pairs / a|b, then stat."""
    col_keys = table[["name", "task"]].drop_duplicates()
    if names is not None:
        extra = [n for n in names if n not in set(col_keys["name"])]
        col_keys = pd.concat([col_keys, pd.DataFrame({"name": extra, "task": "all"})], ignore_index=True)

    def task_rank(t: str) -> tuple[int, str]:
        return (0 if t == "all" else 2 if t == "pairs" else 3 if "|" in t else 1, t)

    keys = sorted(
        zip(col_keys["name"], col_keys["task"], strict=True), key=lambda nt: (nt[0], task_rank(nt[1]))
    )
    slot = {nt: i for i, nt in enumerate(keys)}
    pos = np.array([slot[nt] for nt in zip(table["name"], table["task"], strict=True)], dtype=np.int64)
    run_pos = table["run"].to_numpy(dtype=np.int64)
    # values[run, stat, key]: scattered once per stat, then read out with stats innermost.
    values = np.full((len(run_ids), len(stats), len(keys)), np.nan)
    for i, stat in enumerate(stats):
        values[run_pos, i, pos] = table[stat].to_numpy(dtype=float)
    curv_ok = set(curvature_names)
    columns, take = [], []
    for j, (name, task) in enumerate(keys):
        for i, stat in enumerate(stats):
            if stat.startswith("curv_") and (name not in curv_ok or "|" in task or task == "pairs"):
                continue
            columns.append(f"{name}/{task}/{stat}")
            take.append((i, j))
    data = values[:, [i for i, _ in take], [j for _, j in take]] if take else np.empty((len(run_ids), 0))
    return pd.DataFrame(data, index=run_ids, columns=columns)


def score_labels(scores: pd.DataFrame) -> pd.Series:
    """The feature-frame column of each stored score: ``score/<task>/<metric>``, where the
    run-level scores (task ``""``) are ``score/all/<metric>``."""
    return "score/" + scores["task"].astype(str).replace("", "all") + "/" + scores["metric"].astype(str)


def _score_columns(scores: pd.DataFrame, run_ids: pd.Index) -> tuple[pd.DataFrame, list[str]]:
    if scores is None or scores.empty:
        return pd.DataFrame(index=run_ids), []
    label = score_labels(scores)
    wide = (
        pd.DataFrame({"run_id": scores["run_id"].astype(str), "col": label, "value": scores["value"]})
        .pivot_table(index="run_id", columns="col", values="value", aggfunc="last", dropna=False)
        .reindex(run_ids)
    )
    cols = sorted(wide.columns, key=lambda c: (c.split("/")[1] != "all", c))
    wide = wide[cols]
    wide.columns.name = None
    return wide, cols


def _multitask(
    scores: pd.DataFrame, run_ids: pd.Index, directions: Any, ranges: Any, metrics: Any, declared: Any = None
) -> pd.Series:
    empty = pd.Series(np.nan, index=run_ids, name="multitask_score")
    if scores is None or scores.empty:
        return empty
    try:
        s = multitask_score(
            scores, directions=directions, ranges=ranges, metrics=metrics, score_ranges=declared
        )
    except ValueError as err:
        overall = sorted(set(scores.loc[scores["task"] == "", "metric"].astype(str)))
        hint = (
            f" The runs store run-level scores {['score/all/' + m for m in overall]}: use one as the target."
            if overall
            else ""
        )
        warnings.warn(f"multitask_score is NaN: {err}.{hint}", stacklevel=3)
        return empty
    s = s.reindex(run_ids)
    s.name = "multitask_score"
    return s
