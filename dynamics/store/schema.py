"""The run store's on-disk contract, shared by the writer, the reader and the TensorBoard bridge.

Kept free of pandas and torch so the training side can import it.

A run is one directory::

    run.json                    identity, tasks, tags, configuration (JSON)
    metrics/part-NNNNN.parquet  tidy rows: step, name, task, task_b, value
    scores.parquet              final evaluation: task, metric, value

Rows are append-only. When a resumed run logs a (step, name, task, task_b) key again, the later
part wins on load, so resuming from a checkpoint never duplicates a step.
"""

from __future__ import annotations

RUN_FILE = "run.json"
METRICS_DIR = "metrics"
SCORES_FILE = "scores.parquet"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1

METRIC_COLUMNS = ("step", "name", "task", "task_b", "value")
SCORE_COLUMNS = ("task", "metric", "value")
KEY_COLUMNS = ("step", "name", "task", "task_b")

TB_PREFIX = "dynamics"
# Separates the two tasks of a pairwise metric inside a TensorBoard tag ("/" already separates fields).
PAIR_SEP = "|"


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}{PART_SUFFIX}"


def tb_tag(name: str, task: str = "", task_b: str = "") -> str:
    """TensorBoard tag for a store row: ``dynamics/<name>[/<task>[|<task_b>]]``."""
    if not task:
        return f"{TB_PREFIX}/{name}"
    if task_b:
        return f"{TB_PREFIX}/{name}/{task}{PAIR_SEP}{task_b}"
    return f"{TB_PREFIX}/{name}/{task}"


def parse_tb_tag(tag: str) -> tuple[str, str, str]:
    """Inverse of :func:`tb_tag`; any other tag becomes a global metric named after the whole tag.

    HF's TensorBoard integration prefixes scalars with ``train/`` or ``eval/``; that prefix is kept
    before ``dynamics/`` so ``train/dynamics/loss/vqa`` parses as (``loss``, ``vqa``, ``""``).
    """
    parts = tag.split("/")
    if TB_PREFIX in parts[:2]:
        rest = parts[parts.index(TB_PREFIX) + 1 :]
        if len(rest) == 1:
            return rest[0], "", ""
        if len(rest) == 2:
            task, _, task_b = rest[1].partition(PAIR_SEP)
            return rest[0], task, task_b
    return tag, "", ""
