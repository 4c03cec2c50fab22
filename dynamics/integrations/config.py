"""One configuration for the training hooks, shared by ``attach``, ``DynamicsCallback`` and ``LoopRecorder``.

Every adapter takes the same keyword options (``probe_every=``, ``probe_size=``, ``tags=``, ...) or a
ready :class:`RecorderConfig` as ``config=``; both routes end in :meth:`RecorderConfig.build`, so an
option has one name, one default and one check everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_FLUSH_SECONDS",
    "DEFAULT_PROBE_EVERY",
    "DEFAULT_PROBE_SIZE",
    "DEFAULT_SYNC_EVERY",
    "RecorderConfig",
]

# Probe every 100 optimizer steps: a probe of 32 examples costs 1.2-2.4 training steps of 32
# examples (benchmarks/bench_overhead.py), so <= 2.4 % overhead.
DEFAULT_PROBE_EVERY = 100
# 32 examples: enough for a stable n x n Gram spectrum and >= 4 examples per task for up to 8
# tasks, while one probe stays about the cost of one or two training steps of a typical batch.
DEFAULT_PROBE_SIZE = 32
# Per-step sums reach the store at least this often (and at every logging step): what a SIGKILL
# can lose. A few seconds keeps the number of Parquet parts small on long runs.
DEFAULT_FLUSH_SECONDS = 5.0
# At most this many closed steps wait on the device for their host copy (a memory bound only: the
# time bound above usually hands them over first).
DEFAULT_SYNC_EVERY = 16

_RESERVED_PROBE_KWARGS = ("task_ids", "tasks", "direction")


def _nonneg_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_tasks(tasks: Any) -> list[str]:
    """``tasks`` as a list of unique non-empty names, or a clear error."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if not all(isinstance(t, str) and t for t in tasks):
        raise TypeError(f"every task name must be a non-empty string, got {list(tasks)!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {list(tasks)!r}")
    return list(tasks)


@dataclass
class RecorderConfig:
    """What the recorder records, how often, and where.

    Attributes:
        tasks: task names; ``task_ids`` in the data are indices into this list or the names themselves.
        out_dir: run store directory (rank 0 writes). HF default: ``<args.output_dir>/dynamics``;
            ``None`` in a plain loop keeps values in the logs only.
        tags: run tags for the statistics layer (``construction``, ``model``, ``seed``, ...).
        meta: extra ``run.json`` metadata (e.g. ``score_ranges``).
        probe_every: optimizer steps between probes; 0 turns probes off.
        probe_size: examples in the held, task-stratified probe batch.
        loss: training loss kind for the per-task losses (``"auto"``, a kind name, or a callable);
            see :mod:`dynamics.signals.losses`.
        probe_batch: a collated batch (dict with ``task_ids``) to probe instead of drawing one.
        probe_dataset: a map-style dataset of dict items to draw the probe batch from.
        collate_fn: collator for ``probe_dataset`` in a plain loop (default ``default_collate``);
            the HF adapter uses the Trainer's collator.
        probe_kwargs: passed to :func:`dynamics.probe` (``params``, ``method``, ``hessian``, ...).
        update_direction: log ``update_cosine`` (copies the probed parameters on probe steps).
        flush_seconds: each step's rows, handed to the store at the step's end, reach the disk
            within this long, whatever the logging cadence; a SIGKILL loses at most about this much.
        sync_every: at most this many closed steps wait for their host copy (memory bound).
        overwrite: replace a run already in ``out_dir`` instead of refusing (a real resume from a
            checkpoint appends without it).
        seed: seed of the probe-batch selection (never the training RNG).
    """

    tasks: list[str]
    out_dir: str | Path | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    probe_every: int = DEFAULT_PROBE_EVERY
    probe_size: int = DEFAULT_PROBE_SIZE
    loss: str | Callable[..., Any] = "auto"
    probe_batch: Mapping[str, Any] | None = None
    probe_dataset: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    probe_kwargs: dict[str, Any] = field(default_factory=dict)
    update_direction: bool = True
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    sync_every: int = DEFAULT_SYNC_EVERY
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = check_tasks(self.tasks)
        self.out_dir = Path(self.out_dir) if self.out_dir is not None else None
        self.tags = dict(self.tags or {})
        self.meta = dict(self.meta or {})
        self.probe_kwargs = dict(self.probe_kwargs or {})
        self.probe_every = _nonneg_int("probe_every", self.probe_every, 0)
        self.probe_size = _nonneg_int("probe_size", self.probe_size, 1)
        self.sync_every = _nonneg_int("sync_every", self.sync_every, 1)
        self.seed = int(self.seed)
        self.update_direction = bool(self.update_direction)
        self.overwrite = bool(self.overwrite)
        if isinstance(self.flush_seconds, bool) or not isinstance(self.flush_seconds, (int, float)):
            raise ValueError(f"flush_seconds must be a number of seconds > 0, got {self.flush_seconds!r}")
        if not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds must be a number of seconds > 0, got {self.flush_seconds!r}")
        self.flush_seconds = float(self.flush_seconds)
        for reserved in _RESERVED_PROBE_KWARGS:
            if reserved in self.probe_kwargs:
                raise ValueError(f"probe_kwargs may not set {reserved!r}: the recorder passes it")
        if not (callable(self.loss) or isinstance(self.loss, str)):
            raise TypeError(f"loss must be 'auto', a loss kind name or a callable, got {self.loss!r}")

    @classmethod
    def options(cls) -> list[str]:
        """The keyword options every adapter accepts (all fields but ``tasks``)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "tasks"]

    @classmethod
    def build(
        cls, tasks: Sequence[str] | None = None, config: RecorderConfig | None = None, **options: Any
    ) -> RecorderConfig:
        """A config from ``tasks`` and keyword options, or ``config`` with some options replaced.

        Raises:
            TypeError: for an unknown option (the message lists the valid ones) or missing tasks.
        """
        unknown = sorted(set(options) - set(cls.options()))
        if unknown:
            raise TypeError(
                f"unknown dynamics option(s) {unknown}; valid options are {cls.options()} "
                "(or pass config=RecorderConfig(...))"
            )
        if config is not None:
            if not isinstance(config, RecorderConfig):
                raise TypeError(f"config must be a RecorderConfig, got {type(config).__name__}")
            changes = dict(options)
            if tasks is not None:
                changes["tasks"] = list(tasks)
            return dataclasses.replace(config, **changes) if changes else config
        if tasks is None:
            raise TypeError("tasks=[...] is required (the task names; task_ids index into it or name them)")
        return cls(tasks=list(tasks) if not isinstance(tasks, str) else tasks, **options)  # type: ignore[arg-type]

    def to_meta(self) -> dict[str, Any]:
        """The configuration as stored in ``run.json`` (no tensors, callables named only)."""
        return {
            "probe_every": self.probe_every,
            "probe_size": self.probe_size,
            "loss": self.loss if isinstance(self.loss, str) else "callable",
            "update_direction": self.update_direction,
            "flush_seconds": self.flush_seconds,
            "sync_every": self.sync_every,
            "seed": self.seed,
            "probe_kwargs": {k: v for k, v in self.probe_kwargs.items() if k != "params"},
        }
