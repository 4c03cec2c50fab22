"""Per-task training losses: the loss meter's reduction and the Trainer-loss identity per model family."""

from __future__ import annotations

import pytest
import torch

from dynamics.integrations.loss_meter import task_sums
from dynamics.signals.losses import per_example_loss, resolve_loss_kind
from tests import tiny_models as tm


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
    ("build", "make", "kind"),
    [
        (tm.tiny_llama, tm.llama_batch, "causal_lm"),
        (tm.tiny_llava, tm.llava_batch, "causal_lm"),
        (tm.tiny_t5, tm.t5_batch, "token"),
        (tm.tiny_bert_token, tm.token_batch, "token"),
        (tm.tiny_bert_seqcls, tm.seqcls_batch, "classification"),
    ],
    ids=["llama", "llava", "t5", "bert_token", "bert_seqcls_ignored"],
)
def test_token_weighted_task_losses_add_up_to_the_transformers_loss(build, make, kind):
    """Per task L_a = S_a / N_a equals the model's own loss on that task's examples, and the
    N-weighted mean over tasks equals its loss on the whole batch (the Trainer's logged loss)."""
    model = build().eval()
    batch, task_ids = make(n=9)
    with torch.no_grad():
        out = model(**batch)
        assert resolve_loss_kind(model, logits=out.logits, labels=batch["labels"]) == kind
        s, n = per_example_loss(out, batch["labels"], kind)
        sums = task_sums(s, n, task_ids, 3)
        assert float(sums[0].sum() / sums[1].sum()) == pytest.approx(float(out.loss), rel=1e-5)
        for a in range(3):
            members = task_ids == a
            sub = model(**{k: v[members] for k, v in batch.items()})
            assert float(sums[0, a] / sums[1, a]) == pytest.approx(float(sub.loss), rel=1e-5)
