"""Per-example losses and task weighting against transformers' own training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.signals.signals_helpers import build

from dynamics import probe
from dynamics.signals.losses import causal_lm_losses, per_example_losses


def _task_batch(batch, members):
    return {k: v[members] for k, v in batch.items()}


@pytest.mark.parametrize("family", ["llama_tied", "llava"])
def test_task_loss_and_gradient_match_transformers(family):
    """Task loss = HF ``model(**task_batch, labels=...).loss``; task gradient = its gradient.

    The gradient is compared through ``direction``: with d = grad of the HF task loss,
    cos(g_a, d) = 1 and |g_a| = |d| hold only if the token weighting is exactly HF's.
    """
    model, batch, task_ids, _ = build(family)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for a in range(3):
        members = task_ids == a
        sub = _task_batch(batch, members)
        hf = model(**sub, use_cache=False)
        assert hf.loss is not None
        grads = torch.autograd.grad(hf.loss, params, allow_unused=True)
        d = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        res = probe(model, batch, task_ids=task_ids, direction=d)
        # transformers casts logits to float32 even in a float64 model: float32 accuracy here;
        # a wrong token weighting would be off by percents.
        assert res.task_loss[a].item() == pytest.approx(hf.loss.item(), rel=1e-6)
        dnorm = torch.sqrt(sum((x**2).sum() for x in d)).item()
        assert res.task_grad_norm[a].item() == pytest.approx(dnorm, rel=1e-5)
        assert res.direction_cosine[a].item() == pytest.approx(1.0, abs=1e-6)
        other = (a + 1) % 3
        assert res.direction_cosine[other].item() < 0.999


def test_causal_lm_losses_by_hand():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100]])
    losses, counts = causal_lm_losses(logits, labels)
    lp = torch.log_softmax(logits, -1)
    expect0 = -(lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 2, 3]) / 3
    expect1 = -lp[1, 1, 4]
    assert counts.tolist() == [3.0, 1.0]
    assert losses[0].item() == pytest.approx(expect0.item(), rel=1e-12)
    assert losses[1].item() == pytest.approx(expect1.item(), rel=1e-12)
    # no supervised token: zero loss, zero weight
    losses, counts = causal_lm_losses(logits, torch.full((2, 4), -100))
    assert losses.tolist() == [0.0, 0.0] and counts.tolist() == [0.0, 0.0]


def test_classification_loss_and_auto_detection():
    model, batch, task_ids, _ = build("mlp")
    model.eval()  # the MLP has dropout
    pel = per_example_losses(model, batch, "auto")
    assert pel.kind == "classification"
    logits = model(batch["x"])["logits"]
    expect = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(pel.losses, expect)
    res = probe(model, batch, task_ids=task_ids)
    for a in range(3):
        assert res.task_loss[a].item() == pytest.approx(expect[task_ids == a].mean().item(), rel=1e-12)
    model, batch, _, _ = build("llama_untied")
    assert per_example_losses(model, batch, "auto").kind == "causal_lm"


def test_callable_loss_equals_builtin_and_accepts_token_counts():
    model, batch, task_ids, _ = build("llama_untied")
    builtin = probe(model, batch, task_ids=task_ids, loss="causal_lm")

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return causal_lm_losses(logits, b["labels"])

    res = probe(model, batch, task_ids=task_ids, loss=loss_fn)
    np.testing.assert_allclose(res.gram.numpy(), builtin.gram.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.task_grad_norm.numpy(), builtin.task_grad_norm.numpy(), rtol=1e-10)

    def mean_only(m, b):
        return loss_fn(m, b)[0]

    unweighted = probe(model, batch, task_ids=task_ids, loss=mean_only)
    assert unweighted.loss_kind == "callable"
    # weights 1/n_a instead of N_i/N_a: same Gram, different task gradients (lengths differ)
    np.testing.assert_allclose(unweighted.gram.numpy(), builtin.gram.numpy(), rtol=1e-10, atol=1e-14)
    assert not np.allclose(unweighted.task_grad_norm.numpy(), builtin.task_grad_norm.numpy(), rtol=1e-6)


def test_tuple_batch_and_loss_errors():
    model, batch, task_ids, _ = build("mlp")

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["logits"]

    plain = Plain(model)
    res = probe(plain, (batch["x"], batch["labels"]), task_ids=task_ids)
    ref = probe(model, batch, task_ids=task_ids)
    np.testing.assert_allclose(res.gram.numpy(), ref.gram.numpy(), rtol=1e-12)

    with pytest.raises(ValueError, match="labels"):
        probe(model, {"x": batch["x"]}, task_ids=task_ids)
    with pytest.raises(ValueError, match="loss must be"):
        probe(model, batch, task_ids=task_ids, loss="mse")
    with pytest.raises(ValueError, match="causal_lm loss needs logits"):
        probe(model, batch, task_ids=task_ids, loss="causal_lm")
    with pytest.raises(ValueError, match="one task id per example"):
        probe(model, batch, task_ids=task_ids[:-1])
    with pytest.raises(ValueError, match="task names"):
        probe(model, batch, task_ids=task_ids, tasks=["a", "b"])
    with pytest.raises(ValueError, match="method"):
        probe(model, batch, task_ids=task_ids, method="fast")
    with pytest.raises(ValueError, match="requires_grad=False"):
        model.head.bias.requires_grad_(False)
        probe(model, batch, task_ids=task_ids, params=[model.head.bias])


def test_sharded_parameters_are_refused():
    model, batch, task_ids, _ = build("mlp")
    model.head.weight._is_flat_param = True  # what FSDP's flat parameters carry
    with pytest.raises(ValueError, match="sharded"):
        probe(model, batch, task_ids=task_ids)
