"""The store sink: the recorder's rows into the run store, on rank 0, without blocking training.

Opens the :class:`~dynamics.store.writer.RunWriter` lazily (rank 0 only), as a new run, a real
resume (``resume_step`` = the checkpoint's step, > 0) or an overwrite; a new training into a
directory that already holds a run is refused by the writer (``RunExistsError``) before the first
step. Rows are handed to the writer as they become known (the recorder: at every step's end), and
the writer puts them on disk within ``flush_seconds`` on its own clock; :meth:`StoreSink.request_flush`
asks it to do so now, in the background (the recorder calls it for probe and evaluation rows and
at :meth:`~dynamics.integrations.recorder.Recorder.sync`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.integrations.loss_meter import EXAMPLES, LOSS, TOKENS, StepSums

__all__ = ["StoreSink", "step_rows"]

Row = tuple[int, str, str, str, float]


def step_rows(steps: Sequence[StepSums], tasks: Sequence[str]) -> list[Row]:
    """Store rows of closed steps: per task ``loss`` (token-weighted), ``n_examples``, ``n_tokens``;
    global ``train_loss`` and ``lr``. A task gets a ``loss`` row only on steps where it has items."""
    rows: list[Row] = []
    n = len(tasks)
    for s in steps:
        sums = s.sums[:, :n]
        if sums[EXAMPLES].sum() > 0:
            for a, task in enumerate(tasks):
                if sums[TOKENS, a] > 0:
                    rows.append((s.step, "loss", task, "", float(sums[LOSS, a] / sums[TOKENS, a])))
                rows.append((s.step, "n_examples", task, "", float(sums[EXAMPLES, a])))
                rows.append((s.step, "n_tokens", task, "", float(sums[TOKENS, a])))
            if sums[TOKENS].sum() > 0:
                rows.append((s.step, "train_loss", "", "", float(sums[LOSS].sum() / sums[TOKENS].sum())))
        if s.lr is not None:
            rows.append((s.step, "lr", "", "", float(s.lr)))
    return rows


class StoreSink:
    """Rank 0's run writer (or nothing: no ``out_dir``, or another rank).

    Args:
        tasks: the run's tasks.
        out_dir: the run directory, or ``None`` (rows go to the logs only).
        tags: run tags; meta: ``run.json`` metadata.
        flush_seconds: passed to the writer (its own background flush interval).
        overwrite: replace a run already in ``out_dir``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        out_dir: str | Path | None,
        tags: Mapping[str, Any],
        meta: Mapping[str, Any],
        flush_seconds: float,
        overwrite: bool,
    ) -> None:
        self.tasks = list(tasks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tags = dict(tags)
        self.meta = dict(meta)
        self.flush_seconds = flush_seconds
        self.overwrite = overwrite
        self.main_process = True
        self.resume_step: int | None = None
        self._writer: Any = None

    def open(self) -> Any:
        """The writer, opened on first use on the main process (else ``None``)."""
        if self._writer is not None or self.out_dir is None or not self.main_process:
            return self._writer
        from dynamics.store.writer import RunWriter

        self._writer = RunWriter(
            self.out_dir,
            tasks=self.tasks,
            tags=self.tags,
            meta=self.meta,
            resume_step=self.resume_step if self.resume_step else None,
            overwrite=self.overwrite,
            flush_seconds=self.flush_seconds,
        )
        return self._writer

    @property
    def writer(self) -> Any:
        return self.open()

    def write_rows(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        writer = self.open()
        if writer is None or not rows:
            return
        steps, names, tasks, task_bs, values = zip(*rows, strict=True)
        writer.log_many(np.asarray(steps, dtype=np.int64), names, values, tasks, task_bs)

    def write_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        writer = self.open()
        if writer is not None:
            writer.log_scores(scores)

    def request_flush(self) -> None:
        """Ask the writer to write its buffered rows now, in the background (never waits on disk)."""
        if self._writer is not None:
            self._writer.request_flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
