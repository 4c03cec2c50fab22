"""The probe's per-example losses and gradients against an independent reference, per model family.

The reference is written here, independent of :mod:`dynamics`: every example is run through the
model ON ITS OWN (a batch of one), in float64 and eval mode; its loss is spelt out position by
position from ``log_softmax`` (the decoder inputs of T5 are shifted by hand), and its gradient is
one ``torch.autograd.grad`` call. The probe (fast path and exact path) must give the same losses,
per-example gradients, Gram matrix and task norms to 1e-8 relative, and the training-side
``per_example_loss`` on the Trainer's own forward of the same batch the same losses (float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from dynamics import probe
from dynamics.signals import losses as losses_module
from dynamics.signals.losses import LogitsLoss, per_example_loss, per_example_losses, resolve_loss_kind
from tests import tiny_models as tm

RTOL = 1e-8
SMOOTH = 0.1  # label smoothing of the user loss


def _nll(logp: torch.Tensor, y: int) -> torch.Tensor:
    return -logp[y]


def _smoothed(logp: torch.Tensor, y: int) -> torch.Tensor:
    return -(1 - SMOOTH) * logp[y] - SMOOTH * logp.mean()


def _token_loss(
    logits: torch.Tensor, targets: torch.Tensor, term: Callable = _nll
) -> tuple[torch.Tensor, int]:
    """Mean of ``term`` over the positions whose target is not -100, one position at a time."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = logits.sum() * 0.0, 0
    for t in range(targets.shape[0]):
        y = int(targets[t])
        if y != -100:
            total = total + term(logp[t], y)
            count += 1
    return (total / count if count else total), count


def _one(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def ref_causal(model, ex, term=_nll):
    logits = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"], use_cache=False).logits[0]
    return _token_loss(logits[:-1], ex["labels"][0, 1:], term)  # position t predicts label t + 1


def ref_t5(model, ex):
    labels = ex["labels"]
    # decoder inputs: start token, then the labels shifted right, -100 -> pad (written out by hand)
    dec = torch.full_like(labels, model.config.pad_token_id)
    dec[0, 0] = model.config.decoder_start_token_id
    for t in range(1, labels.shape[1]):
        y = int(labels[0, t - 1])
        dec[0, t] = model.config.pad_token_id if y == -100 else y
    out = model(
        input_ids=ex["input_ids"], attention_mask=ex["attention_mask"], decoder_input_ids=dec, use_cache=False
    )
    return _token_loss(out.logits[0], labels[0])


def ref_token(model, ex):
    logits = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"]).logits[0]
    return _token_loss(logits, ex["labels"][0])


def ref_seqcls(model, ex):
    logits = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"]).logits[0]
    y = int(ex["labels"][0])
    if y == -100:
        return logits.sum() * 0.0, 0  # ignored: no loss, weight 0
    return -torch.log_softmax(logits.double(), -1)[y], 1


def _smoothed_token_loss(logits: torch.Tensor, labels: torch.Tensor):
    """A user loss (label-smoothed causal CE, token-weighted), vectorised: ``(l, N)``."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(logits.double(), -1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per = -(1 - SMOOTH) * picked - SMOOTH * logp.mean(-1)
    count = keep.sum(1)
    return (per * keep).sum(1) / count.clamp(min=1), count


CASES = {
    # family: (model builder, batch maker, reference, probe loss=, training-side loss)
    "causal_llama": (tm.tiny_llama, tm.llama_batch, ref_causal, "auto", None),
    "t5": (tm.tiny_t5, tm.t5_batch, ref_t5, "auto", None),
    "bert_token": (tm.tiny_bert_token, tm.token_batch, ref_token, "auto", None),
    "bert_seqcls_ignored": (tm.tiny_bert_seqcls, tm.seqcls_batch, ref_seqcls, "auto", None),
    "user_logits_loss": (
        tm.tiny_llama,
        tm.llama_batch,
        lambda m, ex: ref_causal(m, ex, _smoothed),
        LogitsLoss(_smoothed_token_loss),
        LogitsLoss(_smoothed_token_loss),
    ),
}


def _flat(grads, params):
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def reference(model, batch, ref_loss):
    """``(G, l, N)``: per-example gradients (n x P), losses and weights, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch["labels"].shape[0]
    rows, losses, weights = [], [], []
    for i in range(n):
        loss, count = ref_loss(model, _one(batch, i))
        grads = (
            torch.autograd.grad(loss, params, allow_unused=True)
            if loss.requires_grad
            else [None] * len(params)
        )
        rows.append(_flat(grads, params))
        losses.append(float(loss.detach()))
        weights.append(float(count))
    return torch.stack(rows).double().numpy(), np.array(losses), np.array(weights)


def task_norms(G, weights, task_ids, n_tasks):
    out = np.full(n_tasks, np.nan)
    for a in range(n_tasks):
        members = [i for i in range(len(task_ids)) if task_ids[i] == a]
        total = sum(weights[i] for i in members)
        if total > 0:
            out[a] = np.linalg.norm(sum(weights[i] / total * G[i] for i in members))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, make, ref_loss, loss, train_loss = CASES[request.param]
    model = build(seed=0, dtype=torch.float64).eval()
    batch, task_ids = make(n=6, seed=1)
    G, losses, weights = reference(model, batch, ref_loss)
    return request.param, model, batch, task_ids, loss, train_loss, (G, losses, weights)


def test_reference_is_not_trivial(case):
    name, _, _, task_ids, _, _, (G, losses, weights) = case
    assert np.linalg.norm(G, axis=1)[weights > 0].min() > 1e-3  # real gradients
    assert len(set(np.round(weights, 6))) > 1 or name == "bert_seqcls_ignored"  # token weighting matters
    if name == "bert_seqcls_ignored":
        assert weights.tolist()[:2] == [0.0, 0.0] and (G[:2] == 0).all()


def test_per_example_losses_and_gradients(case):
    _, model, batch, _, loss, _, (G, losses, weights) = case
    params = [p for p in model.parameters() if p.requires_grad]
    pel = per_example_losses(model, batch, loss)
    np.testing.assert_allclose(pel.losses.detach().numpy(), losses, rtol=RTOL, atol=1e-14)
    np.testing.assert_array_equal(pel.weights.numpy(), weights)
    for i in range(len(losses)):
        if weights[i] == 0:
            assert float(pel.losses[i]) == 0.0
            continue
        g = _flat(torch.autograd.grad(pel.losses[i], params, retain_graph=True, allow_unused=True), params)
        np.testing.assert_allclose(g.numpy(), G[i], rtol=RTOL, atol=1e-12 * np.abs(G[i]).max())


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_probe_gram_and_task_norms(case, method):
    name, model, batch, task_ids, loss, _, (G, losses, weights) = case
    res = probe(model, batch, task_ids=task_ids, loss=loss, method=method)
    K = G @ G.T
    np.testing.assert_allclose(res.losses.numpy(), losses, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(res.gram.numpy(), K, rtol=RTOL, atol=1e-10 * np.abs(K).max())
    want = task_norms(G, weights, task_ids.tolist(), 3)
    got = res.task_grad_norm.numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=RTOL)
    assert res.loss_kind == ("callable" if name.startswith("user") else resolve_loss_kind(model))


def test_training_side_losses_equal_the_probes(case):
    """The Trainer's forward (labels passed: T5 builds its decoder inputs itself) -> per_example_loss."""
    _, model, batch, task_ids, loss, train_loss, (_, losses, weights) = case
    with torch.no_grad():
        out = model(**batch)
    kind = (
        train_loss
        if train_loss is not None
        else resolve_loss_kind(model, logits=out.logits, labels=batch["labels"])
    )
    S, N = per_example_loss(out, batch["labels"], kind)
    assert S.dtype == N.dtype == torch.float32 and S.shape == N.shape == (len(losses),)
    np.testing.assert_array_equal(N.numpy(), weights)
    np.testing.assert_allclose((S / N.clamp(min=1)).numpy(), losses, rtol=1e-6, atol=1e-7)
    if train_loss is None and weights.sum() > 0:
        # and the token-weighted mean is the model's own loss (transformers' weighting, -100 ignored)
        assert float(S.sum() / N.sum()) == pytest.approx(float(out.loss), rel=1e-6)
    res = probe(model, batch, task_ids=task_ids, loss=loss)
    np.testing.assert_allclose((S / N.clamp(min=1)).numpy(), res.losses.numpy(), rtol=1e-6, atol=1e-7)


def test_training_side_reads_the_models_own_loss(case, monkeypatch):
    """With the graph (the Trainer's forward), the token kinds read the model's own per-token terms.

    The recomputation from the logits is made to fail, so these losses can only come from the
    log-probabilities the model's cross-entropy saved; they must equal the reference.
    """
    name, model, batch, _, _, train_loss, (_, losses, weights) = case
    out = model(**batch)
    kind = resolve_loss_kind(model, logits=out.logits, labels=batch["labels"])
    if train_loss is not None or kind not in ("causal_lm", "token"):
        pytest.skip("a user loss or a kind without per-token terms is recomputed as before")

    def recompute(*args, **kwargs):
        raise AssertionError("recomputed from the logits instead of reading the model's own loss")

    monkeypatch.setattr(losses_module, "_token_terms", recompute)
    S, N = per_example_loss(out, batch["labels"], kind)
    np.testing.assert_array_equal(N.numpy(), weights)
    np.testing.assert_allclose((S / N.clamp(min=1)).numpy(), losses, rtol=1e-6, atol=1e-7)


def test_model_callable_equals_logits_loss():
    """The probe-only form ``fn(model, batch)`` and ``LogitsLoss`` give the same signals."""
    model = tm.tiny_llama(dtype=torch.float64).eval()
    batch, task_ids = tm.llama_batch(n=6, seed=1)

    def model_loss(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return _smoothed_token_loss(logits, b["labels"])

    a = probe(model, batch, task_ids=task_ids, loss=model_loss)
    b = probe(model, batch, task_ids=task_ids, loss=LogitsLoss(_smoothed_token_loss))
    np.testing.assert_allclose(a.gram.numpy(), b.gram.numpy(), rtol=1e-12)
    np.testing.assert_allclose(a.task_grad_norm.numpy(), b.task_grad_norm.numpy(), rtol=1e-12)
    assert a.loss_kind == b.loss_kind == "callable"
    assert not math.isnan(a.fisher_se)
