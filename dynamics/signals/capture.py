"""Capture of layer inputs and output gradients, and the plan of which path covers each parameter.

During the probe's single forward pass, forward hooks record every call of the modules that own a
chosen parameter directly, and of their ancestors: the call's inputs, its output tensors and the
autograd *gradient edge* of each output (taken at hook time, so a later in-place change of the
output, e.g. ``ReLU(inplace=True)``, cannot redirect its gradient). One backward pass of
``L = sum_i l_i`` to those edges then yields, for every captured call, ``dy = dL/dy``, whose row
``i`` equals ``d l_i / d y_i`` when row ``i`` belongs to example ``i`` (examples do not interact: the
probe runs in eval mode); a second, weighted backward pass checks exactly that (see below).

Which path computes ``g_i(p)`` for a chosen parameter ``p`` (:func:`plan`):

1. ``factored``: every live call that uses ``p`` is a stock ``nn.Linear`` / ``nn.Embedding`` /
   ``nn.Conv1d/2d`` call on a batch-first input; ``g_i`` is a sum over tokens (positions) of outer
   products (see :mod:`.products`);
2. ``module``: otherwise, the innermost captured module (the owner itself for norms,
   ``class_embedding`` and the like, or an ancestor, e.g. for an embedding applied to broadcast
   position ids) whose calls are batch-first and contain every use of ``p``; per-example gradients
   come from a closed form for normalisation layers (:mod:`.layer_rules`) or a vector-Jacobian
   product of that module alone (:mod:`.module_grads`);
3. ``exact``: per-example autograd through the whole model (:mod:`.gram_exact`).

"Every use of ``p``" is checked on the autograd graph, not assumed: the number of graph edges into
``p``'s gradient accumulator reachable from the loss must equal the number found inside the
covering calls (each traversed from its outputs back to its inputs). A parameter used anywhere
else (a tied weight read directly by a parent module, a ``ParameterDict``) therefore fails the
check and moves down the list instead of getting a silently wrong gradient.

"Batch-first" means dimension 0 of the call's input and output tensors indexes the probe's examples
in order (inputs with another leading size are treated as shared by all examples). The shapes are
only the first test (:meth:`ModuleCall.batch_first`: ``n`` rows in dimension 0, and for the factored
and closed-form kinds outputs whose shape agrees with the input's); agreeing shapes can be a
coincidence (``n`` images that are not one per example, patches flattened across images), so the
example axis is then verified (:mod:`.example_axis`): :func:`backward_to_outputs` checks that every
row of a captured output influences only its own example's loss, and the module path checks that
its per-example re-runs reproduce the recorded outputs. A parameter whose calls fail either check
goes to the exact path.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynamics.signals.example_axis import check_weights, rows_local
from dynamics.signals.layer_rules import rule_kind

_GRAPH_LIMIT = 2_000_000  # nodes; a local traversal longer than this gives up (-> next path)


FACTORED_KINDS = frozenset({"linear", "embedding", "conv"})


def module_kind(module: nn.Module) -> str:
    """How the fast path treats a module's own parameters.

    ``"linear"``, ``"embedding"``, ``"conv"`` (factored, :mod:`.products`): stock ``nn.Linear``,
    ``nn.Embedding`` (no max-norm renormalisation, no frequency scaling) and ``nn.Conv1d/2d``
    (zero padding, one group); a closed-form rule of :mod:`.layer_rules` (``"layernorm"``,
    ``"groupnorm"``, ``"rmsnorm"``, ``"llama_rmsnorm"``); ``"generic"`` (module-local vjp);
    ``"unsupported"`` (never re-run: an embedding that renormalises its weight in place).
    """
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return "embedding"
        return "unsupported"  # renorm writes into the weight; frequency scaling couples examples
    if (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and forward in (nn.Conv1d.forward, nn.Conv2d.forward)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    return rule_kind(module) or "generic"


@dataclass
class ModuleCall:
    """One recorded call of a hooked module."""

    module: nn.Module
    kind: str
    args: tuple
    kwargs: dict
    out_leaves: list[Any]
    grad_idx: list[int]  # indices into out_leaves of tensors with a gradient edge
    edges: list[Any]  # torch.autograd.graph.GradientEdge per grad_idx entry
    in_versions: list[tuple[Tensor, int]]
    boundary: set[int]  # ids of the grad_fn nodes of the inputs
    out_versions: list[int] = field(default_factory=list)  # per leaf, at hook time (-1: not a tensor)
    live: bool = False
    dys: list[Tensor] = field(default_factory=list)
    _counts: dict[int, int] | None = None
    _counted: bool = False

    def main_input(self) -> Any:
        return self.args[0] if self.args else next(iter(self.kwargs.values()), None)

    def batch_first(self, n: int) -> bool:
        """Shapes say dimension 0 indexes the ``n`` examples (verified later, see :mod:`.example_axis`).

        Outputs with gradient have ``n`` rows; for the factored and closed-form kinds the main input
        has ``n`` rows too and the output's shape is the one the layer gives that input, so the
        products (which split both along dimension 0) cannot be handed inconsistent shapes.
        """
        outs = [self.out_leaves[k] for k in self.grad_idx]
        if any(out.dim() == 0 or out.shape[0] != n for out in outs):
            return False
        if self.kind not in ("generic", "unsupported"):
            x = self.main_input()
            if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != n or len(outs) != 1:
                return False
            y = outs[0]
            if self.kind == "linear":
                return x.dim() >= 2 and y.shape[:-1] == x.shape[:-1]
            if self.kind == "embedding":
                return y.shape[:-1] == x.shape
            if self.kind == "conv":
                want = 3 if isinstance(self.module, nn.Conv1d) else 4
                return x.dim() == want and y.dim() == want and y.shape[1] == self.module.out_channels
            return y.shape == x.shape  # a normalisation keeps its input's shape
        return True

    def inputs_unchanged(self) -> bool:
        return all(t._version == v for t, v in self.in_versions)

    def output_unchanged(self, k: int) -> bool:
        """Whether output leaf ``k`` still holds the values the call returned (no in-place change since)."""
        t = self.out_leaves[k]
        return isinstance(t, Tensor) and t._version == self.out_versions[k]

    def edge_counts(self, targets: set[int]) -> dict[int, int] | None:
        """Graph edges into the accumulators of ``targets`` (param ids) inside this call (cached).

        None when the traversal gave up (graph too large), which makes the coverage check fail.
        """
        if not self._counted:
            roots = [e.node for e in self.edges if id(e.node) not in self.boundary]
            res = graph_edge_counts(roots, targets, self.boundary, _GRAPH_LIMIT)
            self._counts = None if res is None else res[0]
            self._counted = True
        return self._counts


def _contains_unsupported(module: nn.Module) -> bool:
    """Re-running such a module would renormalise an embedding weight in place: never do that."""
    return any(module_kind(m) == "unsupported" for m in module.modules())


def graph_edge_counts(
    roots: list[Any], targets: set[int], stop: set[int], limit: int | None = None
) -> tuple[dict[int, int], set[int]] | None:
    """Count graph edges into ``AccumulateGrad`` nodes of the parameters in ``targets``.

    Walks ``next_functions`` from ``roots`` (each node once), not entering nodes whose id is in
    ``stop``. Returns ``(counts by id(param), ids of visited nodes)``, or None past ``limit`` nodes.
    """
    counts: dict[int, int] = defaultdict(int)
    seen: dict[int, Any] = {}  # holds the node objects so that their ids stay unique
    stack = []
    for r in roots:
        if r is not None and id(r) not in seen:
            seen[id(r)] = r
            stack.append(r)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt).__name__ == "AccumulateGrad":
                pid = id(nxt.variable)
                if pid in targets:
                    counts[pid] += 1
                continue
            key = id(nxt)
            if key in stop or key in seen:
                continue
            seen[key] = nxt
            stack.append(nxt)
            if limit is not None and len(seen) > limit:
                return None
    return dict(counts), set(seen)


def flat_leaves(tree: Any) -> list[Any]:
    """Leaves of nested tuples / lists / dicts (ModelOutput included), in order; fast for hooks.

    The same function flattens a call's outputs at hook time and after a re-run, so leaf
    indices agree.
    """
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        out = []
        for t in tree:
            out.extend(flat_leaves(t))
        return out
    if isinstance(tree, dict):
        out = []
        for t in tree.values():
            out.extend(flat_leaves(t))
        return out
    return [tree]


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in flat_leaves(args) + flat_leaves(kwargs) if isinstance(t, Tensor)]


class Capture:
    """Forward hooks on the owners of ``params`` and their ancestors; use as a context manager."""

    def __init__(self, model: nn.Module, params: list[Tensor]):
        self.model = model
        self.params = params
        self.pids = {id(p) for p in params}
        self.calls: dict[int, list[ModuleCall]] = defaultdict(list)
        self.owners: dict[int, list[nn.Module]] = defaultdict(list)
        self.parent: dict[int, nn.Module] = {}
        self.names: dict[int, dict[int, str]] = {}  # module id -> {param id: name relative to it}
        self._handles: list[Any] = []
        for m in model.modules():
            for child in m.children():
                self.parent.setdefault(id(child), m)
            for p in m._parameters.values():
                if p is not None and id(p) in self.pids and m not in self.owners[id(p)]:
                    self.owners[id(p)].append(m)
        hooked: dict[int, nn.Module] = {}
        for mods in self.owners.values():
            for m in mods:
                while m is not None and id(m) not in hooked:
                    hooked[id(m)] = m
                    m = self.parent.get(id(m))
        self.hooked = hooked

    def __enter__(self) -> Capture:
        for m in self.hooked.values():
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        leaves = flat_leaves(output)
        grad_idx, edges = [], []
        for k, t in enumerate(leaves):
            if isinstance(t, Tensor) and t.requires_grad and t.grad_fn is not None:
                grad_idx.append(k)
                edges.append(torch.autograd.graph.get_gradient_edge(t))
        if not edges:
            return
        ins = _tensors(args, kwargs)
        self.calls[id(module)].append(
            ModuleCall(
                module=module,
                kind=module_kind(module),
                args=args,
                kwargs=kwargs,
                out_leaves=leaves,
                grad_idx=grad_idx,
                edges=edges,
                in_versions=[(t, t._version) for t in ins],
                boundary={id(t.grad_fn) for t in ins if t.grad_fn is not None},
                out_versions=[t._version if isinstance(t, Tensor) else -1 for t in leaves],
            )
        )

    def ancestors(self, module: nn.Module) -> list[nn.Module]:
        out = []
        m = self.parent.get(id(module))
        while m is not None:
            out.append(m)
            m = self.parent.get(id(m))
        return out

    def param_name(self, module: nn.Module, p: Tensor) -> str:
        """Name of ``p`` relative to ``module`` (for ``functional_call``)."""
        table = self.names.get(id(module))
        if table is None:
            table = {}
            for name, q in module.named_parameters(remove_duplicate=False):
                table.setdefault(id(q), name)
            self.names[id(module)] = table
        return table[id(p)]


@dataclass
class Plan:
    """Which path covers each chosen parameter (see module docstring)."""

    factored: dict[int, list[ModuleCall]]  # param id -> its (Linear/Embedding) calls
    module: dict[int, tuple[nn.Module, list[Tensor]]]  # module id -> (module, params it covers)
    exact: list[Tensor]
    unused: list[Tensor]
    calls_needed: list[ModuleCall]
    graph_size: int = 0  # autograd nodes reachable from the loss
    uses: tuple[int, ...] = ()  # graph edges into each chosen parameter, in order


def plan(cap: Capture, loss_sum: Tensor, n: int, allow_fast: bool = True) -> Plan:
    """Assign every chosen parameter to the cheapest path whose coverage check passes."""
    if loss_sum.grad_fn is None:
        raise ValueError(
            "the probe loss does not depend on any parameter that requires grad; "
            "check `params` and that the model's parameters have requires_grad=True"
        )
    res = graph_edge_counts([loss_sum.grad_fn], cap.pids, set())
    assert res is not None
    total, reachable = res
    for calls in cap.calls.values():
        for c in calls:
            c.live = any(id(e.node) in reachable for e in c.edges)

    factored: dict[int, list[ModuleCall]] = {}
    module: dict[int, tuple[nn.Module, list[Tensor]]] = {}
    exact: list[Tensor] = []
    unused: list[Tensor] = []

    def live_calls(m: nn.Module) -> list[ModuleCall]:
        return [c for c in cap.calls.get(id(m), []) if c.live]

    def covers(calls: list[ModuleCall], p: Tensor, need: int) -> bool:
        if not calls or not all(c.batch_first(n) and c.inputs_unchanged() for c in calls):
            return False
        got = 0
        for c in calls:
            counts = c.edge_counts(cap.pids)
            if counts is None:
                return False
            got += counts.get(id(p), 0)
        return got == need

    for p in cap.params:
        need = total.get(id(p), 0)
        if need == 0:
            unused.append(p)
            continue
        if not allow_fast:
            exact.append(p)
            continue
        owners = cap.owners.get(id(p), [])
        owner_calls = [c for m in owners for c in live_calls(m)]
        kinds = {c.kind for c in owner_calls}
        if owner_calls and kinds <= FACTORED_KINDS and covers(owner_calls, p, need):
            factored[id(p)] = owner_calls
            continue
        candidates: list[nn.Module] = []
        if len(owners) == 1 and len(kinds) == 1 and not kinds & FACTORED_KINDS:
            candidates.append(owners[0])  # a rule or the generic vjp on the owner itself
        if owners:
            common = [a for a in cap.ancestors(owners[0]) if all(a in cap.ancestors(o) for o in owners[1:])]
            candidates += common
        for m in candidates:
            if _contains_unsupported(m):
                continue
            calls = live_calls(m)
            if covers(calls, p, need):
                module.setdefault(id(m), (m, []))[1].append(p)
                break
        else:
            exact.append(p)

    needed: dict[int, ModuleCall] = {}
    for calls in factored.values():
        for c in calls:
            needed[id(c)] = c
    for m, _ in module.values():
        for c in live_calls(m):
            needed[id(c)] = c
    uses = tuple(total.get(id(p), 0) for p in cap.params)
    return Plan(factored, module, exact, unused, list(needed.values()), len(reachable), uses)


def _signature(t: Any) -> Any:
    return (tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else None


def forward_structure(cap: Capture, pl: Plan) -> tuple[Any, dict[int, nn.Module]]:
    """What the captured forward did, for :mod:`.axis_cache`: per hooked module its calls' shapes.

    Returns a hashable description (each call's input and output shapes and dtypes, whether it
    reaches the loss, the loss graph's size and each parameter's number of uses) and the hooked
    modules by id. Two forwards with equal descriptions ran the same code path on the same shapes.
    """
    per_module = []
    for mid, m in cap.hooked.items():
        calls = tuple(
            (
                tuple(_signature(t) for t, _ in c.in_versions),
                tuple(_signature(c.out_leaves[k]) for k in c.grad_idx),
                c.live,
            )
            for c in cap.calls.get(mid, [])
        )
        per_module.append((mid, type(m), calls))
    return (tuple(per_module), pl.graph_size, pl.uses), dict(cap.hooked)


def call_key(call: ModuleCall, cap: Capture) -> tuple[int, int]:
    """``(id(module), index of the call among that module's calls)``: stable across equal structures."""
    calls = cap.calls[id(call.module)]
    for i, c in enumerate(calls):
        if c is call:
            return (id(call.module), i)
    raise KeyError("call not captured")


def backward_to_outputs(
    losses: Tensor,
    calls: list[ModuleCall],
    retain_graph: bool,
    known: dict[int, bool] | None = None,
) -> tuple[set[int], dict[int, bool] | None]:
    """Output gradients ``dy = d(sum_i l_i)/dy`` of the calls (``call.dys``, zeros if unused) and their check.

    Backward passes of the per-example ``losses`` (n,) to the recorded output edges: the check
    weights of :func:`~.example_axis.check_weights`, then weights 1; each call's verdict is whether
    every row of its outputs influences only its own example's loss
    (:func:`~.example_axis.rows_local`). ``known`` maps ``id(call)`` to a verdict reused from an
    earlier probe of the same inputs (:mod:`.axis_cache`): when it covers every call, the weighted
    pass is skipped. Returns the ids of the calls that are not per-example, and the verdicts
    computed here (None when all were known). The graph is retained after the last pass only if
    ``retain_graph``.
    """
    if not calls:
        return set(), None
    index: dict[tuple[int, int], int] = {}
    edges = []
    for c in calls:
        for e in c.edges:
            key = (id(e.node), e.output_nr)
            if key not in index:
                index[key] = len(edges)
                edges.append(e)
    if known is not None and all(id(c) in known for c in calls):
        grads = torch.autograd.grad(
            losses, edges, grad_outputs=torch.ones_like(losses), retain_graph=retain_graph, allow_unused=True
        )
        for c in calls:
            c.dys = _dys(c, grads, index)
        return {id(c) for c in calls if not known[id(c)]}, None
    weights = check_weights(losses.shape[0], losses.detach())
    weighted = list(
        torch.autograd.grad(losses, edges, grad_outputs=weights, retain_graph=True, allow_unused=True)
    )
    grads = torch.autograd.grad(
        losses, edges, grad_outputs=torch.ones_like(losses), retain_graph=retain_graph, allow_unused=True
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
