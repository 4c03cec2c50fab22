"""Append-only writer for one run directory (training side: pyarrow and numpy only).

Rows are buffered column-wise in memory and written as one Parquet part per flush. Each part is
written under a temporary name and renamed into place (``os.replace`` is atomic on POSIX), so a
process killed at any moment leaves only complete parts behind: it loses at most the rows logged
since the last flush, never a file. Open writers are flushed at interpreter exit and on SIGTERM.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamics.store import schema

__all__ = ["RunWriter"]

_ARROW_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("name", pa.string()),
        ("task", pa.string()),
        ("task_b", pa.string()),
        ("value", pa.float64()),
    ]
)
_SCORE_SCHEMA = pa.schema([("task", pa.string()), ("metric", pa.string()), ("value", pa.float64())])

_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()
_SIGTERM_INSTALLED = False


def _flush_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.flush()
        except Exception:  # never turn an exit into a traceback cascade
            pass


def _install_sigterm_handler() -> None:
    """Flush every open writer on SIGTERM, then hand over to whatever handler was there before.

    Only the main thread may install signal handlers; elsewhere atexit is our only guarantee.
    """
    global _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        _flush_open_writers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # default action: terminate, as the sender asked, after our flush
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
        _SIGTERM_INSTALLED = True
    except ValueError:  # not the main interpreter (e.g. some embedded runtimes)
        pass


atexit.register(_flush_open_writers)


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + schema.TMP_SUFFIX)
    write(tmp)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy of tags/meta: numbers and strings stay, everything else is stringified."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return str(obj)


class RunWriter:
    """Write one run of tidy metric rows, its metadata and its final scores.

    Args:
        run_dir: the run's directory; created if missing. If it already holds a run (``run.json``),
            the writer re-opens it and appends (resume); tasks must then match.
        tasks: the task names; every row's ``task``/``task_b`` must be one of them or ``""`` (global).
        tags: free-form labels the statistics layer groups and pairs on, e.g.
            ``{"construction": "IMAX", "model": "llava", "seed": 0}``.
        meta: anything else worth keeping (model class, parameter counts, configuration).
        flush_every: buffered rows that trigger a flush (a Parquet part).
        run_id: stable identifier; default ``<directory name>-<random hex>``.

    Example:
        >>> with RunWriter(tmp / "run", tasks=["a", "b"], tags={"seed": 0}) as w:  # doctest: +SKIP
        ...     w.log(0, "loss", 1.5, task="a")
        ...     w.log_scores({"a": {"accuracy": 0.8}})
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tasks: Sequence[str],
        tags: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        flush_every: int = 10_000,
        run_id: str | None = None,
    ) -> None:
        if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
            raise TypeError(f"tasks must be a list of non-empty strings, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)!r}")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every!r}")
        self.run_dir = Path(run_dir)
        self.tasks: list[str] = list(tasks)
        self._allowed = frozenset(self.tasks) | {""}
        self.flush_every = int(flush_every)
        self._lock = threading.RLock()
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._closed = False
        self._scores: dict[tuple[str, str], float] = {}

        metrics_dir = self.run_dir / schema.METRICS_DIR
        metrics_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.run_dir / schema.RUN_FILE
        if run_file.exists():
            self._info = self._reopen(run_file, tags, meta)
        else:
            default_name = self.run_dir.name if self.run_dir.name != "dynamics" else self.run_dir.parent.name
            self._info = {
                "format_version": schema.FORMAT_VERSION,
                "run_id": run_id or f"{default_name or 'run'}-{uuid.uuid4().hex[:6]}",
                "dynamics_version": _version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": socket.gethostname(),
                "tasks": self.tasks,
                "tags": _jsonable(dict(tags or {})),
                "meta": _jsonable(dict(meta or {})),
            }
            self._write_info()
        existing = sorted(metrics_dir.glob(f"{schema.PART_PREFIX}*{schema.PART_SUFFIX}"))
        self._next_part = 1 + max(
            (int(p.name[len(schema.PART_PREFIX) : -len(schema.PART_SUFFIX)]) for p in existing), default=-1
        )
        _OPEN_WRITERS.add(self)
        _install_sigterm_handler()

    # ------------------------------------------------------------------ metadata
    @property
    def run_id(self) -> str:
        return str(self._info["run_id"])

    def _reopen(self, run_file: Path, tags: Mapping[str, Any] | None, meta: Mapping[str, Any] | None) -> dict:
        try:
            info = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{run_file} exists but is not valid JSON ({err}); move the directory aside or pass a new run_dir"
            ) from err
        if list(info.get("tasks", [])) != self.tasks:
            raise ValueError(
                f"{self.run_dir} already holds a run with tasks {info.get('tasks')!r}, not {self.tasks!r}; "
                "resume with the same tasks or write to a new run_dir"
            )
        info.setdefault("tags", {}).update(_jsonable(dict(tags or {})))
        info.setdefault("meta", {}).update(_jsonable(dict(meta or {})))
        info["resumed"] = int(info.get("resumed", 0)) + 1
        self._info = info
        self._write_info()
        scores = self.run_dir / schema.SCORES_FILE
        if scores.exists():
            table = pq.read_table(scores)
            for t, m, v in zip(*(table.column(c).to_pylist() for c in schema.SCORE_COLUMNS), strict=True):
                self._scores[(t, m)] = v
        return info

    def _write_info(self) -> None:
        text = json.dumps(self._info, indent=2, sort_keys=True)
        _write_atomic(self.run_dir / schema.RUN_FILE, lambda p: p.write_text(text))

    def set_meta(self, **meta: Any) -> None:
        """Add or replace keys in ``run.json``'s ``meta`` (rewritten atomically)."""
        with self._lock:
            self._info["meta"].update(_jsonable(meta))
            self._write_info()

    def set_tags(self, **tags: Any) -> None:
        """Add or replace tags in ``run.json`` (rewritten atomically)."""
        with self._lock:
            self._info["tags"].update(_jsonable(tags))
            self._write_info()

    # ------------------------------------------------------------------ rows
    def log(self, step: int, name: str, value: float, task: str = "", task_b: str = "") -> None:
        """Log one row. ``task=""`` is a global metric; ``task_b`` is set only for pairwise metrics."""
        self.log_many(step, name, value, task, task_b)

    def log_rows(self, rows: Iterable[tuple[int, str, str, str, float]]) -> None:
        """Log ``(step, name, task, task_b, value)`` tuples, e.g. ``ProbeResult.to_rows(step)``."""
        rows = list(rows)
        if not rows:
            return
        steps, names, tasks, task_bs, values = zip(*rows, strict=True)
        self.log_many(steps, names, values, tasks, task_bs)

    def log_many(
        self,
        steps: int | Sequence[int] | np.ndarray,
        names: str | Sequence[str] | np.ndarray,
        values: float | Sequence[float] | np.ndarray,
        tasks: str | Sequence[str] | np.ndarray | None = None,
        task_bs: str | Sequence[str] | np.ndarray | None = None,
    ) -> None:
        """Vectorised logging: each argument is a scalar or an array; scalars broadcast.

        Values are stored as float64 exactly as given: NaN and inf are data, not errors.
        """
        if self._closed:
            raise RuntimeError(f"RunWriter for {self.run_dir} is closed; open a new RunWriter to append")
        cols = [
            np.atleast_1d(np.asarray(steps)),
            np.atleast_1d(np.asarray(names, dtype=object)),
            np.atleast_1d(np.asarray("" if tasks is None else tasks, dtype=object)),
            np.atleast_1d(np.asarray("" if task_bs is None else task_bs, dtype=object)),
            np.atleast_1d(np.asarray(values, dtype=np.float64)),
        ]
        n = max(len(c) for c in cols)
        for i, c in enumerate(cols):
            if len(c) == n:
                continue
            if len(c) != 1:
                raise ValueError(
                    f"log_many: argument {schema.METRIC_COLUMNS[i]!r} has length {len(c)} but others have {n}; "
                    "pass equal-length sequences or scalars"
                )
            cols[i] = np.repeat(c, n)
        step, name, task, task_b, value = cols
        step = self._check_steps(step)
        self._check_labels(name, task, task_b)
        with self._lock:
            self._chunks.append((step, name, task, task_b, value))
            self._buffered += n
            if self._buffered >= self.flush_every:
                self.flush()

    @staticmethod
    def _check_steps(step: np.ndarray) -> np.ndarray:
        if step.dtype.kind in "iu":
            return step.astype(np.int64, copy=False)
        try:
            as_float = step.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"step must be an integer, got {step[:3].tolist()!r}") from err
        bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
        if bad.any():
            raise ValueError(
                f"step must be a finite integer (the optimizer step), got {as_float[bad][0]!r}; "
                "log values at integer steps"
            )
        return as_float.astype(np.int64)

    def _check_labels(self, name: np.ndarray, task: np.ndarray, task_b: np.ndarray) -> None:
        # Checking the distinct labels only keeps 1e6-row batches cheap.
        for n in set(name.tolist()):
            if not isinstance(n, str) or not n:
                raise ValueError(f"metric name must be a non-empty string, got {n!r}")
        for column in (task, task_b):
            unknown = set(column.tolist()) - self._allowed
            if unknown:
                raise ValueError(
                    f"unknown task {sorted(map(str, unknown))[0]!r}; this run declares tasks {self.tasks!r} "
                    "(use task='' for a global metric, or declare the task in RunWriter(tasks=...))"
                )

    def flush(self) -> None:
        """Write buffered rows as a new Parquet part (atomically). A no-op when nothing is buffered."""
        with self._lock:
            if not self._chunks:
                return
            step, name, task, task_b, value = (np.concatenate(c) for c in zip(*self._chunks, strict=True))
            table = pa.Table.from_arrays(
                [
                    pa.array(step, pa.int64()),
                    pa.array(name, pa.string()),
                    pa.array(task, pa.string()),
                    pa.array(task_b, pa.string()),
                    pa.array(value, pa.float64()),
                ],
                schema=_ARROW_SCHEMA,
            )
            path = self.run_dir / schema.METRICS_DIR / schema.part_name(self._next_part)
            _write_atomic(path, lambda p: pq.write_table(table, p, compression="zstd"))
            self._next_part += 1
            self._chunks.clear()
            self._buffered = 0

    # ------------------------------------------------------------------ scores
    def log_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final evaluation scores ``{task: {metric: value}}`` (``task=""`` for overall ones).

        Scores are merged with those already recorded and written at once to ``scores.parquet``.
        """
        if not isinstance(scores, Mapping):
            raise TypeError("log_scores expects {task: {metric: value}}, e.g. {'vqa': {'accuracy': 0.7}}")
        new: dict[tuple[str, str], float] = {}
        for task, metrics in scores.items():
            if task not in self._allowed:
                raise ValueError(f"unknown task {task!r} in scores; this run declares tasks {self.tasks!r}")
            if not isinstance(metrics, Mapping):
                raise TypeError(f"scores[{task!r}] must be a {{metric: value}} mapping, got {metrics!r}")
            for metric, value in metrics.items():
                new[(task, str(metric))] = float(value)
        with self._lock:
            self._scores.update(new)
            keys = list(self._scores)
            table = pa.Table.from_arrays(
                [
                    pa.array([k[0] for k in keys], pa.string()),
                    pa.array([k[1] for k in keys], pa.string()),
                    pa.array([self._scores[k] for k in keys], pa.float64()),
                ],
                schema=_SCORE_SCHEMA,
            )
            _write_atomic(self.run_dir / schema.SCORES_FILE, lambda p: pq.write_table(table, p))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush and stop accepting rows. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        _OPEN_WRITERS.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, run_id={self.run_id!r}, buffered={self._buffered})"


def _version() -> str:
    from dynamics import __version__

    return __version__
