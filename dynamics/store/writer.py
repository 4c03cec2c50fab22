"""Append-only writer for one run directory (training side: pyarrow and numpy only).

Durability is by time: rows are buffered in memory and a background thread writes them as one
Parquet part at least every ``flush_seconds`` (and at once after :meth:`RunWriter.request_flush`),
so the training step never waits on disk and a process killed at any moment (SIGKILL included)
loses at most the rows of the last ``flush_seconds``. Each part is written under a hidden
temporary name and renamed into place (``os.replace`` is atomic on POSIX): a kill never leaves a
half part under a part name. Part names carry a per-writer random id, so two writers never pick
the same one; a training writer holds an advisory lock (``flock``) on the run for its lifetime.

Signals: no flush ever runs inside a signal handler. SIGTERM keeps its default action (the
process dies at once, even inside a blocking collective, as launchers like torchrun expect);
when another library installed a Python SIGTERM handler first, the writer wraps it: the wrapper
records that a stop was asked for (:func:`stop_requested`) and calls it, and the background thread
then writes the buffered rows within a fraction of a second. At interpreter exit every open
writer is flushed from ``atexit`` (no imports, bounded waits on locks).
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import numbers
import os
import signal
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamics.store import _arrow, schema

try:  # POSIX advisory locks; elsewhere the training lock is skipped (part names still never collide)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_FLUSH_SECONDS",
    "RunExistsError",
    "RunLockedError",
    "RunWriter",
    "StoreWarning",
    "stop_requested",
]

DEFAULT_FLUSH_SECONDS = 3.0
"""Rows reach disk at most this many seconds after they are logged (what a SIGKILL can lose)."""
DEFAULT_FLUSH_EVERY = 50_000
"""Buffered rows that wake the background flush early (bounds memory between flushes)."""
_EXIT_LOCK_TIMEOUT = 10.0  # seconds the exit-time flush waits for a background write in progress
_POLL_SECONDS = 0.25  # how often the background thread checks for a recorded stop request


class RunExistsError(FileExistsError):
    """A new training was pointed at a directory that already holds a run."""


class RunLockedError(RuntimeError):
    """Another training writer (another process, or an open writer in this one) holds the run."""


class StoreWarning(UserWarning):
    """A write to the run store failed; the rows are kept in memory and retried."""


# ---------------------------------------------------------------------- process-wide state
_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()
_EXITING = False
_STOP_SIGNAL: int | None = None
_SIGTERM_WRAPPED = False


def stop_requested() -> int | None:
    """The signal number of a stop request seen by the writer's SIGTERM wrapper, else ``None``."""
    return _STOP_SIGNAL


def _wrap_sigterm() -> None:
    """Wrap a Python SIGTERM handler installed by someone else: record, then chain to it.

    With SIGTERM at its default action nothing is installed: a Python-level handler would delay the
    kill until the main thread leaves C code (a blocked collective would then hang until SIGKILL),
    and the background flush already bounds what the kill loses. Only the main thread may install.
    """
    global _SIGTERM_WRAPPED
    if _SIGTERM_WRAPPED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):  # SIG_DFL, SIG_IGN or None (installed from C): leave it alone
        return

    def handler(signum: int, frame: Any) -> None:
        global _STOP_SIGNAL
        _STOP_SIGNAL = signum  # a plain assignment: no lock, no I/O, safe at any bytecode
        previous(signum, frame)

    try:
        signal.signal(signal.SIGTERM, handler)
        _SIGTERM_WRAPPED = True
    except ValueError:  # not the main interpreter
        pass


def _flush_open_writers_at_exit() -> None:
    global _EXITING
    _EXITING = True
    for writer in list(_OPEN_WRITERS):
        try:
            writer._flush(lock_timeout=_EXIT_LOCK_TIMEOUT)
        except Exception:  # never turn an exit into a traceback cascade
            pass


def _forget_writers_in_child() -> None:
    # A forked child (a DataLoader worker) must never write its parent's buffered rows again.
    _OPEN_WRITERS.clear()


atexit.register(_flush_open_writers_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writers_in_child)


# ---------------------------------------------------------------------- small helpers
def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a hidden temporary file and rename it into place; no temporary is left on error."""
    tmp = path.with_name(schema.tmp_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _write_table(path: Path, table: pa.Table) -> None:
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _part_files(metrics_dir: Path) -> list[Path]:
    parts = [p for p in metrics_dir.glob(f"{schema.PART_PREFIX}*{schema.PART_SUFFIX}")]
    return sorted(
        (p for p in parts if schema.part_seq(p.name) is not None),
        key=lambda p: (schema.part_seq(p.name), p.name),
    )


class _FileLock:
    """An exclusive ``flock`` on a file, held until :meth:`release` (freed by the kernel on any death)."""

    def __init__(self, path: Path, *, blocking: bool) -> None:
        self.fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __del__(self) -> None:  # a forgotten lock must not stay held for the life of the process
        try:
            self.release()
        except Exception:
            pass

    def release(self) -> None:
        if self.fd is not None and fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _acquire_training_lock(run_dir: Path) -> _FileLock:
    path = run_dir / schema.LOCK_FILE
    try:
        lock = _FileLock(path, blocking=False)
    except BlockingIOError:
        holder = ""
        try:
            holder = path.read_text().strip()
        except OSError:
            pass
        raise RunLockedError(
            f"{run_dir} is being written by another training writer ({holder or 'holder unknown'}); "
            "two trainings cannot write one run. Wait for it to finish, write this training to another "
            "directory, or open an evaluation writer with RunWriter(..., append=True) to add scores."
        ) from None
    if lock.fd is not None:
        os.ftruncate(lock.fd, 0)
        os.write(lock.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return lock


# ---------------------------------------------------------------------- validation
def _to_array(x: Any) -> np.ndarray:
    """1-d numpy array of ``x`` (scalar, sequence, numpy array or torch tensor; autograd detached)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (RuntimeError, TypeError, ValueError):  # e.g. a list of tensors that require grad
        arr = np.empty(len(x), dtype=object)
        arr[:] = [v.detach().cpu().item() if hasattr(v, "detach") else v for v in x]
    if arr.dtype.kind in "US" and isinstance(x, (list, tuple)):  # numpy made [1.0, "x"] all strings
        arr = np.array(x, dtype=object)
    if arr.dtype.kind == "O" and arr.ndim:  # 0-d tensors inside a list: take their items
        if any(hasattr(v, "detach") for v in arr.flat):
            arr = np.array(
                [v.detach().cpu().item() if hasattr(v, "detach") else v for v in arr.flat], dtype=object
            )
    return np.atleast_1d(arr).reshape(-1) if arr.ndim != 1 else arr


def _describe(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


class RunWriter:
    """Write one run of tidy metric rows, its metadata and its final scores.

    Args:
        run_dir: the run's directory; created if missing.
        tasks: the task names; every row's ``task``/``task_b`` must be one of them or ``""`` (global).
        tags: free-form labels the statistics layer groups and pairs on, e.g.
            ``{"construction": "IMAX", "model": "llava", "seed": 0}``.
        meta: anything else worth keeping (model class, parameter counts, configuration).
        run_id: stable identifier of a new run; default ``<directory name>-<random hex>``.
        resume_step: the checkpoint step a training resumes from. With ``resume_step > 0`` an existing
            run is continued: its rows with ``step > resume_step`` are deleted from disk, new rows are
            appended under the same run id. ``0`` or ``None``: a fresh training.
        overwrite: replace a run already in ``run_dir`` (its rows, scores and run.json; new run id).
        append: open an existing run as a secondary writer (e.g. an evaluation script adding scores
            to a finished run): takes no training lock, keeps the run id, deletes nothing.
        flush_seconds: rows reach disk at most this long after they are logged (background thread).
        flush_every: buffered rows that wake the background flush early (bounds memory).

    Raises:
        RunExistsError: ``run_dir`` already holds a run and none of ``resume_step``, ``overwrite``,
            ``append`` says what to do with it.
        RunLockedError: a training writer is already writing ``run_dir``.

    Writers never collide: each names its parts ``part-<seq>-<writer id>.parquet``.

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
        run_id: str | None = None,
        resume_step: int | None = None,
        overwrite: bool = False,
        append: bool = False,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        flush_every: int = DEFAULT_FLUSH_EVERY,
    ) -> None:
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a list of non-empty strings, got {tasks!r}")
        for t in tasks:
            problem = schema.label_problem(t, what="task")
            if problem:
                raise TypeError(f"tasks must be a list of non-empty strings: task name {problem}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)!r}")
        if resume_step is not None and (
            isinstance(resume_step, bool) or not isinstance(resume_step, numbers.Integral) or resume_step < 0
        ):
            raise ValueError(
                f"resume_step must be a non-negative integer (the checkpoint step), got {resume_step!r}"
            )
        resume = int(resume_step or 0)
        if sum((resume > 0, bool(overwrite), bool(append))) > 1:
            raise ValueError(
                "pass at most one of resume_step > 0 (continue a run), overwrite=True (replace it) and "
                f"append=True (add to it without training); got resume_step={resume_step!r}, "
                f"overwrite={overwrite!r}, append={append!r}"
            )
        if not (
            isinstance(flush_seconds, (int, float)) and math.isfinite(flush_seconds) and flush_seconds > 0
        ):
            raise ValueError(f"flush_seconds must be a positive number of seconds, got {flush_seconds!r}")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every!r}")

        self.run_dir = Path(run_dir)
        self.tasks: list[str] = list(tasks)
        self.flush_seconds = float(flush_seconds)
        self.flush_every = int(flush_every)
        self.append = bool(append)
        self.writer_id = uuid.uuid4().hex[:8]
        self.write_failures = 0  # failed background/synchronous writes so far (reported once)
        self._lock = threading.Lock()  # guards the buffer: held for microseconds, never during I/O
        self._io_lock = threading.Lock()  # one write at a time, in part order
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._oldest: float | None = None  # monotonic time the oldest buffered row was logged
        self._retry_at = 0.0
        self._closed = False
        self._pending_info: dict[str, dict[str, Any]] = {}  # meta/tags updates not yet on disk
        self._pending_scores: dict[tuple[str, str], float] = {}
        self._training_lock: _FileLock | None = None
        metrics_dir = self.run_dir / schema.METRICS_DIR

        if append:
            self._info = self._open_append()
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._close_stale_writers()
            self._training_lock = _acquire_training_lock(self.run_dir)
            try:
                self._info = self._open_training(tags, meta, run_id, resume, bool(overwrite))
            except BaseException:
                self._training_lock.release()
                raise
        if append and (tags or meta):
            self._pending_info = {"tags": _jsonable(dict(tags or {})), "meta": _jsonable(dict(meta or {}))}
            self._write_side_files(raise_errors=True)
        self._allowed = frozenset(self.tasks) | {""}
        metrics_dir.mkdir(parents=True, exist_ok=True)
        self._next_seq = 1 + max((schema.part_seq(p.name) or 0 for p in _part_files(metrics_dir)), default=0)

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_background_flush,
            args=(weakref.ref(self), self._wake, self._stop),
            name=f"dynamics-store-flush-{self.writer_id}",
            daemon=True,  # never keeps the interpreter alive; atexit writes what is left
        )
        self._thread.start()
        _OPEN_WRITERS.add(self)
        _wrap_sigterm()

    # ------------------------------------------------------------------ opening
    def _close_stale_writers(self) -> None:
        """Close an earlier training writer of this run left open in this process (a notebook training
        again, a Trainer whose callback was never closed): its rows are written first. Another process
        holding the run still gets :class:`RunLockedError`."""
        here = self.run_dir.resolve()
        for other in list(_OPEN_WRITERS):
            if other._training_lock is not None and other.run_dir.resolve() == here:
                warnings.warn(
                    f"dynamics: closing the earlier writer of {self.run_dir} still open in this process "
                    f"(run {other.run_id!r}; its rows are written first) before opening a new training writer",
                    StoreWarning,
                    stacklevel=4,
                )
                other.close()

    def _has_run(self) -> bool:
        return (self.run_dir / schema.RUN_FILE).exists() or bool(
            _part_files(self.run_dir / schema.METRICS_DIR)
        )

    def _new_info(
        self, tags: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, run_id: str | None
    ) -> dict:
        default_name = self.run_dir.name if self.run_dir.name != "dynamics" else self.run_dir.parent.name
        return {
            "format_version": schema.FORMAT_VERSION,
            "run_id": run_id or f"{default_name or 'run'}-{uuid.uuid4().hex[:6]}",
            "dynamics_version": _version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "tasks": self.tasks,
            "tags": _jsonable(dict(tags or {})),
            "meta": _jsonable(dict(meta or {})),
        }

    def _existing_info(self, fix: str) -> dict:
        run_file = self.run_dir / schema.RUN_FILE
        info = _read_json(run_file)
        if info is None or "run_id" not in info or "tasks" not in info:
            state = (
                "is missing (metric parts without it)"
                if not run_file.exists()
                else "is unreadable or incomplete"
            )
            raise ValueError(f"{self.run_dir} holds a run but its run.json {state}; {fix}")
        return info

    def _open_training(
        self,
        tags: Mapping[str, Any] | None,
        meta: Mapping[str, Any] | None,
        run_id: str | None,
        resume: int,
        overwrite: bool,
    ) -> dict:
        if self._has_run():
            if overwrite:
                self._remove_run_files()
            elif resume > 0:
                return self._open_resume(tags, meta, resume)
            else:
                info = _read_json(self.run_dir / schema.RUN_FILE) or {}
                n_parts = len(_part_files(self.run_dir / schema.METRICS_DIR))
                raise RunExistsError(
                    f"{self.run_dir} already holds run {info.get('run_id', '?')!r} ({n_parts} metric part(s)); "
                    "a new training would silently merge into it. To continue that training, resume it from a "
                    "checkpoint (Trainer.train(resume_from_checkpoint=...); RunWriter(..., resume_step=<checkpoint "
                    "step>)); to replace it pass overwrite=True; to add evaluation scores use append=True; or "
                    "write the new training to another directory."
                )
        info = self._new_info(tags, meta, run_id)
        if resume > 0:  # resuming a training that had no run store yet: a new run that starts late
            info["resumes"] = [{"step": resume, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        self._write_info_file(info)
        return info

    def _open_resume(
        self, tags: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, resume: int
    ) -> dict:
        info = self._existing_info("pass overwrite=True to start the run again, or restore run.json")
        if list(info.get("tasks", [])) != self.tasks:
            raise ValueError(
                f"{self.run_dir} already holds a run with tasks {info.get('tasks')!r}, not {self.tasks!r}; "
                "resume with the same tasks or write to a new run_dir"
            )
        self._truncate_after(resume)
        info.setdefault("tags", {}).update(_jsonable(dict(tags or {})))
        info.setdefault("meta", {}).update(_jsonable(dict(meta or {})))
        info["resumed"] = int(info.get("resumed", 0)) + 1
        info.setdefault("resumes", []).append({"step": resume, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self._write_info_file(info)
        return info

    def _truncate_after(self, step: int) -> None:
        """Delete rows with ``step > step`` from every part (each part rewritten atomically), so that a
        raw reader never sees a resumed step twice. Safe to repeat if the process dies midway."""
        for part in _part_files(self.run_dir / schema.METRICS_DIR):
            try:
                table = _arrow.read_parquet(part)
                steps = _arrow.numeric_values(table.column("step"), np.int64)
            except (pa.ArrowInvalid, OSError, KeyError) as err:
                warnings.warn(
                    f"resume: leaving unreadable part {part} as it is ({err})", StoreWarning, stacklevel=4
                )
                continue
            keep = np.flatnonzero(steps <= step)
            if len(keep) == table.num_rows:
                continue
            if len(keep) == 0:
                part.unlink()
            else:
                _write_table(part, table.take(_arrow.int64_array(keep)))

    def _remove_run_files(self) -> None:
        metrics_dir = self.run_dir / schema.METRICS_DIR
        for path in [*_part_files(metrics_dir), *metrics_dir.glob(f"*{schema.TMP_SUFFIX}")]:
            path.unlink(missing_ok=True)
        for name in (schema.SCORES_FILE, schema.RUN_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    def _open_append(self) -> dict:
        if not self._has_run():
            raise FileNotFoundError(
                f"append=True adds to an existing run, but {self.run_dir} holds none; write the run first "
                "(or drop append=True to start one)"
            )
        info = self._existing_info("restore run.json before appending to this run")
        unknown = [t for t in self.tasks if t not in info["tasks"]]
        if unknown:
            raise ValueError(
                f"tasks {unknown!r} are not declared by the run in {self.run_dir} (tasks {info['tasks']!r}); "
                "an appending writer can only use the run's own tasks"
            )
        self.tasks = list(info["tasks"])
        return info

    # ------------------------------------------------------------------ metadata
    @property
    def run_id(self) -> str:
        return str(self._info["run_id"])

    def _write_info_file(self, info: dict) -> None:
        text = json.dumps(info, indent=2, sort_keys=True)
        _write_atomic(self.run_dir / schema.RUN_FILE, lambda p: p.write_text(text))

    def set_meta(self, **meta: Any) -> None:
        """Add or replace keys in ``run.json``'s ``meta`` (rewritten atomically)."""
        with self._lock:
            self._pending_info.setdefault("meta", {}).update(_jsonable(meta))
        self._write_side_files()

    def set_tags(self, **tags: Any) -> None:
        """Add or replace tags in ``run.json`` (rewritten atomically)."""
        with self._lock:
            self._pending_info.setdefault("tags", {}).update(_jsonable(tags))
        self._write_side_files()

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

        Steps are non-negative integers within int64; values real numbers (Python or numpy numbers,
        0-d tensors; autograd is detached), stored as float64: NaN and inf are data, not errors.
        Returns at once: rows reach disk from the background thread.
        """
        if self._closed:
            raise RuntimeError(f"RunWriter for {self.run_dir} is closed; open a new RunWriter to append")
        cols = [
            _to_array(steps),
            np.atleast_1d(np.asarray(names, dtype=object)),
            np.atleast_1d(np.asarray("" if tasks is None else tasks, dtype=object)),
            np.atleast_1d(np.asarray("" if task_bs is None else task_bs, dtype=object)),
            _to_array(values),
        ]
        n = max(len(c) for c in cols)
        for i, c in enumerate(cols):
            if len(c) == n:
                continue
            if len(c) != 1:
                raise ValueError(
                    f"log_many: argument {schema.ROW_COLUMNS[i]!r} has length {len(c)} but others have {n}; "
                    "pass equal-length sequences or scalars"
                )
            cols[i] = np.repeat(c, n)
        step, name, task, task_b, value = cols
        self._check_labels(name, task, task_b, step)
        step = _check_steps(step, name)
        value = _check_values(value, name, task, step)
        with self._lock:
            self._chunks.append((step, name, task, task_b, value))
            self._buffered += n
            if self._oldest is None:
                self._oldest = time.monotonic()
            full = self._buffered >= self.flush_every
        if full:
            self._wake.set()

    def _check_labels(self, name: np.ndarray, task: np.ndarray, task_b: np.ndarray, step: np.ndarray) -> None:
        # Checking the distinct labels only keeps 1e6-row batches cheap.
        slashed = []
        for label in set(name.tolist()):
            problem = schema.label_problem(label, what="metric")
            if problem:
                first = int(np.flatnonzero(name == label)[0]) if isinstance(label, str) else 0
                raise ValueError(f"metric name {problem} (row at step {step[first]!r})")
            if schema.FIELD_SEP in label:
                slashed.append(label)
        for column in (task, task_b):
            unknown = set(column.tolist()) - self._allowed
            if unknown:
                raise ValueError(
                    f"unknown task {sorted(map(str, unknown))[0]!r}; this run declares tasks {self.tasks!r} "
                    "(use task='' for a global metric, or declare the task in RunWriter(tasks=...))"
                )
        if slashed:  # "a/b" with a task would read back as another metric from a TensorBoard tag
            bad = np.isin(name, slashed) & (task != "")
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"metric {name[i]!r} (task {task[i]!r}) at step {step[i]!r}: a metric name with '/' can "
                    "only be a global metric (task=''); use '_' or '.' inside per-task metric names"
                )

    # ------------------------------------------------------------------ flushing
    def request_flush(self) -> None:
        """Ask the background thread to write the buffered rows now; returns at once."""
        self._wake.set()

    def flush(self) -> bool:
        """Write the buffered rows (and pending metadata and scores) now, in this thread.

        Returns ``True`` when everything is on disk. A failed write (a full disk, ...) never raises:
        it is reported once (:class:`StoreWarning`), its rows stay buffered and are retried.
        """
        return self._flush()

    def _flush(self, *, lock_timeout: float | None = None) -> bool:
        if lock_timeout is None:
            self._io_lock.acquire()
        elif not self._io_lock.acquire(timeout=lock_timeout):
            return False  # a write is stuck (a hung filesystem): exit anyway rather than hang
        try:
            with self._lock:
                chunks, self._chunks = self._chunks, []
                n, self._buffered = self._buffered, 0
                oldest, self._oldest = self._oldest, None
            ok = True
            if chunks:
                try:
                    self._write_part(chunks, n)
                except OSError as err:
                    with self._lock:  # back in front of anything logged meanwhile, in order
                        self._chunks[:0] = chunks
                        self._buffered += n
                        self._oldest = oldest if self._oldest is None else min(oldest or 0.0, self._oldest)
                    self._failed(err, f"{n} buffered rows")
                    ok = False
            if self._pending_info or self._pending_scores:
                ok = self._write_side_files(io_locked=True) and ok
            return ok
        finally:
            self._io_lock.release()

    def _write_part(self, chunks: Sequence[tuple[np.ndarray, ...]], n: int) -> None:
        step, name, task, task_b, value = (np.concatenate(c) for c in zip(*chunks, strict=True))
        table = pa.Table.from_arrays(
            [
                _arrow.string_array([self.run_id], repeat=n),
                _arrow.int64_array(step),
                _arrow.string_array(name),
                _arrow.string_array(task),
                _arrow.string_array(task_b),
                _arrow.float64_array(value),
            ],
            schema=schema.METRIC_SCHEMA,
        )
        path = self.run_dir / schema.METRICS_DIR / schema.part_name(self._next_seq, self.writer_id)
        _write_table(path, table)
        self._next_seq += 1

    def _failed(self, err: OSError, what: str) -> None:
        self.write_failures += 1
        self._retry_at = time.monotonic() + self.flush_seconds
        if self.write_failures == 1:
            full = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
            warnings.warn(
                f"dynamics: could not write {what} to the run store {self.run_dir}{full}: {err}. Training goes on; "
                "the rows stay in memory and are retried every flush; everything already on disk is kept. "
                "This is reported once; RunWriter.write_failures counts the failures.",
                StoreWarning,
                stacklevel=2,
            )

    def _write_side_files(self, *, io_locked: bool = False, raise_errors: bool = False) -> bool:
        """Merge pending meta/tags into run.json and pending scores into scores.parquet.

        Each file is read back and merged under a short lock, so that two writers (training and
        evaluation) never drop each other's keys.
        """
        if not io_locked:
            with self._io_lock:
                return self._write_side_files(io_locked=True, raise_errors=raise_errors)
        with self._lock:
            info_updates = {k: dict(v) for k, v in self._pending_info.items()}
            scores = dict(self._pending_scores)
        try:
            lock = _FileLock(self.run_dir / f"{schema.LOCK_FILE}.update", blocking=True)
            try:
                if info_updates:
                    info = _read_json(self.run_dir / schema.RUN_FILE) or self._info
                    for key, values in info_updates.items():
                        info.setdefault(key, {}).update(values)
                    self._write_info_file(info)
                    self._info = info
                if scores:
                    self._write_scores(scores)
            finally:
                lock.release()
        except OSError as err:
            if raise_errors:
                raise
            self._failed(err, "run.json / scores.parquet")
            return False
        with self._lock:
            for key, values in info_updates.items():
                pending = self._pending_info.get(key, {})
                for k in values:
                    if k in pending and pending[k] == values[k]:
                        del pending[k]
                if not pending:
                    self._pending_info.pop(key, None)
            for score_key, v in scores.items():
                if self._pending_scores.get(score_key) == v:
                    del self._pending_scores[score_key]
        return True

    def _write_scores(self, new: Mapping[tuple[str, str], float]) -> None:
        path = self.run_dir / schema.SCORES_FILE
        merged: dict[tuple[str, str], float] = {}
        if path.exists():
            try:
                old = _arrow.read_parquet(path)
                tasks, metrics = (_arrow.string_values(old.column(c)) for c in ("task", "metric"))
                values = _arrow.numeric_values(old.column("value"), np.float64)
                merged.update({(t, m): float(v) for t, m, v in zip(tasks, metrics, values, strict=True)})
            except (pa.ArrowInvalid, OSError, KeyError) as err:
                warnings.warn(f"replacing unreadable {path} ({err})", StoreWarning, stacklevel=4)
        merged.update(new)
        keys = list(merged)
        table = pa.Table.from_arrays(
            [
                _arrow.string_array([self.run_id], repeat=len(keys)),
                _arrow.string_array([k[0] for k in keys]),
                _arrow.string_array([k[1] for k in keys]),
                _arrow.float64_array(np.array([merged[k] for k in keys], dtype=np.float64)),
            ],
            schema=schema.SCORE_SCHEMA,
        )
        _write_table(path, table)

    def _tick(self, *, requested: bool = False) -> None:
        """One look of the background thread: write when asked, when the oldest row is due, or when a
        stop was asked for; after a failed write, not before the retry time."""
        with self._lock:
            oldest = self._oldest
        now = time.monotonic()
        due = oldest is not None and now - oldest >= self.flush_seconds
        if (requested or due or _STOP_SIGNAL is not None) and now >= self._retry_at:
            self._flush()

    def _seconds_to_due(self) -> float:
        oldest = self._oldest
        if oldest is None:
            return self.flush_seconds
        return max(0.0, max(oldest + self.flush_seconds, self._retry_at) - time.monotonic())

    # ------------------------------------------------------------------ scores
    def log_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final evaluation scores ``{task: {metric: value}}`` (``task=""`` for overall ones).

        Scores are merged with those already in ``scores.parquet`` (by any writer) and written at once.
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
                problem = schema.label_problem(metric, what="metric")
                if problem:
                    raise ValueError(f"score metric name for task {task!r} {problem}")
                [v] = _check_values(
                    _to_array(value), np.array([metric], dtype=object), np.array([task]), None
                )
                new[(task, metric)] = float(v)
        with self._lock:
            self._pending_scores.update(new)
        self._write_side_files()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush, stop the background thread and release the run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_EXIT_LOCK_TIMEOUT)
        ok = self._flush(lock_timeout=_EXIT_LOCK_TIMEOUT)
        if not ok and self._buffered:
            warnings.warn(
                f"dynamics: closing the run store {self.run_dir} with {self._buffered} rows that could not be "
                "written (see the earlier warning); they are lost, everything written before is kept.",
                StoreWarning,
                stacklevel=2,
            )
        _OPEN_WRITERS.discard(self)
        if self._training_lock is not None:
            self._training_lock.release()
            self._training_lock = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        # A writer dropped without close(): write its rows and free the run, as a file object would.
        if not getattr(self, "_closed", True) and not _EXITING:
            try:
                self.close()
            except Exception:
                pass

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, run_id={self.run_id!r}, buffered={self._buffered})"


def _background_flush(ref: weakref.ref[RunWriter], wake: threading.Event, stop: threading.Event) -> None:
    """The writer's flush thread: holds only a weak reference, so a forgotten writer can be collected."""
    while not stop.is_set():
        writer = ref()
        if writer is None:
            return
        timeout = min(writer._seconds_to_due(), _POLL_SECONDS)
        del writer
        woken = wake.wait(timeout=timeout)
        wake.clear()
        writer = ref()
        if writer is None or stop.is_set() or _EXITING:
            return
        try:
            writer._tick(requested=woken)
        except Exception as err:  # the thread must survive anything; the next flush retries
            warnings.warn(
                f"dynamics: background flush failed ({type(err).__name__}: {err})", StoreWarning, stacklevel=1
            )
        del writer


# ---------------------------------------------------------------------- row checks
def _check_steps(step: np.ndarray, name: np.ndarray) -> np.ndarray:
    """int64 steps, or an error naming the metric, the step and what is wrong with it."""

    def fail(i: int, what: str, exc: type[Exception] = ValueError) -> None:
        s = step[i].item() if isinstance(step[i], np.generic) else step[i]
        raise exc(
            f"metric {name[i]!r}: step {s!r} {what}; log the optimizer step, a non-negative integer "
            f"(0 .. 2**63-1)"
        )

    kind = step.dtype.kind
    if kind == "i":
        neg = np.flatnonzero(step < 0)
        if neg.size:
            fail(int(neg[0]), "is negative")
        return step.astype(np.int64, copy=False)
    if kind == "u":
        big = np.flatnonzero(step > schema.STEP_MAX)
        if big.size:
            fail(int(big[0]), "is outside int64")
        return step.astype(np.int64)
    if kind == "f":
        bad = ~np.isfinite(step) | (step != np.round(step))
        if bad.any():
            fail(int(np.flatnonzero(bad)[0]), "is not a finite integer")
        out_of_range = (step < 0) | (step >= 2.0**63)
        if out_of_range.any():
            fail(int(np.flatnonzero(out_of_range)[0]), "is negative or outside int64")
        return step.astype(np.int64)
    if kind == "O":
        out = np.empty(len(step), dtype=np.int64)
        for i, s in enumerate(step):
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (numbers.Integral, float, np.floating)):
                fail(i, f"is a {type(s).__name__}, not an integer", TypeError)
            if isinstance(s, (float, np.floating)) and not (math.isfinite(s) and float(s).is_integer()):
                fail(i, "is not a finite integer")
            if not 0 <= int(s) <= schema.STEP_MAX:
                fail(i, "is negative or outside int64")
            out[i] = int(s)
        return out
    first = step[0].item() if isinstance(step[0], np.generic) else step[0]
    fail(0, f"is a {type(first).__name__}, not an integer", TypeError)
    raise AssertionError  # unreachable: fail raises


def _check_values(
    value: np.ndarray, name: np.ndarray, task: np.ndarray, step: np.ndarray | None
) -> np.ndarray:
    """float64 values, or an error naming the metric, the step and what is wrong with the value."""

    def fail(i: int, v: Any) -> None:
        at = "" if step is None else f" at step {int(step[i])}"
        on = f" (task {task[i]!r})" if task[i] else ""
        raise TypeError(
            f"metric {name[i]!r}{on}{at}: value {_describe(v)} is not a real number; log a float, an int, "
            "a numpy number or a 0-d tensor"
        )

    kind = value.dtype.kind
    if kind in "iuf":
        return value.astype(np.float64, copy=False)
    if kind == "O":
        out = np.empty(len(value), dtype=np.float64)
        for i, v in enumerate(value):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.integer, np.floating)):
                fail(i, v)
            out[i] = float(v)
        return out
    fail(0, value[0].item() if isinstance(value[0], np.generic) else value[0])
    raise AssertionError  # unreachable: fail raises


def _version() -> str:
    from dynamics import __version__

    return __version__
