"""One recorded call of a hooked module: its inputs, outputs, gradient edges and output gradients.

:class:`ModuleCall` is what the forward hooks of :mod:`.capture` record and what every per-layer
path reads (:mod:`.products`, :mod:`.layer_rules`, :mod:`.module_grads`, :mod:`.row_map`). The gradient edges
(``torch.autograd.graph.GradientEdge``) are taken at hook time, so a later in-place change of an
output (e.g. ``ReLU(inplace=True)``) cannot redirect its gradient; ``dys`` (and ``row_map`` for
a call that is not batch-first) are filled by the backward pass of :mod:`.backward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from dynamics.signals.graph import GRAPH_LIMIT, graph_edge_counts


@dataclass
class ModuleCall:
    """One recorded call of a hooked module.

    ``used`` maps the module's own parameter names to the tensors the call actually used: the
    registered parameters themselves, or, under FSDP, the unsharded parameters it swaps in for the
    forward (their graph edges are what the coverage check counts).
    """

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
    used: dict[str, Tensor] = field(default_factory=dict)
    live: bool = False
    dys: list[Tensor] = field(default_factory=list)
    # example of each row for a row-mapped call (:mod:`.row_map`), set with ``dys``; None: batch-first
    row_map: Tensor | None = None
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
            if self.kind in ("linear", "linear_t"):
                return x.dim() >= 2 and y.shape[:-1] == x.shape[:-1]
            if self.kind == "embedding":
                return y.shape[:-1] == x.shape
            if self.kind == "conv":
                kernel: Any = getattr(self.module, "kernel_size", ())
                want = 2 + len(kernel)
                return x.dim() == want and y.dim() == want and y.shape[1] == self.module.out_channels
            return y.shape == x.shape  # a normalisation keeps its input's shape
        return True

    def inputs_unchanged(self) -> bool:
        return all(t._version == v for t, v in self.in_versions)

    def output_unchanged(self, k: int) -> bool:
        """Whether output leaf ``k`` still holds the values the call returned (no in-place change since)."""
        t = self.out_leaves[k]
        return isinstance(t, Tensor) and t._version == self.out_versions[k]

    def edge_counts(self, targets: set[int], canon: dict[int, int]) -> dict[int, int] | None:
        """Graph edges into the accumulators of ``targets`` (tensor ids) inside this call (cached).

        Counts are keyed by ``canon.get(id, id)`` (the chosen parameter a tensor stands for). None
        when the traversal gave up (graph too large), which makes the coverage check fail.
        """
        if not self._counted:
            roots = [e.node for e in self.edges if id(e.node) not in self.boundary]
            res = graph_edge_counts(roots, targets, self.boundary, GRAPH_LIMIT)
            if res is None:
                self._counts = None
            else:
                counts: dict[int, int] = {}
                for tid, c in res[0].items():
                    key = canon.get(tid, tid)
                    counts[key] = counts.get(key, 0) + c
                self._counts = counts
            self._counted = True
        return self._counts


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


def tensor_leaves(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in flat_leaves(args) + flat_leaves(kwargs) if isinstance(t, Tensor)]
