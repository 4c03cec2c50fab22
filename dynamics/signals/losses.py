"""Per-example losses and the task weights that make them add up to the training loss.

Conventions (shared by every signal in :mod:`dynamics.signals`):

* ``l_i`` is example ``i``'s own loss and ``g_i = grad l_i`` its gradient. For a causal LM
  ``l_i = (1 / N_i) sum_t CE(logits_{i,t}, y_{i,t+1})`` over its ``N_i`` non-ignored (label != -100)
  shifted tokens, exactly the per-token terms of transformers' ``ForCausalLMLoss`` (labels padded
  with -100 on the right and shifted by one, cross-entropy with ``ignore_index=-100``). An example
  without supervised tokens has ``N_i = 0``, ``l_i = 0`` and ``g_i = 0``.
  For classification ``l_i = CE(logits_i, y_i)`` and ``N_i = 1``; a callable loss gives ``l_i``
  directly and ``N_i = 1`` unless it also returns per-example token counts.
* ``N_i`` is the example's *weight* in its task: ``w_ai = N_i / N_a`` with ``N_a = sum_{i in a} N_i``.
  Then ``sum_i w_ai l_i = (sum of task a's token losses) / (task a's token count)`` is the task's
  token-weighted training loss (what ``ForCausalLMLoss`` computes on a batch holding only task
  ``a``), and ``g_a = sum_i w_ai g_i`` is exactly its gradient. For classification and callables
  ``w_ai = 1 / n_a`` (the task mean).

Logits are cast to at least float32 before the cross-entropy, as transformers does (float64 stays
float64, so that float64 references are exact).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

IGNORE_INDEX = -100

LossSpec = str | Callable[..., Any]
_LABEL_KEYS = ("labels", "shift_labels")


@dataclass
class PerExampleLoss:
    """``losses`` (n,) per-example losses ``l_i`` (with autograd graph); ``weights`` (n,) ``N_i``."""

    losses: Tensor
    weights: Tensor
    kind: str


def split_batch(batch: Any) -> tuple[tuple, dict, Tensor | None]:
    """Model inputs and labels of a batch.

    A mapping is passed to the model as keyword arguments without ``labels`` / ``shift_labels`` (the
    loss is computed here, per example); a ``(inputs, labels)`` tuple or list as ``model(inputs)``;
    a tensor as ``model(tensor)`` with no labels.
    """
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return (), kwargs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}, batch[1]
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    raise TypeError(
        f"batch must be a dict of model inputs, an (inputs, labels) pair or a tensor, got {type(batch).__name__}"
    )


def _wants_no_cache(model: torch.nn.Module, kwargs: dict) -> bool:
    """Hugging Face models build a KV cache in eval mode unless told not to.

    The cache wastes memory here, and it is state shared by every attention call of the forward
    pass: a module re-run for per-example gradients would append to it. Composite models (LLaVA
    and other vision-language models) keep ``use_cache`` on their text config only.
    """
    config = getattr(model, "config", None)
    if "use_cache" in kwargs or config is None:
        return False
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    if getattr(config, "use_cache", None) is None and getattr(text_config, "use_cache", None) is None:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def run_model(model: torch.nn.Module, batch: Any) -> Any:
    """``model(...)`` on the batch's inputs (labels withheld; ``use_cache=False`` for HF models)."""
    args, kwargs, _ = split_batch(batch)
    if _wants_no_cache(model, kwargs):
        kwargs = {**kwargs, "use_cache": False}
    return model(*args, **kwargs)


def get_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, an object/dict with ``logits``, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot find logits in the model output ({type(output).__name__}); "
            "pass loss=callable(model, batch) -> per-example losses of shape (n,)"
        )
    return logits


def _upcast(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def causal_lm_losses(
    logits: Tensor, labels: Tensor | None, shift_labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-example causal-LM losses ``l_i`` and supervised token counts ``N_i``.

    ``shift_labels[i, t] = labels[i, t + 1]`` (last position -100), as ``ForCausalLMLoss`` pads and
    shifts; ``l_i = sum_t CE_it [y_it != -100] / max(N_i, 1)``.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm loss needs `labels` (or `shift_labels`) in the batch")
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if logits.dim() != 3 or logits.shape[:2] != shift_labels.shape:
        raise ValueError(
            f"causal_lm loss needs logits (n, T, V) matching labels (n, T); got logits "
            f"{tuple(logits.shape)} and labels {tuple(shift_labels.shape)} (if the model returns logits "
            "for fewer positions, e.g. logits_to_keep, pass a callable loss)"
        )
    n, t, v = logits.shape
    target = shift_labels.to(logits.device)
    ce = F.cross_entropy(
        _upcast(logits).reshape(n * t, v), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(n, t)
    counts = (target != IGNORE_INDEX).sum(1)
    return ce.sum(1) / counts.clamp(min=1).to(ce.dtype), counts.to(ce.dtype)


def classification_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example cross-entropy ``l_i = CE(logits_i, y_i)``, weights ``N_i = 1``."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"classification loss needs logits (n, C) and integer labels (n,); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(
            "classification loss needs integer class labels; for regression pass a callable loss"
        )
    ce = F.cross_entropy(_upcast(logits), labels.to(logits.device), reduction="none")
    return ce, torch.ones_like(ce)


def detect_kind(logits: Tensor, labels: Tensor | None) -> str:
    """``"causal_lm"`` for (n, T, V) logits with (n, T) labels, ``"classification"`` for 1-D labels."""
    if labels is None:
        raise ValueError(
            'loss="auto" needs `labels` in the batch; add them or pass loss=callable(model, batch) -> (n,)'
        )
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape:
        return "causal_lm"
    if labels.dim() == 1 and logits.dim() == 2:
        return "classification"
    raise ValueError(
        f'loss="auto" cannot tell the head from logits {tuple(logits.shape)} and labels '
        f'{tuple(labels.shape)}; pass loss="causal_lm", "classification" or a callable'
    )


def per_example_losses(model: torch.nn.Module, batch: Any, loss: LossSpec = "auto") -> PerExampleLoss:
    """Run the model on the batch and return per-example losses and task weights (see module doc).

    ``loss``: ``"auto"``, ``"causal_lm"``, ``"classification"`` or a callable
    ``loss_fn(model, batch) -> (n,)`` (or ``-> ((n,) losses, (n,) token counts)``).
    """
    if callable(loss):
        out = loss(model, batch)
        losses, weights = out if isinstance(out, tuple) else (out, None)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("a callable loss must return per-example losses of shape (n,)")
        if weights is None:
            weights = torch.ones_like(losses.detach())
        return PerExampleLoss(losses, weights.detach().to(losses.dtype), "callable")
    if loss not in ("auto", "causal_lm", "classification"):
        raise ValueError(f'loss must be "auto", "causal_lm", "classification" or a callable, got {loss!r}')
    _, _, labels = split_batch(batch)
    logits = get_logits(run_model(model, batch))
    kind = detect_kind(logits, labels) if loss == "auto" else loss
    if kind == "causal_lm":
        shift = batch.get("shift_labels") if isinstance(batch, Mapping) else None
        losses, weights = causal_lm_losses(logits, labels, shift)
    else:
        if labels is None:
            raise ValueError("classification loss needs `labels` in the batch")
        losses, weights = classification_losses(logits, labels)
    return PerExampleLoss(losses, weights, kind)
