"""Tiny, seeded models and probe batches shared by the test suite.

Every builder is deterministic (it seeds a private RNG fork, so the caller's global RNG state is left
as it was) and builds in well under a second on a CPU. Batch makers return ``(batch, task_ids)``:
``batch`` is a dict that the matching model accepts as ``model(**batch)`` (``labels`` included: the
plain-PyTorch models then also return a ``"loss"`` entry, like Hugging Face models do), and
``task_ids`` is a ``LongTensor`` of shape ``(n,)`` with values in ``range(n_tasks)``; when
``n >= n_tasks`` every task occurs at least once.

Families:

- :func:`mlp` / :func:`mlp_batch`: classifier on 8 features (Linear, LayerNorm, in-place ReLU).
- :func:`cnn` / :func:`cnn_batch`: classifier on 1x8x8 images (Conv2d, GroupNorm, Linear).
- :func:`tiny_llama` / :func:`llama_batch`: Llama-style causal LM, vocab 64, hidden 16, 2 layers,
  eager attention, tied or untied embeddings; right padding, ``labels`` = -100 on padding and on a
  short prompt prefix.
- :func:`tiny_llava` / :func:`llava_batch`: LLaVA built from config (CLIP vision tower on 16x16 px
  images with 4x4 patches -> 16 image tokens, Llama text model), eager attention.
- :func:`lora_llama` / :func:`lora_llama_batch`: PEFT LoRA (r=4 on q_proj, v_proj, dropout 0.1,
  non-zero init of both factors) on the untied :func:`tiny_llama`; only adapters are trainable.
- :func:`tiny_t5` / :func:`t5_batch`: ``T5ForConditionalGeneration`` (encoder-decoder), the batch
  as the Trainer builds it: ``input_ids``, ``attention_mask``, ``labels`` (no decoder inputs).
- :func:`tiny_bert_token` / :func:`token_batch`: ``BertForTokenClassification`` (5 tags), labels
  -100 on [CLS], padding and some sub-word positions.
- :func:`tiny_bert_seqcls` / :func:`seqcls_batch`: ``BertForSequenceClassification`` (3 classes),
  some labels -100 (ignored examples).
- :func:`tiny_head_model`: a tiny Hugging Face model of a named class (GPT-2, BART, BERT MLM, ViT,
  Qwen2, DistilBERT, ...) for loss-kind detection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]

VOCAB = 64
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_TOKEN_ID = 63  # inside the vocabulary, as LLaVA requires
IMAGE_SIZE = 16
PATCH_SIZE = 4
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" feature strategy drops CLS


def _fork(seed: int):
    """A private RNG scope: seeded inside, caller's RNG state restored on exit."""
    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


def _task_ids(n: int, n_tasks: int, gen: torch.Generator) -> torch.Tensor:
    """Every task at least once (when n >= n_tasks), in a seeded random order."""
    ids = torch.arange(n) % n_tasks
    return ids[torch.randperm(n, generator=gen)]


# ---------------------------------------------------------------------------------------------
# plain PyTorch classifiers


class TinyMLP(nn.Module):
    """8 -> 16 -> 16 -> n_classes; LayerNorm and an in-place ReLU (which overwrites a Linear output)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, n_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.norm(self.fc1(x)))
        h = self.drop(self.act(self.fc2(h)))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TinyCNN(nn.Module):
    """1x8x8 -> conv(4) -> conv(4, stride 2) -> GroupNorm -> linear(n_classes)."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.norm(self.conv2(h)))
        logits = self.head(h.flatten(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyMLP:
    """Seeded :class:`TinyMLP` (4 classes)."""
    ctx = _fork(seed)
    try:
        return TinyMLP().to(dtype)
    finally:
        ctx.__exit__(None, None, None)


def cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyCNN:
    """Seeded :class:`TinyCNN` (3 classes)."""
    ctx = _fork(seed)
    try:
        return TinyCNN().to(dtype)
    finally:
        ctx.__exit__(None, None, None)


def mlp_batch(
    n: int = 8, n_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Batch, torch.Tensor]:
    """``{"x": (n, 8), "labels": (n,) in [0, 4)}`` and task ids."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=dtype)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return {"x": x, "labels": labels}, _task_ids(n, n_tasks, gen)


def cnn_batch(
    n: int = 8, n_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Batch, torch.Tensor]:
    """``{"x": (n, 1, 8, 8), "labels": (n,) in [0, 3)}`` and task ids."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return {"x": x, "labels": labels}, _task_ids(n, n_tasks, gen)


# ---------------------------------------------------------------------------------------------
# Hugging Face models built from configs (no downloads)


def _llama_config(hidden: int = 16, tie_word_embeddings: bool = False, **kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="eager",
        **kw,
    )


def tiny_llama(tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Seeded ``LlamaForCausalLM``: vocab 64, hidden 16, 2 layers, 2 heads (1 KV head), eager attention."""
    from transformers import LlamaForCausalLM

    ctx = _fork(seed)
    try:
        model = LlamaForCausalLM(_llama_config(tie_word_embeddings=tie_word_embeddings))
    finally:
        ctx.__exit__(None, None, None)
    if tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.to(dtype)


def llama_batch(n: int = 8, seq_len: int = 12, n_tasks: int = 3, seed: int = 0) -> tuple[Batch, torch.Tensor]:
    """Right-padded causal-LM batch with variable lengths and a masked prompt prefix.

    ``input_ids`` (n, seq_len): BOS, random tokens, PAD after each row's length;
    ``attention_mask`` 1 on real tokens; ``labels`` = ``input_ids`` with -100 on padding and on the
    first 1-3 tokens (a "prompt"), so examples carry different numbers of supervised tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.full((n, seq_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        row = torch.randint(3, IMAGE_TOKEN_ID, (length,), generator=gen)
        row[0] = BOS_ID
        input_ids[i, :length] = row
        attention_mask[i, :length] = 1
        labels[i, prompt:length] = row[prompt:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch, _task_ids(n, n_tasks, gen)


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Seeded ``LlavaForConditionalGeneration`` from config.

    Vision: CLIP, hidden 16, 2 layers, 16x16 px images, 4x4 patches (16 image tokens after the
    "default" strategy drops CLS; the default feature layer -2 leaves the last CLIP layer and
    ``post_layernorm`` without gradient). Text: Llama, hidden 32, 2 layers, vocab 64, untied.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=16,
    )
    text = _llama_config(hidden=32)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=N_IMAGE_TOKENS,
        attn_implementation="eager",
    )
    ctx = _fork(seed)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        ctx.__exit__(None, None, None)
    return model.to(dtype)


def llava_batch(
    n: int = 8, text_len: int = 8, n_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Batch, torch.Tensor]:
    """One image per example: BOS, 16 image tokens, then text; right padded.

    ``input_ids`` (n, 1 + 16 + text_len), ``pixel_values`` (n, 3, 16, 16), ``labels`` -100 on BOS, the
    image tokens, a 1-2 token prompt and padding.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_len = 1 + N_IMAGE_TOKENS + text_len
    input_ids = torch.full((n, seq_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    start = 1 + N_IMAGE_TOKENS
    for i in range(n):
        length = int(torch.randint(text_len // 2, text_len + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, 3, (1,), generator=gen))
        text = torch.randint(3, IMAGE_TOKEN_ID, (length,), generator=gen)
        input_ids[i, 0] = BOS_ID
        input_ids[i, 1:start] = IMAGE_TOKEN_ID
        input_ids[i, start : start + length] = text
        attention_mask[i, : start + length] = 1
        labels[i, start + prompt : start + length] = text[prompt:]
    pixel_values = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen, dtype=dtype)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "labels": labels,
    }
    return batch, _task_ids(n, n_tasks, gen)


def lora_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """PEFT LoRA (r=4, alpha=8, q_proj and v_proj, dropout 0.1) on the untied :func:`tiny_llama`.

    ``init_lora_weights=False`` initialises both LoRA factors randomly, so that neither factor starts
    with an all-zero gradient. Only the adapter weights require grad.
    """
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tie_word_embeddings=False, seed=seed, dtype=dtype)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.1,
        init_lora_weights=False,
    )
    ctx = _fork(seed + 1)
    try:
        model = get_peft_model(base, config)
    finally:
        ctx.__exit__(None, None, None)
    return model.to(dtype)


def lora_llama_batch(
    n: int = 8, seq_len: int = 12, n_tasks: int = 3, seed: int = 0
) -> tuple[Batch, torch.Tensor]:
    """Same as :func:`llama_batch` (the LoRA model takes the same inputs)."""
    return llama_batch(n=n, seq_len=seq_len, n_tasks=n_tasks, seed=seed)


def tiny_t5(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Seeded ``T5ForConditionalGeneration``: vocab 64, d_model 16, 2 + 2 layers, 2 heads, ReLU FF."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.1,
        feed_forward_proj="relu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        initializer_factor=1.0,
        attn_implementation="eager",
    )
    ctx = _fork(seed)
    try:
        model = T5ForConditionalGeneration(config)
    finally:
        ctx.__exit__(None, None, None)
    return model.to(dtype)


def t5_batch(
    n: int = 8, src_len: int = 10, tgt_len: int = 6, n_tasks: int = 3, seed: int = 0
) -> tuple[Batch, torch.Tensor]:
    """Trainer-style seq2seq batch: right-padded sources and targets of variable length.

    ``input_ids`` / ``attention_mask`` (n, src_len); ``labels`` (n, tgt_len): random tokens then EOS,
    -100 after (as ``DataCollatorForSeq2Seq`` pads labels). No ``decoder_input_ids``.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.full((n, src_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(n, src_len, dtype=torch.long)
    labels = torch.full((n, tgt_len), -100, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(src_len // 2, src_len + 1, (1,), generator=gen))
        input_ids[i, :length] = torch.randint(3, VOCAB, (length,), generator=gen)
        attention_mask[i, :length] = 1
        target = int(torch.randint(2, tgt_len + 1, (1,), generator=gen))
        labels[i, : target - 1] = torch.randint(3, VOCAB, (target - 1,), generator=gen)
        labels[i, target - 1] = EOS_ID
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch, _task_ids(n, n_tasks, gen)


def _bert_config(**kw: Any):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
        **kw,
    )


def tiny_bert_token(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 5):
    """Seeded ``BertForTokenClassification``: hidden 16, 2 layers, ``num_labels`` tags."""
    from transformers import BertForTokenClassification

    ctx = _fork(seed)
    try:
        model = BertForTokenClassification(_bert_config(num_labels=num_labels))
    finally:
        ctx.__exit__(None, None, None)
    return model.to(dtype)


def _bert_inputs(n: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.full((n, seq_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(n, seq_len, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen))
        input_ids[i, :length] = torch.randint(3, VOCAB, (length,), generator=gen)
        input_ids[i, 0] = BOS_ID  # [CLS]
        attention_mask[i, :length] = 1
    return input_ids, attention_mask


def token_batch(
    n: int = 8, seq_len: int = 10, n_tasks: int = 3, seed: int = 0, num_labels: int = 5
) -> tuple[Batch, torch.Tensor]:
    """Tagging batch: labels in ``[0, num_labels)`` aligned with the tokens; -100 on [CLS], padding and
    about a quarter of the other positions (continuation sub-words)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = _bert_inputs(n, seq_len, gen)
    labels = torch.randint(0, num_labels, (n, seq_len), generator=gen)
    subword = torch.rand(n, seq_len, generator=gen) < 0.25
    labels[(attention_mask == 0) | subword] = -100
    labels[:, 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch, _task_ids(n, n_tasks, gen)


def tiny_bert_seqcls(seed: int = 0, dtype: torch.dtype = torch.float32, num_labels: int = 3):
    """Seeded ``BertForSequenceClassification`` (``problem_type`` left to transformers)."""
    from transformers import BertForSequenceClassification

    ctx = _fork(seed)
    try:
        model = BertForSequenceClassification(_bert_config(num_labels=num_labels))
    finally:
        ctx.__exit__(None, None, None)
    return model.to(dtype)


def seqcls_batch(
    n: int = 8, seq_len: int = 10, n_tasks: int = 3, seed: int = 0, num_labels: int = 3, ignored: int = 2
) -> tuple[Batch, torch.Tensor]:
    """Sequence classification batch: one class per example; the first ``ignored`` labels are -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = _bert_inputs(n, seq_len, gen)
    labels = torch.randint(0, num_labels, (n,), generator=gen)
    labels[:ignored] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return batch, _task_ids(n, n_tasks, gen)


def _head_configs() -> dict[str, tuple[str, Any]]:
    small = {"vocab_size": VOCAB, "pad_token_id": PAD_ID}
    bert = {
        **small,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    llama = {**bert, "num_key_value_heads": 1, "max_position_embeddings": 64}
    bart = {
        **small,
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 64,
    }
    t5 = {
        **small,
        "d_model": 16,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 1,
        "num_heads": 2,
        "decoder_start_token_id": PAD_ID,
    }
    vit = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    vit |= {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    return {
        "LlamaForCausalLM": ("LlamaConfig", llama),
        "LlamaForSequenceClassification": ("LlamaConfig", {**llama, "num_labels": 3}),
        "Qwen2ForCausalLM": ("Qwen2Config", llama),
        "GPT2LMHeadModel": (
            "GPT2Config",
            {**small, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64},
        ),
        "T5ForConditionalGeneration": ("T5Config", t5),
        "T5ForSequenceClassification": ("T5Config", {**t5, "num_labels": 3}),
        "BartForConditionalGeneration": ("BartConfig", bart),
        "BartForSequenceClassification": ("BartConfig", {**bart, "num_labels": 3}),
        "BertForMaskedLM": ("BertConfig", bert),
        "BertForTokenClassification": ("BertConfig", {**bert, "num_labels": 5}),
        "BertForSequenceClassification": ("BertConfig", {**bert, "num_labels": 3}),
        "BertForQuestionAnswering": ("BertConfig", bert),
        "DistilBertForTokenClassification": (
            "DistilBertConfig",
            {**small, "dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "num_labels": 5},
        ),
        "ViTForImageClassification": ("ViTConfig", {**vit, "num_labels": 4}),
    }


def tiny_head_model(name: str, seed: int = 0, **config_kw: Any):
    """A tiny Hugging Face model of class ``name`` (see :func:`_head_configs` for the classes),
    built from its config; ``config_kw`` overrides config fields (e.g. ``problem_type``)."""
    import transformers as tf

    config_name, kw = _head_configs()[name]
    config = getattr(tf, config_name)(**{**kw, **config_kw})
    ctx = _fork(seed)
    try:
        return getattr(tf, name)(config)
    finally:
        ctx.__exit__(None, None, None)


BUILDERS = {
    "mlp": (mlp, mlp_batch),
    "cnn": (cnn, cnn_batch),
    "llama_untied": (lambda **kw: tiny_llama(tie_word_embeddings=False, **kw), llama_batch),
    "llama_tied": (lambda **kw: tiny_llama(tie_word_embeddings=True, **kw), llama_batch),
    "llava": (tiny_llava, llava_batch),
    "lora_llama": (lora_llama, lora_llama_batch),
    "t5": (tiny_t5, t5_batch),
    "bert_token": (tiny_bert_token, token_batch),
    "bert_seqcls": (tiny_bert_seqcls, seqcls_batch),
}
"""Family name -> (model builder, batch maker); the builders accept ``seed=`` and ``dtype=``."""
