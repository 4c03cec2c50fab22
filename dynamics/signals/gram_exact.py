"""Exact per-example gradients by autograd: the fallback for parameters the fast path cannot cover.

For per-example losses ``l`` (n,) of ONE batched forward pass, ``g_i(p) = d l_i / d p`` is computed
as a vector-Jacobian product with the i-th unit vector. All ``n`` products run as one batched
backward (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward);
where an operation has no batching rule this falls back to a plain loop of ``n`` backward calls.
Either way the cost is about ``n`` backward passes through the part of the graph that leads to the
requested parameters, and memory is ``n x (their parameter count)``.

Tied weights need no special care: autograd sums every use of a parameter.
Only ``torch.autograd.grad`` is used, so ``p.grad`` is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def per_example_grads(losses: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``[G_p]`` with ``G_p[i] = d losses[i] / d p`` (shape ``(n, *p.shape)``); unused params give zeros.

    The graph of ``losses`` is retained (the caller may still need it).
    """
    n = losses.shape[0]
    params = list(params)
    if not params:
        return []
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    grads: Sequence[Tensor | None]
    try:
        grads = torch.autograd.grad(
            losses,
            params,
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
    except RuntimeError:
        # An op without a vmap rule for its backward: loop over examples instead.
        rows: list[list[Tensor | None]] = []
        for i in range(n):
            rows.append(list(torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)))
        stacked = []
        for k, p in enumerate(params):
            per = [g if (g := r[k]) is not None else torch.zeros_like(p) for r in rows]
            stacked.append(torch.stack(per))
        grads = stacked
    return [
        torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if g is None else g.detach()
        for g, p in zip(grads, params, strict=True)
    ]
