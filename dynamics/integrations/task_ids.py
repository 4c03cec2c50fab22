"""Carry task ids through a model's forward without the model knowing about them.

The batch holds ``task_ids`` (one int per example, an index into the run's task list). A forward
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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TASK_IDS_KEY", "TaskIdHook"]

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
