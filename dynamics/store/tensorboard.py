"""Import TensorBoard event directories into run stores, so runs trained without the dynamics
callback (any HF Trainer run with ``report_to="tensorboard"``) can be analysed all the same.

Each directory that directly holds ``events.out.tfevents.*`` files becomes one run. Scalars tagged
``[train/]dynamics/<name>[/<task>[|<task_b>]]`` (what the callback logs) map back onto their store
rows; every other scalar (``train/loss``, ``train/learning_rate``, ``eval/...``) is kept as a global
metric named after its tag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dynamics.store import schema
from dynamics.store.writer import RunWriter

__all__ = ["import_tensorboard"]

_EVENT_GLOB = "events.out.tfevents.*"


def _event_dirs(logdir: Path) -> list[Path]:
    return sorted({p.parent for p in logdir.rglob(_EVENT_GLOB)})


def _read_scalars(event_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # EventAccumulator is TensorBoard's own reader; size_guidance 0 keeps every scalar event
    # instead of its default reservoir sample of 10,000.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (
            np.fromiter((e.step for e in events), dtype=np.int64, count=len(events)),
            np.fromiter((e.value for e in events), dtype=np.float64, count=len(events)),
        )
    return out


def import_tensorboard(
    logdir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
    progress: bool = False,
) -> list[Path]:
    """Convert every event directory below ``logdir`` into a run under ``out_dir``.

    Args:
        logdir: a TensorBoard log directory, searched recursively.
        out_dir: parent of the new runs; each run's directory mirrors its path relative to ``logdir``.
        tasks: task names to declare; default: those found in ``dynamics/`` tags.
        tags: tags for every imported run (e.g. ``{"construction": "IMAX"}``); the relative path is
            always kept as the ``source`` tag.
        progress: show a progress bar over event directories.

    Returns:
        the run directories written.
    """
    logdir, out_dir = Path(logdir), Path(out_dir)
    if not logdir.is_dir():
        raise FileNotFoundError(
            f"{logdir} is not a directory; pass the TensorBoard log directory (the one given to --logdir)"
        )
    event_dirs = _event_dirs(logdir)
    if not event_dirs:
        raise ValueError(f"no TensorBoard event files ({_EVENT_GLOB}) under {logdir}")
    written = []
    for event_dir in tqdm(event_dirs, desc="import-tb", unit="run", disable=not progress):
        scalars = _read_scalars(event_dir)
        parsed = {tag: schema.parse_tb_tag(tag) for tag in scalars}
        found = sorted({t for _, task, task_b in parsed.values() for t in (task, task_b) if t})
        run_tasks = list(tasks) if tasks else found
        unknown = set(found) - set(run_tasks)
        if unknown:
            raise ValueError(
                f"{event_dir} logs tasks {sorted(unknown)} that are not in --task {list(run_tasks)}; "
                "declare every task or leave --task out to take them from the logs"
            )
        rel = event_dir.relative_to(logdir)
        run_dir = out_dir / rel if str(rel) != "." else out_dir / logdir.name
        if (run_dir / schema.RUN_FILE).exists():
            raise ValueError(f"{run_dir} already holds a run; import into an empty OUT_DIR")
        run_tags = {"source": str(rel), **dict(tags or {})}
        with RunWriter(
            run_dir, tasks=run_tasks, tags=run_tags, meta={"imported_from": str(event_dir)}
        ) as writer:
            for tag, (steps, values) in scalars.items():
                name, task, task_b = parsed[tag]
                writer.log_many(steps, name, values, task, task_b)
        written.append(run_dir)
    return written
