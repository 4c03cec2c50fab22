"""A probe never changes training: p.grad, train/eval flags, buffers, weights, RNG, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynamics import probe
from tests.reference import ref_grads, ref_signals
from tests.signals.signals_helpers import build


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_grads_modes_buffers_weights_rng_untouched(method):
    torch.manual_seed(0)
    model = BNNet().double()
    model.train()
    model.head.eval()  # a mixed state must come back exactly
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    batch = (x, torch.tensor([0, 1, 2, 0, 1, 2]))
    model.conv.weight.grad = torch.randn_like(model.conv.weight)
    grad_obj, grad_val = model.conv.weight.grad, model.conv.weight.grad.clone()
    before = _snapshot(model)
    flags = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()

    res = probe(model, batch, task_ids=torch.tensor([0, 0, 1, 1, 2, 2]), method=method, hessian=True)

    assert model.conv.weight.grad is grad_obj and torch.equal(grad_obj, grad_val)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv.weight")
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert res.hessian_top is not None

    # and the result is the eval-mode one (BN on running statistics, dropout off)
    model.eval()
    params = list(model.parameters())
    loss_batch = {"x": x, "labels": batch[1]}

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    G, losses, weights = ref_grads(Wrap(model), loss_batch, params, "classification")
    ref = ref_signals(G, losses, weights, np.array([0, 0, 1, 1, 2, 2]), 3, 2e-16, dense_fisher=False)
    np.testing.assert_allclose(res.gram.numpy(), ref.gram, rtol=1e-8, atol=1e-14)


def test_train_mode_dropout_does_not_randomise_the_probe():
    model, batch, task_ids, _ = build("lora_llama")
    model.train()
    a = probe(model, batch, task_ids=task_ids).gram
    b = probe(model, batch, task_ids=task_ids).gram
    assert torch.equal(a, b)
    assert model.training


def test_hooks_and_modes_restored_after_an_error():
    model, batch, task_ids, _ = build("llama_tied")
    model.train()

    def broken(m, b):
        m(input_ids=b["input_ids"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        probe(model, batch, task_ids=task_ids, loss=broken)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
