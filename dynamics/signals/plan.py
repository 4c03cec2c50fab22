"""The plan: which path computes the per-example gradients ``g_i(p)`` of each chosen parameter.

1. ``factored``: every live call that uses ``p`` is a stock ``nn.Linear`` / ``nn.Embedding`` /
   ``nn.Conv1d/2d`` (or patch ``nn.Conv3d``) call on a batch-first input, or on rows of several
   examples (a *row-mapped* call, below); ``g_i`` is a sum over tokens (positions) of outer
   products (see :mod:`.products`);
2. ``elementwise``: every use of ``p`` is a product ``p * x``, a sum ``x + p`` or a copy
   ``expand(p)`` in the graph, broadcast into ``n`` rows (layer scales, gates, added position
   embeddings, class tokens; also of a tensor computed from ``p`` alone, such as T5's relative
   position bias), or every use is the right factor of a bare matrix product ``x @ p`` (factored
   like a Linear weight, its rows possibly row-mapped; :mod:`.elementwise_uses`), unless ``p``
   belongs to a normalisation layer with a closed-form rule (which stays on the module path);
3. ``module``: otherwise, the innermost captured module (the owner itself for norms,
   ``class_embedding`` and the like, or an ancestor, e.g. for an embedding applied to broadcast
   position ids) whose calls are batch-first and contain every use of ``p``; per-example gradients
   come from a closed form for normalisation layers (:mod:`.layer_rules`) or a vector-Jacobian
   product of that module alone (:mod:`.module_grads`);
4. ``exact``: per-example autograd through the whole model (:mod:`.gram_exact`).

"Every use of ``p``" is checked on the autograd graph, not assumed (:mod:`.graph`): the number of
graph edges into ``p``'s gradient accumulator reachable from the loss must equal the number found
inside the covering calls (each traversed from its outputs back to its inputs). A parameter used
anywhere else (a tied weight read directly by a parent module, a ``ParameterDict``) therefore fails
the check and moves down the list instead of getting a silently wrong gradient.

"Batch-first" means dimension 0 of the call's input and output tensors indexes the probe's examples
in order (inputs with another leading size are treated as shared by all examples). The shapes are
only the first test (:meth:`~.calls.ModuleCall.batch_first`); agreeing shapes can be a coincidence
(``n`` images that are not one per example, patches flattened across images), so the example axis
is then verified (:mod:`.example_axis`): :func:`~.backward.backward_to_outputs` checks that every
row of a captured output influences only its own example's loss, and the module path checks that
its per-example re-runs reproduce the recorded outputs. A parameter whose calls fail either check
goes to the exact path.

A factored call, or a call of a closed-form rule on the owner itself, that is not batch-first but
whose shapes fit its kind over flattened leading positions ("rows": Qwen2-VL's patches flattened
across images, Pixtral's one sequence of all images) is *row-mapped*: the weighted backward pass
discovers which example each row belongs to (:mod:`.row_map`; rows that reach no loss are
dropped), and the call fails like a non-local one when some row reaches several examples' losses,
or when ``n > 32`` (the check weights repeat). ``Plan.rows`` lists these calls. Module re-runs
(:mod:`.module_grads`) stay batch-first only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dynamics.signals.calls import ModuleCall
from dynamics.signals.capture import Capture
from dynamics.signals.elementwise_uses import ElementwiseUse, find_elementwise_uses
from dynamics.signals.graph import graph_edge_counts, node_parents
from dynamics.signals.layer_kinds import FACTORED_KINDS, contains_unsupported
from dynamics.signals.layer_rules import rule_kind
from dynamics.signals.row_map import row_count

NO_GRAD_MESSAGE = (
    "the probe loss does not depend on any parameter that requires grad; "
    "check `params` and that the model's parameters have requires_grad=True"
)


@dataclass
class Plan:
    """Which path covers each chosen parameter (see module docstring)."""

    factored: dict[int, list[ModuleCall]]  # param id -> its (Linear/Embedding/Conv) calls
    module: dict[int, tuple[nn.Module, list[Tensor]]]  # module id -> (module, params it covers)
    exact: list[Tensor]
    unused: list[Tensor]
    calls_needed: list[ModuleCall | ElementwiseUse]
    graph_size: int = 0  # autograd nodes reachable from the loss
    uses: tuple[int, ...] = ()  # graph edges into each chosen parameter, in order
    # id of each row-mapped call -> its number of rows (:mod:`.row_map`)
    rows: dict[int, int] = field(default_factory=dict)
    elementwise: dict[int, list[ElementwiseUse]] = field(default_factory=dict)  # param id -> its uses

    def live_calls(self, cap: Capture, module: nn.Module) -> list[ModuleCall]:
        return [c for c in cap.calls.get(id(module), []) if c.live]


def _uses(
    cap: Capture, loss_sum: Tensor
) -> tuple[dict[int, int], set[int], dict[int, list[tuple[Any, int]]]]:
    """Graph edges into each chosen parameter from the loss (by param id), the reachable nodes, and
    the ``(node, input index)`` of each edge into an accumulator of the parameter or an alias (by param id)."""
    if loss_sum.grad_fn is None:
        raise ValueError(NO_GRAD_MESSAGE)
    parents: dict[int, list[tuple[Any, int]]] = {}
    res = graph_edge_counts([loss_sum.grad_fn], cap.targets, set(), parents=parents)
    assert res is not None
    counts, reachable = res
    total: dict[int, int] = {}
    for tid, c in counts.items():
        pid = cap.canon.get(tid, tid)
        total[pid] = total.get(pid, 0) + c
    by_param: dict[int, list[tuple[Any, int]]] = {}
    for tid, edges in parents.items():  # FSDP2: edges into the unsharded alias count for the parameter
        by_param.setdefault(cap.canon.get(tid, tid), []).extend(edges)
    return total, reachable, by_param


def _covers(cap: Capture, calls: list[ModuleCall], p: Tensor, need: int, n: int, rows: bool = False) -> bool:
    """Whether ``calls`` are batch-first (or, with ``rows``, row-shaped), unchanged since, and hold all
    ``need`` uses of ``p``."""
    if not calls or not all(
        (c.batch_first(n) or (rows and row_count(c) is not None)) and c.inputs_unchanged() for c in calls
    ):
        return False
    got = 0
    for c in calls:
        counts = c.edge_counts(cap.targets, cap.canon)
        if counts is None:
            return False
        got += counts.get(id(p), 0)
    return got == need


def _covering_module(cap: Capture, p: Tensor, need: int, n: int, kinds: set[str]) -> nn.Module | None:
    """The innermost module (owner, then common ancestors) whose live calls cover every use of ``p``."""
    owners = cap.owners.get(id(p), [])
    candidates: list[nn.Module] = []
    if len(owners) == 1 and len(kinds) == 1 and not kinds & FACTORED_KINDS:
        candidates.append(owners[0])  # a rule or the generic vjp on the owner itself
    if owners:
        candidates += [a for a in cap.ancestors(owners[0]) if all(a in cap.ancestors(o) for o in owners[1:])]
    for m in candidates:
        if contains_unsupported(m):
            continue
        # rows of several examples only for a closed-form rule on the owner: a re-run cannot split them
        rows = len(owners) == 1 and m is owners[0] and rule_kind(m) is not None
        if _covers(cap, [c for c in cap.calls.get(id(m), []) if c.live], p, need, n, rows):
            return m
    return None


def _elementwise_uses(
    cap: Capture,
    p: Tensor,
    need: int,
    n: int,
    parents: dict[int, list[tuple[Any, int]]],
    first_key: int,
    parents_of: Callable[[Any], list[tuple[Any, int]]],
) -> list[ElementwiseUse] | None:
    """``p``'s elementwise uses when they are all of its ``need`` uses.

    Under FSDP2 the edges lead to the unsharded parameter the forward used (an alias of ``p``);
    FSDP1 hands modules views of a flat parameter, whose uses are not edges into an accumulator,
    so the count falls short and ``p`` takes another path.
    """
    edges = parents.get(id(p), [])
    if len(edges) != need:
        return None
    return find_elementwise_uses(edges, cap.shape(p), n, first_key, parents_of)


def plan(cap: Capture, loss_sum: Tensor, n: int, allow_fast: bool = True) -> Plan:
    """Assign every chosen parameter to the cheapest path whose coverage check passes."""
    total, reachable, parents = _uses(cap, loss_sum)
    for calls in cap.calls.values():
        for c in calls:
            c.live = any(id(e.node) in reachable for e in c.edges)
    pl = Plan({}, {}, [], [], [], len(reachable), tuple(total.get(id(p), 0) for p in cap.params))
    all_parents: dict[int, list[tuple[Any, int]]] | None = None

    def parents_of(node: Any) -> list[tuple[Any, int]]:  # a second walk, only for shared chains
        nonlocal all_parents
        if all_parents is None:
            all_parents = node_parents(loss_sum.grad_fn) or {}
        return all_parents.get(id(node), [])

    for p in cap.params:
        need = total.get(id(p), 0)
        if need == 0:
            pl.unused.append(p)
            continue
        if not allow_fast:
            pl.exact.append(p)
            continue
        owner_calls = [c for m in cap.owners.get(id(p), []) for c in pl.live_calls(cap, m)]
        kinds = {c.kind for c in owner_calls}
        if owner_calls and kinds <= FACTORED_KINDS and _covers(cap, owner_calls, p, need, n, rows=True):
            pl.factored[id(p)] = owner_calls
            continue
        m = _covering_module(cap, p, need, n, kinds)
        if m is None or not (rule_kind(m) and m in cap.owners.get(id(p), [])):
            first = sum(len(u) for u in pl.elementwise.values())
            uses = _elementwise_uses(cap, p, need, n, parents, first, parents_of)
            if uses is not None:
                pl.elementwise[id(p)] = uses
                continue
        if m is None:
            pl.exact.append(p)
        else:
            pl.module.setdefault(id(m), (m, []))[1].append(p)

    needed: dict[int, ModuleCall] = {}
    for calls in pl.factored.values():
        needed.update((id(c), c) for c in calls)
    for m, _ in pl.module.values():
        needed.update((id(c), c) for c in pl.live_calls(cap, m))
    pl.rows = {id(c): r for c in needed.values() if not c.batch_first(n) and (r := row_count(c)) is not None}
    pl.rows.update(
        (id(u), u.shape[0]) for uses in pl.elementwise.values() for u in uses if u.matmul and u.shape[0] != n
    )
    pl.calls_needed = [*needed.values(), *(u for uses in pl.elementwise.values() for u in uses)]
    return pl
