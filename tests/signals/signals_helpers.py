"""Shared set-up for the signal tests: float64 families, parameter subsets, thread pinning."""

from __future__ import annotations

import numpy as np
import torch

from tests import tiny_models as tm

FAMILIES = ["mlp", "cnn", "llama_untied", "llama_tied", "llava", "lora_llama"]

# Parameter subsets small enough for a dense P x P Fisher, still spanning every path:
# one-hot embedding factors (tied included), norms, broadcast position embeddings, LoRA.
SUBSETS = {
    "mlp": None,
    "cnn": None,
    "lora_llama": None,
    "llama_untied": [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ],
    "llama_tied": [
        "model.embed_tokens.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ],
    "llava": [
        "model.vision_tower.embeddings.class_embedding",
        "model.vision_tower.embeddings.position_embedding.weight",
        "model.vision_tower.pre_layrnorm.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.language_model.layers.0.post_attention_layernorm.weight",
        "model.language_model.norm.weight",
    ],
}

KIND = {"mlp": "classification", "cnn": "classification"}


def build(family: str, n: int = 8, n_tasks: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0):
    """``(model, batch, task_ids, loss kind)`` for a family, in ``dtype``."""
    builder, maker = tm.BUILDERS[family]
    model = builder(seed=seed, dtype=dtype)
    batch, task_ids = maker(n=n, n_tasks=n_tasks, seed=seed)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    return model, batch, task_ids, KIND.get(family, "causal_lm")


def chosen_params(model, family: str, subset: bool):
    """``(names, params)``: the family's subset, or every trainable parameter."""
    named = dict(model.named_parameters())
    names = (
        SUBSETS[family] if subset and SUBSETS[family] else [k for k, p in named.items() if p.requires_grad]
    )
    return names, [named[k] for k in names]


def assert_gram(res, G) -> None:
    """The probe's Gram equals the brute-force ``G G^T`` (float64) to 1e-9."""
    K = G @ G.T
    np.testing.assert_allclose(res.gram.numpy(), K, rtol=1e-9, atol=1e-12 * np.abs(K).max())
