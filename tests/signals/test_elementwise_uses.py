"""Parameters used elementwise (``p * x``, ``x + p``, ``p.expand``): the closed forms against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynamics import probe
from dynamics.signals.axis_cache import clear
from tests.reference import ref_grads
from tests.signals.signals_helpers import assert_gram

N, T, D = 6, 4, 5


class LayerScaled(nn.Module):
    """Layer scales as InternVL, ConvNeXt and DINOv2 write them, used in every way a product allows."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.lambda_1 = nn.Parameter(torch.randn(D))  # left operand
        self.lambda_2 = nn.Parameter(torch.randn(D))  # right operand, and used twice
        self.gamma = nn.Parameter(torch.randn(2, 1, 1))  # channel scale of an (n, C, H, W) map
        self.head = nn.Linear(D + 4 * T, 3)

    def forward(self, x):
        h = self.inp(x)  # (n, T, D)
        h = h + self.lambda_1 * torch.tanh(h)
        h = h + torch.sin(h) * self.lambda_2
        h = h * self.lambda_2
        maps = h[..., :4].reshape(x.shape[0], 2, T, 2)  # (n, C = 2, H = T, W = 2)
        maps = self.gamma * torch.relu(maps)
        return self.head(torch.cat([h.mean(1), maps.flatten(1)], 1))


class OneScale(nn.Module):
    """A Linear layer, one scale vector, a head: subclasses use the scale in one awkward way."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.scale = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)


class Mixing(OneScale):
    """A scale whose product's rows reach every example's loss (a batch mean): no closed form."""

    def forward(self, x):
        z = self.scale * torch.tanh(self.inp(x))  # (n, D): rows look batch-first
        return self.head(z + z.mean(0, keepdim=True))


class PatchEmbeddings(nn.Module):
    """A ViT-style stem: a class token expanded over the batch, learned positions added, an offset."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(D, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.position = nn.Parameter(torch.randn(1, T + 1, D))
        self.offset = nn.Parameter(torch.randn(D))  # added twice, once as the left operand
        self.doubled = nn.Parameter(torch.randn(D))  # x + 2 * p (alpha): not a plain sum
        self.shift = nn.Parameter(torch.randn(D))  # x - p: not recognised either
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], 1) + self.position
        h = torch.tanh(self.offset + h) + self.offset
        h = torch.add(torch.sin(h), self.doubled, alpha=2.0) - self.shift
        return self.head(h[:, 0] + h[:, 1:].mean(1))


def _batch(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(N, T, D, generator=gen, dtype=dtype),
        "labels": torch.randint(0, 3, (N,), generator=gen),
    }


def _coverage(res) -> dict[str, str]:
    return {name: path for path, names in res.coverage.items() for name in names}


@pytest.mark.parametrize("method", ["auto", "materialize"])
def test_layer_scales_match_brute_force_by_their_closed_form(method):
    torch.manual_seed(0)
    model = LayerScaled().double()
    batch = _batch()
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    for _ in range(2):  # the first probe verifies the example axis, the second reuses the verdicts
        res = probe(model, batch, task_ids=torch.arange(N) % 2, method=method)
        assert_gram(res, G)
        cov = _coverage(res)
        for name in ("lambda_1", "lambda_2", "gamma"):
            assert cov[name] == "rule", name
        assert res.coverage["module"] == [] and res.coverage["exact"] == []


@pytest.mark.parametrize("build", ["LayerScaled", "BareMatmuls"])  # the matrices' layout matters here
def test_direction_dots_match_explicit_vectors(build):
    torch.manual_seed(1)
    model = globals()[build]().double()
    batch = _batch(seed=1)
    params = list(model.parameters())
    G, _, weights = ref_grads(model, batch, params, "classification")
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    d = torch.cat([x.reshape(-1) for x in direction]).numpy()
    task_ids = torch.arange(N) % 2
    res = probe(model, batch, task_ids=task_ids, direction=direction)
    for a in range(2):
        members = task_ids.numpy() == a
        g = (weights[members, None] / weights[members].sum() * G[members]).sum(0)
        want = g @ d / (np.linalg.norm(g) * np.linalg.norm(d))
        assert res.direction_cosine[a].item() == pytest.approx(want, rel=1e-9)


def test_a_scale_whose_rows_mix_examples_fails_the_check_and_goes_to_exact_autograd():
    torch.manual_seed(2)
    model = Mixing().double()
    batch = {"x": torch.randn(N, D, dtype=torch.float64), "labels": torch.randint(0, 3, (N,))}
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2)
    assert_gram(res, G)
    assert _coverage(res)["scale"] == "exact"


def test_an_in_place_product_is_covered_or_falls_back_but_is_never_wrong():
    class InPlace(OneScale):
        def forward(self, x):
            h = torch.tanh(self.inp(x)).clone()
            h.mul_(self.scale)  # the node saves the factor before the in-place change, or cannot be read
            return self.head(h.mean(1))

    torch.manual_seed(3)
    model = InPlace().double()
    batch = _batch(seed=3)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    res = probe(model, batch, task_ids=torch.arange(N) % 2)
    assert_gram(res, G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_scales_in_low_precision_against_the_float64_reference(dtype):
    torch.manual_seed(4)
    model = LayerScaled().double()
    batch = _batch(seed=4)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    low = LayerScaled().to(dtype)
    low.load_state_dict(model.state_dict())
    res = probe(low, {"x": batch["x"].to(dtype), "labels": batch["labels"]}, task_ids=torch.arange(N) % 2)
    K = G @ G.T
    # bfloat16 activations carry ~3 significant digits through a few layers
    tol = 2e-4 if dtype == torch.float32 else 8e-2
    assert np.abs(res.gram.numpy() - K).max() <= tol * np.abs(K).max()
    assert _coverage(res)["lambda_1"] == "rule"
    clear(low)


def test_added_and_expanded_parameters_match_brute_force_by_their_closed_form():
    torch.manual_seed(5)
    model = PatchEmbeddings().double()
    batch = _batch(seed=5)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    for _ in range(2):
        res = probe(model, batch, task_ids=torch.arange(N) % 2)
        assert_gram(res, G)
        cov = _coverage(res)
        for name in ("cls_token", "position", "offset"):
            assert cov[name] == "rule", name
        for name in ("doubled", "shift"):  # alpha != 1, a difference: another path, still exact
            assert cov[name] in ("module", "exact"), name


class SharedBias(nn.Module):
    """Attention-like scores with biases computed from parameters alone, the same for every example.

    ``table``: T5's relative position bias (a lookup of constant buckets, permuted, unsqueezed, added
    to two layers' scores, masked by a padding mask in a batched ``where``). ``grid``: a position
    table interpolated to the input's size (LFM2-VL, SigLIP2), through a nonlinear gate. ``split``:
    one parameter feeding two branches before its use (not a chain: another path).
    """

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(7, 2))  # 7 buckets x 2 heads
        self.grid = nn.Parameter(torch.randn(1, D, 2))
        self.split = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(2 * T * T + T * D, 3)
        buckets = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(-3, 3) + 3
        self.register_buffer("buckets", buckets)

    def forward(self, x, keep):
        h = self.inp(x)  # (n, T, D)
        bias = nn.functional.embedding(self.buckets, self.table).permute(2, 0, 1).unsqueeze(0)  # (1, 2, T, T)
        scores = torch.einsum("ntd,nsd->nts", h, h).unsqueeze(1).expand(-1, 2, -1, -1)
        masked = torch.where(keep[:, None, None, :], bias, torch.full_like(bias, -3.0))  # (n, 2, T, T)
        s1 = torch.softmax(scores + masked, -1)
        s2 = torch.tanh(torch.sigmoid(s1) + bias)
        positions = nn.functional.interpolate(self.grid, size=T, mode="linear", align_corners=False)
        g = torch.tanh(h + torch.sigmoid(positions).transpose(1, 2)) * (self.split.exp() + self.split)
        return self.head(torch.cat([s2.flatten(1), g.flatten(1)], 1))


def test_tensors_computed_from_parameters_alone_match_brute_force_by_their_shared_chains():
    torch.manual_seed(6)
    model = SharedBias().double()
    batch = _batch(seed=6)
    batch["keep"] = torch.ones(N, T, dtype=torch.bool)
    batch["keep"][1, 2:] = False  # a padded example: the mask differs between examples
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    start = sum(p.numel() for name, p in model.named_parameters() if name.startswith("inp."))
    assert np.linalg.norm(G[:, start : start + 14], axis=1).min() > 1e-3  # the table's are not trivial
    for _ in range(2):
        res = probe(model, batch, task_ids=torch.arange(N) % 2)
        assert_gram(res, G)
        cov = _coverage(res)
        assert cov["table"] == cov["grid"] == "rule", cov
        assert cov["split"] in ("module", "exact"), cov


class BareMatmuls(nn.Module):
    """Matrices used by hand-written products: ``x @ W`` on (n, T, d) and (n, d) inputs (rows mapped to
    examples by the weighted pass, or one row per example), ``addmm(b, x, V)``, one matrix used twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.proj = nn.Parameter(torch.randn(D, 4))  # as Gemma 3's mm_input_projection_weight
        self.pooled = nn.Parameter(torch.randn(D, 3))
        self.bias = nn.Parameter(torch.randn(3))
        self.twice = nn.Parameter(torch.randn(4, 4))
        self.scaled = nn.Parameter(torch.randn(4, 3))  # addmm with beta != 1: another path
        self.head = nn.Linear(4 + 3 + 3, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # (n, T, D)
        z = torch.tanh(torch.matmul(h, self.proj))  # folded to (n T, D) @ (D, 4)
        z = torch.matmul(torch.sin(z), self.twice) + torch.matmul(z, self.twice)
        pooled = torch.addmm(self.bias, h.mean(1), self.pooled)  # (n, D) @ (D, 3) + b
        other = torch.addmm(self.bias, z.mean(1), self.scaled, beta=0.5)
        return self.head(torch.cat([z.mean(1), torch.tanh(pooled), other], 1))


def test_matrices_of_bare_products_match_brute_force_as_factored_terms():
    torch.manual_seed(7)
    model = BareMatmuls().double()
    batch = _batch(seed=7)
    G, _, _ = ref_grads(model, batch, list(model.parameters()), "classification")
    for _ in range(2):  # the second probe reuses the discovered row maps
        res = probe(model, batch, task_ids=torch.arange(N) % 2)
        assert_gram(res, G)
        cov = _coverage(res)
        for name in ("proj", "pooled", "twice"):
            assert cov[name] in ("ghost", "materialized"), (name, cov)
        assert cov["scaled"] in ("module", "exact"), cov
    for method in ("ghost", "materialize"):
        assert_gram(probe(model, batch, task_ids=torch.arange(N) % 2, method=method), G)
