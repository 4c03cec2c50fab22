"""Closed-form per-example gradients for normalisation layers (faster than the generic vjp).

For a normalisation ``y = xhat * w + b`` (``xhat`` the normalised input, ``w`` and ``b`` broadcast over
every dimension except the normalised / channel ones), per example ``i``:

    g_i(w) = sum over the other dimensions of (dy_i * xhat_i),     g_i(b) = sum of dy_i.

``xhat`` is recomputed from the captured input exactly as the layer computes it:

* ``nn.LayerNorm``: ``F.layer_norm(x, shape, eps=eps)``; sums over dims 1 .. -len(shape)-1;
* ``nn.GroupNorm``: ``F.group_norm(x, groups, eps=eps)``; ``w``, ``b`` per channel (dim 1);
* ``nn.RMSNorm``: ``F.rms_norm(x, shape, eps=eps)``;
* Llama-style RMSNorm of transformers (and its many copies, e.g. Qwen2, Mistral):
  ``xhat = (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)``, ``x32 = x.float()``, ``y = w * xhat``.
  A module is recognised only if its ``forward`` has the same bytecode, constants and names as
  the reference implementation below, so a variant or a kernel replacement falls back to the
  generic path instead of getting a wrong formula;
* T5's ``T5LayerNorm`` (and its copies: MT5, UMT5, LongT5, Pix2Struct, ...), by bytecode as well:
  ``h = x * rsqrt(mean(x32^2, -1) + eps)`` (float32 for half inputs), cast to a half-precision
  ``w``'s dtype, ``y = w * h``; so ``xhat = h``;
* Gemma's RMSNorm (Gemma, Gemma 3, also recognised by bytecode, ``_norm`` included):
  ``y = (xhat * (1 + w)).type_as(x)`` with ``xhat = _norm(x.float())``, so ``g_i(w) = sum dy_i * xhat_i``
  in float32.

A row-mapped call (rows of several examples, :mod:`.row_map`) gets the same formulas per row; the
per-row terms are then summed by example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynamics.signals.calls import ModuleCall
from dynamics.signals.row_map import row_view, sum_rows


def _llama_rmsnorm_forward(self, hidden_states):  # reference code: must stay byte-identical
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _t5_layernorm_forward(self, hidden_states):  # reference code (T5, MT5, ...): must stay byte-identical
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states


def _gemma_rmsnorm_norm(self, x):  # reference code (Gemma, Gemma 3): must stay byte-identical
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _gemma_rmsnorm_forward(self, x):  # reference code: must stay byte-identical
    output = self._norm(x.float())
    # Llama does x.to(float16) * w whilst Gemma3 is (x * w).to(float16)
    # See https://github.com/huggingface/transformers/pull/29402
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)


def same_code(f, g) -> bool:
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if a is None or b is None:
        return False
    return (a.co_code, a.co_consts, a.co_names, a.co_varnames) == (
        b.co_code,
        b.co_consts,
        b.co_names,
        b.co_varnames,
    )


def rule_kind(module: nn.Module) -> str | None:
    """The closed-form rule for this module, or None."""
    forward = type(module).forward
    if isinstance(module, nn.LayerNorm) and forward is nn.LayerNorm.forward and module.elementwise_affine:
        return "layernorm"
    if isinstance(module, nn.GroupNorm) and forward is nn.GroupNorm.forward and module.affine:
        return "groupnorm"
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms) and forward is rms.forward and module.elementwise_affine:
        return "rmsnorm"
    for kind, reference in (
        ("llama_rmsnorm", _llama_rmsnorm_forward),
        ("t5_layernorm", _t5_layernorm_forward),
    ):
        if (
            same_code(forward, reference)
            and isinstance(getattr(module, "weight", None), Tensor)
            and set(module._parameters) == {"weight"}
            and isinstance(getattr(module, "variance_epsilon", None), float)
        ):
            return kind
    if (
        same_code(forward, _gemma_rmsnorm_forward)
        and same_code(getattr(type(module), "_norm", None), _gemma_rmsnorm_norm)
        and isinstance(getattr(module, "weight", None), Tensor)
        and set(module._parameters) == {"weight"}
        and isinstance(getattr(module, "eps", None), float)
    ):
        return "gemma_rmsnorm"
    return None


def _normalised(module: Any, kind: str, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``xhat`` and the dims to sum over (all but the batch and the parameter's dims)."""
    if kind == "layernorm":
        shape = tuple(module.normalized_shape)
        xhat = F.layer_norm(x, shape, None, None, module.eps)
        return xhat, tuple(range(1, x.dim() - len(shape)))
    if kind == "groupnorm":
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
        return xhat, tuple(range(2, x.dim()))
    if kind == "rmsnorm":
        shape = tuple(module.normalized_shape)
        xhat = F.rms_norm(x, shape, None, module.eps)
        return xhat, tuple(range(1, x.dim() - len(shape)))
    if kind == "gemma_rmsnorm":  # y = (xhat * (1 + w)).type_as(x): dy/dw = xhat, in float32
        return module._norm(x.float()), tuple(range(1, x.dim() - 1))
    if kind == "t5_layernorm":
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        if module.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(module.weight.dtype)
        return h, tuple(range(1, x.dim() - 1))
    h = x.to(torch.float32)
    xhat = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
    return xhat, tuple(range(1, x.dim() - 1))


def rule_per_example_grads(
    module: nn.Module,
    kind: str,
    params: Sequence[Tensor],
    calls: Sequence[ModuleCall],
    n: int,
    *,
    names: Sequence[str],
    shapes: Sequence[torch.Size],
) -> list[Tensor]:
    """Per-example gradients ``(n, *shape)`` of the module's ``weight`` / ``bias`` over its calls.

    ``names`` are the parameters' attribute names in ``module`` (``"weight"`` or ``"bias"``) and
    ``shapes`` their whole shapes (a sharded parameter's own shape is that of its shard).
    """
    out = [
        torch.zeros((n, *shape), dtype=p.dtype, device=dy_device(calls, p))
        for p, shape in zip(params, shapes, strict=True)
    ]
    for call in calls:
        row_map = call.row_map
        view = call if row_map is None else row_view(call)  # rows of several examples: one "example" each
        x = view.main_input().detach()
        dy = view.dys[0]
        xhat, dims = _normalised(module, kind, x)
        for k, name in enumerate(names):
            g = dy * xhat if name == "weight" else dy
            g = (g.sum(dims) if dims else g).to(out[k].dtype)
            out[k] += g if row_map is None else sum_rows(g, row_map, n)
    return out


def dy_device(calls: Sequence[ModuleCall], p: Tensor) -> torch.device:
    """Where the per-example gradients live: with the output gradients (a DTensor's device is its mesh's)."""
    return calls[0].dys[0].device if calls and calls[0].dys else p.device
