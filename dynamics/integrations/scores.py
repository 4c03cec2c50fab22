"""Scores: evaluation metrics over training (curves) and the run's final scores.

Naming (one scheme, stable): an evaluation at optimizer step ``s`` that reports
``eval_<task>_<metric>`` (the Trainer's keys for ``eval_dataset={task: ...}``, or
:func:`~dynamics.integrations.task_ids.split_by_task`) is stored as the metric row
``(step=s, name="eval_<metric>", task=<task>)``; a global ``eval_<metric>`` as
``(s, "eval_<metric>", "")``. Those rows are the score *curves*. The last evaluation's per-task
metrics are also the run's final *scores* (``scores.parquet``: task, metric, value), except
losses (``loss`` and ``*_loss``), which stay curves only: a loss is not a score, and a
multi-task score averaged with losses would mix directions. For every metric present for all
declared tasks, the multi-task average is added under task ``""``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["EVAL_PREFIX", "ScoreBook", "eval_rows", "is_loss_metric", "parse_eval_metrics"]

EVAL_PREFIX = "eval"

# What Trainer.evaluate adds about speed, not quality: never a score or a curve.
_SPEED_METRICS = frozenset(
    {
        "runtime",
        "samples_per_second",
        "steps_per_second",
        "model_preparation_time",
        "jit_compilation_time",
        "epoch",
    }
)

Row = tuple[int, str, str, str, float]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number))


def is_loss_metric(metric: str) -> bool:
    return metric == "loss" or metric.endswith("_loss")


def parse_eval_metrics(
    metrics: Mapping[str, Any], tasks: Iterable[str], prefix: str = EVAL_PREFIX, *, with_global: bool = False
) -> dict[str, dict[str, float]]:
    """``{prefix}_<task>_<metric>`` keys -> ``{task: {metric: value}}`` (longest matching task name wins).

    With ``with_global``, keys ``{prefix}_<metric>`` that name no task go under task ``""``.
    """
    by_length = sorted(tasks, key=len, reverse=True)
    out: dict[str, dict[str, float]] = {}
    head = f"{prefix}_"
    for key, value in metrics.items():
        if not key.startswith(head) or not _number(value):
            continue
        rest = key[len(head) :]
        for task in by_length:
            if rest.startswith(task + "_") and len(rest) > len(task) + 1:
                metric = rest[len(task) + 1 :]
                if metric not in _SPEED_METRICS:
                    out.setdefault(task, {})[metric] = float(value)
                break
        else:
            if with_global and rest and rest not in _SPEED_METRICS:
                out.setdefault("", {})[rest] = float(value)
    return out


def eval_rows(step: int, parsed: Mapping[str, Mapping[str, float]]) -> list[Row]:
    """Curve rows ``(step, "eval_<metric>", task, "", value)`` of one evaluation."""
    return [
        (int(step), f"{EVAL_PREFIX}_{metric}", task, "", float(value))
        for task, metrics in parsed.items()
        for metric, value in metrics.items()
    ]


class ScoreBook:
    """The run's final scores ``{task: {metric: value}}``, merged over calls, with the multi-task average."""

    def __init__(self, tasks: Iterable[str]) -> None:
        self.tasks = list(tasks)
        self._scores: dict[str, dict[str, float]] = {}

    def add(self, scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """Merge ``scores``; returns every score to write (per task, plus the average under ``""``).

        Raises:
            TypeError, ValueError: for a malformed mapping or an undeclared task.
        """
        if not isinstance(scores, Mapping) or not all(isinstance(v, Mapping) for v in scores.values()):
            raise TypeError("record_scores expects {task: {metric: value}}, e.g. {'vqa': {'accuracy': 0.71}}")
        unknown = set(scores) - set(self.tasks) - {""}
        if unknown:
            raise ValueError(
                f"unknown task(s) {sorted(unknown)} in scores; this run declares tasks {self.tasks}"
            )
        for task, metrics in scores.items():
            self._scores.setdefault(task, {}).update({str(m): float(v) for m, v in metrics.items()})
        per_task = {t: m for t, m in self._scores.items() if t}
        common = set.intersection(*(set(per_task.get(t, {})) for t in self.tasks))
        overall = {m: float(np.mean([per_task[t][m] for t in self.tasks])) for m in sorted(common)}
        overall.update(self._scores.get("", {}))  # an overall score the user gave wins
        return {**per_task, **({"": overall} if overall else {})}

    def final_from_eval(self, parsed: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """The per-task, non-loss part of one evaluation: what becomes a final score."""
        return {
            task: kept
            for task, metrics in parsed.items()
            if task and (kept := {m: v for m, v in metrics.items() if not is_loss_metric(m)})
        }
