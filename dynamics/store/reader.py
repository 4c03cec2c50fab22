"""Load run directories into pandas DataFrames (analysis side).

Reading is safe while a run is still being written: only complete, renamed parts are read.
Nothing on disk makes loading fail: a temporary file (a flush in progress, or a writer killed
mid-flush), a truncated part or a half-written run.json is skipped or recovered with a warning
that names it.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dynamics.store import schema

__all__ = ["RunSet", "load_runs", "find_run_dirs"]

_METRIC_DTYPES = schema.METRIC_DTYPES  # run_id first, then the row columns
_SCORE_DTYPES = schema.SCORE_DTYPES
_RUN_BASE_COLUMNS = ["run_id", "path", "n_steps", "tasks", "created"]


def _typed(frame: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in dtypes.items()})
    return frame.astype(dtypes)


@dataclass
class RunSet:
    """A collection of runs as three tidy DataFrames.

    Attributes:
        runs: one row per run: ``run_id``, ``path``, ``n_steps`` (largest logged step), ``tasks``
            (list of names), ``created``, then one column per tag (``construction``, ``model``, ...).
        metrics: ``run_id, step, name, task, task_b, value`` (``task=""`` for global metrics).
        scores: ``run_id, task, metric, value`` (final evaluation).
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    scores: pd.DataFrame

    @classmethod
    def from_frames(
        cls,
        runs: pd.DataFrame,
        metrics: pd.DataFrame,
        scores: pd.DataFrame | None = None,
    ) -> RunSet:
        """Build a RunSet in memory (synthetic data, tests), with the same dtypes as :func:`load_runs`."""
        if "run_id" not in runs.columns:
            raise ValueError("runs needs a 'run_id' column")
        missing = set(_METRIC_DTYPES) - {"task", "task_b"} - set(metrics.columns)
        if missing:
            raise ValueError(
                f"metrics lacks columns {sorted(missing)}; expected run_id, step, name, task, task_b, value"
            )
        metrics = metrics.copy()
        for col in ("task", "task_b"):
            if col not in metrics:
                metrics[col] = ""
        metrics = _typed(metrics[list(_METRIC_DTYPES)], _METRIC_DTYPES)
        if scores is None:
            scores = pd.DataFrame(columns=list(_SCORE_DTYPES))
        scores = _typed(scores[list(_SCORE_DTYPES)], _SCORE_DTYPES)
        runs = runs.copy()
        runs["run_id"] = runs["run_id"].astype("str")
        if "n_steps" not in runs:
            last = metrics.groupby("run_id")["step"].max()
            runs["n_steps"] = runs["run_id"].map(last).fillna(0).astype("int64")
        if "tasks" not in runs:
            by_run = metrics[metrics["task"] != ""].groupby("run_id")["task"].unique()
            runs["tasks"] = [sorted(by_run.get(r, [])) for r in runs["run_id"]]
        for col in ("path", "created"):
            if col not in runs:
                runs[col] = ""
        return cls(runs.reset_index(drop=True), metrics.reset_index(drop=True), scores.reset_index(drop=True))

    @property
    def tag_columns(self) -> list[str]:
        """The tag columns of :attr:`runs` (everything that is not bookkeeping)."""
        return [c for c in self.runs.columns if c not in _RUN_BASE_COLUMNS]

    def __len__(self) -> int:
        return len(self.runs)

    def subset(self, run_ids: Iterable[str]) -> RunSet:
        """The runs whose ids are in ``run_ids``."""
        keep = set(run_ids)
        return RunSet(
            self.runs[self.runs["run_id"].isin(keep)].reset_index(drop=True),
            self.metrics[self.metrics["run_id"].isin(keep)].reset_index(drop=True),
            self.scores[self.scores["run_id"].isin(keep)].reset_index(drop=True),
        )

    def __repr__(self) -> str:
        return f"RunSet({len(self.runs)} runs, {len(self.metrics)} metric rows, {len(self.scores)} scores)"


def find_run_dirs(paths_or_globs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand paths and globs into run directories (directories holding ``run.json``).

    A directory that is not itself a run is searched recursively, so ``load_runs("out/")`` finds
    every run below ``out``.
    """
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    found: list[Path] = []
    for item in paths_or_globs:
        text = os.fspath(item)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else [text]
        if not matches:
            raise FileNotFoundError(f"no path matches {text!r}; check the glob or the working directory")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist; pass a run directory (one holding run.json) or a folder of runs"
                )
            if (path / schema.RUN_FILE).is_file():
                found.append(path)
                continue
            if path.is_file():
                raise ValueError(f"{path} is a file, not a run; pass the run directory that holds run.json")
            below = sorted(p.parent for p in path.rglob(schema.RUN_FILE))
            if not below:
                raise ValueError(
                    f"{path} is not a run: no run.json in it or below it. Runs are written by RunWriter, "
                    "the dynamics callback, or `dynamics import-tb LOGDIR OUT_DIR` for TensorBoard logs"
                )
            found.extend(below)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _read_info(run_dir: Path) -> dict | None:
    """run.json as a dict, or ``None`` (with a warning) when it is missing, half-written or foreign."""
    path = run_dir / schema.RUN_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"is unreadable ({err})"
    else:
        if isinstance(info, dict) and "run_id" in info and "tasks" in info:
            return info
        problem = "lacks 'run_id' or 'tasks' (not written by dynamics' RunWriter?)"
    warnings.warn(
        f"{path} {problem}: the run's rows are loaded with its id taken from its parts (or its directory "
        "name), its tasks from its rows, and no tags; restore run.json to get its tags back",
        stacklevel=3,
    )
    return None


def _read_parts(run_dir: Path) -> pa.Table | None:
    """Every complete part, in the order written, as one table of the row columns (no run_id).

    Temporary files (a flush in progress, or a writer killed mid-flush) and unreadable parts (a
    truncated copy) are skipped with a warning that names them; loading never fails on them.
    """
    metrics_dir = run_dir / schema.METRICS_DIR
    tmps = sorted(p.name for p in metrics_dir.glob(f"*{schema.TMP_SUFFIX}"))
    if tmps:
        warnings.warn(
            f"skipping {len(tmps)} temporary file(s) in {metrics_dir} ({', '.join(tmps[:3])}): a flush in "
            "progress or a part that was never completed (its writer was killed mid-flush); all complete "
            "parts are read",
            stacklevel=3,
        )
    tables = []
    parts = [p for p in metrics_dir.glob(f"{schema.PART_PREFIX}*{schema.PART_SUFFIX}")]
    ordered = sorted(
        (p for p in parts if schema.part_seq(p.name) is not None),
        key=lambda p: (schema.part_seq(p.name), p.name),
    )
    for part in ordered:
        try:
            table = pq.read_table(part)
            run_ids = table.column("run_id").unique().to_pylist() if "run_id" in table.column_names else []
            table = table.select(list(schema.ROW_COLUMNS)).cast(
                pa.schema([schema.METRIC_SCHEMA.field(c) for c in schema.ROW_COLUMNS])
            )
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            warnings.warn(f"skipping unreadable part {part} (truncated or foreign): {err}", stacklevel=3)
            continue
        tables.append((table, run_ids))
    if not tables:
        return None
    merged = pa.concat_tables([t for t, _ in tables])
    ids = sorted({i for _, run_ids in tables for i in run_ids if i})
    return merged.replace_schema_metadata({"run_ids": ",".join(ids)})


def _read_scores(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / schema.SCORES_FILE
    if not path.exists():
        return None
    try:
        frame = pq.read_table(path).to_pandas()
        return frame[[c for c in schema.SCORE_COLUMNS if c != "run_id"]]
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        warnings.warn(f"skipping unreadable {path}: {err}", stacklevel=3)
        return None


def load_runs(paths_or_globs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> RunSet:
    """Load one or more runs (directories, folders of runs, or globs) into a :class:`RunSet`.

    A (step, name, task, task_b) key logged twice keeps its latest value (a resume deletes the steps
    after its checkpoint from disk, so raw readers see no duplicates either). Truncated parts,
    temporary files and a half-written run.json never make loading fail: each is named in a warning.

    Example:
        >>> rs = load_runs("out/**/dynamics")  # doctest: +SKIP
        >>> rs.metrics.query("name == 'loss'").groupby(["run_id", "task"]).value.last()  # doctest: +SKIP
    """
    run_dirs = find_run_dirs(paths_or_globs)
    run_rows, metric_tables, score_frames = [], [], []
    seen: dict[str, Path] = {}
    for run_dir in run_dirs:
        info = _read_info(run_dir)
        table = _read_parts(run_dir)
        if info is None:  # recover what the rows say: nothing on disk is hidden by a bad run.json
            ids = (table.schema.metadata or {}).get(b"run_ids", b"").decode().split(",") if table else []
            tasks = sorted(set(table.column("task").to_pylist()) - {""}) if table is not None else []
            info = {"run_id": ids[0] if ids and ids[0] else run_dir.name, "tasks": tasks}
        run_id = str(info["run_id"])
        if run_id in seen:
            raise ValueError(
                f"run id {run_id!r} appears in both {seen[run_id]} and {run_dir} (a copied run?); "
                "load them separately or give one a new run_id in its run.json"
            )
        seen[run_id] = run_dir
        n_steps = 0
        if table is not None and table.num_rows:
            # run.json's id is authoritative (a copied run may have been given a new one).
            table = table.replace_schema_metadata(None)
            table = table.add_column(0, "run_id", pa.array([run_id] * table.num_rows, pa.string()))
            metric_tables.append(table)
            n_steps = int(pa.compute.max(table.column("step")).as_py())
        scores = _read_scores(run_dir)
        if scores is not None:
            scores.insert(0, "run_id", run_id)
            score_frames.append(scores)
        row = {
            "run_id": run_id,
            "path": str(run_dir),
            "n_steps": n_steps,
            "tasks": list(info.get("tasks", [])),
            "created": info.get("created", ""),
        }
        for key, value in (info.get("tags") or {}).items():
            row.setdefault(key, value)
        run_rows.append(row)

    runs = pd.DataFrame(run_rows, columns=None if run_rows else _RUN_BASE_COLUMNS)
    if metric_tables:
        metrics = pa.concat_tables(metric_tables).to_pandas()
        metrics = metrics[list(_METRIC_DTYPES)]
        # Later parts win: a key logged twice (an appending writer re-logging a step) keeps its last value.
        metrics = metrics.drop_duplicates(["run_id", *schema.KEY_COLUMNS], keep="last")
        metrics = _typed(metrics, _METRIC_DTYPES)
    else:
        metrics = _typed(pd.DataFrame(), _METRIC_DTYPES)
    scores_frame = (
        _typed(pd.concat(score_frames, ignore_index=True), _SCORE_DTYPES)
        if score_frames
        else _typed(pd.DataFrame(), _SCORE_DTYPES)
    )
    return RunSet(runs, metrics.reset_index(drop=True), scores_frame)
