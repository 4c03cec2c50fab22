"""Parameters used as elementwise scales in the autograd graph: ``z = p * x`` with ``p`` broadcast.

Layer scales (InternVL's ``lambda_1 * attention_output``, ConvNeXt's ``gamma``), gates and the
weight of a hand-written norm are bare parameters multiplied into an activation, not arguments of
a layer the hooks can see. For such a use the per-example gradient has a closed form:

    g_i(p) = sum over the broadcast positions of (x ⊙ dz)_i,

with ``dz = d(sum_j l_j)/dz`` read at the multiplication's output (a gradient edge of the ``Mul``
node itself, so no module has to own it) and ``x`` the operand the node saved for ``p``'s
gradient. Row ``i`` of ``dz`` must belong to example ``i`` alone, which the example-axis check
verifies like any captured output (:mod:`.example_axis`): a use is a duck-typed call with one
gradient edge for :func:`~.backward.backward_to_outputs`. A parameter is covered only when every
graph edge into its gradient accumulator comes from such a node (the edge count of :mod:`.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_MUL_NODES = ("MulBackward0",)


@dataclass(eq=False)
class ScaleUse:
    """One ``z = p * x`` node: what :func:`~.backward.backward_to_outputs` reads of a call, and ``x``."""

    key: int  # position among the plan's scale uses: stable across equal graphs (:mod:`.cache_key`)
    x: Tensor  # the other operand, batch-first: (n, *S) with p broadcast over S's leading dims
    edges: list[Any]  # [GradientEdge of z]
    grad_idx: list[int] = field(default_factory=lambda: [0])
    dys: list[Tensor] = field(default_factory=list)
    row_map: Tensor | None = None

    @property
    def out_leaves(self) -> list[Tensor]:  # dz has the shape of x (checked when found)
        return [self.x]


def _operand(node: Any, k: int) -> Tensor | None:
    """The tensor ``node`` saved for the gradient of its input ``k`` (the other factor), if readable."""
    try:
        saved = node._saved_other if k == 0 else node._saved_self
    except RuntimeError:  # modified in place after the multiplication: nothing to read
        return None
    return saved if isinstance(saved, Tensor) else None


def find_scale_uses(
    uses: list[tuple[Any, int]], shape: torch.Size, n: int, first_key: int
) -> list[ScaleUse] | None:
    """Scale uses for a parameter of ``shape`` whose graph edges come from the ``(node, input)`` ``uses``.

    None unless every edge is an elementwise product with a batch-first operand ``x`` of ``n``
    rows that ``p`` broadcasts into without spanning the example axis (``broadcast(p, x) == x``).
    """
    found: list[ScaleUse] = []
    for node, k in uses:
        if type(node).__name__ not in _MUL_NODES or k not in (0, 1):
            return None
        x = _operand(node, k)
        if x is None or x.dim() < 1 or x.shape[0] != n or len(shape) >= x.dim() or not x.is_floating_point():
            return None
        try:
            if torch.broadcast_shapes(shape, x.shape) != x.shape:
                return None
        except RuntimeError:
            return None
        found.append(ScaleUse(first_key + len(found), x, [torch.autograd.graph.GradientEdge(node, 0)]))
    return found or None


def scale_per_example_grads(uses: list[ScaleUse], shape: torch.Size, n: int) -> Tensor:
    """``g_i(p)`` of shape ``(n, *shape)``: the sum over ``uses`` of ``x ⊙ dz`` reduced to ``p``'s shape."""
    total: Tensor | None = None
    for u in uses:
        dz = u.dys[0]
        dtype = torch.promote_types(torch.promote_types(u.x.dtype, dz.dtype), torch.float32)
        prod = u.x.detach().to(dtype) * dz.to(dtype)
        target = (n,) + (1,) * (prod.dim() - 1 - len(shape)) + tuple(shape)
        g = prod.sum_to_size(target).reshape(n, *shape)
        total = g if total is None else total + g
    assert total is not None
    return total
