"""Everything a report page needs, computed once: runs, groups, colours and the statistics frames.

The statistics (features, group comparison, correlation, early forecast) come from
:mod:`dynamics.analysis` unchanged; the report only formats and draws them. A statistic that cannot
be computed for these runs (one group only, no final scores, too few runs) is kept as a note that
says why, and the pages that need it are left out with that note.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dynamics.store.reader import RunSet, load_runs

__all__ = [
    "Stat",
    "ReportContext",
    "build_context",
    "resolve_runs",
    "DEFAULT_GROUP",
    "PHASES",
    "FRACTIONS",
    "PRIMARY_SIGNALS",
]

DEFAULT_GROUP = "construction"
PHASES = (1 / 3, 2 / 3)
FRACTIONS = (0.1, 0.25, 0.5)
# The IMAX paper's hypotheses: lower spectral entropy and higher dominant ratio for the better data.
PRIMARY_SIGNALS = ("fisher_se/all/mean", "fisher_rho/all/mean")
NO_GROUP = "all runs"
MISSING_TAG = "(untagged)"
# Tags that identify a replicate rather than a condition: never a default group.
_REPLICATE_TAGS = ("model", "seed")


@dataclass
class Stat:
    """One statistics frame, or the reason it is missing."""

    frame: pd.DataFrame | None = None
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
    features: Stat = field(default_factory=Stat)
    comparison: Stat = field(default_factory=Stat)
    # The pre-specified family: the target and the IMAX paper's two spectrum signals, tested and
    # Holm-corrected together, apart from the exploratory family of every feature (``comparison``).
    primary: Stat = field(default_factory=Stat)
    correlation: Stat = field(default_factory=Stat)
    forecast: Stat = field(default_factory=Stat)

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


def _resolve_group(runset: RunSet, group: str | None) -> str | None:
    tags = runset.tag_columns
    if group is not None:
        if group not in tags:
            raise ValueError(
                f"--group {group!r} is not a tag of these runs; their tags are {sorted(tags) or 'none'} "
                "(tags are set with RunWriter(tags=...) or attach(tags=...))"
            )
        return group
    if DEFAULT_GROUP in tags and runset.runs[DEFAULT_GROUP].nunique(dropna=True) > 1:
        return DEFAULT_GROUP
    return None


def _resolve_pair(runset: RunSet, group: str | None, pair: Sequence[str] | str | None) -> tuple[str, ...]:
    tags = runset.tag_columns
    if pair is None:
        return tuple(t for t in _REPLICATE_TAGS if t in tags and t != group)
    if isinstance(pair, str):
        pair = [p.strip() for p in pair.split(",") if p.strip()]
    unknown = [p for p in pair if p not in tags]
    if unknown:
        raise ValueError(
            f"--pair tag(s) {unknown} are not tags of these runs; their tags are {sorted(tags) or 'none'}"
        )
    if group is not None and group in pair:
        raise ValueError(f"--pair cannot contain the group tag {group!r}: runs are paired across its groups")
    return tuple(pair)


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
            f"--target {target!r} is not a score of these runs; use 'multitask_score' or one of {known[:12]}"
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
    group: str | None = None,
    pair: Sequence[str] | str | None = None,
    target: str = "multitask_score",
    statistics: bool = True,
    step: Callable[[str], None] | None = None,
) -> ReportContext:
    """Load the runs, resolve group / pairing / target, and compute the statistics frames.

    Args:
        run_dirs: run directories, folders of runs, globs, or a :class:`RunSet`.
        group: the tag whose values are compared (default ``construction`` when it has two or
            more values, else no grouping).
        pair: tags that pair runs across groups (list or comma-separated); default ``model`` and
            ``seed`` where present.
        target: the final score that correlations and forecasts explain.
        statistics: compute the statistics frames (False: plots only).
        step: called with a label before each long step (progress reporting).
    """
    note = step or (lambda label: None)
    note("loading runs")
    runset = resolve_runs(run_dirs)
    group = _resolve_group(runset, group)
    pair = _resolve_pair(runset, group, pair)
    _check_target(runset, target)
    if group is None:
        run_group = pd.Series(NO_GROUP, index=runset.runs["run_id"].to_numpy())
    else:
        labels = runset.runs[group].map(lambda v: MISSING_TAG if pd.isna(v) else str(v))
        run_group = pd.Series(labels.to_numpy(), index=runset.runs["run_id"].to_numpy())
    groups = sorted(run_group.unique(), key=_natural_key)

    from dynamics.report.style import group_palette

    ctx = ReportContext(
        runset=runset,
        group=group,
        run_group=run_group,
        groups=groups,
        palette=group_palette(groups),
        pair=pair,
        target=target,
        tasks=_task_union(runset),
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
        ctx.comparison = Stat(None, "no group to compare: pass --group TAG (a tag with two or more values)")
    elif len(ctx.groups) < 2:
        ctx.comparison = Stat(None, f"only one value of {ctx.group!r} ({ctx.groups[0]}): nothing to compare")
    else:
        note("comparing groups")
        pair_on = ctx.pair or None
        ctx.comparison = _attempt(lambda: compare(feats, by=ctx.group, pair_on=pair_on))
        # Pre-specified hypotheses get their own, small Holm family instead of being one of the
        # hundreds of exploratory tests.
        primary = [ctx.target] if has_target else []
        primary += [f for f in PRIMARY_SIGNALS if f in feats.columns and feats[f].notna().any()]
        ctx.primary = (
            _attempt(lambda: compare(feats, by=ctx.group, pair_on=pair_on, features=primary))
            if primary
            else Stat(None, f"neither {ctx.target!r} nor the Fisher spectrum signals are in these runs")
        )
    if ctx.comparison.note and not ctx.primary.note and not ctx.primary.ok:
        ctx.primary = Stat(None, ctx.comparison.note)

    if not has_target:
        if runset.scores.empty:
            reason = "no final scores (scores.parquet) in these runs"
        elif ctx.target in feats.columns:
            reason = (
                f"{ctx.target!r} is NaN for every run: the final scores could not be combined (see the "
                "statistics layer's warning); pick one score with --target score/<task>/<metric>"
            )
        else:
            reason = f"target {ctx.target!r} is not among the features' score columns"
        ctx.correlation = ctx.forecast = Stat(None, reason)
        return
    note("correlating features with the score")
    ctx.correlation = _attempt(lambda: correlate(feats, target=ctx.target, method="spearman"))
    note("forecasting from early training")
    forecast_group = "model" if "model" in runset.tag_columns else None
    ctx.forecast = _attempt(
        lambda: forecast(runset, target=ctx.target, fractions=FRACTIONS, group=forecast_group)
    )
