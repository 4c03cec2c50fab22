"""The example axis read off shapes is verified: coincidences go to exact autograd, never to a wrong K.

Each model below has a captured call whose dimension 0 has ``n`` entries (or whose inputs are split
by that rule) although its rows are not the probe's examples in order. Before the checks of
:mod:`dynamics.signals.example_axis` the fast path returned a wrong Gram matrix for these (or
raised on inconsistent shapes); now it must equal the brute-force one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynamics import probe
from dynamics.signals.example_axis import check_weights, reproduces, rows_local
from dynamics.signals.losses import run_model
from tests import tiny_models as tm
from tests.reference import ref_grads

N, D = 6, 5


def _assert_gram(res, G):
    K = G @ G.T
    np.testing.assert_allclose(res.gram.numpy(), K, rtol=1e-9, atol=1e-12 * np.abs(K).max())


def _coverage(res) -> dict[str, str]:
    return {name: path for path, names in res.coverage.items() for name in names}


def _multi_image_llava_batch(n: int = 4):
    """``n`` images for ``n`` examples, but example 0 carries two images and example 1 none.

    LLaVA consumes ``pixel_values`` in order, so vision-tower row ``r`` is not example ``r``
    although the tower's dimension 0 has the probe's ``n`` entries.
    """
    batch, _ = tm.llava_batch(n=n, text_len=6, seed=0, dtype=torch.float64)
    P = tm.N_IMAGE_TOKENS
    T = batch["input_ids"].shape[1] + P
    ids = torch.full((n, T), tm.PAD_ID)
    att = torch.zeros(n, T, dtype=torch.long)
    lab = torch.full((n, T), -100)
    for i in range(n):
        row, lrow, arow = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        if i == 0:  # a second image right after BOS
            row = torch.cat([row[:1], torch.full((P,), tm.IMAGE_TOKEN_ID), row[1:]])
            lrow = torch.cat([torch.full((P,), -100), lrow])
            arow = torch.cat([torch.ones(P, dtype=torch.long), arow])
        elif i == 1:  # no image
            keep = row != tm.IMAGE_TOKEN_ID
            row, lrow, arow = row[keep], lrow[keep], arow[keep]
        ids[i, : len(row)], lab[i, : len(lrow)], att[i, : len(arow)] = row, lrow, arow
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "pixel_values": batch["pixel_values"]}


def test_images_not_one_per_example_are_not_attributed_by_position():
    model = tm.tiny_llava(seed=0, dtype=torch.float64)
    batch = _multi_image_llava_batch()
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "causal_lm")
    res = probe(model, batch, task_ids=torch.arange(4) % 2)
    _assert_gram(res, G)
    cov = _coverage(res)
    assert cov["model.vision_tower.embeddings.patch_embedding.weight"] == "exact"
    assert cov["model.multi_modal_projector.linear_1.weight"] == "exact"
    assert cov["lm_head.weight"] in ("ghost", "materialized")  # the text side keeps the fast path


class Reversed(nn.Module):
    """A Linear that sees the examples in reverse order: right shapes, wrong rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.flip(0)).flip(0)))


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_rows_in_another_order_fail_the_locality_check(method):
    torch.manual_seed(0)
    model = Reversed().double()
    batch = {"x": torch.randn(N, D, dtype=torch.float64), "labels": torch.randint(0, 3, (N,))}
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2, method=method)
    _assert_gram(res, G)
    cov = _coverage(res)
    assert cov["lin.weight"] == cov["lin.bias"] == "exact"
    assert cov["head.weight"] != "exact"


class Centered(nn.Module):
    """Examples mixed (centred over the batch) between two Linear layers and a head: the mixing is
    above ``lin0`` and ``lin1``, below ``head``."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.lin1(torch.tanh(self.lin0(x)))
        return self.head(torch.tanh(h - h.mean(0, keepdim=True)))


def test_the_weighted_pass_judges_each_output_where_it_reaches_it(monkeypatch):
    # Only the deepest output is asked of autograd (the others are judged by a hook on their tensor
    # and dropped), and a mixing seen through a hook fails like one seen at the end.
    torch.manual_seed(0)
    model = Centered().double()
    batch = {"x": torch.randn(N, D, dtype=torch.float64), "labels": torch.randint(0, 3, (N,))}
    asked: list[int] = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kw):
        if grad_outputs is not None and not bool((grad_outputs == 1).all()):
            asked.append(len(inputs))
        return grad(outputs, inputs, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    res = probe(model, batch, task_ids=torch.arange(N) % 2, method="materialize")
    monkeypatch.undo()
    assert asked[0] == 1  # lin0's output, of the three captured
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    _assert_gram(res, G)
    cov = _coverage(res)
    assert cov["lin0.weight"] == cov["lin1.weight"] == cov["lin1.bias"] == "exact"
    assert cov["head.weight"] == "materialized"


class FlatPatches(nn.Module):
    """Patches flattened across examples (Qwen2-VL style): ``(n * P, d)`` into a tower, regrouped after.

    The tower's Linear is not batch-first: splitting it by dimension 0 would be wrong (it raised a
    shape error once, then went to exact autograd); its rows' examples are now discovered
    (:mod:`dynamics.signals.row_map`).
    """

    P = 3

    def __init__(self):
        super().__init__()
        self.tower = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, patches):
        h = torch.tanh(self.tower(patches))  # (n * P, D)
        return self.head(h.reshape(-1, self.P, D).mean(1))


def test_patches_flattened_across_examples_are_row_mapped():
    torch.manual_seed(1)
    model = FlatPatches().double()
    batch = {
        "patches": torch.randn(N * FlatPatches.P, D, dtype=torch.float64),
        "labels": torch.randint(0, 3, (N,)),
    }
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2)
    _assert_gram(res, G)
    assert res.coverage["exact"] == []
    assert "tower.weight" in res.coverage["ghost"] + res.coverage["materialized"]


class SharedTable(nn.Module):
    """A table shared by every example whose length happens to be ``n``, and a parameter read by the root.

    ``scale`` puts the root on the module path; splitting ``table`` by rows (its dimension 0 is
    ``n``) changes the outputs, which the re-run check sees.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x, table):
        # scale reaches the product by two paths: neither a plain product p * x nor one shared chain
        # f(p), which the elementwise path covers (tests/signals/test_elementwise_uses.py)
        return self.head(torch.tanh(x * (self.scale.exp() + self.scale) + table.mean(0)))


def test_shared_input_of_length_n_is_not_split_by_the_module_path():
    torch.manual_seed(2)
    model = SharedTable().double()
    gen = torch.Generator().manual_seed(2)
    batch = {
        "x": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "table": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 3, (N,), generator=gen),
    }
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2)
    _assert_gram(res, G)
    assert _coverage(res)["scale"] == "exact"


def test_check_weights_are_distinct_signed_powers_of_two():
    w = check_weights(40, torch.zeros(1, dtype=torch.float32))
    assert w.dtype == torch.float32
    first = w[:32].tolist()
    assert len(set(first)) == 32
    assert all(abs(v) == 2.0 ** round(np.log2(abs(v))) for v in first)
    assert w[:4].tolist() == [1.0, -1.0, 2.0, -2.0]
    assert torch.equal(w[32:], w[: 40 - 32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_locality_check_is_exact_for_row_local_graphs_and_sees_mixing(dtype):
    """Power-of-two weights commute with rounding: a row-local backward matches to the last bit."""
    gen = torch.Generator().manual_seed(0)
    n = 8
    x = torch.randn(n, 4, 7, generator=gen).to(dtype).requires_grad_(True)
    W = torch.randn(7, 7, generator=gen).to(dtype)
    y = torch.tanh(x @ W)
    local_losses = (y.float() ** 2).mean((1, 2)).log1p()
    w = check_weights(n, local_losses)
    dy_w = torch.autograd.grad(local_losses, y, w, retain_graph=True)[0]
    dy_1 = torch.autograd.grad(local_losses, y, torch.ones_like(local_losses))[0]
    assert torch.equal(dy_w, w.to(dtype)[:, None, None] * dy_1)
    assert rows_local(dy_w, dy_1, w)

    y = torch.tanh(x @ W)
    mixed = (y.float() ** 2).mean((1, 2)) + 0.5 * y.float().mean((1, 2)).roll(1, 0)  # row r feeds r + 1
    dy_w = torch.autograd.grad(mixed, y, w, retain_graph=True)[0]
    dy_1 = torch.autograd.grad(mixed, y, torch.ones_like(mixed))[0]
    assert not rows_local(dy_w, dy_1, w)
    assert rows_local(None, None, w)
    assert not rows_local(None, dy_1, w)


def test_reproduces():
    y = torch.randn(3, 4, dtype=torch.float64)
    assert reproduces(y + 1e-12, y)
    assert not reproduces(y + 1e-3 * y.abs().max(), y)
    assert not reproduces(y[:1], y)
    assert reproduces(torch.zeros(3, 4, dtype=torch.float64), y, shape_only=True)


def test_composite_models_run_without_a_kv_cache():
    """LLaVA keeps ``use_cache`` on its text config: the probe still switches the cache off."""
    model = tm.tiny_llava(seed=0).eval()
    batch, _ = tm.llava_batch(n=2)
    assert getattr(model.config, "use_cache", None) is None
    with torch.no_grad():
        assert model(**{k: v for k, v in batch.items() if k != "labels"}).past_key_values is not None
        assert run_model(model, batch).past_key_values is None
