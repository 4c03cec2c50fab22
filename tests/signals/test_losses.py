"""The one loss module: kinds against explicit formulas, detection across model classes, fused outputs.

(The probe against an independent per-example reference, family by family, is in
``test_loss_reference.py``.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynamics import probe
from dynamics.signals import losses as L
from dynamics.signals.losses import (
    IGNORE_INDEX,
    LOSS_KINDS,
    LogitsLoss,
    extract_logits,
    per_example_loss,
    per_example_losses,
    resolve_loss_kind,
)
from tests import tiny_models as tm
from tests.integrations.hook_helpers import token_losses
from tests.signals.signals_helpers import build


def _shifted(labels):
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


# ------------------------------------------------------------------ per_example_loss, kind by kind


def test_causal_lm_and_token_match_the_token_loop():
    batch, _ = tm.llama_batch(n=5, seq_len=9)
    logits = torch.randn(5, 9, 64, generator=torch.Generator().manual_seed(0))
    shifted = _shifted(batch["labels"])
    want_s, want_n = token_losses(logits, shifted)
    s, n = per_example_loss(logits, batch["labels"], "causal_lm")
    assert n.tolist() == want_n and s.dtype == torch.float32 and not s.requires_grad
    assert s.tolist() == pytest.approx(want_s, rel=1e-5)
    # "token" on pre-shifted labels, and shift_labels= (padding-free collators), are the same terms.
    assert per_example_loss(logits, shifted, "token")[0].tolist() == pytest.approx(want_s, rel=1e-5)
    s_shift, _ = per_example_loss(logits, batch["labels"], "causal_lm", shift_labels=shifted)
    assert s_shift.tolist() == pytest.approx(want_s, rel=1e-5)
    # a model output object or dict works like its logits
    assert per_example_loss({"logits": logits}, batch["labels"], "causal_lm")[0].tolist() == s.tolist()


def test_chunking_does_not_change_the_result(monkeypatch):
    batch, _ = tm.llama_batch(n=7, seq_len=10)
    logits = torch.randn(7, 10, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = per_example_loss(logits, batch["labels"], "causal_lm")
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 3 * 64)  # three tokens per chunk
    monkeypatch.setattr(L, "_MIN_CHUNK_ROWS", 1)
    chunked = per_example_loss(logits, batch["labels"], "causal_lm")
    torch.testing.assert_close(chunked, whole)


def test_chunked_terms_and_their_gradient_match_one_cross_entropy(monkeypatch):
    # The probe differentiates through the chunked sum: chunks wholly without labels (a prompt
    # span) are skipped, partly labelled ones keep their labelled rows, and the gradient of any
    # weighting of the per-example sums equals that of one unchunked cross-entropy.
    n, t, v = 5, 10, 64
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, v, (n, t), generator=gen)
    targets[:, :6] = IGNORE_INDEX  # 6 of every 10 rows unlabelled: whole chunks of 3 rows skipped
    targets[2, 8] = IGNORE_INDEX
    targets[4] = IGNORE_INDEX  # an example without labels
    logits = torch.randn(n, t, v, generator=gen, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(L, "_CPU_CHUNK_ELEMENTS", 3 * v)
    monkeypatch.setattr(L, "_MIN_CHUNK_ROWS", 1)
    s, count = L._token_terms(logits, targets)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, v), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    want = ce.reshape(n, t).sum(1)
    torch.testing.assert_close(s, want, rtol=1e-12, atol=0)
    assert count.tolist() == (targets != IGNORE_INDEX).sum(1).tolist()
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, 7.0], dtype=torch.float64)
    (g,) = torch.autograd.grad((c * s).sum(), logits)
    (g_want,) = torch.autograd.grad((c * want).sum(), logits)
    torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-15)


def test_strided_logits_match_the_token_loop():
    # Logits that are a strided view (no flat row table) take the gather-by-coordinates path.
    batch, _ = tm.llama_batch(n=4, seq_len=8)
    logits = torch.randn(8, 4, 64, generator=torch.Generator().manual_seed(4)).transpose(0, 1)
    with pytest.raises(RuntimeError):
        logits.view(-1, 64)
    want_s, want_n = token_losses(logits.contiguous(), _shifted(batch["labels"]))
    s, n = per_example_loss(logits, batch["labels"], "causal_lm")
    assert n.tolist() == want_n
    assert s.tolist() == pytest.approx(want_s, rel=1e-5)


def test_example_without_supervised_tokens_has_zero_loss_and_weight():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, -100]])
    s, n = per_example_loss(logits, labels, "causal_lm")
    lp = torch.log_softmax(logits, -1)
    assert s[0].item() == pytest.approx(-(lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 2, 3]).item(), rel=1e-6)
    assert n.tolist() == [3.0, 0.0] and s[1].item() == 0.0


def _ce(z, y):
    return -math.log(math.exp(float(z[y])) / sum(math.exp(float(v)) for v in z))


def test_classification_regression_multilabel_against_formulas_with_ignored_labels():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 4, (6,), generator=gen)
    labels[2] = IGNORE_INDEX
    s, n = per_example_loss(logits, labels, "classification")
    assert n.tolist() == [1, 1, 0, 1, 1, 1]
    want = [0.0 if i == 2 else _ce(logits[i], int(labels[i])) for i in range(6)]
    assert s.tolist() == pytest.approx(want, rel=1e-5)

    target = torch.randn(6, 4, generator=gen)
    target[1, 2] = IGNORE_INDEX  # one ignored output
    target[4] = IGNORE_INDEX  # an example with every output ignored
    s, n = per_example_loss(logits, target, "regression")
    assert n.tolist() == [1, 1, 1, 1, 0, 1]
    for i in range(6):
        keep = [c for c in range(4) if float(target[i, c]) != IGNORE_INDEX]
        want_i = sum((float(logits[i, c]) - float(target[i, c])) ** 2 for c in keep) / max(len(keep), 1)
        assert s[i].item() == pytest.approx(want_i, rel=1e-5, abs=1e-7)

    bits = (torch.randn(6, 4, generator=gen) > 0).float()
    bits[3, 0] = IGNORE_INDEX
    s, n = per_example_loss(logits, bits, "multilabel")
    assert n.tolist() == [1.0] * 6
    sig = torch.sigmoid(logits.double())
    for i in range(6):
        keep = [c for c in range(4) if float(bits[i, c]) != IGNORE_INDEX]
        terms = [-(bits[i, c] * sig[i, c].log() + (1 - bits[i, c]) * (1 - sig[i, c]).log()) for c in keep]
        assert s[i].item() == pytest.approx(float(sum(terms) / len(keep)), rel=1e-5)


def test_kind_errors_name_the_problem():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="integer class labels"):
        per_example_loss(logits, torch.randn(3), "classification")
    with pytest.raises(ValueError, match="one label per logit position"):
        per_example_loss(logits, torch.zeros(3, 4, dtype=torch.long), "token")
    with pytest.raises(ValueError, match="resolved kind.*'causal_lm'"):
        per_example_loss(logits, torch.zeros(3, dtype=torch.long), "auto")
    with pytest.raises(TypeError, match="cannot find logits"):
        per_example_loss(object(), torch.zeros(3, dtype=torch.long), "classification")


def test_extract_logits():
    z = torch.randn(2, 3)
    assert extract_logits(z) is z and extract_logits({"logits": z}) is z
    assert extract_logits((torch.tensor(0.5), z)) is z  # HF tuple outputs with labels: (loss, logits)
    assert extract_logits((z,)) is z and extract_logits({"log_probs": z}) is None


# ------------------------------------------------------------------ fused outputs (TRL)


@pytest.fixture(scope="module")
def fused_llama():
    from trl.trainer.utils import add_fused_lm_head

    model = tm.tiny_llama().eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
    return model


def test_fused_output_equals_the_logits_path(fused_llama):
    batch, _ = tm.llama_batch(n=5)
    with torch.no_grad():
        fused = fused_llama(**batch, fused_lm_head=True)
        plain = fused_llama(**batch)
    assert extract_logits(fused) is None and fused.label_mask is not None
    s, n = per_example_loss(fused, batch["labels"], "causal_lm")
    s_ref, n_ref = per_example_loss(plain, batch["labels"], "causal_lm")
    assert n.tolist() == n_ref.tolist()
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    # the token-weighted mean is the fused output's own loss
    assert float(s.sum() / n.sum()) == pytest.approx(float(fused.loss), rel=1e-5)
    # pre-shifted labels (context parallelism) are scored unshifted, by TRL and by us alike
    shifted = _shifted(batch["labels"])
    with torch.no_grad():
        fused_shift = fused_llama(**{**batch, "labels": None}, shift_labels=shifted, fused_lm_head=True)
    s2, _ = per_example_loss(fused_shift, None, "causal_lm")
    torch.testing.assert_close(s2, s_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fused output"):
        per_example_loss(fused, batch["labels"], "classification")


def test_fused_dict_output():
    log_probs = -torch.rand(2, 3, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    log_probs = log_probs * mask
    s, n = per_example_loss({"log_probs": log_probs, "label_mask": mask}, None, "token")
    assert n.tolist() == [2.0, 0.0]
    assert s[0].item() == pytest.approx(-(log_probs[0, 0] + log_probs[0, 2]).item(), rel=1e-6)
    assert s[1].item() == 0.0


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("LlamaForCausalLM", "causal_lm"),
        ("Qwen2ForCausalLM", "causal_lm"),
        ("GPT2LMHeadModel", "causal_lm"),
        ("T5ForConditionalGeneration", "token"),
        ("BartForConditionalGeneration", "token"),
        ("BertForMaskedLM", "token"),
        ("BertForTokenClassification", "token"),
        ("DistilBertForTokenClassification", "token"),
        ("BertForSequenceClassification", "classification"),
        ("LlamaForSequenceClassification", "classification"),
        ("T5ForSequenceClassification", "classification"),  # an encoder-decoder with a class head
        ("BartForSequenceClassification", "classification"),
        ("ViTForImageClassification", "classification"),
    ],
)
def test_detection_from_the_model_class(name, kind):
    model = tm.tiny_head_model(name)
    assert resolve_loss_kind(model) == kind  # from class and config alone: no tensors needed
    # tensors never override the model: causal-looking (n, T, V) logits on T5 stay aligned
    seq = torch.zeros(2, 5, 64)
    if kind in ("causal_lm", "token"):
        assert resolve_loss_kind(model, logits=seq, labels=torch.zeros(2, 5, dtype=torch.long)) == kind


def test_detection_llava_and_peft():
    assert resolve_loss_kind(tm.tiny_llava()) == "causal_lm"  # ...ForConditionalGeneration, decoder-only
    assert resolve_loss_kind(tm.lora_llama()) == "causal_lm"  # PEFT: the base model's class decides


def test_sequence_classification_problem_types():
    labels_int, labels_float = torch.zeros(2, dtype=torch.long), torch.zeros(2, 3)
    model = tm.tiny_head_model("BertForSequenceClassification")
    assert resolve_loss_kind(model, labels=labels_int) == "classification"
    assert resolve_loss_kind(model, labels=labels_float) == "multilabel"  # as transformers decides
    for problem, kind in [
        ("multi_label_classification", "multilabel"),
        ("regression", "regression"),
        ("single_label_classification", "classification"),
    ]:
        model = tm.tiny_head_model("BertForSequenceClassification", problem_type=problem)
        assert resolve_loss_kind(model, labels=labels_float) == kind
    assert (
        resolve_loss_kind(tm.tiny_head_model("BertForSequenceClassification", num_labels=1)) == "regression"
    )


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_detection_through_ddp_fsdp_and_compile(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    t5 = tm.tiny_t5()
    assert resolve_loss_kind(DistributedDataParallel(t5)) == "token"
    assert resolve_loss_kind(FullyShardedDataParallel(tm.tiny_t5(), device_id=torch.device("cpu"))) == "token"
    sharded = tm.tiny_t5()
    fully_shard(sharded)  # FSDP2 swaps the class for a subclass
    assert type(sharded) is not type(t5) and resolve_loss_kind(sharded) == "token"
    assert resolve_loss_kind(torch.compile(tm.tiny_head_model("BertForTokenClassification"))) == "token"


def test_explicit_choice_wins_and_plain_modules():
    t5 = tm.tiny_head_model("T5ForConditionalGeneration")
    assert resolve_loss_kind(t5, "causal_lm") == "causal_lm"
    fn = LogitsLoss(lambda z, y: z.sum(-1))
    assert resolve_loss_kind(t5, fn) is fn
    mlp = tm.mlp()
    assert resolve_loss_kind(mlp, logits=torch.zeros(2, 4), labels=torch.zeros(2, dtype=torch.long)) == (
        "classification"
    )
    assert resolve_loss_kind(mlp, logits=torch.zeros(2, 1), labels=torch.zeros(2)) == "regression"
    assert resolve_loss_kind(None, "token") == "token"


def test_detection_errors_name_the_choices():
    seq, ids = torch.zeros(2, 5, 64), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="shifted.*aligned.*'causal_lm'.*'token'.*'classification'"):
        resolve_loss_kind(
            tm.mlp(), logits=seq, labels=ids
        )  # sequence logits from a module we cannot classify
    with pytest.raises(ValueError, match="no recognised Hugging Face task head.*'causal_lm'"):
        resolve_loss_kind(tm.mlp())
    with pytest.raises(ValueError, match="cannot infer.*'regression'"):
        resolve_loss_kind(
            tm.mlp(), logits=torch.zeros(2, 4), labels=torch.zeros(2, 4)
        )  # multilabel or regression?
    with pytest.raises(ValueError, match="ForQuestionAnswering.*callable"):
        resolve_loss_kind(tm.tiny_head_model("BertForQuestionAnswering"))
    with pytest.raises(ValueError, match="one of"):
        resolve_loss_kind(tm.mlp(), "mse")
    assert set(LOSS_KINDS) == {"causal_lm", "token", "classification", "multilabel", "regression"}


# ------------------------------------------------------------------ the probe's side


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
        hf = model(**_task_batch(batch, members), use_cache=False)
        grads = torch.autograd.grad(hf.loss, params, allow_unused=True)
        d = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        res = probe(model, batch, task_ids=task_ids, direction=d)
        # transformers casts logits to float32 even in a float64 model: float32 accuracy here;
        # a wrong token weighting would be off by percents.
        assert res.task_loss[a].item() == pytest.approx(hf.loss.item(), rel=1e-6)
        dnorm = torch.sqrt(sum((x**2).sum() for x in d)).item()
        assert res.task_grad_norm[a].item() == pytest.approx(dnorm, rel=1e-5)
        assert res.direction_cosine[a].item() == pytest.approx(1.0, abs=1e-6)
        assert res.direction_cosine[(a + 1) % 3].item() < 0.999


def test_t5_batch_with_or_without_decoder_inputs():
    """A Trainer-style T5 batch (no decoder inputs) and one from DataCollatorForSeq2Seq agree."""
    model = tm.tiny_t5(dtype=torch.float64).eval()
    batch, task_ids = tm.t5_batch(n=6)
    res = probe(model, batch, task_ids=task_ids)
    with_dec = {
        **batch,
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    }
    again = probe(model, with_dec, task_ids=task_ids)
    np.testing.assert_allclose(again.gram.numpy(), res.gram.numpy(), rtol=1e-12)
    assert res.loss_kind == "token"


def test_classification_auto_and_ignored_labels():
    model, batch, task_ids, _ = build("mlp")
    model.eval()  # the MLP has dropout
    batch["labels"][0] = IGNORE_INDEX
    pel = per_example_losses(model, batch, "auto")
    assert pel.kind == "classification" and pel.weights[0] == 0 and pel.losses[0] == 0
    logits = model(batch["x"])["logits"]
    expect = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # 0 at -100
    torch.testing.assert_close(pel.losses, expect)
    res = probe(model, batch, task_ids=task_ids)
    assert res.gram[0].abs().max() == 0  # an ignored example has no gradient
    for a in range(3):
        members = (task_ids == a) & (batch["labels"] != IGNORE_INDEX)
        assert res.task_loss[a].item() == pytest.approx(expect[members].mean().item(), rel=1e-12)


def test_user_loss_forms():
    model, batch, task_ids, _ = build("llama_untied")
    builtin = probe(model, batch, task_ids=task_ids, loss="causal_lm")

    def per_token(logits, labels):  # the LogitsLoss form: (l, N) from logits and labels
        S, N = L._kind_terms(logits, labels, "causal_lm", None)
        return S / N.clamp(min=1), N

    res = probe(model, batch, task_ids=task_ids, loss=LogitsLoss(per_token))
    np.testing.assert_allclose(res.gram.numpy(), builtin.gram.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.task_grad_norm.numpy(), builtin.task_grad_norm.numpy(), rtol=1e-10)
    assert res.loss_kind == "callable"

    def mean_only(m, b):  # the probe-only form fn(model, batch): weights 1 / n_a instead of N_i / N_a
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return per_token(logits, b["labels"])[0]

    unweighted = probe(model, batch, task_ids=task_ids, loss=mean_only)
    np.testing.assert_allclose(unweighted.gram.numpy(), builtin.gram.numpy(), rtol=1e-10, atol=1e-14)
    assert not np.allclose(unweighted.task_grad_norm.numpy(), builtin.task_grad_norm.numpy(), rtol=1e-6)

    # the training side takes the same LogitsLoss, and a plain callable as that form too
    with torch.no_grad():
        logits = model(**batch).logits
    s, n = per_example_loss(logits, batch["labels"], LogitsLoss(per_token))
    s_builtin, n_builtin = per_example_loss(logits, batch["labels"], "causal_lm")
    torch.testing.assert_close((s, n), (s_builtin, n_builtin))
    torch.testing.assert_close(per_example_loss(logits, batch["labels"], per_token), (s, n))
    s1, n1 = per_example_loss(logits, batch["labels"], lambda z, y: per_token(z, y)[0])
    assert n1.tolist() == [1.0] * 8 and s1.tolist() == pytest.approx((s / n).tolist(), rel=1e-6)


def test_tuple_batch_and_probe_errors():
    model, batch, task_ids, _ = build("mlp")

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["logits"]

    res = probe(Plain(model), (batch["x"], batch["labels"]), task_ids=task_ids)
    ref = probe(model, batch, task_ids=task_ids)
    np.testing.assert_allclose(res.gram.numpy(), ref.gram.numpy(), rtol=1e-12)

    with pytest.raises(ValueError, match="need `labels` in the batch"):
        probe(model, {"x": batch["x"]}, task_ids=task_ids)
    with pytest.raises(ValueError, match="loss must be"):
        probe(model, batch, task_ids=task_ids, loss="mse")
    with pytest.raises(ValueError, match="one label per logit position"):
        probe(model, batch, task_ids=task_ids, loss="causal_lm")
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        probe(model, batch, task_ids=task_ids, loss=LogitsLoss(lambda z, y: z.sum()))
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


def test_user_loss_with_an_empty_example_adds_nothing():
    """A user loss that divides by an empty count (0 / 0) at N_i = 0 gives S_i = 0 on the training side
    (the probe refuses such a non-finite loss: test_losses_degenerate.py)."""

    def mean_tokens(logits, labels):
        keep = labels != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        return (ce * keep).sum(1) / keep.sum(1), keep.sum(1)

    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    s, n = per_example_loss(logits, labels, LogitsLoss(mean_tokens))
    assert n.tolist() == [2.0, 0.0] and s[1].item() == 0.0 and math.isfinite(s[0].item())


@pytest.mark.parametrize("name", ["T5ForConditionalGeneration", "BartForConditionalGeneration"])
def test_encoder_decoder_probe_inputs_match_the_models_own_forward(name):
    """The probe's decoder inputs (built from labels) are the ones the model builds itself from labels."""
    model = tm.tiny_head_model(name).double().eval()
    batch, _ = tm.t5_batch(n=4)
    with torch.no_grad():
        own = model(**batch)  # labels given: the model shifts them into decoder inputs
        pel = per_example_losses(model, batch)
    s, n = per_example_loss(own, batch["labels"], "token")
    assert pel.kind == "token" and pel.weights.tolist() == n.tolist()
    np.testing.assert_allclose(pel.losses.numpy(), (s / n).numpy(), rtol=1e-6)
