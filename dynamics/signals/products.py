"""Per-layer contributions to the per-example Gram matrix: ghost products or materialised gradients.

A stock ``nn.Linear`` call ``y_it = W x_it + b`` gives, for example ``i`` with tokens ``t``,

    g_i(W) = sum_t dy_it x_it^T,        g_i(b) = sum_t dy_it,

and an ``nn.Embedding`` call ``z_it = E[u_it]`` gives ``g_i(E) = sum_t e_{u_it} dz_it^T`` (rows of
the padding index excluded, as ``F.embedding`` does). Both are *factored*: ``g_i = sum_t a_it b_it^T``
with ``a`` dense (``dy``) or one-hot (token ids ``u``). A parameter used by several calls (tied
input/output embeddings, a module applied twice) has one factored term per call, and its
per-example gradient is their sum. Two ways to get its block of ``K``:

* ghost products, never forming ``g_i``:
  ``<g_i, g_j> = sum_{c, c'} sum_{t in i, s in j} <a^c_it, a^c'_js> <b^c_it, b^c'_js>``,
  where a one-hot factor turns an inner product into a lookup (``<e_u, a> = a[u]``) or a token
  equality test (``<e_u, e_v> = [u = v]``). Tokens whose factor row is zero (padding, positions
  without a label) are dropped first. Cost ~ ``M^2 (d_a + d_b)`` for ``M`` kept tokens;
* materialised ``g_i`` (``bmm`` or ``index_add``) and ``K += G G^T``; cost ~ ``n T d_a d_b + n^2 d_a d_b``.
  They are formed in blocks of rows (or columns) of the weight, and ``K`` is the sum of the
  blocks' Grams, so memory stays bounded (``MATERIALIZE_ELEMENTS``) whatever the layer size.
  An embedding's ``g_i`` is formed over the distinct ids of the batch only (``d_a`` = their
  number, not the vocabulary): the other rows are zero for every example.

``method="auto"`` takes the cheaper by this operation count; a table read by lookups alone (an
embedding) gets its block from the pairs of tokens with equal ids instead (:mod:`.id_pairs`), which
is cheaper than both. Per-example gradients of any other
kind (bias sums, module-local or exact autograd gradients) are added as dense ``(n, ...)`` blocks.
Products run in the parameter dtype promoted to at least float32; ``K`` is accumulated in float64.

The dot product of each ``g_i`` with a direction ``D`` (same shape as the parameter) is computed from
the same factors: ``<g_i, D> = sum_t <a_it, D b_it>`` (``D[u_it] . b_it`` for one-hot ``a``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynamics.signals.calls import ModuleCall
from dynamics.signals.id_pairs import equal_id_gram
from dynamics.signals.layer_rules import same_code
from dynamics.signals.row_map import example_layout

CHUNK_ELEMENTS = 1 << 24  # size of one (tokens x tokens) block of ghost products
MATERIALIZE_ELEMENTS = 1 << 26  # largest block of materialised per-example gradients (elements)
PRUNE_RATIO = 8  # count non-zero token rows only if ghost products are within this factor
# Per-example sizes from which a block's Gram goes straight into the float64 K; smaller blocks'
# Grams are summed in their own dtype first (one n x n addition in float64 per dtype and device).
DIRECT_GRAM = 1 << 14


@contextmanager
def block_limits(elements: int) -> Iterator[None]:
    """Cap the probe's working blocks at ``elements`` each (ghost token-pair blocks, materialised
    per-example gradient blocks, pending dense gradients), e.g. ``with block_limits(1 << 22): probe(...)``.

    The Gram is the same sum of block Grams whatever the block size, so only memory and speed change:
    smaller blocks lower the probe's extra peak (down to the captured output gradients, which
    the training step holds as well) at the cost of more, smaller products.
    """
    global CHUNK_ELEMENTS, MATERIALIZE_ELEMENTS
    if elements < 1:
        raise ValueError(f"elements must be >= 1, got {elements}")
    saved = CHUNK_ELEMENTS, MATERIALIZE_ELEMENTS
    CHUNK_ELEMENTS, MATERIALIZE_ELEMENTS = min(CHUNK_ELEMENTS, elements), min(MATERIALIZE_ELEMENTS, elements)
    try:
        yield
    finally:
        CHUNK_ELEMENTS, MATERIALIZE_ELEMENTS = saved


@dataclass
class Factored:
    """``g_i = sum_t a_it b_it^T``: ``a`` (n, T, d_a) dense or (n, T) ids (``a_index``); ``b`` (n, T, d_b)."""

    a: Tensor
    b: Tensor
    a_index: bool
    d_a: int


def linear_weight_factor(call: ModuleCall) -> Factored:
    """Factors of ``g_i(W)`` for a captured ``nn.Linear`` call: ``a = dy``, ``b = x``."""
    x = call.main_input()
    dy = call.dys[0]
    n = x.shape[0]
    return Factored(
        dy.reshape(n, -1, dy.shape[-1]), x.detach().reshape(n, -1, x.shape[-1]), False, dy.shape[-1]
    )


def transposed_linear_weight_factor(call: ModuleCall) -> Factored:
    """Factors of ``g_i(W)`` for ``y = x W + b`` with ``W`` stored (in, out) (GPT-2's ``Conv1D``): ``a = x``, ``b = dy``."""
    x = call.main_input().detach()
    dy = call.dys[0]
    n = x.shape[0]
    return Factored(x.reshape(n, -1, x.shape[-1]), dy.reshape(n, -1, dy.shape[-1]), False, x.shape[-1])


def linear_bias_grad(call: ModuleCall) -> Tensor:
    """``g_i(b) = sum_t dy_it`` (n, d_out)."""
    dy = call.dys[0]
    return dy.reshape(dy.shape[0], -1, dy.shape[-1]).sum(1)


def conv_weight_factor(call: ModuleCall) -> Factored:
    """Factors of ``g_i(W)`` for a captured ``nn.Conv1d/2d/3d`` call (one group, zero padding).

    A convolution is a Linear map on unfolded input patches: ``b`` = the patches (channel-major like
    the weight's ``(C_in, *kernel)`` layout), ``a = dy`` at each output position. Patches come from
    ``F.unfold`` (Conv1d as a 2-D convolution of height 1, Conv2d), or, for non-overlapping patches
    (kernel == stride, no padding or dilation: the patch embeddings of vision towers, Conv3d
    included, for which torch has no unfold), from a reshape of the input.
    """
    m: Any = call.module
    x = call.main_input().detach()
    dy = call.dys[0]
    n = x.shape[0]
    a = dy.reshape(n, dy.shape[1], -1).transpose(1, 2)
    if is_patch_conv(m):
        return Factored(a, _patches(x, tuple(m.kernel_size)), False, dy.shape[1])
    if x.dim() == 3:  # Conv1d as a 2-D convolution of height 1
        x = x.unsqueeze(2)
        kernel, dilation, padding, stride = (
            (1, *m.kernel_size),
            (1, *m.dilation),
            (0, *_int_padding(m)),
            (1, *m.stride),
        )
    else:
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, _int_padding(m), m.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return Factored(a, patches.transpose(1, 2), False, dy.shape[1])


def is_patch_conv(m: Any) -> bool:
    """Whether a convolution cuts its input into non-overlapping patches (kernel == stride, no padding)."""
    k = tuple(m.kernel_size)
    return tuple(m.stride) == k and _zero_padding(m.padding) and all(d == 1 for d in m.dilation)


def _zero_padding(padding: Any) -> bool:
    """``padding="valid"`` is no padding (SigLIP's patch embedding is built that way)."""
    return padding == "valid" if isinstance(padding, str) else all(p == 0 for p in padding)


def _int_padding(m: Any) -> tuple[int, ...]:
    return (0,) * len(m.kernel_size) if m.padding == "valid" else tuple(m.padding)


def _patches(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """``(N, L, C * prod(kernel))`` non-overlapping patches of ``x`` (N, C, *spatial), channel-major.

    Trailing input positions that do not fill a whole patch are dropped, as the convolution drops them.
    """
    N, C = x.shape[:2]
    out = [s // k for s, k in zip(x.shape[2:], kernel, strict=True)]
    crop = tuple(slice(0, o * k) for o, k in zip(out, kernel, strict=True))
    x = x[(slice(None), slice(None)) + crop]
    split = [d for o, k in zip(out, kernel, strict=True) for d in (o, k)]
    x = x.reshape(N, C, *split)
    d = len(kernel)
    order = [0, *(2 + 2 * i for i in range(d)), 1, *(3 + 2 * i for i in range(d))]
    return x.permute(order).reshape(N, math.prod(out), C * math.prod(kernel))


def conv_bias_grad(call: ModuleCall) -> Tensor:
    """``g_i(b) = sum over output positions of dy_i`` (n, C_out)."""
    dy = call.dys[0]
    return dy.reshape(dy.shape[0], dy.shape[1], -1).sum(2)


def embedding_factor(call: ModuleCall) -> Factored:
    """Factors of ``g_i(E)`` for a captured ``nn.Embedding`` call: one-hot ids and ``dz``."""
    ids = call.main_input()
    dz = call.dys[0]
    n = ids.shape[0]
    ids = ids.reshape(n, -1)
    dz = dz.reshape(n, ids.shape[1], dz.shape[-1])
    module: Any = call.module
    if is_scaled_embedding(module):  # y = E[u] * s: the table's gradient is s times dy's
        dz = dz * module.embed_scale.to(dz.device, dz.dtype)
    pad = module.padding_idx
    if pad is not None:
        dz = dz * (ids != pad).unsqueeze(-1).to(dz.dtype)
    return Factored(ids, dz, True, module.num_embeddings)


class _ScaledEmbedding(nn.Embedding):
    embed_scale: Tensor

    def forward(self, input_ids):  # transformers' Gemma ScaledWordEmbedding: must stay byte-identical
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def is_scaled_embedding(module: Any) -> bool:
    """An ``nn.Embedding`` whose output is scaled by a scalar buffer (Gemma's ``sqrt(d)`` embeddings).

    Recognised by the bytecode of its forward and its direct base, so a variant falls back.
    """
    cls = type(module)
    scale = getattr(module, "embed_scale", None)
    return (
        isinstance(module, nn.Embedding)
        and cls.__mro__[1] is nn.Embedding
        and isinstance(scale, Tensor)
        and scale.numel() == 1
        and same_code(cls.forward, _ScaledEmbedding.forward)
    )


def factor_by_example(f: Factored, row_map: Tensor, n: int) -> Factored:
    """Per-row factors (rows in dimension 0, e.g. of :func:`~.row_map.row_view`) as per-example ones.

    Row ``r`` goes to example ``row_map[r]`` (dropped for ``-1``); an example's rows are laid end to
    end and padded with zero rows, which add nothing to ``sum_t a_it b_it^T``.
    """
    t = f.b.shape[1]
    a = example_layout(f.a, row_map, n)
    b = example_layout(f.b, row_map, n)
    tokens = a.shape[1] * t
    return Factored(
        a.reshape(n, tokens, *f.a.shape[2:]), b.reshape(n, tokens, f.b.shape[-1]), f.a_index, f.d_a
    )


def _row_mask(f: Factored) -> Tensor:
    """(n * T,) True where token ``t`` of example ``i`` contributes (its factor rows are non-zero).

    For a dense ``a`` (an output gradient) only ``a`` is tested: input rows are rarely all zero.
    """
    n, t = f.b.shape[:2]
    rows = (f.b if f.a_index else f.a).reshape(n * t, -1)
    if rows.shape[1] == 0 or rows.dtype == torch.bool:
        return rows.any(1)
    # max != 0 or min != 0, i.e. any(1) (NaN counts, -0.0 does not), in two vectorised
    # reductions: any(1) on floats ran 7x slower on CPU (3.0 against 0.43 ms at 2048 x 1024).
    return (rows.amax(1) != 0) | (rows.amin(1) != 0)


def _prune(f: Factored, dtype: torch.dtype, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Token rows with a non-zero contribution: ``(a rows, b rows, example index of each row)``."""
    n, t = f.b.shape[:2]
    idx = (_row_mask(f) if mask is None else mask).nonzero().squeeze(1)
    b = f.b.reshape(n * t, -1)[idx].to(dtype)
    a = f.a.reshape(n * t)[idx] if f.a_index else f.a.reshape(n * t, -1)[idx].to(dtype)
    return a, b, torch.div(idx, t, rounding_mode="floor")


def _compact_ids(factors: list[Factored]) -> tuple[list[Factored], Tensor]:
    """The same one-hot factors over only the table rows the batch uses, and those rows.

    ``g_i(E)`` is zero on every row no token of the batch looks up, so dropping those rows leaves
    ``K`` unchanged while the materialised gradients shrink from ``n x vocab x d`` to
    ``n x (distinct ids) x d`` (at 150 k vocabularies, from prohibitive to a few blocks).
    """
    rows, inverse = torch.unique(torch.cat([f.a.reshape(-1) for f in factors]), return_inverse=True)
    out, start = [], 0
    for f in factors:
        size = f.a.numel()
        out.append(Factored(inverse[start : start + size].reshape(f.a.shape), f.b, True, rows.numel()))
        start += size
    return out, rows


def _inner(a1: Tensor, i1: bool, a2: Tensor, i2: bool, dtype: torch.dtype) -> Tensor:
    """Token-by-token inner products of two factors (dense rows or one-hot ids)."""
    if not i1 and not i2:
        return a1 @ a2.T
    if i1 and not i2:
        return a2[:, a1].T
    if not i1 and i2:
        return a1[:, a2]
    return (a1[:, None] == a2[None, :]).to(dtype)


_F = TypeVar("_F", bound=Callable[..., Any])


def without_autocast(device: torch.device) -> AbstractContextManager[Any]:
    """A context in which matmuls run in their inputs' dtype even inside a caller's ``torch.autocast``.

    The products run in the parameters' dtype promoted to float32 by design; under autocast a
    float32 matmul would come back in bfloat16 (a silently coarser ``K``, and ghost blocks of
    mixed dtypes that ``index_add_`` refuses). The forward and the backward keep the caller's autocast.
    """
    kind = device.type
    if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return nullcontext()


def _in_full_precision(method: _F) -> _F:
    @functools.wraps(method)
    def wrapped(self: GramBuilder, *args: Any, **kwargs: Any) -> Any:
        with without_autocast(self.device):
            return method(self, *args, **kwargs)

    return wrapped  # type: ignore[return-value]


class GramBuilder:
    """Accumulates ``K`` (float64) and, optionally, ``<g_i, direction>`` over parameters."""

    def __init__(self, n: int, device: torch.device, mode: str = "auto"):
        if mode not in ("auto", "ghost", "materialize"):
            raise ValueError(f"mode must be auto, ghost or materialize, got {mode!r}")
        self.n = n
        self.device = device
        self.mode = mode
        self.K = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.dots = torch.zeros(n, dtype=torch.float64, device=device)
        self.has_dots = False
        self.paths: dict[str, list[int]] = {"ghost": [], "materialized": []}
        self.eps = torch.finfo(torch.float64).eps
        # Grams of small blocks, one per (dtype, device), summed by addmm_ in place. Concatenating the
        # blocks for one GEMM copied them all: 100 blocks of 32 x 64..16 k took 94 ms that way on
        # CPU against 28 ms by addmm_ (the same sums in another order).
        self._small: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _note_dtype(self, dtype: torch.dtype) -> None:
        self.eps = max(self.eps, torch.finfo(dtype).eps)

    @_in_full_precision
    def add_dense(self, grads: Tensor, direction: Tensor | None = None) -> None:
        """Add per-example gradients ``(n, *shape)`` of one parameter."""
        dtype = torch.promote_types(grads.dtype, torch.float32)
        self._note_dtype(dtype)
        flat = grads.reshape(self.n, -1).to(dtype)
        if direction is not None:
            self.dots += (flat @ direction.reshape(-1).to(flat.device, dtype)).double().to(self.device)
            self.has_dots = True
        if flat.shape[1] >= DIRECT_GRAM:
            self.K += (flat @ flat.T).double().to(self.device)
            return
        # a model split over devices keeps its gradients where they are
        acc = self._small.get((flat.dtype, flat.device))
        if acc is None:
            acc = self._small[(flat.dtype, flat.device)] = torch.zeros(
                self.n, self.n, dtype=flat.dtype, device=flat.device
            )
        acc.addmm_(flat, flat.T)

    def _flush(self) -> None:
        for acc in self._small.values():
            self.K += acc.double().to(self.device)
        self._small = {}

    @_in_full_precision
    def add_factored(
        self,
        pid: int,
        shape: torch.Size,
        factors: list[Factored],
        dense: list[Tensor],
        direction: Tensor | None,
    ) -> None:
        """Add one parameter whose per-example gradient is ``sum(factors) + sum(dense)``."""
        if dense:
            total = dense[0]
            for extra in dense[1:]:
                total = total + extra
            for f in factors:
                m = self._materialize(f)
                total = total + m.reshape(total.shape)
            self.add_dense(total.reshape(self.n, *shape), direction)
            self.paths["materialized"].append(pid)
            return
        if not factors:
            return
        dtype = torch.promote_types(factors[0].b.dtype, torch.float32)
        self._note_dtype(dtype)
        one_hot = all(f.a_index for f in factors)
        if one_hot and self.mode == "auto":
            self._add_equal_ids(pid, factors, direction, dtype)  # groups the batch's ids itself
            return
        if one_hot:
            factors, rows = _compact_ids(factors)
            if direction is not None:
                direction = direction.reshape(-1, direction.shape[-1])[rows.to(direction.device)]
        d_b = factors[0].b.shape[-1]
        d_a = factors[0].d_a
        mat_ops = sum(self.n * f.b.shape[1] * (1 if f.a_index else d_a) * d_b for f in factors)
        mat_ops += self.n * self.n * d_a * d_b

        def ghost_ops(rows: list[int]) -> int:
            ops = 0
            for c1 in range(len(factors)):
                for c2 in range(c1, len(factors)):
                    da = 1 if (factors[c1].a_index or factors[c2].a_index) else d_a
                    ops += rows[c1] * rows[c2] * (da + d_b + 1)
            return ops

        masks = None
        if self.mode == "ghost":
            ghost = True
        elif self.mode == "materialize":
            ghost = False
        else:
            # Dropping zero rows can only make ghost products cheaper; count them only when that
            # could change the decision (it costs a pass over the factors).
            full = ghost_ops([self.n * f.b.shape[1] for f in factors])
            ghost = full < mat_ops
            if not ghost and full < PRUNE_RATIO * mat_ops:
                masks = [_row_mask(f) for f in factors]
                ghost = ghost_ops([int(m.sum()) for m in masks]) < mat_ops
        if not ghost:
            self._add_materialized(factors, d_a, d_b, direction)
            self.paths["materialized"].append(pid)
            return
        self.paths["ghost"].append(pid)
        parts = [_prune(f, dtype, None if masks is None else masks[k]) for k, f in enumerate(factors)]
        self.K += self._ghost(parts, [f.a_index for f in factors], dtype)
        if direction is not None:
            for (a, b, seg), f in zip(parts, factors, strict=True):
                d = direction.to(b.device, dtype).reshape(d_a, -1)
                if f.a_index:
                    per_row = (d[a] * b).sum(1)
                else:
                    per_row = ((b @ d.T) * a).sum(1)
                self.dots.index_add_(0, seg.to(self.device), per_row.double().to(self.device))
            self.has_dots = True

    def _add_equal_ids(
        self, pid: int, factors: list[Factored], direction: Tensor | None, dtype: torch.dtype
    ) -> None:
        """A table read by lookups only: its block from pairs of equal ids (:mod:`.id_pairs`), never
        dearer than the materialised gradients over the batch's ids, nor than ghost products."""
        parts = [_prune(f, dtype) for f in factors]
        b = torch.cat([p[1] for p in parts])
        # the whole table: equal_id_gram gathers (and casts) only the rows the batch reads
        d = None if direction is None else direction.reshape(-1, b.shape[-1])
        K, dots, dense_only = equal_id_gram(
            torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts]), b, self.n, d
        )
        self.K += K.double().to(self.device)
        if dots is not None:
            self.dots += dots.double().to(self.device)
            self.has_dots = True
        self.paths["materialized" if dense_only else "ghost"].append(pid)

    def _add_materialized(
        self, factors: list[Factored], d_a: int, d_b: int, direction: Tensor | None
    ) -> None:
        """Materialise ``g_i`` block by block (memory ``<= MATERIALIZE_ELEMENTS``), adding each block's Gram.

        Blocks split the weight's rows (``d_a``), or its columns (``d_b``) when a factor is one-hot;
        the Gram of a parameter is the sum of its blocks' Grams. The (d_b, d_a) layout of a
        block makes the batched product's left factor the narrower one, which BLAS runs faster
        (the layout of a per-example gradient does not change ``K``).
        """
        by_cols = any(f.a_index for f in factors)
        size, other = (d_b, d_a) if by_cols else (d_a, d_b)
        step = max(1, MATERIALIZE_ELEMENTS // max(1, self.n * other))
        swap = not by_cols and d_a > d_b
        dmat = None if direction is None else direction.reshape(d_a, d_b)
        for s0 in range(0, size, step):
            sl = slice(s0, min(size, s0 + step))
            total = None
            # Dense terms first, then one-hot ones scattered into them in place: a tied embedding
            # (lookup + output layer) would otherwise pay a zeroed table and a sum per block.
            for f in sorted(factors, key=lambda f: f.a_index):
                if by_cols:
                    m = self._materialize(f, swap, cols=sl, into=total)
                else:
                    m = self._materialize(f, swap, rows=sl)
                if total is None or m is total:
                    total = m
                else:  # blocks are fresh tensors: add in place unless the sum needs a wider dtype
                    total = total.add_(m) if m.dtype == total.dtype else total + m
            d = None
            if dmat is not None:
                d = dmat[:, sl] if by_cols else dmat[sl]
                d = d.T if swap else d
            assert total is not None
            self.add_dense(total, d)

    def _materialize(
        self,
        f: Factored,
        swap: bool = False,
        rows: slice | None = None,
        cols: slice | None = None,
        into: Tensor | None = None,
    ) -> Tensor:
        """``g_i`` (rows / columns of it) as (n, d_a, d_b), or as (n, d_b, d_a) with ``swap``.

        A one-hot factor given ``into`` (an unswapped block of the same shape) is added to it in place.
        """
        dtype = torch.promote_types(f.b.dtype, torch.float32)
        b = f.b.to(dtype) if cols is None else f.b[..., cols].to(dtype)
        n, t, d_b = b.shape
        if f.a_index:
            g = (
                torch.zeros(n * f.d_a, d_b, dtype=dtype, device=b.device)
                if into is None
                else into.view(-1, d_b)
            )
            offsets = f.a + torch.arange(n, device=b.device)[:, None] * f.d_a
            g.index_add_(0, offsets.reshape(-1), b.reshape(n * t, d_b).to(g.dtype))
            return g.view(n, f.d_a, d_b) if into is None else into
        a = f.a.to(dtype) if rows is None else f.a[..., rows].to(dtype)
        if swap:
            return torch.bmm(b.transpose(1, 2), a)
        return torch.bmm(a.transpose(1, 2), b)

    def _ghost(self, parts: list[tuple[Tensor, Tensor, Tensor]], is_index: list[bool], dtype) -> Tensor:
        n = self.n
        K = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for c1 in range(len(parts)):
            a1, b1, s1 = parts[c1]
            for c2 in range(c1, len(parts)):
                a2, b2, s2 = parts[c2]
                m1, m2 = len(s1), len(s2)
                if m1 == 0 or m2 == 0:
                    continue
                rows = max(1, CHUNK_ELEMENTS // m2)
                dev = b1.device
                block = torch.zeros(n, n, dtype=dtype, device=dev)
                for r0 in range(0, m1, rows):
                    r1 = min(m1, r0 + rows)
                    prod = _inner(a1[r0:r1], is_index[c1], a2, is_index[c2], dtype) * (b1[r0:r1] @ b2.T)
                    q = torch.zeros(r1 - r0, n, dtype=dtype, device=dev).index_add_(1, s2, prod)
                    block.index_add_(0, s1[r0:r1], q)
                block = block.double().to(self.device)
                K += block if c1 == c2 else block + block.T
        return K

    @_in_full_precision
    def finish(self) -> Tensor:
        """The accumulated ``K`` (float64, symmetrised)."""
        self._flush()
        return 0.5 * (self.K + self.K.T)
