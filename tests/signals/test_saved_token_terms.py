"""The training-side token losses read from the model's own cross-entropy, and when they are not.

``per_example_loss`` on an output whose ``loss`` still holds its graph reads the per-token terms
from the log-probabilities the model's ``nll_loss`` saved. Each case here is checked against the
recomputation from the logits (``torch.no_grad`` forwards keep no graph and always recompute; the
recomputation itself is checked against a float64 per-example reference in
``test_loss_reference.py``), and each fallback against the losses the definition gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from dynamics.integrations.loss_meter import LossMeter, totals
from dynamics.signals import losses as L
from dynamics.signals.losses import IGNORE_INDEX, per_example_loss
from tests import tiny_models as tm


def _no_recompute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("recomputed from the logits instead of reading the model's own loss")

    monkeypatch.setattr(L, "_token_terms", fail)


def _recomputed(logits, labels, kind="causal_lm"):
    return per_example_loss(logits.detach(), labels, kind)


def _causal_ce(logits, labels, **kw):
    """transformers' layout: pad the labels with -100, shift, one cross-entropy over all rows."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), **kw)


def _logits_and_labels(n=5, length=9, vocab=23, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, vocab, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n, length), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # an example with nothing supervised
    return logits, labels


@pytest.mark.parametrize("builder, make", [(tm.tiny_llama, tm.llama_batch), (tm.tiny_llava, tm.llava_batch)])
def test_hf_models_are_read_from_their_loss(builder, make, monkeypatch):
    model = builder(seed=0)
    batch, _ = make(n=5, seed=2)
    with torch.no_grad():
        want = per_example_loss(model(**batch), batch["labels"], "causal_lm")
    out = model(**batch)
    _no_recompute(monkeypatch)
    got = per_example_loss(out, batch["labels"], "causal_lm")
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6, atol=1e-6)
    assert float(got[0].sum() / got[1].sum()) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def test_rescaled_loss_and_the_older_shift_are_read(monkeypatch):
    logits, labels = _logits_and_labels()
    want = _recomputed(logits, labels)
    items = (labels[:, 1:] != IGNORE_INDEX).sum()
    older = F.cross_entropy(  # transformers < 4.46: logits[..., :-1] against labels[..., 1:]
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    _no_recompute(monkeypatch)
    for loss in (_causal_ce(logits, labels, reduction="sum") / items, 2.0 * older / items):
        got = per_example_loss(CausalLMOutput(loss=loss, logits=logits), labels, "causal_lm")
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6)
        assert got[0][2] == 0 and got[1][2] == 0


@pytest.mark.parametrize(
    "why",
    [
        "label_smoothing",
        "auxiliary_loss",
        "class_weights",
        "half_precision",
        "other_labels",
        "no_loss",
        "compiled",
    ],
)
def test_other_losses_are_recomputed(why, monkeypatch):
    dtype = torch.bfloat16 if why == "half_precision" else torch.float32
    logits, labels = _logits_and_labels(dtype=dtype)
    model_labels = labels
    if why == "other_labels":  # the model was given other labels than the meter (e.g. a collator's)
        model_labels = labels.roll(1, dims=1)
    if why == "half_precision":
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)  # no upcast
        assert loss.dtype == torch.bfloat16
    elif why == "label_smoothing":
        loss = _causal_ce(logits, labels, label_smoothing=0.1)
    elif why == "class_weights":
        loss = _causal_ce(logits, labels, weight=torch.rand(logits.shape[-1]))
    elif why == "auxiliary_loss":
        loss = _causal_ce(logits, labels) + 0.01 * logits.float().pow(2).mean()
    elif why == "compiled":  # one opaque node for the whole loss
        loss = torch.compile(_causal_ce, backend="aot_eager")(logits, labels)
        assert type(loss.grad_fn).__name__ == "CompiledFunctionBackward"
    else:
        loss = _causal_ce(logits, model_labels)
    output = CausalLMOutput(loss=None if why == "no_loss" else loss, logits=logits)
    want = _recomputed(logits, labels)
    calls = []
    recompute = L._token_terms
    monkeypatch.setattr(L, "_token_terms", lambda *a: calls.append(1) or recompute(*a))
    got = per_example_loss(output, labels, "causal_lm")
    assert calls, "a loss that is not the definition's was read instead of recomputed"
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())


def test_packed_rows_take_each_task_from_the_one_loss(monkeypatch):
    """Per-token task ids: each task's masked labels agree with the model's where they supervise."""
    logits, labels = _logits_and_labels(n=4, length=12)
    labels[2] = torch.arange(12) % 23  # supervised again: a packed row of two tasks
    ids = torch.tensor([0] * 6 + [1] * 6).repeat(4, 1)
    ids[1] = 2
    ids[3, :3] = -1  # padding of no task

    def sums(output):
        meter = LossMeter(3, "causal_lm", warn=lambda key, msg: None)
        meter.observe_output(output, labels, ids)
        meter.close_step(0, None)
        return totals(meter.ready(block=True), 3)

    want = sums(logits.detach())
    out = CausalLMOutput(loss=_causal_ce(logits, labels), logits=logits)
    _no_recompute(monkeypatch)
    got = sums(out)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (want[1, :3] > 0).all()  # every task has supervised tokens


def test_per_token_losses_against_the_position_by_position_formula(monkeypatch):
    """``per_token_losses`` (TRL's packed rows) read from the loss and recomputed, against a loop."""
    logits, labels = _logits_and_labels(n=4, length=8)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    logp = torch.log_softmax(logits.detach().double(), -1)
    want = torch.zeros(targets.shape, dtype=torch.float64)
    for i in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[i, t] != IGNORE_INDEX:
                want[i, t] = -logp[i, t, targets[i, t]]
    recomputed = L.per_token_losses(logits.detach(), targets)
    out = CausalLMOutput(loss=_causal_ce(logits, labels), logits=logits)
    _no_recompute(monkeypatch)
    monkeypatch.setattr(L.F, "cross_entropy", lambda *a, **k: pytest.fail("recomputed"))
    read = L.per_token_losses(out, targets)
    for got in (recomputed, read):
        assert got.dtype == torch.float32 and got.shape == targets.shape
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    assert (want[targets == IGNORE_INDEX] == 0).all() and (want[targets != IGNORE_INDEX] > 0).all()
