"""Top Hessian eigenvalue: Lanczos on Hessian-vector products against a dense Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dynamics import probe
from dynamics.signals.hessian import hessian_top_eigenvalue
from tests.reference import ref_hessian
from tests.signals.signals_helpers import build


@pytest.mark.parametrize(
    ("family", "names", "rtol"),
    [
        ("mlp", ["head.weight", "head.bias", "norm.weight"], 1e-6),
        # transformers' RMSNorm computes in float32 even in a float64 model: float32 accuracy
        (
            "llama_untied",
            [
                "model.layers.1.self_attn.k_proj.weight",
                "model.norm.weight",
                "model.layers.0.input_layernorm.weight",
            ],
            1e-4,
        ),
    ],
)
def test_top_eigenvalue_matches_dense_hessian(family, names, rtol):
    model, batch, task_ids, kind = build(family)
    named = dict(model.named_parameters())
    params = [named[k] for k in names]
    H = ref_hessian(model, batch, params, kind)
    np.testing.assert_allclose(H, H.T, rtol=10 * rtol, atol=10 * rtol * np.abs(H).max())
    top = np.linalg.eigh((H + H.T) / 2)[0][-1]
    res = probe(
        model,
        batch,
        task_ids=task_ids,
        params=dict(zip(names, params, strict=True)),
        hessian=True,
        hessian_iters=H.shape[0],
        hessian_tol=1e-12,
    )
    assert res.hessian_top == pytest.approx(top, rel=rtol)
    assert ("hessian_top" in {r[1] for r in res.to_rows(0)}) is True


def test_default_settings_are_close():
    model, batch, task_ids, kind = build("mlp")
    named = dict(model.named_parameters())
    names = ["fc1.weight", "fc2.bias", "head.weight", "head.bias"]  # 212 parameters
    params = [named[k] for k in names]
    top = np.linalg.eigh(ref_hessian(model, batch, params, kind))[0][-1]
    res = probe(model, batch, task_ids=task_ids, params=params, hessian=True)  # 20 iterations, tol 1e-3
    assert res.hessian_top == pytest.approx(top, rel=1e-2)
    assert probe(model, batch, task_ids=task_ids).hessian_top is None


def test_largest_algebraic_not_largest_magnitude():
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    A = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 0.5], dtype=torch.float64))

    def loss():
        return 0.5 * x @ A @ x

    out = hessian_top_eigenvalue(loss, [x], max_iter=10, tol=1e-12)
    assert out.value == pytest.approx(2.0, rel=1e-10)
    assert out.converged and out.iters <= 4  # Krylov space exhausted after 4 products
    lin = hessian_top_eigenvalue(lambda: (x * 3).sum(), [x])
    assert lin.value == 0.0 and lin.converged
    with pytest.raises(ValueError, match="hessian_iters"):
        hessian_top_eigenvalue(loss, [x], max_iter=0)


class _Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class FusedKernelModel(nn.Module):
    """Stands in for a model whose fused attention kernel has no double backward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.config = type("Cfg", (), {"_attn_implementation": "sdpa"})()

    def forward(self, x):
        return _Once.apply(self.lin(x))


def test_missing_double_backward_gives_a_clear_error():
    torch.manual_seed(0)
    model = FusedKernelModel()
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    res = probe(model, batch, task_ids=torch.zeros(5, dtype=torch.long))  # first order works
    assert res.gram.shape == (5, 5)
    with pytest.raises(RuntimeError, match='attn_implementation="eager"') as info:
        probe(model, batch, task_ids=torch.zeros(5, dtype=torch.long), hessian=True)
    assert "'sdpa'" in str(info.value)
