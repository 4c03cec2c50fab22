"""Which per-layer path a module's own parameters can take on the fast path.

``module_kind`` names the treatment; :mod:`.plan` decides, per parameter, whether the recorded calls
prove that the treatment covers every use of it.
"""

from __future__ import annotations

import torch
from torch import nn

from dynamics.signals.layer_rules import rule_kind, same_code
from dynamics.signals.products import is_patch_conv, is_scaled_embedding

FACTORED_KINDS = frozenset({"linear", "linear_t", "embedding", "conv"})


def _gpt2_conv1d_forward(self, x):  # transformers' Conv1D (GPT-2, GPT): must stay byte-identical
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    x = x.view(size_out)
    return x


def module_kind(module: nn.Module) -> str:
    """How the fast path treats a module's own parameters.

    ``"linear"``, ``"linear_t"``, ``"embedding"``, ``"conv"`` (factored, :mod:`.products`): stock
    ``nn.Linear``; transformers' ``Conv1D`` (GPT-2: ``y = x W + b`` with ``W`` stored (in, out),
    recognised by the bytecode of its forward, so a variant falls back); ``nn.Embedding`` (no max-norm
    renormalisation, no frequency scaling; Gemma's output-scaled embedding too); ``nn.Conv1d/2d`` (zero padding, one group) and ``nn.Conv3d``
    cutting non-overlapping patches (kernel == stride, no padding or dilation, one group; any other
    Conv3d is ``"generic"``); a closed-form rule of :mod:`.layer_rules` (``"layernorm"``,
    ``"groupnorm"``, ``"rmsnorm"``, ``"llama_rmsnorm"``, ``"t5_layernorm"``, ``"gemma_rmsnorm"``); ``"generic"`` (module-local vjp);
    ``"unsupported"`` (never re-run: an embedding that renormalises its weight in place).
    """
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if (
        same_code(forward, _gpt2_conv1d_forward)
        and set(module._parameters) == {"weight", "bias"}
        and isinstance(getattr(module, "nf", None), int)
    ):
        return "linear_t"
    if isinstance(module, nn.Embedding) and (forward is nn.Embedding.forward or is_scaled_embedding(module)):
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return "embedding"
        return "unsupported"  # renorm writes into the weight; frequency scaling couples examples
    if (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and forward in (nn.Conv1d.forward, nn.Conv2d.forward)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and (not isinstance(module.padding, str) or module.padding == "valid")
    ):
        return "conv"
    if (
        isinstance(module, nn.Conv3d)
        and forward is nn.Conv3d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and is_patch_conv(module)
    ):
        return "conv"  # patch embeddings (Qwen2-VL); torch has no 3-D unfold for the general case
    return rule_kind(module) or "generic"


def contains_unsupported(module: nn.Module) -> bool:
    """Re-running such a module would renormalise an embedding weight in place: never do that."""
    return any(module_kind(m) == "unsupported" for m in module.modules())
