"""The probe's backward passes: output gradients of the captured calls, and the check of their example axis.

For per-example losses ``l`` (n,), one backward pass of ``sum_i l_i`` to the recorded output edges
gives every captured call's ``dy = dL/dy`` (row ``i`` is ``d l_i / d y_i`` when row ``i`` belongs to
example ``i``). A second pass with the distinct weights of :func:`~.example_axis.check_weights`
verifies that (:func:`~.example_axis.rows_local`); it is skipped when earlier verdicts for the same
inputs are known (:mod:`.axis_cache`). Neither pass computes weight gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dynamics.signals.calls import ModuleCall
from dynamics.signals.example_axis import check_weights, rows_local


def _edge_index(calls: list[ModuleCall]) -> tuple[dict[tuple[int, int], int], list[Any]]:
    """The distinct output edges of ``calls`` (a call and its parent may share one)."""
    index: dict[tuple[int, int], int] = {}
    edges: list[Any] = []
    for c in calls:
        for e in c.edges:
            key = (id(e.node), e.output_nr)
            if key not in index:
                index[key] = len(edges)
                edges.append(e)
    return index, edges


def backward_to_outputs(
    losses: Tensor,
    calls: list[ModuleCall],
    retain_graph: bool,
    known: dict[int, bool] | None = None,
    one_pass: bool = False,
) -> tuple[set[int], dict[int, bool] | None]:
    """Output gradients ``dy = d(sum_i l_i)/dy`` of the calls (``call.dys``, zeros if unused) and their check.

    ``known`` maps ``id(call)`` to a verdict reused from an earlier probe of the same inputs: when
    it covers every call, the weighted pass is skipped. Returns the ids of the calls that are not
    per-example, and the verdicts computed here (None when all were known). The graph is retained
    after the last pass only if ``retain_graph``. ``one_pass`` runs both weightings in one batched
    backward (``is_grads_batched``), for models whose hooks allow one backward per forward.
    """
    if not calls:
        return set(), None
    index, edges = _edge_index(calls)
    ones = torch.ones_like(losses)
    if known is not None and all(id(c) in known for c in calls):
        grads = torch.autograd.grad(
            losses, edges, grad_outputs=ones, retain_graph=retain_graph, allow_unused=True
        )
        for c in calls:
            c.dys = _dys(c, grads, index)
        return {id(c) for c in calls if not known[id(c)]}, None
    weights = check_weights(losses.shape[0], losses.detach())
    weighted: list[Tensor | None]
    if one_pass:
        # FSDP1 frees the unsharded parameters after the first backward and re-gathers them only
        # once per forward, so both weightings run in one (batched) backward pass.
        both = torch.autograd.grad(
            losses,
            edges,
            grad_outputs=torch.stack([weights, ones]),
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        weighted = [None if g is None else g[0] for g in both]
        grads = tuple(None if g is None else g[1] for g in both)
    else:
        weighted = list(
            torch.autograd.grad(losses, edges, grad_outputs=weights, retain_graph=True, allow_unused=True)
        )
        grads = torch.autograd.grad(
            losses, edges, grad_outputs=ones, retain_graph=retain_graph, allow_unused=True
        )
    local: dict[int, bool] = {}
    for j in range(len(edges)):
        local[j] = rows_local(weighted[j], grads[j], weights)
        weighted[j] = None  # free each weighted gradient once checked
    verdicts: dict[int, bool] = {}
    for c in calls:
        verdicts[id(c)] = all(local[index[(id(e.node), e.output_nr)]] for e in c.edges)
        c.dys = _dys(c, grads, index)
    return {cid for cid, ok in verdicts.items() if not ok}, verdicts


def _dys(c: ModuleCall, grads: tuple, index: dict[tuple[int, int], int]) -> list[Tensor]:
    out = []
    for k, e in zip(c.grad_idx, c.edges, strict=True):
        g = grads[index[(id(e.node), e.output_nr)]]
        out.append(torch.zeros_like(c.out_leaves[k]) if g is None else g)
    return out
