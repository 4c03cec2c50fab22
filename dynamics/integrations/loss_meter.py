"""The per-task loss meter: per-example training losses -> per-step, per-task sums, without stalling training.

For every training micro-batch the meter gets the model output and labels (from the forward hook)
and computes, with the one loss definition of :mod:`dynamics.signals.losses`, each example's summed
loss ``S_i`` and item count ``N_i`` (detached, no graph). Task ``a``'s loss over optimizer step
``s`` (all micro-batches, all ranks) is

    L_a(s) = sum_{i in a} S_i / sum_{i in a} N_i ,

so the token-weighted mean over tasks, ``sum_a N_a L_a / N = sum_i S_i / N``, is the loss the
Trainer itself logs for the step (transformers divides the step's summed token losses by
``num_items_in_batch``).

Task ids come per example ``(B,)`` or per token ``(B, L)`` (packed rows holding several examples):
then every supervised token counts for its own task (the labels of the other tasks are masked
with -100 and the same per-example loss is taken once per task present), and an *example* is a
(row, task) segment. Per-token ids < 0 mark positions of no task (padding); ids >= T are out of
range, counted and reported.

Cost and timing. ``observe`` only queues device tensors. ``close_step`` reduces the step's
micro-batches to one ``(3, T + 1)`` tensor (rows ``sum S``, ``sum N``, #examples; column ``T``
collects out-of-range ids) in one ``index_add``, starts the all-reduce over ranks asynchronously
(the same collective on every rank, once per step, in step order) and a non-blocking host copy.
``ready`` hands back the closed steps whose reduction and copy have finished, so reading them never
waits on the device; ``ready(block=True)`` (at logging steps and at the end) waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynamics.integrations import distributed as dist_utils
from dynamics.signals.losses import (
    IGNORE_INDEX,
    LossSpec,
    extract_logits,
    per_example_loss,
    resolve_loss_kind,
)

__all__ = ["LOSS", "TOKENS", "EXAMPLES", "LossMeter", "StepSums", "task_sums"]

LOSS, TOKENS, EXAMPLES = 0, 1, 2

# One micro-batch: per-example S_i, N_i, example weight (1, or segment present) and task id.
_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StepSums:
    """One closed optimizer step: ``sums[:, a]`` = ``[sum S, sum N, #examples]`` of task ``a``, summed
    over ranks; column ``T`` holds the examples whose task id was out of range."""

    step: int
    lr: float | None
    sums: np.ndarray  # (3, T + 1) float64


@torch.no_grad()
def task_sums(
    loss_sum: torch.Tensor,
    count: torch.Tensor,
    bins: torch.Tensor,
    n_bins: int,
    examples: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-bin totals as one ``(3, n_bins)`` float64 tensor: rows ``sum S_i``, ``sum N_i``, ``sum e_i``.

    ``e_i`` is the example weight (default 1). Examples with no target item (``N_i = 0``, e.g. fully
    masked) add nothing to the loss but count as examples, as they do in the Trainer's batch.
    """
    values = torch.stack(
        [
            loss_sum.double(),
            count.double().to(loss_sum.device),
            torch.ones_like(loss_sum, dtype=torch.float64)
            if examples is None
            else examples.double().to(loss_sum.device),
        ]
    )
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=loss_sum.device)
    out.index_add_(1, bins.to(loss_sum.device).long(), values)  # one kernel for the three sums
    return out


class _Closed:
    """A closed step whose reduction / host copy may still be running."""

    def __init__(self, step: int, lr: float | None, host: torch.Tensor, work: Any, event: Any) -> None:
        self.step, self.lr, self.host, self.work, self.event = step, lr, host, work, event

    def done(self) -> bool:
        if self.work is not None and not self.work.is_completed():
            return False
        return self.event is None or bool(self.event.query())

    def wait(self) -> np.ndarray:
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class LossMeter:
    """Per-task training losses of every optimizer step (see the module docstring).

    Args:
        n_tasks: number of declared tasks ``T``.
        loss: ``"auto"`` (resolved from the model on the first batch), a kind name or a callable.
        warn: ``warn(key, message)`` for problems in the data (the recorder warns once per key).
    """

    def __init__(self, n_tasks: int, loss: LossSpec, warn: Callable[[str, str], None]) -> None:
        self.n_tasks = n_tasks
        self.loss = loss
        self._kind: LossSpec | None = None if loss == "auto" else loss
        self._warn = warn
        self._lock = threading.Lock()
        self._parts: list[_Part] = []
        self._closed: list[_Closed] = []
        self.model: nn.Module | None = None  # the unwrapped model the loss kind is resolved from

    # ------------------------------------------------------------------ per micro-batch
    def observe(self, task_ids: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        """One training forward (the hook's ``kwargs`` hold ``labels``); problems warn and skip."""
        if task_ids is None:
            self._warn(
                "no_task_ids",
                "dynamics: a training batch has no 'task_ids', so its per-task losses are not recorded "
                "(training continues). Put one task index (or task name) per example under batch['task_ids']; "
                "with the HF Trainer use dynamics.attach(trainer, ...) so that remove_unused_columns and the "
                "collator keep that column.",
            )
            return
        labels = kwargs.get("labels")
        if labels is None:
            self._warn(
                "no_labels",
                "dynamics: a training forward got no 'labels' keyword, so per-task losses cannot be computed "
                "for it (training continues). Pass labels to the model, or call observe(logits, labels, "
                "task_ids) yourself (e.g. when a compute_loss_func or label smoother pops the labels).",
            )
            return
        self.observe_output(output, labels, task_ids, shift_labels=kwargs.get("shift_labels"))

    def observe_output(
        self, output: Any, labels: torch.Tensor, task_ids: Any, *, shift_labels: torch.Tensor | None = None
    ) -> None:
        """Add one micro-batch from a model output (or logits) and its labels."""
        kind = self._resolve(output, labels)
        ids = _as_id_tensor(task_ids)
        token_ids = ids.dim() == 2 and ids.shape[1] > 1 and labels.dim() >= 2
        if not token_ids:
            loss_sum, count = per_example_loss(output, labels, kind, shift_labels=shift_labels)
            self.add(loss_sum, count, _per_example_ids(ids, int(loss_sum.shape[0])))
            return
        # Packed rows: one pass per task present, the other tasks' labels masked.
        if ids.shape != labels.shape[:2]:
            raise ValueError(
                f"per-token task_ids have shape {tuple(ids.shape)} but labels have {tuple(labels.shape)}; "
                "give one task id per token (B, L) or one per example (B,)"
            )
        ids = ids.to(labels.device)
        ids = torch.where(ids >= self.n_tasks, self.n_tasks, ids)  # out of range: bin T
        shifted_ids = None if shift_labels is None else F.pad(ids, (0, 1), value=-1)[..., 1:]
        for a in torch.unique(ids[ids >= 0]).tolist():
            keep = ids == a
            masked = labels.masked_fill(~keep, IGNORE_INDEX)
            masked_shift = (
                None
                if shift_labels is None or shifted_ids is None
                else shift_labels.masked_fill(shifted_ids != a, IGNORE_INDEX)
            )
            loss_sum, count = per_example_loss(output, masked, kind, shift_labels=masked_shift)
            present = keep.any(dim=1).to(loss_sum.dtype)
            self.add(
                loss_sum * present, count * present, torch.full_like(present, a, dtype=torch.long), present
            )

    def add(
        self,
        loss_sum: torch.Tensor,
        counts: torch.Tensor,
        ids: torch.Tensor,
        examples: torch.Tensor | None = None,
    ) -> None:
        """Queue per-example ``S_i``, ``N_i`` with their task ids (no device work until ``close_step``)."""
        loss_sum = loss_sum.detach().reshape(-1)
        counts = counts.detach().reshape(-1).to(loss_sum.device)
        ids = ids.to(loss_sum.device, copy=True).long()  # the batch's id tensor may be refilled in place
        if examples is None:
            examples = torch.ones_like(loss_sum)
        with self._lock:
            self._parts.append((loss_sum, counts, examples.detach().reshape(-1), ids))

    def _resolve(self, output: Any, labels: torch.Tensor) -> LossSpec:
        if self._kind is None:
            self._kind = resolve_loss_kind(
                self.model, self.loss, logits=extract_logits(output), labels=labels
            )
        return self._kind

    @property
    def kind(self) -> LossSpec | None:
        """The resolved loss kind (``None`` before the first batch with ``loss="auto"``)."""
        return self._kind

    # ------------------------------------------------------------------ per step
    def close_step(self, step: int, lr: float | None, device: torch.device | None = None) -> None:
        """Reduce step ``step``'s micro-batches and start their all-reduce and host copy.

        A collective under torch.distributed: every rank calls it once per optimizer step, in order.
        """
        with self._lock:
            parts, self._parts = self._parts, []
        n_cols = self.n_tasks + 1
        if parts:
            on = parts[0][0].device
            ids = torch.cat([p[3] for p in parts])
            bins = torch.where((ids < 0) | (ids >= self.n_tasks), self.n_tasks, ids)
            sums = task_sums(
                torch.cat([p[0] for p in parts]),
                torch.cat([p[1].to(on) for p in parts]),
                bins,
                n_cols,
                torch.cat([p[2].to(on) for p in parts]),
            )
        else:
            sums = torch.zeros(3, n_cols, dtype=torch.float64, device=device or torch.device("cpu"))
        work = None
        if dist_utils.is_distributed() and dist_utils.world_size() > 1:
            sums = sums.to(dist_utils.reduce_device(sums.device))
            work = torch.distributed.all_reduce(sums, async_op=True)
        event = None
        if sums.device.type == "cuda":
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            if work is not None:
                work.wait()  # enqueues the wait on the stream; the host is not blocked by NCCL
                work = None
            host.copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = sums  # gloo writes in place; read after work.wait()
        self._closed.append(_Closed(int(step), lr, host, work, event))

    @property
    def n_waiting(self) -> int:
        """Closed steps not yet handed back by :meth:`ready`."""
        return len(self._closed)

    def ready(self, block: bool = False) -> list[StepSums]:
        """The closed steps whose sums are on the host, oldest first (all of them if ``block``)."""
        out: list[StepSums] = []
        while self._closed and (block or self._closed[0].done()):
            closed = self._closed.pop(0)
            out.append(StepSums(closed.step, closed.lr, closed.wait().copy()))
        return out


def _as_id_tensor(task_ids: Any) -> torch.Tensor:
    ids = task_ids if isinstance(task_ids, torch.Tensor) else torch.as_tensor(task_ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"task_ids must be integers (an index into tasks) or task names, got dtype {ids.dtype}"
        )
    return ids.long()


def _per_example_ids(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    ids = ids.reshape(-1) if ids.dim() > 1 and ids.numel() == batch_size else ids
    if ids.dim() != 1 or ids.numel() != batch_size:
        raise ValueError(
            f"task_ids has shape {tuple(ids.shape)} but the batch has {batch_size} examples; "
            "give exactly one task index per example (B,) or one per token (B, L)"
        )
    return ids


def per_example_ids(task_ids: Any, batch_size: int) -> torch.Tensor:
    """``task_ids`` as a 1-D LongTensor of one id per example (shape and dtype checked, not range)."""
    return _per_example_ids(_as_id_tensor(task_ids), batch_size)


def totals(steps: Sequence[StepSums], n_tasks: int) -> np.ndarray:
    """Sum of several steps' ``(3, T + 1)`` sums."""
    out = np.zeros((3, n_tasks + 1))
    for s in steps:
        out += s.sums
    return out
