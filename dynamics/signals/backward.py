"""The probe's backward passes: output gradients of the captured calls, and the check of their example axis.

For per-example losses ``l`` (n,), one backward pass of ``sum_i l_i`` to the recorded output edges
gives every captured call's ``dy = dL/dy`` (row ``i`` is ``d l_i / d y_i`` when row ``i`` belongs to
example ``i``). A second pass with the distinct weights of :func:`~.example_axis.check_weights`
verifies that (:func:`~.example_axis.rows_local`), or, for a row-mapped call (one whose dimension 0
is not the examples, :mod:`.row_map`), discovers which example each row belongs to from the same
two gradients. It is skipped when earlier verdicts (booleans or row maps) for the same inputs are
known (:mod:`.axis_cache`). The second pass judges each output's gradient as it reaches it and
lets it go (:func:`_weighted_pass`), so it adds no second set of output gradients to the first's.
Neither pass computes weight gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from dynamics.signals.axis_cache import Verdict
from dynamics.signals.calls import ModuleCall
from dynamics.signals.elementwise_uses import ElementwiseUse
from dynamics.signals.example_axis import check_weights, rows_local
from dynamics.signals.graph import ancestors
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
    users: dict[int, list[Call]] = {}
    for c in calls:
        for e in c.edges:
            users.setdefault(index[(id(e.node), e.output_nr)], []).append(c)
    local: dict[int, bool] = {}
    verdicts: dict[int, Verdict] = {}

    def judge(j: int, weighted: Tensor | None) -> None:
        for c in users[j]:
            if id(c) in rows:  # one gradient edge: the row-shaped kinds have a single output
                found = discover_row_map(weighted, grads[j], weights, rows[id(c)])
                verdicts[id(c)] = False if found is None else found
        if any(id(c) not in rows for c in users[j]):
            local[j] = rows_local(weighted, grads[j], weights)

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
        grads = tuple(None if g is None else g[1] for g in both)
        for j, g in enumerate(both):
            judge(j, None if g is None else g[0])
    else:
        grads = torch.autograd.grad(losses, edges, grad_outputs=ones, retain_graph=True, allow_unused=True)
        _weighted_pass(losses, calls, edges, index, weights, retain_graph, judge)
    for c in calls:
        if id(c) not in rows:
            verdicts[id(c)] = all(local[index[(id(e.node), e.output_nr)]] for e in c.edges)
        v = verdicts[id(c)]
        c.row_map = v if isinstance(v, Tensor) else None
        c.dys = _dys(c, grads, index)
    return {cid for cid, v in verdicts.items() if v is False}, verdicts


def _weighted_pass(
    losses: Tensor,
    calls: list[Call],
    edges: list[Any],
    index: dict[tuple[int, int], int],
    weights: Tensor,
    retain_graph: bool,
    judge: Callable[[int, Tensor | None], None],
) -> None:
    """The backward of ``sum_i w_i l_i``, each output gradient judged as soon as the pass reaches it.

    Asking autograd for every output edge would hold all their gradients until the pass ends: a
    second set of output gradients on top of the unit pass's, most of the first probe's extra
    memory. Instead only the edges with no other captured node below them (and the outputs that
    cannot take a tensor hook) are asked for; the pass must run through every other captured node
    to reach those, and a hook on its output tensor judges the gradient there and lets it go.
    """
    hookable: dict[int, Tensor] = {}
    for c in calls:
        if not isinstance(c, ModuleCall):
            continue  # an elementwise use has no output tensor of its own
        for k, e in zip(c.grad_idx, c.edges, strict=True):
            y = c.out_leaves[k]
            if c.output_unchanged(k) and _same_edge(get_gradient_edge(y), e):
                hookable[index[(id(e.node), e.output_nr)]] = y
    above = None if losses.grad_fn is None else ancestors(losses.grad_fn, {id(e.node) for e in edges})
    asked = [j for j, e in enumerate(edges) if j not in hookable or above is None or id(e.node) not in above]
    judged: set[int] = set()

    def hook(j: int, g: Tensor) -> None:
        judge(j, g)
        judged.add(j)

    handles = [hookable[j].register_hook(partial(hook, j)) for j in set(hookable) - set(asked)]
    try:
        got = torch.autograd.grad(
            losses,
            [edges[j] for j in asked],
            grad_outputs=weights,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    finally:
        for h in handles:
            h.remove()
    for j, g in zip(asked, got, strict=True):
        judge(j, g)
        judged.add(j)
    for j in set(range(len(edges))) - judged:
        judge(j, None)  # the pass never reached it: a zero gradient


def _same_edge(a: Any, b: Any) -> bool:
    return a.node is b.node and a.output_nr == b.output_nr


def _dys(c: Call, grads: tuple, index: dict[tuple[int, int], int]) -> list[Tensor]:
    out = []
    for k, e in zip(c.grad_idx, c.edges, strict=True):
        g = grads[index[(id(e.node), e.output_nr)]]
        out.append(torch.zeros_like(c.out_leaves[k]) if g is None else g)
    return out
