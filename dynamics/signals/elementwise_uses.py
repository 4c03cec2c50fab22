"""Parameters used elementwise in the autograd graph: ``p * x``, ``x + p``, ``p.expand(...)``, ``where(c, p, y)``.

Layer scales (InternVL's ``lambda_1 * attention_output``, ConvNeXt's ``gamma``), gates, the weight
of a hand-written norm, learned position embeddings added to the patches and class tokens expanded
over the batch are bare parameters broadcast into an activation ``z`` of ``n`` rows, not arguments
of a layer the hooks can see. For such a use the per-example gradient has a closed form,

    g_i(p) = sum over the broadcast positions of (x ⊙ dz)_i   (product z = p * x; a selection
                                                               z = where(c, p, y) has x = c)
    g_i(p) = sum over the broadcast positions of dz_i         (sum z = x + p, copy z = expand(p)),

with ``dz = d(sum_j l_j)/dz`` read at the node's output (a gradient edge of the ``Mul`` / ``Add`` /
``Expand`` node itself, so no module has to own it) and ``x`` the operand the product saved for
``p``'s gradient. Row ``i`` of ``dz`` must belong to example ``i`` alone, which the example-axis
check verifies like any captured output (:mod:`.example_axis`): a use is a duck-typed call with one
gradient edge for :func:`~.backward.backward_to_outputs`. A parameter is covered only when every
graph edge into its gradient accumulator comes from such a node (the edge count of :mod:`.plan`).
The output shape of an ``Add`` or ``Expand`` node is read from the node's input metadata (a
private attribute of PyTorch's autograd nodes: without it these uses are not recognised).

Matrix products. A parameter ``W`` (in, out) used as the right factor of ``z = x @ W`` (a bare
``torch.matmul``, ``mm`` or ``addmm(b, x, W)``, e.g. Gemma 3's projector matrix) has
``g_i(W) = sum over example i's rows r of x_r^T dz_r``: a factored term like a Linear layer's,
handed to the same products (:mod:`.products`). The product's rows (``x`` flattened to ``R`` rows,
the node's saved input) are mapped to examples by the weighted backward pass like any row-mapped
call (:mod:`.row_map`, which needs ``n <= 32`` unless ``R = n``).

Shared chains. The broadcast operand may also be a tensor computed from ``p`` alone, the same for
every example: T5's relative position bias ``s = unsqueeze(permute(embedding(buckets, p)))`` added
to every layer's attention scores, a position table interpolated to the input's size or passed
through a gate. Then ``s = f(p)`` with every node of the chain
``f`` taking one differentiable input, the closed form above gives ``c_i = d l_i / d s``, and

    g_i(p) = J_f(p)^T c_i ,

one call per example of the chain's own backward nodes (each a vector-Jacobian product, linear in
its gradient), from the top of the chain down to ``p``. The chain's nodes are below every captured
output, so the backward pass to those outputs does not run (or free) them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dynamics.signals.example_axis import WEIGHT_PERIOD
from dynamics.signals.products import Factored, factor_by_example

_KINDS = {
    "MulBackward0": "mul",
    "AddBackward0": "add",
    "ExpandBackward0": "expand",
    "WhereBackward0": "where",
}


# Matrix products z = x @ W: node -> (input index of W, name of the saved x, names of scalars that must be 1).
_MATMULS = {
    "MmBackward0": (1, "_saved_self", ()),
    "AddmmBackward0": (2, "_saved_mat1", ("_saved_alpha", "_saved_beta")),
}


@dataclass(eq=False)
class ElementwiseUse:
    """One node ``z = p * x``, ``x + p`` or ``expand(p)``: what :func:`~.backward.backward_to_outputs`
    reads of a call, and the product's other operand ``x``."""

    key: int  # position among the plan's uses: stable across equal graphs (:mod:`.cache_key`)
    shape: tuple[int, ...]  # of z: (n, *S), p broadcast over the examples and S's leading dims
    dtype: torch.dtype
    device: torch.device
    edges: list[Any]  # [GradientEdge of z]
    x: Tensor | None = None  # a product's other operand (a selection's mask); None for a sum or a copy
    # The use's operand s = f(p): its shape, and f's backward nodes with the input each leads
    # down by, from s to p (empty when the operand is p itself).
    operand_shape: tuple[int, ...] = ()
    chain: tuple[tuple[Any, int], ...] = ()
    matmul: bool = False  # z = x @ p: rows (R, in) and (R, out), a factored term (module docstring)
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


def _broadcasts_into(p_shape: tuple[int, ...], z_shape: tuple[int, ...], n: int) -> bool:
    """Whether ``p`` broadcasts into ``z`` (n rows) without spanning its example axis."""
    if len(z_shape) < 1 or z_shape[0] != n or len(p_shape) > len(z_shape):
        return False
    if len(p_shape) == len(z_shape) and p_shape[0] != 1:
        return False
    try:
        return tuple(torch.broadcast_shapes(p_shape, z_shape)) == tuple(z_shape)
    except RuntimeError:
        return False


def _matmul_use(node: Any, k: int, p_shape: tuple[int, ...], n: int, key: int) -> ElementwiseUse | None:
    """``z = x @ p`` (``p`` the right factor of ``mm`` / ``addmm`` with unit scalars), or None."""
    spec = _MATMULS.get(type(node).__name__)
    if spec is None or k != spec[0] or len(p_shape) != 2:
        return None
    try:
        x = getattr(node, spec[1])
        scalars = [getattr(node, name) for name in spec[2]]
    except (AttributeError, RuntimeError):
        return None
    meta = _output_meta(node)
    if not isinstance(x, Tensor) or meta is None or any(v != 1 for v in scalars):
        return None
    rows = x.shape[0]
    if x.dim() != 2 or meta[0] != (rows, p_shape[1]) or (rows != n and n > WEIGHT_PERIOD):
        return None
    return ElementwiseUse(key, *meta, [torch.autograd.graph.GradientEdge(node, 0)], x, p_shape, matmul=True)


def matmul_factor(u: ElementwiseUse, n: int) -> Factored:
    """``g_i = sum_r x_r^T dz_r`` over example ``i``'s rows of a matrix-product use, as factors."""
    assert u.x is not None
    x, dz = u.x.detach(), u.dys[0]
    f = Factored(x.reshape(x.shape[0], 1, -1), dz.reshape(dz.shape[0], 1, -1), False, x.shape[-1])
    return f if u.row_map is None else factor_by_example(f, u.row_map, n)


def _use(node: Any, k: int, p_shape: tuple[int, ...], n: int, key: int) -> ElementwiseUse | None:
    if type(node).__name__ in _MATMULS:
        return _matmul_use(node, k, p_shape, n, key)
    kind = _KINDS.get(type(node).__name__)
    edge = [torch.autograd.graph.GradientEdge(node, 0)]
    if kind == "mul" and k in (0, 1):
        x = _operand(node, k)
        if x is None or not x.is_floating_point() or not _broadcasts_into(p_shape, tuple(x.shape), n):
            return None
        return ElementwiseUse(key, tuple(x.shape), x.dtype, x.device, edge, x, operand_shape=p_shape)
    if kind == "where" and k in (0, 1):  # where(c, p, y) or where(c, y, p): a product with the mask
        meta = _output_meta(node)
        try:
            cond = node._saved_condition
        except RuntimeError:
            return None
        if meta is None or not isinstance(cond, Tensor) or not _broadcasts_into(p_shape, meta[0], n):
            return None
        return ElementwiseUse(key, *meta, edge, cond if k == 0 else ~cond, operand_shape=p_shape)
    if kind == "add" and getattr(node, "_saved_alpha", None) != 1:
        return None  # x + alpha * p scales p's gradient: not handled
    if kind in ("add", "expand") and (k in (0, 1) if kind == "add" else k == 0):
        meta = _output_meta(node)
        if meta is None or not _broadcasts_into(p_shape, meta[0], n):
            return None
        return ElementwiseUse(key, *meta, edge, operand_shape=p_shape)
    return None


_CHAIN_LIMIT = 32  # nodes of a shared chain; longer ones take another path


def _chain_uses(
    node: Any, k: int, n: int, key: int, parents_of: Callable[[Any], list[tuple[Any, int]]]
) -> list[ElementwiseUse] | None:
    """The uses of a shared tensor ``s = f(p)`` whose chain ``f`` starts with ``node`` (at its input ``k``).

    The chain climbs while a node has ``p``'s path as its one differentiable input and one parent;
    it ends at the first node all of whose parents are elementwise uses broadcasting its output into
    ``n`` rows. None for anything else (a branch, a use by a matrix product, ...).
    """
    chain: list[tuple[Any, int]] = []
    for _ in range(_CHAIN_LIMIT):
        if [j for j, (nxt, _) in enumerate(node.next_functions) if nxt is not None] != [k]:
            return None
        meta = _output_meta(node)
        if meta is None or len(node._input_metadata) != 1:  # one output: one gradient to call it with
            return None
        chain.insert(0, (node, k))
        ups = parents_of(node)
        uses = [_use(up, j, meta[0], n, key + i) for i, (up, j) in enumerate(ups)]
        if ups and all(u is not None and not u.matmul for u in uses):
            for u in uses:
                assert u is not None
                u.chain = tuple(chain)
            return [u for u in uses if u is not None]
        if len(ups) != 1:
            return None
        node, k = ups[0]
    return None


def find_elementwise_uses(
    uses: list[tuple[Any, int]],
    shape: torch.Size,
    n: int,
    first_key: int,
    parents_of: Callable[[Any], list[tuple[Any, int]]] | None = None,
) -> list[ElementwiseUse] | None:
    """Elementwise uses for a parameter of ``shape`` whose graph edges come from the ``(node, input)``
    ``uses``; None unless every one is a product, a sum or a copy broadcast into ``n`` rows, of the
    parameter itself or (given ``parents_of``, a node's ``(parent, input)`` edges) of a shared chain."""
    found: list[ElementwiseUse] = []
    for node, k in uses:
        use = _use(node, k, tuple(shape), n, first_key + len(found))
        if use is not None:
            found.append(use)
            continue
        chained = None if parents_of is None else _chain_uses(node, k, n, first_key + len(found), parents_of)
        if chained is None:
            return None
        found += chained
    if len({u.matmul for u in found}) > 1:
        return None  # factored and dense terms of one parameter: not combined here
    return found or None


def _reduced(u: ElementwiseUse, n: int) -> Tensor:
    """``d l_i / d s`` of one use, shape ``(n, *s)``: ``x ⊙ dz`` (or ``dz``) summed to ``s``'s broadcast."""
    dz = u.dys[0]
    dtype = torch.promote_types(dz.dtype, torch.float32)
    term = dz.to(dtype)
    if u.x is not None:
        term = u.x.detach().to(torch.promote_types(u.x.dtype, dtype)) * term
    shape = u.operand_shape
    lead = shape[1:] if len(shape) == term.dim() else (1,) * (term.dim() - 1 - len(shape)) + tuple(shape)
    return term.sum_to_size((n, *lead)).reshape(n, *shape)


def _pull_back(chain: tuple[tuple[Any, int], ...], c: Tensor) -> Tensor:
    """``J_f^T c_i`` for every example: the chain's backward nodes called one example at a time."""
    rows = []
    for c_i in c:
        t: Any = c_i
        for node, k in chain:
            out = node(t)
            t = out[k] if isinstance(out, tuple) else out
            if not isinstance(t, Tensor):
                raise RuntimeError(f"{type(node).__name__} gave no gradient")
        rows.append(t)
    return torch.stack(rows)


def elementwise_per_example_grads(uses: list[ElementwiseUse], shape: torch.Size, n: int) -> Tensor:
    """``g_i(p)`` of shape ``(n, *shape)``: the sum over ``uses`` of ``x ⊙ dz`` (or ``dz``) reduced to
    their operand, pulled back through its shared chain (uses of one chain summed first).

    Raises RuntimeError when a chain's backward fails (e.g. its saved tensors were freed)."""
    chains: dict[tuple[int, ...], tuple[tuple[Any, int], ...]] = {}
    sums: dict[tuple[int, ...], Tensor] = {}
    for u in uses:
        key = tuple(id(node) for node, _ in u.chain)
        c = _reduced(u, n)
        chains[key] = u.chain
        sums[key] = sums[key] + c if key in sums else c
    total: Tensor | None = None
    for key, c in sums.items():
        g = (_pull_back(chains[key], c) if chains[key] else c).reshape(n, *shape)
        total = g if total is None else total + g
    assert total is not None
    return total
