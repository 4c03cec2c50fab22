"""Row-mapped calls (:mod:`dynamics.signals.row_map`): rows of several examples in one call, attributed exactly.

Each toy model feeds a layer rows that are not the probe's examples in order (dimension 0 is all
rows of all examples, interleaved, unequal per example, one example with none). Where every row
belongs to one example, the default probe must equal the brute-force Gram with nothing on the
exact path; where rows are mixed or shared across examples, or ``n > 32``, the layer must go to
exact autograd, and the Gram must still be right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynamics import probe
from dynamics.signals import axis_cache
from dynamics.signals.example_axis import check_weights
from dynamics.signals.row_map import discover_row_map, example_layout, sum_rows
from tests.reference import ref_grads
from tests.signals.signals_helpers import assert_gram

D = 5


def _owners(n: int, seed: int = 0) -> torch.Tensor:
    """Row -> example, interleaved, unequal counts; example 1 has no rows."""
    gen = torch.Generator().manual_seed(seed)
    counts = [3, 0] + [int(c) for c in torch.randint(1, 4, (n - 2,), generator=gen)]
    owner = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    return owner[torch.randperm(owner.numel(), generator=gen)]


class FlatRows(nn.Module):
    """A tower (LayerNorm, Linear, Embedding on token rows) over rows of all examples, pooled per example.

    ``mix`` adds a term every example sees (the mean over ALL rows), ``share`` adds row 0 to example
    ``share`` too: both make rows reach several examples' losses.
    """

    def __init__(self, n: int, mix: bool = False, share: int | None = None):
        super().__init__()
        self.n, self.mix, self.share = n, mix, share
        self.norm = nn.LayerNorm(D)
        self.tower = nn.Linear(D, D)
        self.emb = nn.Embedding(11, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, rows, ids, owner):
        h = torch.tanh(self.tower(self.norm(rows)) + self.emb(ids))  # (R, D), R != n
        pooled = torch.zeros(self.n, D, dtype=h.dtype).index_add(0, owner, h)
        if self.mix:
            pooled = pooled + h.mean(0)
        if self.share is not None:
            pooled[self.share] = pooled[self.share] + h[0]
        return self.head(x + pooled)


def _batch(n: int, seed: int = 0, in_order: bool = False):
    """``in_order``: two rows per example in batch order (equal-sized images), else :func:`_owners`."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.arange(n).repeat_interleave(2) if in_order else _owners(n, seed)
    r = owner.numel()
    return {
        "x": torch.randn(n, D, generator=gen, dtype=torch.float64),
        "rows": torch.randn(r, D, generator=gen, dtype=torch.float64),
        "ids": torch.randint(0, 11, (r,), generator=gen),
        "owner": owner,
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }


def _probe_and_ref(model, batch, n):
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    return probe(model, batch, task_ids=torch.arange(n) % 2), G


TOWER = ["emb.weight", "norm.bias", "norm.weight", "tower.bias", "tower.weight"]


@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_rows_of_one_example_each_are_row_mapped(method, in_order):
    torch.manual_seed(0)
    n = 6
    model = FlatRows(n).double()
    batch = _batch(n, in_order=in_order)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(n) % 2, method=method)
    assert_gram(res, G)
    assert res.coverage["exact"] == []
    assert {"norm.weight", "norm.bias"} <= set(res.coverage["rule"])


def test_steady_state_reuses_the_row_maps(weighted_passes):
    torch.manual_seed(0)
    n = 6
    model = FlatRows(n).double()
    batch = _batch(n)
    axis_cache.clear(model)
    first, G = _probe_and_ref(model, batch, n)
    second = probe(model, batch, task_ids=torch.arange(n) % 2)
    assert weighted_passes["n"] == 1  # the second probe found every map in the memo
    assert_gram(first, G)
    assert_gram(second, G)
    assert second.coverage["exact"] == []


@pytest.mark.parametrize("kind", ["mix", "share"])
def test_rows_reaching_several_examples_go_to_exact(kind):
    torch.manual_seed(1)
    n = 6
    model = FlatRows(n, mix=kind == "mix", share=2 if kind == "share" else None).double()
    batch = _batch(n, seed=1)
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    assert sorted(res.coverage["exact"]) == TOWER
    assert "head.weight" not in res.coverage["exact"]


def test_more_examples_than_distinct_weights_go_to_exact():
    torch.manual_seed(2)
    n = 34  # > WEIGHT_PERIOD: examples i and i + 32 share a check weight
    model = FlatRows(n).double()
    batch = _batch(n, seed=2)
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    assert sorted(res.coverage["exact"]) == TOWER


def test_rows_without_gradient_are_dropped_and_verified_again(weighted_passes):
    """Rows that reach no loss map to -1; such a map is not reused (the row may matter later)."""
    torch.manual_seed(3)
    n = 5
    model = FlatRows(n).double()
    batch = _batch(n, seed=3)
    batch["owner"] = batch["owner"].clone()
    dead = batch["owner"] == 0
    extra = torch.zeros(int(dead.sum()), dtype=torch.long)  # rows of example 0 pooled into a dropped slot

    class Drop(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, rows, ids, owner):
            h = torch.tanh(self.inner.tower(self.inner.norm(rows)) + self.inner.emb(ids))
            pooled = torch.zeros(n + 1, D, dtype=h.dtype).index_add(0, torch.where(owner == 0, n, owner), h)
            return self.inner.head(x + pooled[:n])

    wrapped = Drop(model)
    assert extra.numel() > 0
    axis_cache.clear(wrapped)
    res, G = _probe_and_ref(wrapped, batch, n)
    again = probe(wrapped, batch, task_ids=torch.arange(n) % 2)
    assert_gram(res, G)
    assert_gram(again, G)
    assert res.coverage["exact"] == [] and again.coverage["exact"] == []
    assert weighted_passes["n"] == 2


class PatchEmbed3d(nn.Module):
    """Qwen2-VL's patch embedding: rows of (C, T, P, P) pixels of all images, a Conv3d with kernel == stride."""

    def __init__(self, n: int, kernel=(2, 2, 2), spatial=(2, 2, 2)):
        super().__init__()
        self.n = n
        self.spatial = spatial
        self.proj = nn.Conv3d(3, D, kernel_size=kernel, stride=kernel, bias=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x, rows, owner):
        h = torch.tanh(self.proj(rows.view(-1, 3, *self.spatial))).flatten(2).mean(2)  # (R, D)
        pooled = torch.zeros(self.n, D, dtype=h.dtype).index_add(0, owner, h)
        return self.head(x + pooled)


@pytest.mark.parametrize(
    ("kernel", "spatial"),
    [((2, 2, 2), (2, 2, 2)), ((1, 2, 2), (2, 5, 4))],  # one patch per row; several, trailing pixels dropped
)
def test_conv3d_patch_embedding_is_factored(kernel, spatial):
    torch.manual_seed(4)
    n = 5
    model = PatchEmbed3d(n, kernel, spatial).double()
    gen = torch.Generator().manual_seed(4)
    owner = _owners(n, seed=4)
    batch = {
        "x": torch.randn(n, D, generator=gen, dtype=torch.float64),
        "rows": torch.randn(owner.numel(), 3 * int(np.prod(spatial)), generator=gen, dtype=torch.float64),
        "owner": owner,
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    assert res.coverage["exact"] == []
    assert "proj.weight" in res.coverage["ghost"] + res.coverage["materialized"]


def test_batch_first_conv3d_patch_embedding_is_factored():
    torch.manual_seed(5)
    n = 4
    conv = nn.Conv3d(2, D, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(D * 2 * 2 * 2, 3)).double()
    gen = torch.Generator().manual_seed(5)
    batch = {
        "input": torch.randn(n, 2, 2, 4, 5, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    assert "0.weight" in res.coverage["ghost"] + res.coverage["materialized"]


def test_overlapping_conv3d_is_not_factored():
    conv = nn.Conv3d(2, 3, kernel_size=2, stride=1)
    from dynamics.signals.layer_kinds import module_kind

    assert module_kind(conv) == "generic"
    assert module_kind(nn.Conv3d(2, 3, kernel_size=2, stride=2)) == "conv"
    assert module_kind(nn.Conv3d(2, 3, kernel_size=2, stride=2, padding=1)) == "generic"


def test_discover_row_map_names_each_rows_example_and_rejects_mixtures():
    n = 6
    c = check_weights(n, torch.zeros((), dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    owner = torch.tensor([3, 0, 5, 5, 2, 0, 4])
    u = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    u[1] = 0.0  # a row without gradient
    w = c[owner].unsqueeze(1) * u
    found = discover_row_map(w, u, c, 7)
    assert found is not None
    assert found.tolist() == [3, -1, 5, 5, 2, 0, 4]
    mixed = w.clone()
    mixed[2] = c[5] * u[2] * 0.5 + c[1] * u[2] * 0.5 + 1e-3 * u[3]  # row 2 feeds examples 5 and 1
    assert discover_row_map(mixed, u, c, 7) is None
    cancel = w.clone()
    cancel[1] = u[0]  # zero unit gradient, non-zero weighted one: examples cancel on the row
    assert discover_row_map(cancel, u, c, 7) is None
    assert discover_row_map(w, u, check_weights(33, u), 7) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        for which in ("unit", "weighted"):
            uu, ww = u.clone(), w.clone()
            (uu if which == "unit" else ww)[4, 2] = bad
            assert discover_row_map(ww, uu, c, 7) is None, (bad, which)
    # the largest |u| of a row may be negative: its ratio names the example as well
    neg = u.clone()
    neg[0] = torch.tensor([0.1, -3.0, 0.2, 1.0], dtype=torch.float64)
    found = discover_row_map(c[owner].unsqueeze(1) * neg, neg, c, 7)
    assert found is not None and found.tolist() == [3, -1, 5, 5, 2, 0, 4]


def test_example_layout_and_sum_rows_group_rows_by_example():
    rows = torch.arange(12.0).reshape(6, 2)
    row_map = torch.tensor([2, 0, -1, 2, 0, 2])
    lay = example_layout(rows, row_map, 4)
    assert lay.shape == (4, 3, 2)
    assert lay[0].tolist() == [[2, 3], [8, 9], [0, 0]]
    assert lay[1].abs().sum() == 0 and lay[3].abs().sum() == 0
    assert lay[2].tolist() == [[0, 1], [6, 7], [10, 11]]
    sums = sum_rows(rows, row_map, 4)
    assert torch.equal(sums, lay.sum(1))


def _layout_by_loop(rows: torch.Tensor, row_map: torch.Tensor, n: int) -> torch.Tensor:
    per = [[rows[r] for r in range(len(row_map)) if int(row_map[r]) == i] for i in range(n)]
    r_max = max(1, *(len(p) for p in per))
    out = torch.zeros(n, r_max, *rows.shape[1:], dtype=rows.dtype)
    for i, p in enumerate(per):
        for k, row in enumerate(p):
            out[i, k] = row
    return out


@pytest.mark.parametrize(
    "row_map",
    [
        torch.arange(4).repeat_interleave(3),  # in order, equal counts: a view
        torch.arange(4).repeat(3),  # interleaved
        torch.tensor([0, 0, 1, 1, 1, 3, 3]),  # in order, unequal, example 2 empty
        torch.tensor([1, -1, 0, 0, -1, 1]),  # dropped rows
        torch.full((3,), -1),  # no row kept
    ],
)
def test_example_layout_and_sum_rows_match_a_loop_and_follow_changes_to_the_map(row_map):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(len(row_map), 3, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 9, (len(row_map),), generator=gen)
    for _ in range(2):  # the second call reads the cached layout
        assert torch.equal(example_layout(rows, row_map, 4), _layout_by_loop(rows, row_map, 4))
        assert torch.equal(example_layout(ids, row_map, 4), _layout_by_loop(ids, row_map, 4))
        torch.testing.assert_close(sum_rows(rows, row_map, 4), _layout_by_loop(rows, row_map, 4).sum(1))
    row_map[0] = 2 if int(row_map[0]) == 3 else 3  # a map edited in place is not served from the cache
    assert torch.equal(example_layout(rows, row_map, 4), _layout_by_loop(rows, row_map, 4))
    torch.testing.assert_close(sum_rows(rows, row_map, 4), _layout_by_loop(rows, row_map, 4).sum(1))


def test_row_maps_from_the_single_batched_backward_of_fsdp1_and_zero3(monkeypatch):
    """Where only one backward per forward is allowed, both weightings come from one batched pass."""
    from dynamics.signals.capture import Capture

    monkeypatch.setattr(Capture, "one_backward", property(lambda self: True))
    torch.manual_seed(6)
    n = 6
    model = FlatRows(n).double()
    batch = _batch(n, seed=6)
    axis_cache.clear(model)
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    assert res.coverage["exact"] == []


class ImagePatchIds(nn.Module):
    """An embedding read at (images x patches) ids, images of several examples (not n of them):
    each row of ids belongs to one example, so the table is row-mapped, not a shared grid."""

    def __init__(self, n: int, patches: int):
        super().__init__()
        self.n = n
        self.emb = nn.Embedding(11, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, ids, owner):
        h = torch.tanh(self.emb(ids)).mean(1)  # (images, D)
        return self.head(x + torch.zeros(self.n, D, dtype=h.dtype).index_add(0, owner, h))


@pytest.mark.parametrize("patches", [3, 4])  # images x patches; 4: square by coincidence
def test_image_by_patch_ids_are_row_mapped_unless_square(patches):
    torch.manual_seed(5)
    n = 6
    owner = _owners(n, seed=5)[:4]  # four images of some of the examples
    gen = torch.Generator().manual_seed(5)
    batch = {
        "x": torch.randn(n, D, generator=gen, dtype=torch.float64),
        "ids": torch.randint(0, 11, (4, patches), generator=gen),
        "owner": owner,
        "labels": torch.randint(0, 3, (n,), generator=gen),
    }
    model = ImagePatchIds(n, patches).double()
    res, G = _probe_and_ref(model, batch, n)
    assert_gram(res, G)
    factored = res.coverage["ghost"] + res.coverage["materialized"]
    assert ("emb.weight" in factored) == (patches != 4), res.coverage
    assert res.coverage["exact"] == [] or patches == 4
