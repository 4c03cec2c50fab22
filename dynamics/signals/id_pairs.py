"""The Gram block of a table read only by one-hot lookups (an embedding), from pairs of equal ids.

For ``g_i(E) = sum_t e_{u_it} b_it^T`` (token ids ``u``, output gradients ``b``),

    K_ij = sum_{t in i, s in j, u_it = u_js} <b_it, b_js>:

only pairs of tokens with the *same* id contribute. Let ``S_(v,i) = sum_{t in i, u_it = v} b_it`` (the
non-zero rows of ``g_i``, one per distinct (id, example) pair) and ``c_v`` the number of examples
that read id ``v``. Then ``K = sum_v S_v S_v^T`` with ``S_v`` the ``c_v`` rows of id ``v``, and its cost is
``sum_v c_v^2 d`` instead of the ``n^2 (ids) d`` of materialised ``g_i`` (a padded ``(n, ids, d)``
block, mostly zero: an example reads a few of the batch's ids) or the ``(nT)^2 d`` of ghost products
over all token pairs. For natural text ``c_v`` is small for most ids and near ``n`` for a few (common
words, a template's tokens), so the ids are split at a group size ``C``:

* ids read by at most ``C`` examples (rows sorted by id): the pairs of rows ``k = 0 .. C-1`` apart
  within one id, ``C`` passes over their rows;
* the others: a dense ``(n, ids, d)`` block and one product, ``n^2 (ids) d``.

``C`` minimises the sum of the two counts (``C = 0``, all dense, is the materialised path over the
batch's ids). The result equals both other paths up to float rounding (the sums run in another order).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _split_cost(counts: Tensor, n: int, d: int, limit: int) -> int:
    """Operation count with ids read by more than ``limit`` examples dense (``counts``: examples per id)."""
    rare = counts <= limit
    rows = int(counts[rare].sum())
    return rows * limit * d + n * n * int((~rare).sum()) * d


def equal_id_gram(
    ids: Tensor,
    examples: Tensor,
    b: Tensor,
    n: int,
    direction: Tensor | None = None,
    *,
    limit: int | None = None,
) -> tuple[Tensor, Tensor | None, bool]:
    """``(K, dots, dense_only)`` over token rows: ``ids`` (M,), ``examples`` (M,) and ``b`` (M, d).

    ``direction`` (table rows, d; any dtype and device) gives ``dots_i = <g_i, D> = sum_t D[u_it] . b_it`` too. ``limit`` is the
    group size ``C`` (default: the cheapest). ``K`` and ``dots`` are in ``b``'s dtype on its device;
    ``dense_only`` says whether the split formed no pairs (the materialised path over the batch's ids).
    """
    dtype, dev, d = b.dtype, b.device, b.shape[-1]
    K = torch.zeros(n, n, dtype=dtype, device=dev)
    if ids.numel() == 0:
        return K, None if direction is None else torch.zeros(n, dtype=dtype, device=dev), False
    keys, inverse = torch.unique(ids * n + examples, return_inverse=True)  # sorted by id, then example
    S = torch.zeros(keys.numel(), d, dtype=dtype, device=dev).index_add_(0, inverse, b)
    pid, pex = torch.div(keys, n, rounding_mode="floor"), keys % n
    _, group, counts = torch.unique_consecutive(pid, return_inverse=True, return_counts=True)
    dots = None
    if direction is not None:
        rows = direction[pid.to(direction.device)].to(dev, dtype)  # only the rows the batch reads
        dots = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, pex, (S * rows).sum(1))
    if limit is None:
        limits = [0] + [1 << k for k in range(n.bit_length()) if 1 << k <= n] + [n]
        limit = min(limits, key=lambda c: _split_cost(counts, n, d, c))
    rare = counts[group] <= limit
    if limit < int(counts.max()):  # the dense block of ids read by many examples
        many = ~rare
        cols = torch.unique(pid[many], return_inverse=True)[1]
        width = int(cols.max()) + 1
        dense = torch.zeros(n * width, d, dtype=dtype, device=dev)
        dense.index_add_(0, pex[many] * width + cols, S[many])
        flat = dense.view(n, width * d)
        K += flat @ flat.T
    if limit > 0 and bool(rare.any()):
        Sr, er, gr = S[rare], pex[rare], group[rare]
        K.view(-1).index_add_(0, er * (n + 1), (Sr * Sr).sum(1))
        for k in range(1, min(limit, Sr.shape[0])):
            same = (gr[k:] == gr[:-k]).nonzero().squeeze(1)
            if same.numel() == 0:
                continue
            v = (Sr[k:][same] * Sr[same]).sum(1)
            i, j = er[same], er[k:][same]
            K.view(-1).index_add_(0, torch.cat([i * n + j, j * n + i]), torch.cat([v, v]))
    return K, dots, limit == 0
