"""Per-example and per-task training losses recomputed from the logits the model already produced.

No extra forward pass: the recorder sees the logits of the training forward (a forward hook) and
recomputes the loss per example, detached and without building a graph.

For a causal LM with labels ``y`` (``-100`` = ignored) and logits ``z``, example ``i`` contributes

    S_i = sum_{t : y_{i,t+1} != -100}  CE(z_{i,t}, y_{i,t+1})        (summed token losses)
    N_i = #{t : y_{i,t+1} != -100}                                     (its target tokens)

and task ``a``'s loss over an optimizer step (all micro-batches, all ranks) is

    L_a = sum_{i in a} S_i / sum_{i in a} N_i .

Because transformers' ``ForCausalLMLoss`` divides the summed token losses of the whole step by
``num_items_in_batch = sum_i N_i`` (under gradient accumulation and, with
``average_tokens_across_devices``, across ranks), the token-weighted mean of the per-task losses,
``sum_a (N_a / N) L_a = sum_i S_i / N``, is exactly the loss the Trainer logs for that step.
Logits are upcast to float32 as transformers does, so the two agree to float rounding. (A model
whose ``forward`` takes no ``**kwargs`` gets no ``num_items_in_batch``; the Trainer then logs the
mean of the micro-batch means, which differs from the token-weighted mean under gradient
accumulation with unequal token counts; the per-task losses here stay token-weighted.)

Kinds (``loss=``):
    ``causal_lm``       token CE, labels shifted by one (decoder-only LMs, LLaVA-style VLMs);
    ``token``           token CE, labels aligned with logits (masked LM, token classification,
                        encoder-decoder decoders, or a collator that passes ``shift_labels``);
    ``classification``  CE per example (N_i = 1);
    ``multilabel``      BCE-with-logits, mean over labels (N_i = 1);
    ``regression``      squared error, mean over outputs (N_i = 1);
    a callable ``f(logits, labels) -> (S, N)`` with ``S`` and ``N`` of shape ``(batch,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynamics.signals.losses import IGNORE_INDEX, classification_losses, get_logits

__all__ = [
    "LOSS_KINDS",
    "LossSpec",
    "extract_logits",
    "infer_loss_kind",
    "per_example_loss",
    "task_sums",
]

LOSS_KINDS = ("causal_lm", "token", "classification", "multilabel", "regression")
LossSpec = str | Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Logit elements upcast at once: bounds the float32 copy (transformers upcasts all logits at once;
# chunking keeps our recomputation from doubling that peak).
_CHUNK_ELEMENTS = 1 << 25
# On CPU, smaller chunks (512 KiB of float32 rows) keep the gathered rows and their log-softmax in
# L2 cache (an A/B of alternating 40-step runs of the benchmark VLM: 17 % less time in the hook;
# within noise in the full benchmark). Not on accelerators, where launches per chunk cost more.
_CPU_CHUNK_ELEMENTS = 1 << 17
_MIN_CHUNK_ROWS = 16  # large vocabularies: bounds the per-chunk Python/launch overhead


def extract_logits(output: Any) -> torch.Tensor | None:
    """The logits in a model output (see :func:`dynamics.signals.losses.get_logits`), or ``None``."""
    try:
        return get_logits(output)
    except TypeError:
        return None


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def infer_loss_kind(model: nn.Module | None, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Pick the loss kind from shapes and, for sequence logits, the model class (HF naming).

    Raises:
        ValueError: when shapes do not identify the loss; the message says which ``loss=`` to pass.
    """
    base = _base_model(model) if model is not None else None
    config = getattr(base, "config", None)
    if logits.dim() >= 3 and labels.dim() == logits.dim() - 1 and not labels.is_floating_point():
        if getattr(config, "is_encoder_decoder", False):
            return "token"
        name = type(base).__name__ if base is not None else ""
        if any(key in name for key in ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")):
            return "causal_lm"
        if any(key in name for key in ("ForMaskedLM", "ForTokenClassification")):
            return "token"
        raise ValueError(
            f"cannot tell whether the sequence labels of {name or 'this model'} are shifted (causal LM) or "
            "aligned with the logits; pass loss='causal_lm' or loss='token'"
        )
    if logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return "classification"
    if labels.is_floating_point() and labels.numel() == logits.numel():
        if getattr(config, "problem_type", None) == "multi_label_classification":
            return "multilabel"
        return "regression"
    raise ValueError(
        f"cannot infer the loss from logits of shape {tuple(logits.shape)} and labels of shape "
        f"{tuple(labels.shape)} ({labels.dtype}); pass loss= one of {LOSS_KINDS} or a callable "
        "f(logits, labels) -> (loss_sum, n_items) per example"
    )


@torch.no_grad()
def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: LossSpec,
    *,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss ``S_i`` and item count ``N_i`` per example (see the module docstring).

    Args:
        logits: ``(B, L, V)`` for sequences, ``(B, C)`` or ``(B,)`` otherwise; any float dtype.
        labels: ``(B, L)`` token ids (-100 = not a target), ``(B,)`` class ids, or floats.
        kind: one of :data:`LOSS_KINDS` or a callable returning ``(S, N)``.
        shift_labels: already-shifted targets (transformers' padding-free collators); implies ``token``.

    Returns:
        ``(S, N)``, both float32 of shape ``(B,)``, detached.
    """
    logits = logits.detach()
    if callable(kind):
        loss_sum, count = kind(logits, labels)
        return loss_sum.detach().float().reshape(-1), torch.as_tensor(
            count, device=loss_sum.device
        ).float().reshape(-1)
    labels = labels.to(logits.device)
    if kind == "causal_lm" and shift_labels is None:
        # transformers pads then shifts: position t predicts token t+1, the last predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if kind in ("causal_lm", "token"):
        targets = (labels if shift_labels is None else shift_labels).to(logits.device)
        if logits.dim() < 3 or targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}; "
                "per-token losses need one label per logit position"
            )
        # Only supervised positions: image tokens, prompts and padding (often most of a VLM's
        # sequence) cost nothing. Selecting them syncs the host once per micro-batch; the Trainer
        # itself syncs once per micro-batch (its NaN filter), so the pipeline loses nothing to speak of.
        supervised = targets != IGNORE_INDEX
        count = supervised.reshape(supervised.shape[0], -1).sum(dim=1).float()
        per_example = supervised[0].numel()  # positions per example
        flat_index = supervised.reshape(-1).nonzero().squeeze(1)
        flat_targets = targets.reshape(-1)
        vocab = logits.shape[-1]
        try:
            table = logits.view(-1, vocab)  # rows in (example, position) order, no copy
        except RuntimeError:  # a strided view (e.g. sliced logits): gather rows without copying all
            table = None
        loss_sum = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, vocab))  # rows per float32 chunk
        if logits.device.type == "cpu":
            step = min(step, max(_MIN_CHUNK_ROWS, _CPU_CHUNK_ELEMENTS // max(1, vocab)))
        for i in range(0, flat_index.numel(), step):
            index = flat_index[i : i + step]
            # index_select copies whole rows in one kernel (advanced indexing is ~3x slower on CPU);
            # cross_entropy (fused log-softmax + NLL) beats logsumexp - gather on CPU and CUDA alike.
            rows = (
                table.index_select(0, index)
                if table is not None
                else logits[torch.unravel_index(index, targets.shape)]
            )
            ce = F.cross_entropy(rows.float(), flat_targets.index_select(0, index), reduction="none")
            loss_sum.index_add_(0, torch.div(index, per_example, rounding_mode="floor"), ce)
        return loss_sum, count
    n = logits.shape[0]
    ones = torch.ones(n, device=logits.device)
    if kind == "classification":
        ce, count = classification_losses(logits, labels)
        return ce.float(), count.float()
    if kind == "multilabel":
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float().view_as(logits), reduction="none"
        )
        return bce.reshape(n, -1).mean(dim=1), ones
    if kind == "regression":
        err = (logits.float().reshape(n, -1) - labels.float().reshape(n, -1)) ** 2
        return err.mean(dim=1), ones
    raise ValueError(f"unknown loss kind {kind!r}; use one of {LOSS_KINDS} or a callable")


@torch.no_grad()
def task_sums(
    loss_sum: torch.Tensor, count: torch.Tensor, task_ids: torch.Tensor, n_tasks: int
) -> torch.Tensor:
    """Per-task totals as one ``(3, T)`` float64 tensor: rows ``sum S_i``, ``sum N_i``, ``#examples``.

    Examples with no target item (``N_i = 0``, e.g. fully masked) add nothing to the loss but count
    as examples, as they do in the Trainer's batch.
    """
    values = torch.stack(
        [
            loss_sum.double(),
            count.double().to(loss_sum.device),
            torch.ones_like(loss_sum, dtype=torch.float64),
        ]
    )
    out = torch.zeros(3, n_tasks, dtype=torch.float64, device=loss_sum.device)
    out.index_add_(1, task_ids.to(loss_sum.device).long(), values)  # one kernel for the three sums
    return out
