"""Carry task ids through a model's forward without the model knowing about them.

The batch holds ``task_ids``: per example (or per token, for packed rows) an index into the run's
task list or the task's name itself (:func:`encode_task_ids` turns names into indices). A forward
pre-hook on the outermost module removes that key from the call's keyword arguments before the
model's ``forward`` runs, so models whose ``forward`` has no ``task_ids`` parameter (or, like PEFT
models, one with a different meaning) work unchanged. A forward hook then hands the ids, the
call's keyword arguments (``labels`` among them) and the output (the logits) to a consumer.

Only training forwards reach the consumer: the module must be in training mode with autograd on,
and the hooks must not be paused (the recorder pauses them while its probe runs its own forwards).
Evaluation forwards are stripped of ``task_ids`` too, and otherwise ignored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TASK_IDS_KEY", "TaskIdHook", "encode_task_ids", "split_by_task"]

TASK_IDS_KEY = "task_ids"

# consumer(task_ids or None, forward kwargs, forward output)
Consumer = Callable[[Any, dict[str, Any], Any], None]


class TaskIdHook:
    """Strip ``task_ids`` from ``module``'s forward kwargs and report training forwards.

    Args:
        module: the outermost module the training loop calls (the Trainer's ``model``; a PEFT
            model itself, not its base model, so that PEFT never sees our ``task_ids``).
        consumer: called after each training forward with ``(task_ids, kwargs, output)``;
            ``task_ids`` is ``None`` when the batch had none.
        key: the batch key holding the ids.
    """

    def __init__(self, module: nn.Module, consumer: Consumer, key: str = TASK_IDS_KEY) -> None:
        self.module = module
        self.consumer = consumer
        self.key = key
        self.paused = False
        # One slot per thread: nn.DataParallel runs replicas (sharing these hooks) in threads.
        self._slot = threading.local()
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            module.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    def _pre_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        self._slot.task_ids = kwargs.pop(self.key, None)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        task_ids = getattr(self._slot, "task_ids", None)
        self._slot.task_ids = None
        if self.paused or not module.training or not torch.is_grad_enabled():
            return
        self.consumer(task_ids, kwargs, output)

    def remove(self) -> None:
        """Unregister both hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _is_name(value: Any) -> bool:
    return isinstance(value, (str, np.str_))


def encode_task_ids(task_ids: Any, tasks: Sequence[str]) -> Any:
    """Task names -> their indices in ``tasks``; anything else is returned unchanged.

    Accepts a name, a (nested) list / tuple / numpy array of names (what collators make of a string
    column). Mixed names and integers are allowed (integers are already indices).

    Raises:
        ValueError: for a name that is not one of ``tasks`` (the message lists them).
    """
    if isinstance(task_ids, torch.Tensor) or task_ids is None:
        return task_ids
    if _is_name(task_ids):
        return _index_of(str(task_ids), tasks)
    if isinstance(task_ids, np.ndarray) and task_ids.dtype.kind not in "USO":
        return task_ids
    if isinstance(task_ids, (list, tuple, np.ndarray)):
        items = list(task_ids)
        if not any(_is_name(x) or isinstance(x, (list, tuple, np.ndarray)) for x in items):
            return task_ids
        return [encode_task_ids(x, tasks) for x in items]
    return task_ids


def _index_of(name: str, tasks: Sequence[str]) -> int:
    try:
        return list(tasks).index(name)
    except ValueError:
        raise ValueError(
            f"task name {name!r} in task_ids is not one of the declared tasks {list(tasks)}; "
            "declare it in tasks=[...] or fix the dataset's task_ids"
        ) from None


def task_of_item(item: Any, tasks: Sequence[str], key: str = TASK_IDS_KEY) -> int:
    """The task index of one dataset item (a dict with ``key``: an index, a name, or per-token ids)."""
    if not isinstance(item, Mapping) or key not in item:
        raise ValueError(
            f"dataset items must be dicts with a {key!r} entry (the task index or name of the example); "
            "add it to the dataset or pass probe_batch= explicitly"
        )
    value = encode_task_ids(item[key], tasks)
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0]
    elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        value = np.asarray(value).reshape(-1)[0]
    return int(value)


def split_by_task(dataset: Any, tasks: Sequence[str], key: str = TASK_IDS_KEY) -> dict[str, Any]:
    """One evaluation set per task from a dataset whose items carry ``key`` (indices or names).

    ``trainer.evaluate(split_by_task(ds, TASKS))`` (or ``eval_dataset=`` it) then reports
    ``eval_<task>_<metric>`` for every task, which the callback stores per task. A
    ``datasets.Dataset`` is split with ``select`` (reading only the ``key`` column), anything
    indexable into plain lists; tasks without examples are left out.
    """
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, list) and key in column_names:
        column = dataset[key]
        task_of: Callable[[int], int] = lambda i: task_of_item({key: column[i]}, tasks, key)  # noqa: E731
    else:
        task_of = lambda i: task_of_item(dataset[i], tasks, key)  # noqa: E731
    rows: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        rows.setdefault(task_of(i), []).append(i)
    out: dict[str, Any] = {}
    for a, task in enumerate(tasks):
        if a in rows:
            select = getattr(dataset, "select", None)
            out[task] = select(rows[a]) if callable(select) else [dataset[i] for i in rows[a]]
    return out
