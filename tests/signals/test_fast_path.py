"""Fast-path coverage rules: every awkward parameter use still gives the brute-force Gram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dynamics import probe
from tests.reference import ref_grads
from tests.signals.signals_helpers import build

N, D = 6, 5


class Awkward(nn.Module):
    """Parameters used in the ways a hook-based fast path can get wrong."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(D, D)  # called twice
        self.viewed = nn.Linear(D, D)  # 3-D output is a view; an in-place op rewrites its graph
        self.proj = nn.Linear(D, D, bias=False)  # weight also read directly by the parent
        self.extra = nn.ParameterDict({"scale": nn.Parameter(torch.randn(D))})  # used by the parent
        self.seq_first = nn.Linear(D, D)  # sees (T, n, d): not batch-first, row-mapped
        self.emb = nn.Embedding(7, D, padding_idx=0)
        self.pos = nn.Embedding(3, D)  # applied to broadcast position ids (1, T)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, ids):
        h = x + self.emb(ids) + self.pos(torch.arange(3).unsqueeze(0))  # (n, 3, D)
        h = torch.tanh(self.shared(h))
        h = self.shared(h)
        h = torch.relu_(self.viewed(h))
        h = self.proj(h) + F.linear(h, self.proj.weight) * self.extra["scale"]
        h = self.seq_first(h.transpose(0, 1)).transpose(0, 1)
        return self.head(self.norm(h).mean(1))


def _awkward_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, D, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 7, (N, 3), generator=gen)
    ids[0, 0] = 0  # padding index occurs
    return {"x": x, "ids": ids, "labels": torch.randint(0, 3, (N,), generator=gen)}


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_awkward_uses_match_brute_force(method):
    torch.manual_seed(1)
    model = Awkward().double()
    batch = _awkward_batch()
    params = list(model.parameters())
    G, _, _ = ref_grads(model, batch, params, "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2, method=method)
    np.testing.assert_allclose(res.gram.numpy(), G @ G.T, rtol=1e-9, atol=1e-12 * np.abs(G @ G.T).max())
    cov = {name: path for path, names in res.coverage.items() for name in names}
    # the Linear called twice stays on the factored fast path (two terms per example)
    assert cov["shared.weight"] in ("ghost", "materialized")
    # not batch-first (T, n, d): its rows' examples are discovered (row-mapped), still factored
    assert cov["seq_first.weight"] in ("ghost", "materialized")
    # read outside its module, or whose captured output edge left the graph (in-place op on a
    # view): module path
    for name in ("proj.weight", "viewed.weight"):
        assert cov[name] == "module", name
    # owned by a ParameterDict and multiplied into an activation by the parent: the product's
    # closed form (elementwise_uses), with no module re-run
    assert cov["extra.scale"] == "rule"
    # looked up with broadcast ids: its output is expanded to one row per example, then factored
    for name in ("emb.weight", "pos.weight"):
        assert cov[name] in ("ghost", "materialized"), name
    assert res.coverage["exact"] == []


def test_inplace_relu_on_a_linear_output_stays_on_the_fast_path():
    model, batch, task_ids, kind = build("mlp")  # fc2 -> ReLU(inplace=True)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), kind)
    for method in ("ghost", "materialize"):
        res = probe(model, batch, task_ids=task_ids, method=method)
        assert "fc2.weight" in res.coverage["ghost"] + res.coverage["materialized"]
        np.testing.assert_allclose(res.gram.numpy(), G @ G.T, rtol=1e-9, atol=1e-14)


class Zoo(nn.Module):
    """One of each layer with a closed form or factored rule."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(D, 4, 3, stride=2, padding=1, dilation=1)
        self.conv2d = nn.Conv2d(1, 2, (2, 3), padding=(1, 0), dilation=(1, 2), bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4, eps=1e-5)
        self.ln = nn.LayerNorm(4, bias=False)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x):  # x: (n, D, 8)
        h = self.gn(self.conv1d(x))  # (n, 4, 4)
        h = self.ln(self.rms(h.transpose(1, 2))).mean(1)  # (n, 4)
        c = self.conv2d(x[:, :1, :].unsqueeze(1).expand(-1, 1, 3, 8)).mean((2, 3))  # (n, 2)
        return self.head(torch.cat([h, c], 1))


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_layer_rules_match_brute_force(method):
    torch.manual_seed(4)
    model = Zoo().double()
    with torch.no_grad():  # non-trivial affine parameters
        for mod in (model.gn, model.rms, model.ln):
            mod.weight.normal_()
        model.gn.bias.normal_()
    batch = {"x": torch.randn(N, D, 8, dtype=torch.float64), "labels": torch.randint(0, 3, (N,))}
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    d = [torch.randn_like(p) for p in model.parameters()]
    res = probe(model, batch, task_ids=torch.arange(N) % 2, method=method, direction=d)
    ex = probe(model, batch, task_ids=torch.arange(N) % 2, method="exact", direction=d)
    np.testing.assert_allclose(res.gram.numpy(), G @ G.T, rtol=1e-9, atol=1e-12 * np.abs(G @ G.T).max())
    np.testing.assert_allclose(res.direction_cosine.numpy(), ex.direction_cosine.numpy(), rtol=1e-9)
    assert sorted(res.coverage["rule"]) == ["gn.bias", "gn.weight", "ln.weight", "rms.weight"]
    assert {"conv1d.weight", "conv2d.weight"} <= set(
        res.coverage[method if method == "ghost" else "materialized"]
    )


class NotBatchFirstOutput(nn.Module):
    """The root returns (classes, n): no captured call is batch-first; global exact fallback."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 3)
        self.mix = nn.Linear(N, N, bias=False)  # mixes examples along the batch axis

    def forward(self, x):
        return self.lin(self.mix(x.T).T).T


def test_exact_fallback_when_nothing_is_batch_first():
    torch.manual_seed(2)
    model = NotBatchFirstOutput().double()
    x = torch.randn(N, D, dtype=torch.float64)
    labels = torch.randint(0, 3, (N,))

    def loss_fn(m, b):
        return F.cross_entropy(m(b).T, labels, reduction="none")

    res = probe(model, x, task_ids=torch.zeros(N, dtype=torch.long), loss=loss_fn)
    assert sorted(res.coverage["exact"]) == ["mix.weight"]
    model.eval()
    losses = loss_fn(model, x)
    G = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(losses[i], list(model.parameters()), retain_graph=True)
                ]
            )
            for i in range(N)
        ]
    ).numpy()
    order = {id(p): k for k, p in enumerate(model.parameters())}
    assert order  # parameters enumerate in the same order as above
    np.testing.assert_allclose(res.gram.numpy(), G @ G.T, rtol=1e-9, atol=1e-14)


class _Scale(torch.autograd.Function):
    """Old-style autograd.Function (no setup_context): torch.func transforms refuse it."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x).sum_to_size(s.shape)


class NoVmap(nn.Module):
    """A module with its own parameter whose forward cannot be vmapped: the per-example loop runs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(_Scale.apply(x, self.scale))


def test_module_path_falls_back_to_a_loop_when_vmap_fails():
    torch.manual_seed(3)
    model = NoVmap().double()
    batch = {"x": torch.randn(N, D, dtype=torch.float64), "labels": torch.randint(0, 3, (N,))}
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.zeros(N, dtype=torch.long))
    assert "scale" in res.coverage["module"]
    np.testing.assert_allclose(res.gram.numpy(), G @ G.T, rtol=1e-9, atol=1e-14)


def test_llava_needs_no_exact_fallback():
    """Broadcast CLIP position embeddings are factored (expanded per example), not n backward passes."""
    model, batch, task_ids, _ = build("llava", dtype=torch.float32)
    res = probe(model, batch, task_ids=task_ids)
    assert res.coverage["exact"] == []
    factored = res.coverage["ghost"] + res.coverage["materialized"]
    assert "model.vision_tower.embeddings.position_embedding.weight" in factored
    assert "model.vision_tower.embeddings.patch_embedding.weight" in factored  # Conv2d on patches
    assert "lm_head.weight" in factored
    assert "model.vision_tower.pre_layrnorm.weight" in res.coverage["rule"]  # nn.LayerNorm
    assert "model.language_model.norm.weight" in res.coverage["rule"]  # Llama RMSNorm bytecode


@pytest.mark.parametrize("family", ["llama_tied", "cnn"])
def test_blocked_materialisation(family, monkeypatch):
    """Per-example gradients formed in small row / column blocks give the same Gram and dots."""
    import dynamics.signals.products as products

    model, batch, task_ids, kind = build(family)
    d = [torch.randn_like(p) for p in model.parameters()]
    whole = probe(model, batch, task_ids=task_ids, method="materialize", direction=d)
    monkeypatch.setattr(products, "MATERIALIZE_ELEMENTS", 50)
    blocked = probe(model, batch, task_ids=task_ids, method="materialize", direction=d)
    np.testing.assert_allclose(blocked.gram.numpy(), whole.gram.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(blocked.direction_cosine.numpy(), whole.direction_cosine.numpy(), rtol=1e-10)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), kind)
    np.testing.assert_allclose(blocked.gram.numpy(), G @ G.T, rtol=1e-8, atol=1e-12 * np.abs(G @ G.T).max())


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_small_block_limits_give_the_same_gram(method):
    """Capped blocks (``products.block_limits``) change memory only: the Gram is the brute-force one."""
    from dynamics.signals.products import block_limits

    model, batch, task_ids, _ = build("llava")
    params = [p for p in model.parameters() if p.requires_grad]
    G, _, _ = ref_grads(model, batch, params, "causal_lm")
    with block_limits(1 << 10):
        res = probe(model, batch, task_ids=task_ids, method=method)
    K = G @ G.T
    np.testing.assert_allclose(res.gram.numpy(), K, rtol=1e-9, atol=1e-12 * np.abs(K).max())


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_products_under_autocast_run_in_float32(method):
    # Inside a caller's bfloat16 autocast the forward and backward are autocast's, the products
    # are not: ghost blocks used to mix dtypes (index_add_ raised) and materialised gradients to
    # come back in bfloat16. Against the exact path under the same autocast (whose per-example
    # weight gradients are bfloat16 matmuls, unit roundoff 2^-8): measured 4e-4 of max |K|.
    model, batch, task_ids, _ = build("llama_untied", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = probe(model, batch, task_ids=task_ids, method=method)
        exact = probe(model, batch, task_ids=task_ids, method="exact")
    scale = float(exact.gram.abs().max())
    assert scale > 0 and fast.gram.dtype == torch.float64
    assert float((fast.gram - exact.gram).abs().max()) <= 1e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_mask_is_any_nonzero(dtype):
    # The mask decides which token rows the ghost products keep: it must be exactly any(1),
    # with NaN rows kept, rows of -0.0 dropped, and empty rows (no columns) dropped.
    from dynamics.signals.products import Factored, _row_mask

    rows = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows[0, 1] = 0
    rows[1, 0] = -0.0
    rows[2, 2] = 0
    rows[2, 2, 4] = float("nan")
    rows[3, 0] = 0
    rows[3, 0, 5] = -1e-30 if dtype != torch.bfloat16 else -1e-20
    ids = torch.zeros(4, 3, dtype=torch.long)
    dense = Factored(rows, rows, False, 6)
    one_hot = Factored(ids, rows, True, 6)
    want = rows.reshape(12, 6).any(1)
    assert want.tolist().count(False) == 2
    assert torch.equal(_row_mask(dense), want) and torch.equal(_row_mask(one_hot), want)
    empty = torch.zeros(4, 3, 0, dtype=dtype)
    assert not _row_mask(Factored(empty, empty, False, 0)).any()
