"""The forward pre-hook that carries task ids past models that do not accept them."""

from __future__ import annotations

import pytest
import torch

from dynamics.integrations.task_ids import TaskIdHook
from tests.tiny_models import lora_llama, lora_llama_batch, mlp, mlp_batch


def test_strips_task_ids_and_reports_training_forwards():
    model = mlp()  # forward(x, labels): no task_ids parameter, no **kwargs
    seen = []
    hook = TaskIdHook(model, lambda ids, kwargs, out: seen.append((ids, kwargs["labels"], out["logits"])))
    batch, ids = mlp_batch(n=6)
    out = model(**batch, task_ids=ids)
    assert len(seen) == 1
    assert torch.equal(seen[0][0], ids)
    assert torch.equal(seen[0][1], batch["labels"])
    assert seen[0][2] is out["logits"]
    hook.remove()
    with pytest.raises(TypeError, match="task_ids"):  # without the hook the model rejects the key
        model(**batch, task_ids=ids)


def test_eval_no_grad_and_paused_forwards_are_stripped_but_not_reported():
    model = mlp()
    seen = []
    hook = TaskIdHook(model, lambda *a: seen.append(a))
    batch, ids = mlp_batch(n=4)
    model.eval()
    model(**batch, task_ids=ids)
    model.train()
    with torch.no_grad():
        model(**batch, task_ids=ids)
    hook.paused = True
    model(**batch, task_ids=ids)
    assert seen == []
    hook.paused = False
    model(**batch)  # a batch without ids is reported with ids=None
    assert len(seen) == 1 and seen[0][0] is None


def test_peft_model_never_sees_our_task_ids():
    model = lora_llama()  # PeftModelForCausalLM.forward has its own task_ids (prompt-learning) argument
    seen = []
    TaskIdHook(model, lambda ids, kwargs, out: seen.append((ids, out.logits)))
    batch, ids = lora_llama_batch(n=4)
    torch.manual_seed(0)
    with_ids = model(**batch, task_ids=ids)
    torch.manual_seed(0)
    without = model(**batch)
    assert torch.equal(seen[0][0], ids)
    torch.testing.assert_close(with_ids.loss, without.loss, rtol=0, atol=0)
