"""Task-level gradient geometry from the per-example Gram matrix.

With per-example gradients ``g_i`` (rows of ``G``), ``K = G G^T`` and task weights
``W[a, i] = w_ai = N_i / N_a`` for ``i`` in task ``a`` (0 otherwise; see :mod:`.losses`), the task
gradients are ``g_a = sum_i w_ai g_i`` (rows of ``W G``), hence

* task Gram ``K_task = W K W^T`` (T x T), ``K_task[a, b] = <g_a, g_b>``;
* task gradient norm ``|g_a| = sqrt(K_task[a, a])``;
* task cosine ``cos(a, b) = K_task[a, b] / (|g_a| |g_b|)`` (clipped to [-1, 1]);
* conflict rate = share of task pairs ``a < b`` with ``cos(a, b) < 0``, over the pairs whose
  cosine is defined;
* cosine with a direction ``d`` (e.g. the last optimizer update):
  ``cos(g_a, d) = (sum_i w_ai <g_i, d>) / (|g_a| |d|)``.

A task is *missing* when it has no example in the probe batch, or its examples carry no weight
(``N_a = 0``, e.g. no supervised token). Its row and column are NaN and it takes no part in the
conflict rate; present tasks are unaffected. A cosine involving a zero task gradient is NaN too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def task_weights(task_ids: Tensor, weights: Tensor, n_tasks: int) -> tuple[Tensor, Tensor]:
    """``W`` (T, n) float64 with ``W[a, i] = N_i / N_a`` on task ``a``'s examples; ``present`` (T,) bool."""
    if task_ids.dim() != 1 or task_ids.shape != weights.shape:
        raise ValueError(
            f"task_ids must have shape (n,) like the per-example losses; got {tuple(task_ids.shape)} "
            f"for n = {weights.shape[0]}"
        )
    n = task_ids.shape[0]
    w = weights.detach().to(torch.float64).cpu()
    ids = task_ids.detach().cpu().long()
    onehot = torch.zeros(n_tasks, n, dtype=torch.float64)
    onehot[ids, torch.arange(n)] = 1.0
    raw = onehot * w
    totals = raw.sum(1)
    present = totals > 0
    W = torch.where(present[:, None], raw / totals.clamp(min=1e-300)[:, None], torch.zeros_like(raw))
    return W, present


@dataclass
class TaskGeometry:
    """``gram`` = W K W^T, ``grad_norm``, ``cosine`` (NaN rows/cols for missing tasks), ``conflict_rate``."""

    gram: Tensor
    grad_norm: Tensor
    cosine: Tensor
    conflict_rate: float
    present: Tensor


def task_geometry(gram: Tensor, W: Tensor, present: Tensor) -> TaskGeometry:
    """Task Gram, norms, cosines and conflict rate (formulas in the module docstring)."""
    K = gram.detach().to(torch.float64).cpu()
    tg = W @ K @ W.T
    tg = 0.5 * (tg + tg.T)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    both = present[:, None] & present[None, :]
    tg = torch.where(both, tg, nan)
    norm = torch.where(present, tg.diagonal().clamp(min=0).sqrt(), nan)
    denom = norm[:, None] * norm[None, :]
    cos = torch.where(denom > 0, tg / denom, nan).clamp(-1.0, 1.0)
    iu = torch.triu_indices(len(norm), len(norm), offset=1)
    pairs = cos[iu[0], iu[1]]
    pairs = pairs[torch.isfinite(pairs)]
    conflict = float((pairs < 0).double().mean()) if pairs.numel() else math.nan
    return TaskGeometry(gram=tg, grad_norm=norm, cosine=cos, conflict_rate=conflict, present=present)


def direction_cosine(example_dots: Tensor, direction_norm: float, W: Tensor, grad_norm: Tensor) -> Tensor:
    """``cos(g_a, d)`` (T,) from ``example_dots[i] = <g_i, d>``; NaN for missing or zero tasks / zero ``d``."""
    dots = W @ example_dots.detach().to(torch.float64).cpu()
    denom = grad_norm * direction_norm
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return torch.where(denom > 0, dots / denom, nan).clamp(-1.0, 1.0)
