"""The probe's backward passes: output gradients of the captured calls, and the check of their example axis.

For per-example losses ``l`` (n,), one backward pass of ``sum_i l_i`` to the recorded output edges
gives every captured call's ``dy = dL/dy`` (row ``i`` is ``d l_i / d y_i`` when row ``i`` belongs to
example ``i``). A second pass with the distinct weights of :func:`~.example_axis.check_weights`
verifies that (:func:`~.example_axis.rows_local`), or, for a row-mapped call (one whose dimension 0
is not the examples, :mod:`.row_map`), discovers which example each row belongs to from the same
two gradients. It is skipped when earlier verdicts (booleans or row maps) for the same inputs are
known (:mod:`.axis_cache`). Neither pass computes weight gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dynamics.signals.axis_cache import Verdict
from dynamics.signals.calls import ModuleCall
from dynamics.signals.elementwise_uses import ElementwiseUse
from dynamics.signals.example_axis import check_weights, rows_local
from dynamics.signals.row_map import discover_row_map

# What the passes read of either: edges, grad_idx, out_leaves, dys, row_map.
Call = ModuleCall | ElementwiseUse


def _edge_index(calls: list[Call]) -> tuple[dict[tuple[int, int], int], list[Any]]:
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
    calls: list[Call],
    retain_graph: bool,
    known: dict[int, Verdict] | None = None,
    one_pass: bool = False,
    rows: dict[int, int] | None = None,
) -> tuple[set[int], dict[int, Verdict] | None]:
    """Output gradients ``dy = d(sum_i l_i)/dy`` of the calls (``call.dys``, zeros if unused) and their check.

    ``rows`` maps ``id(call)`` to the number of rows of each row-mapped call (:mod:`.row_map`): its
    verdict is the discovered row -> example map (also set as ``call.row_map``) or False; every
    other call's verdict is whether its rows are local. ``known`` maps ``id(call)`` to a verdict
    reused from an earlier probe of the same inputs: when it covers every call, the weighted pass
    is skipped. Returns the ids of the calls that failed, and the verdicts computed here (None
    when all were known). The graph is retained after the last pass only if ``retain_graph``.
    ``one_pass`` runs both weightings in one batched backward (``is_grads_batched``), for models
    whose hooks allow one backward per forward.
    """
    if not calls:
        return set(), None
    rows = rows or {}
    index, edges = _edge_index(calls)
    ones = torch.ones_like(losses)
    if known is not None and all(id(c) in known for c in calls):
        grads = torch.autograd.grad(
            losses, edges, grad_outputs=ones, retain_graph=retain_graph, allow_unused=True
        )
        for c in calls:
            c.dys = _dys(c, grads, index)
            v = known[id(c)]
            c.row_map = v if isinstance(v, Tensor) else None
        return {id(c) for c in calls if known[id(c)] is False}, None
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
    users: dict[int, list[Call]] = {}
    for c in calls:
        for e in c.edges:
            users.setdefault(index[(id(e.node), e.output_nr)], []).append(c)
    local: dict[int, bool] = {}
    verdicts: dict[int, Verdict] = {}
    for j in range(len(edges)):
        for c in users[j]:
            if id(c) in rows:  # one gradient edge: the row-shaped kinds have a single output
                found = discover_row_map(weighted[j], grads[j], weights, rows[id(c)])
                verdicts[id(c)] = False if found is None else found
        if any(id(c) not in rows for c in users[j]):
            local[j] = rows_local(weighted[j], grads[j], weights)
        weighted[j] = None  # free each weighted gradient once checked
    for c in calls:
        if id(c) not in rows:
            verdicts[id(c)] = all(local[index[(id(e.node), e.output_nr)]] for e in c.edges)
        v = verdicts[id(c)]
        c.row_map = v if isinstance(v, Tensor) else None
        c.dys = _dys(c, grads, index)
    return {cid for cid, v in verdicts.items() if v is False}, verdicts


def _dys(c: Call, grads: tuple, index: dict[tuple[int, int], int]) -> list[Tensor]:
    out = []
    for k, e in zip(c.grad_idx, c.edges, strict=True):
        g = grads[index[(id(e.node), e.output_nr)]]
        out.append(torch.zeros_like(c.out_leaves[k]) if g is None else g)
    return out
