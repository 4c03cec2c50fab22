"""The per-task reduction of per-example losses: one ``index_add`` for the three per-task sums.

The per-example ``(S_i, N_i)`` come from :func:`dynamics.signals.losses.per_example_loss` (the one
loss definition, shared with the probe); task ``a``'s loss over a step is
``L_a = sum_{i in a} S_i / sum_{i in a} N_i``.
"""

from __future__ import annotations

import torch

__all__ = ["task_sums"]


@torch.no_grad()
def task_sums(
    loss_sum: torch.Tensor, count: torch.Tensor, task_ids: torch.Tensor, n_tasks: int
) -> torch.Tensor:
    """Per-task totals as one ``(3, T)`` float64 tensor: rows ``sum S_i``, ``sum N_i``, ``#examples``.

    Examples with no target item (``N_i = 0``, e.g. fully masked) add nothing to the loss but count
    as examples, as they do in the Trainer's batch.
    """
    values = torch.stack(
        [
            loss_sum.double(),
            count.double().to(loss_sum.device),
            torch.ones_like(loss_sum, dtype=torch.float64),
        ]
    )
    out = torch.zeros(3, n_tasks, dtype=torch.float64, device=loss_sum.device)
    out.index_add_(1, task_ids.to(loss_sum.device).long(), values)  # one kernel for the three sums
    return out
