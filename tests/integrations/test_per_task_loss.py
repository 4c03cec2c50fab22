"""Per-example losses recomputed from logits, against explicit per-token loops and transformers."""

from __future__ import annotations

import math

import pytest
import torch

from dynamics.integrations import per_task_loss
from dynamics.integrations.per_task_loss import infer_loss_kind, per_example_loss, task_sums
from tests.integrations.hook_helpers import token_losses
from tests.tiny_models import llama_batch, llava_batch, lora_llama, mlp, tiny_llama, tiny_llava


def test_causal_lm_matches_token_loop_with_shift():
    batch, _ = llama_batch(n=5, seq_len=9)
    logits = torch.randn(5, 9, 64, generator=torch.Generator().manual_seed(0))
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    want_s, want_n = token_losses(logits, shifted)
    s, n = per_example_loss(logits, batch["labels"], "causal_lm")
    assert n.tolist() == want_n
    assert s.tolist() == pytest.approx(want_s, rel=1e-5)
    # "token" with pre-shifted labels, and shift_labels= (padding-free collators), are the same terms.
    s_tok, _ = per_example_loss(logits, shifted, "token")
    s_shift, _ = per_example_loss(logits, batch["labels"], "causal_lm", shift_labels=shifted)
    assert s_tok.tolist() == pytest.approx(want_s, rel=1e-5)
    assert s_shift.tolist() == pytest.approx(want_s, rel=1e-5)


def test_chunking_does_not_change_the_result(monkeypatch):
    batch, _ = llama_batch(n=7, seq_len=10)
    logits = torch.randn(7, 10, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = per_example_loss(logits, batch["labels"], "causal_lm")
    monkeypatch.setattr(per_task_loss, "_CHUNK_ELEMENTS", 3 * 64)  # three tokens per chunk
    chunked = per_example_loss(logits, batch["labels"], "causal_lm")
    torch.testing.assert_close(chunked, whole)


def test_strided_logits_match_the_token_loop():
    # Logits that are a strided view (no flat row table) take the gather-by-coordinates path.
    batch, _ = llama_batch(n=4, seq_len=8)
    logits = torch.randn(8, 4, 64, generator=torch.Generator().manual_seed(4)).transpose(0, 1)
    with pytest.raises(RuntimeError):
        logits.view(-1, 64)  # (4, 8, 64) whose rows have no flat (32, 64) view
    shifted = torch.full_like(batch["labels"], -100)
    shifted[:, :-1] = batch["labels"][:, 1:]
    want_s, want_n = token_losses(logits.contiguous(), shifted)
    s, n = per_example_loss(logits, batch["labels"], "causal_lm")
    assert n.tolist() == want_n
    assert s.tolist() == pytest.approx(want_s, rel=1e-5)


def test_classification_regression_multilabel_against_formulas():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 4, (6,), generator=gen)
    s, n = per_example_loss(logits, labels, "classification")
    want = [
        -math.log(math.exp(float(logits[i, labels[i]])) / sum(math.exp(float(z)) for z in logits[i]))
        for i in range(6)
    ]
    assert s.tolist() == pytest.approx(want, rel=1e-5)
    assert n.tolist() == [1.0] * 6

    target = torch.randn(6, 4, generator=gen)
    s, _ = per_example_loss(logits, target, "regression")
    assert s.tolist() == pytest.approx(
        [float(((logits[i] - target[i]) ** 2).mean()) for i in range(6)], rel=1e-5
    )

    bits = (target > 0).float()
    s, _ = per_example_loss(logits, bits, "multilabel")
    sig = torch.sigmoid(logits.double())
    want = [float(-(bits[i] * sig[i].log() + (1 - bits[i]) * (1 - sig[i]).log()).mean()) for i in range(6)]
    assert s.tolist() == pytest.approx(want, rel=1e-5)


def test_task_sums_against_loop():
    gen = torch.Generator().manual_seed(3)
    s, n = torch.rand(9, generator=gen), torch.randint(0, 5, (9,), generator=gen).float()
    ids = torch.tensor([0, 2, 2, 1, 0, 2, 3, 3, 0])
    out = task_sums(s, n, ids, 5)
    for a in range(5):
        rows = [i for i in range(9) if int(ids[i]) == a]
        assert float(out[0, a]) == pytest.approx(sum(float(s[i]) for i in rows), rel=1e-6)
        assert float(out[1, a]) == sum(float(n[i]) for i in rows)
        assert float(out[2, a]) == len(rows)


@pytest.mark.parametrize(
    ("build", "make"), [(tiny_llama, llama_batch), (tiny_llava, llava_batch)], ids=["llama", "llava"]
)
def test_token_weighted_mean_is_transformers_loss(build, make):
    model = build()
    batch, _ = make(n=6)
    with torch.no_grad():
        out = model(**batch)
    kind = infer_loss_kind(model, out.logits, batch["labels"])
    s, n = per_example_loss(out.logits, batch["labels"], kind)
    assert kind == "causal_lm"
    assert float(s.sum() / n.sum()) == pytest.approx(float(out.loss), rel=1e-6)


def test_infer_kind():
    llama, lora = tiny_llama(), lora_llama()
    seq = torch.zeros(2, 5, 64)
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert infer_loss_kind(llama, seq, ids) == "causal_lm"
    assert infer_loss_kind(lora, seq, ids) == "causal_lm"  # PEFT: the base model's class decides
    assert infer_loss_kind(mlp(), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)) == "classification"
    assert infer_loss_kind(mlp(), torch.zeros(2, 1), torch.zeros(2, 1)) == "regression"
    with pytest.raises(ValueError, match="loss='causal_lm' or loss='token'"):
        infer_loss_kind(mlp(), seq, ids)  # sequence logits from a module we cannot classify
