"""The run store's on-disk contract, defined once: the writer, the reader and the TensorBoard bridge
all take file names, columns and types from here.

Kept free of pandas and torch so the training side can import it (pyarrow only).

A run is one directory::

    run.json                                identity, tasks, tags, configuration (JSON)
    metrics/part-<seq>-<writer>.parquet     tidy rows: run_id, step, name, task, task_b, value
    scores.parquet                          final evaluation: run_id, task, metric, value
    .writer.lock                            advisory lock held by the run's training writer

``<seq>`` is a zero-padded counter (the order in which parts were written), ``<writer>`` a random
id drawn by each writer when it opens, so two writers never pick the same name. Parts are written
under a hidden temporary name (``.<part>.tmp``, ignored by pyarrow/DuckDB/polars globs) and renamed
into place. A resume deletes the steps after its checkpoint from disk before appending, so a raw
reader of ``metrics/*.parquet`` sees each (step, name, task, task_b) key once.
"""

from __future__ import annotations

import re

import pyarrow as pa

RUN_FILE = "run.json"
METRICS_DIR = "metrics"
SCORES_FILE = "scores.parquet"
LOCK_FILE = ".writer.lock"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 2

# The one definition of the row types: (column, Arrow type, pandas dtype).
_METRIC_FIELDS = (
    ("run_id", pa.string(), "str"),
    ("step", pa.int64(), "int64"),
    ("name", pa.string(), "str"),
    ("task", pa.string(), "str"),
    ("task_b", pa.string(), "str"),
    ("value", pa.float64(), "float64"),
)
_SCORE_FIELDS = (
    ("run_id", pa.string(), "str"),
    ("task", pa.string(), "str"),
    ("metric", pa.string(), "str"),
    ("value", pa.float64(), "float64"),
)
METRIC_SCHEMA = pa.schema([(c, t) for c, t, _ in _METRIC_FIELDS])
SCORE_SCHEMA = pa.schema([(c, t) for c, t, _ in _SCORE_FIELDS])
METRIC_DTYPES = {c: d for c, _, d in _METRIC_FIELDS}  # pandas dtypes, run_id first
SCORE_DTYPES = {c: d for c, _, d in _SCORE_FIELDS}
METRIC_COLUMNS = tuple(METRIC_DTYPES)
SCORE_COLUMNS = tuple(SCORE_DTYPES)
ROW_COLUMNS = ("step", "name", "task", "task_b", "value")  # what a writer logs (run_id is implied)
KEY_COLUMNS = ("step", "name", "task", "task_b")
STEP_MAX = 2**63 - 1  # int64

TB_PREFIX = "dynamics"
# Separates the two tasks of a pairwise metric inside a TensorBoard tag ("/" already separates fields).
PAIR_SEP = "|"
FIELD_SEP = "/"

_PART_RE = re.compile(rf"^{re.escape(PART_PREFIX)}(\d+)(?:-([0-9a-z]+))?{re.escape(PART_SUFFIX)}$")


def part_name(seq: int, writer_id: str) -> str:
    """``part-<seq>-<writer>.parquet``: unique per writer, ordered by ``seq`` within a run."""
    return f"{PART_PREFIX}{seq:06d}-{writer_id}{PART_SUFFIX}"


def part_seq(file_name: str) -> int | None:
    """The sequence number of a part file name (``None`` if it is not one). Accepts the old
    ``part-NNNNN.parquet`` names too."""
    match = _PART_RE.match(file_name)
    return int(match.group(1)) if match else None


def tmp_name(file_name: str) -> str:
    """The hidden temporary name a file is written under before its atomic rename."""
    return f".{file_name}{TMP_SUFFIX}"


def label_problem(label: object, *, what: str) -> str | None:
    """Why ``label`` cannot be a metric or task name (``None`` if it can).

    Names are non-empty strings without control characters or surrounding blanks; task names may
    hold neither separator of TensorBoard tags (``/`` and ``|``), metric names no ``|``.
    """
    if not isinstance(label, str):
        return f"must be a string, got {label!r} ({type(label).__name__})"
    if not label:
        return "must be a non-empty string"
    if label != label.strip() or any(ord(c) < 32 or ord(c) == 127 for c in label):
        return f"must not have control characters or leading/trailing blanks, got {label!r}"
    seps = (PAIR_SEP, FIELD_SEP) if what == "task" else (PAIR_SEP,)
    bad = [s for s in seps if s in label]
    if bad:
        return f"must not contain {bad[0]!r} (it separates fields in TensorBoard tags), got {label!r}"
    return None


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
    parts = tag.split(FIELD_SEP)
    if TB_PREFIX in parts[:2]:
        rest = parts[parts.index(TB_PREFIX) + 1 :]
        if len(rest) == 1:
            return rest[0], "", ""
        if len(rest) == 2:
            task, _, task_b = rest[1].partition(PAIR_SEP)
            return rest[0], task, task_b
    return tag, "", ""
