"""Everything a report page needs, computed once: runs, groups, colours and the statistics frames.

The statistics (features, group comparison, correlation, early forecast) come from
:mod:`dynamics.analysis` unchanged; the report only formats and draws them. A statistic that cannot
be computed for these runs (one group only, no final scores, too few runs) is kept as a note that
says why, and the pages that need it are left out with that note.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dynamics.analysis.series import DEFAULT_PHASES
from dynamics.store.reader import RunSet, load_runs

__all__ = [
    "Stat",
    "ReportContext",
    "build_context",
    "resolve_runs",
    "PHASES",
    "FRACTIONS",
    "REPLICATE_TAGS",
    "ALPHA",
]

PHASES = DEFAULT_PHASES
FRACTIONS = (0.1, 0.25, 0.5)
ALPHA = 0.05
NO_GROUP = "all runs"
MISSING_TAG = "(untagged)"
REPLICATE_TAGS = ("model", "seed")
"""Tags that identify a replicate rather than a condition: never a default ``by``, the default
``pair_on`` (where present), and the first one present is the forecast's leave-one-out group."""


@dataclass
class Stat:
    """One statistics frame, or the reason it is missing."""

    # A DataFrame, or None when ``note`` says why not; typed Any so that the pages, which only read
    # a frame after checking ``ok``, need no cast at every use.
    frame: Any = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.frame is not None and not self.frame.empty


@dataclass
class ReportContext:
    """Runs plus the derived pieces shared by all pages (built by :func:`build_context`)."""

    runset: RunSet
    group: str | None
    run_group: pd.Series  # run_id -> group label
    groups: list[str]
    palette: dict[str, tuple[float, float, float]]
    pair: tuple[str, ...]
    target: str
    tasks: list[str]
    primary_features: tuple[str, ...] = ()
    features: Stat = field(default_factory=Stat)
    comparison: Stat = field(default_factory=Stat)
    # The pre-specified family: the target and the ``primary`` features, tested and Holm-corrected
    # together, apart from the exploratory family of every feature (``comparison``).
    primary: Stat = field(default_factory=Stat)
    correlation: Stat = field(default_factory=Stat)
    forecast: Stat = field(default_factory=Stat)

    @property
    def by(self) -> str | None:
        """The grouping tag (``group`` is its older name)."""
        return self.group

    @property
    def pair_on(self) -> tuple[str, ...]:
        return self.pair

    @property
    def metric_names(self) -> set[str]:
        return set(self.runset.metrics["name"].unique())

    @property
    def group_label(self) -> str:
        return self.group or "group"

    def metric(self, name: str) -> pd.DataFrame:
        """The rows of one metric with a ``group`` column added."""
        m = self.runset.metrics
        rows = m[m["name"] == name]
        return rows.assign(group=rows["run_id"].map(self.run_group))

    def __repr__(self) -> str:
        stats = ", ".join(
            f"{name}: {'ok' if stat.ok else 'missing'}"
            for name, stat in [
                ("features", self.features),
                ("comparison", self.comparison),
                ("correlation", self.correlation),
                ("forecast", self.forecast),
            ]
        )
        return (
            f"ReportContext({len(self.runset)} runs, group={self.group!r}, target={self.target!r}; {stats})"
        )

    def group_sizes(self) -> dict[str, int]:
        counts = self.run_group.value_counts()
        return {g: int(counts.get(g, 0)) for g in self.groups}


def resolve_runs(run_dirs: RunSet | str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> RunSet:
    """A RunSet as given, or loaded from run directories / folders / globs (clear error if none)."""
    if isinstance(run_dirs, RunSet):
        runset = run_dirs
    else:
        paths = [run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else list(run_dirs)
        if not paths:
            raise ValueError("no run directories given; pass one or more run directories, folders or globs")
        runset = load_runs([os.fspath(p) for p in paths])
    if len(runset) == 0:
        raise ValueError("no runs found in the given paths")
    return runset


def _resolve_group(runset: RunSet, by: str | None) -> str | None:
    tags = runset.tag_columns
    if by is not None:
        if by not in tags:
            raise ValueError(
                f"by={by!r} is not a tag of these runs; their tags are {sorted(tags) or 'none'} "
                "(tags are set with RunWriter(tags=...) or attach(tags=...))"
            )
        return by
    # Default: the one tag that varies and is not a replicate tag (several such tags: ambiguous).
    varying = [t for t in tags if t not in REPLICATE_TAGS and runset.runs[t].nunique(dropna=True) > 1]
    return varying[0] if len(varying) == 1 else None


def _resolve_pair(runset: RunSet, by: str | None, pair_on: Sequence[str] | str | None) -> tuple[str, ...]:
    tags = runset.tag_columns
    if pair_on is None:
        return tuple(t for t in REPLICATE_TAGS if t in tags and t != by)
    if isinstance(pair_on, str):
        pair_on = [p.strip() for p in pair_on.split(",") if p.strip()]
    unknown = [p for p in pair_on if p not in tags]
    if unknown:
        raise ValueError(
            f"pair_on={list(pair_on)!r}: {unknown} are not tags of these runs; their tags are {sorted(tags) or 'none'}"
        )
    if by is not None and by in pair_on:
        raise ValueError(f"pair_on={list(pair_on)!r} contains by={by!r}: runs are paired across its groups")
    return tuple(pair_on)


def renamed(new: Any, old: Any, new_name: str, old_name: str, where: str) -> Any:
    """``new`` or the deprecated ``old`` spelling of the same argument (with a DeprecationWarning)."""
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"{where}: pass {new_name}= only ({old_name}= is its deprecated name)")
    warnings.warn(
        f"{where}: {old_name}= is deprecated and will be removed in the next release; use {new_name}=",
        DeprecationWarning,
        stacklevel=3,
    )
    return old


def _task_union(runset: RunSet) -> list[str]:
    seen: dict[str, None] = {}
    for tasks in runset.runs["tasks"]:
        for t in tasks:
            seen.setdefault(t, None)
    return list(seen)


def _score_columns(runset: RunSet) -> list[str]:
    from dynamics.analysis.features import score_labels

    return sorted(set(score_labels(runset.scores)))


def _check_target(runset: RunSet, target: str) -> None:
    if runset.scores.empty or target == "multitask_score":
        return
    known = _score_columns(runset)
    if target not in known:
        raise ValueError(
            f"target={target!r} is not a score of these runs; use 'multitask_score' or one of {known[:12]}"
        )


def _attempt(fn: Callable[[], pd.DataFrame]) -> Stat:
    """Run one statistics call; a ValueError (the analysis layer's 'cannot compute this') becomes a note."""
    try:
        frame = fn()
    except ValueError as err:
        return Stat(None, str(err))
    if frame is None or frame.empty:
        return Stat(None, "the statistics layer returned no rows")
    return Stat(frame, None)


def build_context(
    run_dirs: Any,
    *,
    by: str | None = None,
    pair_on: Sequence[str] | str | None = None,
    target: str = "multitask_score",
    primary: Sequence[str] = (),
    statistics: bool = True,
    step: Callable[[str], None] | None = None,
    group: str | None = None,
    pair: Sequence[str] | str | None = None,
) -> ReportContext:
    """Load the runs, resolve grouping / pairing / target, and compute the statistics frames.

    Args:
        run_dirs: run directories, folders of runs, globs, or a :class:`RunSet`.
        by: the tag whose values are compared (default: the only tag other than
            :data:`REPLICATE_TAGS` that takes two or more values; none if there are several).
        pair_on: tags that pair runs across groups (list or comma-separated); default: the
            :data:`REPLICATE_TAGS` present.
        target: the final score that correlations and forecasts explain.
        primary: pre-specified features tested with the target as one small Holm family (e.g.
            the two Fisher-spectrum signals of a hypothesis), apart from the exploratory family.
        statistics: compute the statistics frames (False: plots only).
        step: called with a label before each long step (progress reporting).
        group, pair: deprecated names of ``by`` and ``pair_on``.
    """
    by = renamed(by, group, "by", "group", "build_context")
    pair_on = renamed(pair_on, pair, "pair_on", "pair", "build_context")
    note = step or (lambda label: None)
    note("loading runs")
    runset = resolve_runs(run_dirs)
    by = _resolve_group(runset, by)
    pairs = _resolve_pair(runset, by, pair_on)
    _check_target(runset, target)
    if by is None:
        run_group = pd.Series(NO_GROUP, index=runset.runs["run_id"].to_numpy())
    else:
        labels = runset.runs[by].map(lambda v: MISSING_TAG if pd.isna(v) else str(v))
        run_group = pd.Series(labels.to_numpy(), index=runset.runs["run_id"].to_numpy())
    groups = sorted(run_group.unique(), key=_natural_key)

    from dynamics.report.style import group_palette

    ctx = ReportContext(
        runset=runset,
        group=by,
        run_group=run_group,
        groups=groups,
        palette=group_palette(groups),
        pair=pairs,
        target=target,
        tasks=_task_union(runset),
        primary_features=tuple(p for p in primary if p != target),
    )
    if statistics:
        _compute_statistics(ctx, note)
    return ctx


def _natural_key(label: str) -> tuple:
    return (label == MISSING_TAG, label)


def _compute_statistics(ctx: ReportContext, note: Callable[[str], None]) -> None:
    try:
        from dynamics.analysis import compare, correlate, features, forecast
    except ImportError as err:
        reason = f"the statistics layer (dynamics.analysis) is not available: {err}"
        ctx.features = ctx.comparison = ctx.primary = ctx.correlation = ctx.forecast = Stat(None, reason)
        return
    runset = ctx.runset
    note("computing features")
    ctx.features = _attempt(lambda: features(runset, phases=PHASES))
    if not ctx.features.ok:
        reason = f"features could not be computed: {ctx.features.note}"
        ctx.comparison = ctx.primary = ctx.correlation = ctx.forecast = Stat(None, reason)
        return
    feats = ctx.features.frame
    has_target = ctx.target in feats.columns and feats[ctx.target].notna().sum() > 0

    if ctx.group is None:
        ctx.comparison = Stat(None, "no group to compare: pass by=TAG (a tag with two or more values)")
    elif len(ctx.groups) < 2:
        ctx.comparison = Stat(None, f"only one value of {ctx.group!r} ({ctx.groups[0]}): nothing to compare")
    else:
        note("comparing groups")
        pair_on = ctx.pair or None
        by = ctx.group
        ctx.comparison = _attempt(lambda: compare(feats, by=by, pair_on=pair_on))
        # Pre-specified hypotheses get their own, small Holm family instead of being one of the
        # hundreds of exploratory tests.
        primary = [ctx.target] if has_target else []
        primary += [f for f in ctx.primary_features if f in feats.columns and feats[f].notna().any()]
        ctx.primary = (
            _attempt(lambda: compare(feats, by=by, pair_on=pair_on, features=primary))
            if primary
            else Stat(None, f"{ctx.target!r} has no values in these runs")
        )
    if ctx.comparison.note and not ctx.primary.note and not ctx.primary.ok:
        ctx.primary = Stat(None, ctx.comparison.note)

    if not has_target:
        if runset.scores.empty:
            reason = "no final scores (scores.parquet) in these runs"
        elif ctx.target in feats.columns:
            overall = sorted(c for c in feats.attrs.get("score_columns", []) if c.startswith("score/all/"))
            reason = (
                f"{ctx.target!r} is NaN for every run: the final scores could not be combined (see the "
                "statistics layer's warning; declare per-task ranges in the runs' metadata "
                "meta['score_ranges'] = {task: {metric: [worst, best]}}), or pick one score with "
                "target='score/<task>/<metric>'"
                + (f", e.g. the stored run-level score {overall[0]!r}" if overall else "")
            )
        else:
            reason = f"target {ctx.target!r} is not among the features' score columns"
        ctx.correlation = ctx.forecast = Stat(None, reason)
        return
    note("correlating features with the score")
    # With groups, every feature also gets its within-group correlation (centred per group), so
    # a difference between the groups is not read as "this signal goes with the score".
    control = ctx.group if ctx.group is not None and len(ctx.groups) >= 2 else None
    ctx.correlation = _attempt(
        lambda: correlate(feats, target=ctx.target, method="spearman", control=control)
    )
    note("forecasting from early training")
    forecast_group = next((t for t in REPLICATE_TAGS if t in runset.tag_columns), None)
    ctx.forecast = _attempt(
        lambda: forecast(runset, target=ctx.target, fractions=FRACTIONS, group=forecast_group)
    )
