"""Row-mapped calls: a layer fed rows of several examples at once, with the row -> example map discovered.

A vision tower often sees patches flattened across images (Qwen2-VL: ``(total patches, d)``),
every image of the batch in ONE sequence (Pixtral: ``(1, R, d)``), or image features concatenated
across images (a projector): dimension 0 is not the probe's examples, so the call is not
batch-first (:meth:`~.calls.ModuleCall.batch_first`). Yet for the factored kinds (Linear,
Embedding, Conv) and the normalisation rules (:mod:`.layer_rules`) each *row* (a position of the
leading dimensions, see :func:`row_count`) is processed on its own, so its contribution to
``g_i`` needs only to know which example ``i`` it belongs to:

    g_i = sum over rows r with e(r) = i of (the row's outer product / rule term).

**Discovering** ``e``. The weighted backward pass of :mod:`.backward` already gives, for every
output row ``r``, the unit gradient ``u_r = d(sum_i l_i)/dy_r`` and the weighted one
``w_r = d(sum_i c_i l_i)/dy_r`` (``c``: the distinct signed powers of two of
:func:`~.example_axis.check_weights`). Row ``r`` belongs to example ``e`` alone iff
``w_r = c_e u_r`` (to the rounding argument of :mod:`.example_axis`): the ratio
``(w_r . u_r) / (u_r . u_r)`` names ``e`` exactly (``c_e`` is a signed power of two, distinct for
``n <= 32``), and
every element of the row is then checked against ``c_e u_r``. A row with ``u_r = 0`` (and
``w_r = 0``) adds nothing to any ``g_i`` and maps to ``-1``. A call passes only when every row
passes. A row that feeds several examples gives a weighted average of their ``c``, which fails
the check unless those examples' gradients on the row are exactly parallel and the average lands
on another ``c`` (e.g. ``(4 + (-2)) / 2 = 1``: two *identical* examples, 3 and 4, reading one
shared row would be given to example 0). That needs code that makes examples share rows *and*
duplicated examples; it is the one blind spot of a single weighted pass. For
``n > WEIGHT_PERIOD`` weights repeat, ``e`` is ambiguous, and such calls go to exact autograd.

**Using** ``e``. :func:`row_view` flattens the call to ``R`` rows as if each row were an example,
so the existing per-example builders (:mod:`.products`, :mod:`.layer_rules`) apply unchanged;
their per-row results are then grouped by example: factors into the example-first padded layout
of :func:`example_layout` (zero rows add nothing to a sum of outer products), dense per-row
gradients by :func:`sum_rows`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from dynamics.signals.calls import ModuleCall
from dynamics.signals.example_axis import WEIGHT_PERIOD, locality_tolerance

_LAST_DIM_RULES = ("llama_rmsnorm", "t5_layernorm")
_SHAPED_RULES = ("layernorm", "rmsnorm")


def _lead(call: ModuleCall) -> int | None:
    """How many leading dims of the main input are rows, if the call's shapes are those of its kind."""
    if len(call.grad_idx) != 1:
        return None
    x = call.main_input()
    y = call.out_leaves[call.grad_idx[0]]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        return None
    m: Any = call.module
    if call.kind in ("linear", "linear_t"):
        ok = x.dim() >= 1 and y.dim() == x.dim() and y.shape[:-1] == x.shape[:-1]
        return x.dim() - 1 if ok else None
    if call.kind == "embedding":
        if x.dim() == 2 and x.shape[0] == x.shape[1] > 1:
            # A square grid of ids is taken for a (query, key) table that every example reads whole
            # (T5's relative-position buckets): no row of it belongs to one example, so no map would be
            # found; a batch-first ancestor's per-example re-run covers it instead (plan). Ids of
            # images x patches stay row-mapped; a square one by coincidence only loses speed (the
            # re-run is verified, exact autograd is the fallback).
            return None
        return x.dim() if y.shape[:-1] == x.shape else None
    if call.kind == "conv":
        want = 2 + len(m.kernel_size)
        ok = x.dim() == want and y.dim() == want and y.shape[1] == m.out_channels and y.shape[0] == x.shape[0]
        return 1 if ok else None
    if y.shape != x.shape:
        return None
    if call.kind in _SHAPED_RULES:
        k = len(m.normalized_shape)
        return x.dim() - k if x.dim() >= k else None
    if call.kind in _LAST_DIM_RULES:
        return x.dim() - 1 if x.dim() >= 1 else None
    if call.kind == "groupnorm":
        return 1 if x.dim() >= 2 else None
    return None


def row_count(call: ModuleCall) -> int | None:
    """Number of rows ``R`` of a factored or rule-kind call whose shapes fit its kind (None otherwise)."""
    lead = _lead(call)
    if lead is None:
        return None
    return math.prod(call.main_input().shape[:lead])


def row_view(call: ModuleCall) -> ModuleCall:
    """The call with its main input and output gradient flattened to ``R`` rows in dimension 0.

    The per-example builders read it as ``R`` examples of one row each (their results per row).
    """
    lead = _lead(call)
    assert lead is not None and call.dys, "row_view needs a row-shaped call after the backward pass"
    x, dy = call.main_input(), call.dys[0]
    rows = math.prod(x.shape[:lead])
    xr = x.reshape(rows, *x.shape[lead:])
    dyr = dy.reshape(rows, *dy.shape[lead:])
    return dataclasses.replace(call, args=(xr,), kwargs={}, dys=[dyr])


def discover_row_map(
    dy_weighted: Tensor | None, dy_unit: Tensor | None, weights: Tensor, rows: int
) -> Tensor | None:
    """The example of each of ``rows`` output rows (``-1``: no gradient), or None if some row has none.

    ``dy_*`` are the call's output gradients (``None``: zero) under the weights ``c`` and under
    ones (module docstring). None also for ``n > WEIGHT_PERIOD`` and non-finite gradients.
    """
    n = weights.shape[0]
    if n > WEIGHT_PERIOD:
        return None
    like = dy_unit if dy_unit is not None else dy_weighted
    if like is None:
        return torch.full((rows,), -1, dtype=torch.long, device=weights.device)
    u = like.new_zeros(like.shape) if dy_unit is None else dy_unit
    w = like.new_zeros(like.shape) if dy_weighted is None else dy_weighted
    if u.shape != w.shape or (u.numel() % rows if rows else u.numel()):
        return None
    if rows == 0:
        return torch.empty(0, dtype=torch.long, device=u.device)
    u, w = u.reshape(rows, -1), w.reshape(rows, -1)
    # Reductions and one temporary each, no argmax: on CPU argmax(dim) runs ~10x slower than
    # amax(dim), and the check with them cost 0.3 of a training step on Qwen2-VL's vision tower.
    # A NaN or inf in a row of u or w makes that row's ratio or error NaN or inf: the check fails.
    m = torch.maximum(-u.amin(1), u.amax(1))  # the largest |u| of each row
    live = m != 0
    c = weights.to(u.device, u.dtype)
    # w_r = c_e u_r makes (w_r . v) = c_e (u_r . v) for any v, to the last bit when both dots sum in
    # one order (c_e is a power of two); v = u_r / max|u_r| keeps them clear of under- and overflow
    v = u / torch.where(live, m, torch.ones_like(m)).unsqueeze(1)
    uu = torch.linalg.vecdot(u, v, dim=1)
    ratio = torch.linalg.vecdot(w, v, dim=1) / torch.where(live, uu, torch.ones_like(uu))
    # c_j = (-1)^j 2^(j // 2), so j = 2 log2|c| + [c < 0]
    k = torch.round(torch.log2(ratio.abs().clamp_min(torch.finfo(u.dtype).tiny)))
    j = 2 * k + (ratio < 0).to(k.dtype)
    in_range = (j >= 0) & (j < n)
    e = torch.where(in_range, j, torch.zeros_like(j)).long()  # a NaN ratio (NaN in w) is out of range
    ce = c[e]
    diff = torch.addcmul(w, u, ce.unsqueeze(1), value=-1.0)
    err = torch.maximum(-diff.amin(1), diff.amax(1))  # max_k |w_rk - c_e u_rk|
    scale = ce.abs() * m  # max_k |c_e u_rk|, exactly
    tol = locality_tolerance(u.dtype)
    ok = live & in_range & (err <= tol * scale)
    if not bool(live.all()):
        # a row without unit gradient must have no weighted one either (else examples cancel on it)
        ok |= ~live & (torch.maximum(-w.amin(1), w.amax(1)) <= tol * float(scale.max()))
    if not bool(ok.all()):
        return None
    return torch.where(live, e, torch.full_like(e, -1))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where :func:`example_layout` puts the rows of one row map (computed once per map, see ``_layout``)."""

    n: int
    r_max: int  # the most rows of one example (at least 1)
    version: int  # the map's ``_version`` when this was computed: an in-place change invalidates it
    keep: Tensor | None  # the rows kept (mapped to an example); None: every row
    dest: Tensor | None  # each kept row's position in the flat (n * r_max) layout; None: already there


# Layouts by row map: a verdict's map is reused by every later probe (:mod:`.axis_cache`) and by
# both factors of each of its calls, and building the index (a sort, a count, a scatter) cost
# more than the products it feeds on Qwen2-VL's small vision tower (~0.1 of a training step).
_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _layout(row_map: Tensor, n: int) -> _Layout:
    known = _LAYOUTS.get(row_map)
    if known is not None and known.n == n and known.version == row_map._version:
        return known
    kept = row_map >= 0
    keep = None if bool(kept.all()) else kept.nonzero().squeeze(1)
    ex = row_map if keep is None else row_map[keep]
    counts = torch.bincount(ex, minlength=n)
    r_max = max(1, int(counts.max())) if ex.numel() else 1
    dest = None
    # every row kept, r_max per example, in example order (equal-sized images in batch order, the
    # usual case): the layout is a reshape
    if keep is not None or ex.numel() != n * r_max or bool((ex[1:] < ex[:-1]).any()):
        order = torch.argsort(ex, stable=True)
        by_example = ex[order]
        starts = torch.cumsum(counts, 0) - counts
        dest = torch.empty_like(ex)
        dest[order] = by_example * r_max + torch.arange(ex.numel(), device=ex.device) - starts[by_example]
    # nothing here may hold the map itself: a value holding its key would keep it alive
    layout = _Layout(n, r_max, row_map._version, keep, dest)
    _LAYOUTS[row_map] = layout
    return layout


def example_layout(rows: Tensor, row_map: Tensor, n: int) -> Tensor:
    """``(R, ...)`` rows as ``(n, R_max, ...)``: example ``i``'s rows in order, then zero padding.

    Rows mapped to ``-1`` are dropped. ``R_max`` (at least 1) is the most rows of one example.
    When every example has ``R_max`` rows, in order, the result is a view of ``rows``.
    """
    lay = _layout(row_map, n)
    src = rows if lay.keep is None else rows[lay.keep.to(rows.device)]
    if lay.dest is None:
        return src.reshape(n, lay.r_max, *rows.shape[1:])
    out = rows.new_zeros((n * lay.r_max, *rows.shape[1:]))
    out.index_copy_(0, lay.dest.to(rows.device), src)
    return out.view(n, lay.r_max, *rows.shape[1:])


def sum_rows(per_row: Tensor, row_map: Tensor, n: int) -> Tensor:
    """``(n, ...)`` per-example sums of per-row gradients ``(R, ...)`` (rows mapped to ``-1`` dropped)."""
    lay = _layout(row_map, n)
    if lay.dest is None:
        return per_row.reshape(n, lay.r_max, *per_row.shape[1:]).sum(1)
    if lay.keep is None:
        examples, src = row_map, per_row
    else:
        examples, src = row_map[lay.keep], per_row[lay.keep.to(per_row.device)]
    out = per_row.new_zeros((n, *per_row.shape[1:]))
    return out.index_add_(0, examples.to(out.device), src)


def reusable(verdict: bool | Tensor) -> bool:
    """Whether a verdict may be kept for later probes (:mod:`.axis_cache`): not a map with dropped rows.

    A row of zero gradient now may reach a loss after a few steps (a zero-initialised LoRA ``B``
    behind a row-mapped ``A``), and its example is then unknown.
    """
    return not isinstance(verdict, Tensor) or bool((verdict >= 0).all())
