"""TEMPORARY: the loss interface of INTERFACES.md item 1 over today's ``per_task_loss`` functions.

Branch ``losses`` rewrites :mod:`dynamics.signals.losses` to export ``resolve_loss_kind``,
``per_example_loss``, ``extract_logits`` and ``LossSpec``; :mod:`.loss_meter` imports those names from
there and falls back to this module only while they are missing. Delete this file at the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dynamics.integrations import per_task_loss as _old

LossSpec = str | Callable[..., Any]


def extract_logits(output: Any) -> torch.Tensor | None:
    return _old.extract_logits(output)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel / FSDP1 keep the real model in .module; PEFT behind get_base_model().
    for _ in range(8):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            base = get_base()
            if base is not model:
                model = base
                continue
        break
    return model


def resolve_loss_kind(
    model: nn.Module | None,
    loss: LossSpec = "auto",
    *,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> LossSpec:
    if loss != "auto":
        return loss
    if logits is None or labels is None:
        raise ValueError("cannot infer the loss kind without logits and labels; pass loss=")
    return _old.infer_loss_kind(_unwrap(model) if model is not None else None, logits, labels)


def per_example_loss(
    output: Any, labels: torch.Tensor, kind: LossSpec, *, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = output if isinstance(output, torch.Tensor) else _old.extract_logits(output)
    if logits is None:
        raise TypeError(f"cannot find logits in the model output ({type(output).__name__})")
    if shift_labels is not None and kind == "causal_lm":
        kind = "token"
    return _old.per_example_loss(logits, labels, kind, shift_labels=shift_labels)
