"""Parameters used elementwise in the autograd graph: ``p * x``, ``x + p`` or ``p.expand(...)``.

Layer scales (InternVL's ``lambda_1 * attention_output``, ConvNeXt's ``gamma``), gates, the weight
of a hand-written norm, learned position embeddings added to the patches and class tokens expanded
over the batch are bare parameters broadcast into an activation ``z`` of ``n`` rows, not arguments
of a layer the hooks can see. For such a use the per-example gradient has a closed form,

    g_i(p) = sum over the broadcast positions of (x ⊙ dz)_i   (product z = p * x)
    g_i(p) = sum over the broadcast positions of dz_i         (sum z = x + p, copy z = expand(p)),

with ``dz = d(sum_j l_j)/dz`` read at the node's output (a gradient edge of the ``Mul`` / ``Add`` /
``Expand`` node itself, so no module has to own it) and ``x`` the operand the product saved for
``p``'s gradient. Row ``i`` of ``dz`` must belong to example ``i`` alone, which the example-axis
check verifies like any captured output (:mod:`.example_axis`): a use is a duck-typed call with one
gradient edge for :func:`~.backward.backward_to_outputs`. A parameter is covered only when every
graph edge into its gradient accumulator comes from such a node (the edge count of :mod:`.plan`).
The output shape of an ``Add`` or ``Expand`` node is read from the node's input metadata (a
private attribute of PyTorch's autograd nodes: without it these uses are not recognised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_KINDS = {"MulBackward0": "mul", "AddBackward0": "add", "ExpandBackward0": "expand"}


@dataclass(eq=False)
class ElementwiseUse:
    """One node ``z = p * x``, ``x + p`` or ``expand(p)``: what :func:`~.backward.backward_to_outputs`
    reads of a call, and the product's other operand ``x``."""

    key: int  # position among the plan's uses: stable across equal graphs (:mod:`.cache_key`)
    shape: tuple[int, ...]  # of z: (n, *S), p broadcast over the examples and S's leading dims
    dtype: torch.dtype
    device: torch.device
    edges: list[Any]  # [GradientEdge of z]
    x: Tensor | None = None  # a product's other operand (shape of z); None for a sum or a copy
    grad_idx: list[int] = field(default_factory=lambda: [0])
    dys: list[Tensor] = field(default_factory=list)
    row_map: Tensor | None = None

    @property
    def out_leaves(self) -> list[Tensor]:  # stands for z where a zero gradient is made
        return [torch.empty(self.shape, dtype=self.dtype, device=self.device)]


def _operand(node: Any, k: int) -> Tensor | None:
    """The tensor a product node saved for the gradient of its input ``k`` (the other factor), if readable."""
    try:
        saved = node._saved_other if k == 0 else node._saved_self
    except RuntimeError:  # modified in place after the multiplication: nothing to read
        return None
    return saved if isinstance(saved, Tensor) else None


def _output_meta(node: Any) -> tuple[tuple[int, ...], torch.dtype, torch.device] | None:
    try:
        meta = node._input_metadata[0]
        return tuple(meta.shape), meta.dtype, meta.device
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _broadcasts_into(p_shape: torch.Size, z_shape: tuple[int, ...], n: int) -> bool:
    """Whether ``p`` broadcasts into ``z`` (n rows) without spanning its example axis."""
    if len(z_shape) < 1 or z_shape[0] != n or len(p_shape) > len(z_shape):
        return False
    if len(p_shape) == len(z_shape) and p_shape[0] != 1:
        return False
    try:
        return tuple(torch.broadcast_shapes(p_shape, z_shape)) == tuple(z_shape)
    except RuntimeError:
        return False


def _use(node: Any, k: int, p_shape: torch.Size, n: int, key: int) -> ElementwiseUse | None:
    kind = _KINDS.get(type(node).__name__)
    edge = [torch.autograd.graph.GradientEdge(node, 0)]
    if kind == "mul" and k in (0, 1):
        x = _operand(node, k)
        if x is None or not x.is_floating_point() or not _broadcasts_into(p_shape, tuple(x.shape), n):
            return None
        return ElementwiseUse(key, tuple(x.shape), x.dtype, x.device, edge, x)
    if kind == "add" and getattr(node, "_saved_alpha", None) != 1:
        return None  # x + alpha * p scales p's gradient: not handled
    if kind in ("add", "expand") and (k in (0, 1) if kind == "add" else k == 0):
        meta = _output_meta(node)
        if meta is None or not _broadcasts_into(p_shape, meta[0], n):
            return None
        return ElementwiseUse(key, *meta, edge)
    return None


def find_elementwise_uses(
    uses: list[tuple[Any, int]], shape: torch.Size, n: int, first_key: int
) -> list[ElementwiseUse] | None:
    """Elementwise uses for a parameter of ``shape`` whose graph edges come from the ``(node, input)``
    ``uses``; None unless every one is a product, a sum or a copy broadcast into ``n`` rows."""
    found: list[ElementwiseUse] = []
    for node, k in uses:
        use = _use(node, k, shape, n, first_key + len(found))
        if use is None:
            return None
        found.append(use)
    return found or None


def elementwise_per_example_grads(uses: list[ElementwiseUse], shape: torch.Size, n: int) -> Tensor:
    """``g_i(p)`` of shape ``(n, *shape)``: the sum over ``uses`` of ``x ⊙ dz`` (or ``dz``) reduced to ``p``."""
    total: Tensor | None = None
    for u in uses:
        dz = u.dys[0]
        dtype = torch.promote_types(dz.dtype, torch.float32)
        term = dz.to(dtype)
        if u.x is not None:
            term = u.x.detach().to(torch.promote_types(u.x.dtype, dtype)) * term
        lead = shape[1:] if len(shape) == term.dim() else (1,) * (term.dim() - 1 - len(shape)) + tuple(shape)
        g = term.sum_to_size((n, *lead)).reshape(n, *shape)
        total = g if total is None else total + g
    assert total is not None
    return total
