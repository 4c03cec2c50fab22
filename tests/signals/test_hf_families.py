"""Common Hugging Face architectures, built tiny from configs: the default probe equals brute force, none on exact.

Llama, Qwen2, Mistral, Gemma, GPT-NeoX, GPT-2 (``Conv1D`` layers, transposed weights), OPT, T5
(encoder-decoder, its relative-position bias a (query, key) table every example reads), BERT, ViT,
SigLIP's vision tower and Qwen2-VL (its vision tower fed the patches of all images packed
along dimension 0, as its processor does): ``method="auto"`` must give the Gram ``G G^T`` of a loop of
per-example ``autograd.grad`` (float64), and no parameter may need exact per-example autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamics import probe
from tests.reference import ref_grads

N, T, V = 4, 10, 96
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def build(name: str):
    import transformers as tf

    configs = {
        "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(vocab_size=V, num_key_value_heads=1, **SMALL)),
        "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(vocab_size=V, num_key_value_heads=1, **SMALL)),
        "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(vocab_size=V, num_key_value_heads=1, **SMALL)),
        "gemma": (tf.GemmaForCausalLM, lambda: tf.GemmaConfig(vocab_size=V, num_key_value_heads=1, head_dim=16, **SMALL)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(vocab_size=V, **SMALL)),
        "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)),
        "opt": (tf.OPTForCausalLM, lambda: tf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32)),
        "bert": (tf.BertForSequenceClassification, lambda: tf.BertConfig(vocab_size=V, **SMALL)),
        "vit": (tf.ViTForImageClassification, lambda: tf.ViTConfig(image_size=16, patch_size=4, **SMALL)),
    }  # fmt: skip
    if name == "qwen2_vl":
        return _qwen2_vl()
    if name == "siglip":
        return _siglip()
    if name == "t5":
        return _t5()
    cls, config = configs[name]
    cfg = config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (N, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row
    if name == "bert":
        return model, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}, None
    if name == "vit":
        pixels = torch.randn(N, 3, 16, 16, generator=gen, dtype=torch.float64)
        return model, {"pixel_values": pixels, "labels": torch.tensor([0, 1, 1, 0])}, None
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, None


IMAGE, VISION_START, VISION_END = 90, 91, 92


def _qwen2_vl():
    """The stock Qwen2-VL with the processor's layout: all images' patches packed along dimension 0.

    Example 0 carries two images, example 1 none: the vision tower's rows are patches of several
    images, its patch embedding a Conv3d; only the discovered row -> example map attributes them.
    """
    import transformers as tf

    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                rope_parameters=dict(rope_type="default", mrope_section=[4, 2, 2], rope_theta=1e4))  # fmt: skip
    cfg = tf.Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        video_token_id=93,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.Qwen2VLForConditionalGeneration(cfg).double()
    gen = torch.Generator().manual_seed(1)
    images = [2, 0, 1, 1]
    ids = torch.randint(3, 80, (N, 16), generator=gen)
    for i, k in enumerate(images):  # each 16x16 image: 16 patches, merged 2x2 into 4 image tokens
        for j in range(k):
            at = 1 + 6 * j
            ids[i, at], ids[i, at + 1 : at + 5], ids[i, at + 5] = VISION_START, IMAGE, VISION_END
    mask = torch.ones_like(ids)
    mask[3, 12:] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill((mask == 0) | (ids >= IMAGE), -100),
        "pixel_values": torch.randn(16 * sum(images), 3 * 2 * 4 * 4, generator=gen, dtype=torch.float64),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * sum(images)),
        "mm_token_type_ids": (ids == IMAGE).int(),
    }
    return model, batch, None


def _t5():
    import transformers as tf

    cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(cfg).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (N, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(3, V, (N, 6), generator=gen)
    labels[2, 4:] = -100
    # the decoder inputs given, so that the reference's forward (labels dropped) sees the same ones
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return model, {**batch, "decoder_input_ids": model._shift_right(labels)}, None


def _siglip():
    import transformers as tf

    vision = dict(image_size=16, patch_size=4, **SMALL)
    cfg = tf.SiglipConfig(vision_config=vision, text_config=dict(vocab_size=V, **SMALL))
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.SiglipForImageClassification(cfg).double()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(N, 3, 16, 16, generator=gen, dtype=torch.float64)
    return model, {"pixel_values": pixels, "labels": torch.tensor([0, 1, 1, 0])}, None


KINDS = {"t5": "token", "bert": "classification", "vit": "classification", "siglip": "classification"}
FAMILIES = [
    "llama",
    "qwen2",
    "mistral",
    "gemma",
    "gpt_neox",
    "gpt2",
    "opt",
    "t5",
    "bert",
    "vit",
    "siglip",
    "qwen2_vl",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_auto_matches_brute_force_with_nothing_on_exact(name):
    model, batch, _ = build(name)
    task_ids = torch.tensor([0, 1, 0, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    res = probe(model, batch, task_ids=task_ids)
    G, _, _ = ref_grads(model, batch, params, KINDS.get(name, "causal_lm"))
    K = G @ G.T
    assert np.abs(res.gram.numpy() - K).max() <= 1e-9 * np.abs(K).max()
    assert res.coverage["exact"] == []
    if name in ("llama", "qwen2", "mistral"):  # an untied embedding: from pairs of equal ids
        assert "model.embed_tokens.weight" in res.coverage["ghost"]
    if name == "qwen2_vl":  # the Conv3d patch embedding is factored, its rows mapped to examples
        assert "model.visual.patch_embed.proj.weight" in res.coverage["ghost"] + res.coverage["materialized"]
    if name == "gpt2":  # Conv1D weights are factored (ghost / materialised), not module-local re-runs
        conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
        factored = set(res.coverage["ghost"]) | set(res.coverage["materialized"])
        assert {f"{m}.weight" for m in conv1d} <= factored
    if name == "gemma":  # (1 + w) RMSNorms by their rule, the sqrt(d)-scaled embedding factored
        norms = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "GemmaRMSNorm"}
        assert norms and norms <= set(res.coverage["rule"])
        assert "model.embed_tokens.weight" in res.coverage["ghost"] + res.coverage["materialized"]
    if name == "t5":  # T5LayerNorm by its rule; the bias tables by their shared chain (the encoder's
        # masked by a padded attention mask in a batched where)
        norms = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "T5LayerNorm"}
        assert norms and norms <= set(res.coverage["rule"])
        bias = {n for n, _ in model.named_parameters() if "relative_attention_bias" in n}
        assert len(bias) == 2 and bias <= set(res.coverage["rule"]), res.coverage
    if name == "siglip":  # the padding="valid" patch convolution is factored
        conv = "vision_model.embeddings.patch_embedding.weight"
        assert conv in res.coverage["ghost"] + res.coverage["materialized"], res.coverage


def test_t5_layernorm_rule_in_bfloat16():
    """The rule follows T5LayerNorm's cast to a half-precision weight's dtype: equal to exact autograd
    of the same bfloat16 model (to bfloat16 rounding)."""
    model, batch, _ = _t5()
    model = model.to(torch.bfloat16)
    with torch.no_grad():  # hidden states far from unit RMS: the normalisation matters
        model.shared.weight.mul_(8.0)
    norms = {n: p for n, p in model.named_parameters() if n.endswith("layer_norm.weight")}
    task_ids = torch.tensor([0, 1, 0, 1])
    res = probe(model, batch, task_ids=task_ids, params=norms)
    ex = probe(model, batch, task_ids=task_ids, params=norms, method="exact")
    assert sorted(res.coverage["rule"]) == sorted(norms)
    K, Kx = res.gram.numpy(), ex.gram.numpy()
    assert np.abs(K - Kx).max() <= 3e-2 * np.abs(Kx).max()
