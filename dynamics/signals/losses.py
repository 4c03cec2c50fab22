"""One definition of the per-example loss, shared by the training-side loss meter and the probe.

Every example ``i`` has a summed loss ``S_i`` over its ``N_i`` supervised items and a loss
``l_i = S_i / max(N_i, 1)``. Labels equal to :data:`IGNORE_INDEX` (-100) are not items: they add
nothing to ``S_i`` or ``N_i`` for every kind, so an example with no supervised item has
``S_i = N_i = l_i = 0`` and a zero gradient.

Kinds (:data:`LOSS_KINDS`, the values of ``loss=``):

``causal_lm``
    token cross-entropy with labels shifted by one (position ``t`` predicts label ``t + 1``):
    decoder-only LMs and LLaVA-style vision-language models. ``N_i`` = supervised tokens.
    Exactly the per-token terms of transformers' ``ForCausalLMLoss`` (pad with -100, shift, CE).
    Pre-shifted ``shift_labels`` (padding-free collators, sequence parallelism) are used as given.
``token``
    token cross-entropy with labels aligned with the logits: encoder-decoder models (T5, BART,
    ...; labels are the decoder targets), token classification, masked LM. ``N_i`` = supervised tokens.
``classification``
    cross-entropy of one class per example (sequence / image classification, multiple choice);
    ``N_i = 1``, or 0 when the label is -100.
``multilabel``
    binary cross-entropy with logits, ``l_i`` the mean over the example's non-ignored labels;
    ``N_i = 1`` (0 when all its labels are ignored).
``regression``
    squared error, ``l_i`` the mean over the example's non-ignored outputs; ``N_i`` as multilabel.

Why these weights: task ``a``'s loss ``L_a = sum_{i in a} S_i / sum_{i in a} N_i`` is then exactly
the loss transformers computes on a batch holding only task ``a`` (token-weighted for the token
kinds, the example mean otherwise), and the token-weighted mean over tasks is the Trainer's own
logged loss. Logits are upcast to at least float32 as transformers does (float64 stays float64, so
float64 references are exact).

User losses. Both user forms return per-example losses ``l`` of shape ``(n,)`` or a pair
``(l, N)`` with the weights ``N_i`` (default 1 each); ``S_i = l_i N_i``:

* :class:`LogitsLoss` ``(fn)`` with ``fn(logits, labels)``: works on both sides (the meter gets the
  training forward's logits, the probe runs the model itself and passes its logits with the graph).
  A plain callable given to :func:`per_example_loss` is taken as this form (the training side never
  runs the model).
* a plain callable ``fn(model, batch)`` given to :func:`dynamics.probe`: the probe only; it runs the
  model however it needs to.

Fused outputs: a model output with per-token log-probabilities and a label mask and no logits (TRL's
``FusedCausalLMOutput``: ``log_probs`` zero on ignored positions, ``label_mask``; shifted already)
gives ``S_i = -sum_t log_probs_it``, ``N_i = sum_t label_mask_it`` for the token kinds.

Training side, token kinds: when the model output's ``loss`` still holds its autograd graph (a
training forward with ``labels``), :func:`per_example_loss` reads the per-token terms from the
log-probabilities the model's own cross-entropy saved for its backward, after checking that the
graph is exactly that loss and its targets are the definition's; otherwise it recomputes them
from the logits. The values are the same; reading them costs a gather instead of a log-softmax.

Auto-detection (:func:`resolve_loss_kind`) reads the model's class and config after unwrapping PEFT,
DDP, FSDP, DeepSpeed, ``torch.compile`` and TRL value-head wrappers; tensor shapes only break ties
for models without a recognised head. An explicit kind or callable always wins.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "LogitsLoss",
    "LossSpec",
    "PerExampleLoss",
    "extract_logits",
    "model_inputs",
    "per_example_loss",
    "per_example_losses",
    "per_token_losses",
    "resolve_loss_kind",
    "run_model",
    "split_batch",
    "unwrap_model",
]

IGNORE_INDEX = -100
LOSS_KINDS = ("causal_lm", "token", "classification", "multilabel", "regression")
_TOKEN_KINDS = ("causal_lm", "token")

LossSpec = str | Callable[..., Any]
"""``"auto"``, one of :data:`LOSS_KINDS`, a :class:`LogitsLoss`, or a callable (see module doc)."""

_LABEL_KEYS = ("labels", "shift_labels")
_CHOICES = (
    "pass loss= one of 'causal_lm' (labels shifted by one: decoder-only LMs), 'token' (labels aligned with "
    "the logits: encoder-decoder, token classification, masked LM), 'classification', 'multilabel', "
    "'regression', or a callable (dynamics.signals.losses.LogitsLoss(fn) with fn(logits, labels) -> per-example "
    "losses)"
)

# Logit elements upcast at once: bounds the float32 copy (transformers upcasts all logits at once;
# chunking keeps our recomputation from doubling that peak).
_CHUNK_ELEMENTS = 1 << 25
# On CPU, smaller chunks (2 MiB of float32 rows) keep the gathered rows and their log-softmax in
# cache. Interleaved medians of 7 rounds, ms per micro-batch at 2^17 / 2^18 / 2^19 / 2^20 elements:
# 8 x 112 tokens, vocabulary 1 k: 1.10 / 0.95 / 0.89 / 0.86; 8 x 256, 32 k: 47.0 / 46.5 / 47.2 / 48.4;
# 2 x 512, 150 k: 134.6 / 134.4 / 134.2 / 131.1 (2^17 had been chosen against 2^25 by an A/B of
# 40-step runs). Not on accelerators, where launches per chunk cost more.
_CPU_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK_ROWS = 16  # large vocabularies: bounds the per-chunk Python/launch overhead


class LogitsLoss:
    """A user loss on the model's logits: ``fn(logits, labels) -> l`` or ``(l, N)``, each ``(n,)``.

    ``l_i`` is example ``i``'s loss, ``N_i`` its weight in its task (e.g. its token count; default
    1). The one user form both sides accept: the training-side meter calls it on the training
    forward's logits (no graph), the probe on its own forward's logits (with the graph).
    """

    def __init__(self, fn: Callable[[Tensor, Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"LogitsLoss needs a callable fn(logits, labels), got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, logits: Tensor, labels: Any) -> Any:
        return self.fn(logits, labels)

    def __repr__(self) -> str:
        return f"LogitsLoss({getattr(self.fn, '__name__', self.fn)!r})"


# ------------------------------------------------------------------ model outputs


def extract_logits(output: Any) -> Tensor | None:
    """The logits of a model output, or ``None`` (e.g. a fused output without logits).

    A tensor is the logits; a mapping or object gives its ``logits``; a tuple gives its first
    tensor, skipping a leading 0-d loss (HF tuple outputs with labels are ``(loss, logits, ...)``).
    """
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        items = [x for x in output if isinstance(x, Tensor)]
        if len(items) > 1 and items[0].dim() == 0:
            items = items[1:]
        logits = items[0] if items else None
    return logits if isinstance(logits, Tensor) else None


def _field(output: Any, name: str) -> Any:
    return output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)


def _fused_terms(output: Any) -> tuple[Tensor, Tensor] | None:
    """``(S, N)`` from per-token ``log_probs`` and ``label_mask`` when the output has no logits."""
    if isinstance(output, (Tensor, tuple, list)) or extract_logits(output) is not None:
        return None
    log_probs, mask = _field(output, "log_probs"), _field(output, "label_mask")
    if not isinstance(log_probs, Tensor) or not isinstance(mask, Tensor):
        return None
    if log_probs.shape != mask.shape or log_probs.dim() < 2:
        raise ValueError(
            f"a fused output needs per-token log_probs and label_mask of one shape (n, T); got "
            f"{tuple(log_probs.shape)} and {tuple(mask.shape)}"
        )
    n = log_probs.shape[0]
    keep = mask.to(log_probs.device).bool()
    lp = log_probs.to(_upcast_dtype(log_probs.dtype))
    # where, not multiply: an ignored position holds 0 by contract, but never let it leak a NaN.
    S = -torch.where(keep, lp, torch.zeros_like(lp)).reshape(n, -1).sum(1)
    return S, keep.reshape(n, -1).sum(1).to(S.dtype)


# ------------------------------------------------------------------ the kinds


def _upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _token_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``S_i = sum_t CE(logits_it, y_it)`` over ``y_it != -100`` and ``N_i``, chunked over supervised rows."""
    if logits.dim() < 3 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"per-token losses need one label per logit position: labels {tuple(targets.shape)} do not match "
            f"logits {tuple(logits.shape)} (if the model returns logits for fewer positions, e.g. "
            "logits_to_keep, pass a LogitsLoss)"
        )
    n, vocab = logits.shape[0], logits.shape[-1]
    dtype = _upcast_dtype(logits.dtype)
    # Only supervised positions: image tokens, prompts and padding (often most of a VLM's
    # sequence) cost nothing. Selecting them syncs the host once per micro-batch; the Trainer
    # itself syncs once per micro-batch (its NaN filter), so the pipeline loses nothing to speak of.
    supervised = targets != IGNORE_INDEX
    count = supervised.reshape(n, -1).sum(dim=1).to(dtype)
    per_example = max(1, supervised[0].numel()) if n else 1  # positions per example
    flat_index = supervised.reshape(-1).nonzero().squeeze(1)
    flat_targets = targets.reshape(-1)
    loss_sum = torch.zeros(n, dtype=dtype, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))  # rows per float32 chunk
    if logits.device.type == "cpu":
        step = min(step, max(_MIN_CHUNK_ROWS, _CPU_CHUNK_ELEMENTS // max(1, vocab)))
    try:
        table = logits.view(-1, vocab)  # rows in (example, position) order, no copy
    except RuntimeError:  # a strided view (e.g. sliced logits): gather rows without copying all
        for i in range(0, flat_index.numel(), step):
            index = flat_index[i : i + step]
            rows = logits[torch.unravel_index(index, tuple(targets.shape))]
            ce = F.cross_entropy(rows.to(dtype), flat_targets.index_select(0, index), reduction="none")
            loss_sum.index_add_(0, torch.div(index, per_example, rounding_mode="floor"), ce)
        return loss_sum, count
    # The table is cut by one split (a single autograd node whose backward concatenates the chunks'
    # gradients): an index_select or a slice per chunk would each allocate and zero a gradient the
    # size of all logits in the backward, which made that backward quadratic in the chunk count
    # (the probe's backward through the loss took longer than the model's). Within a chunk,
    # index_select keeps only the supervised rows (its backward zeroes one chunk).
    chunk_of = torch.div(flat_index, step, rounding_mode="floor")
    n_chunks = -(-table.shape[0] // step)
    counts = torch.bincount(chunk_of, minlength=n_chunks).tolist()  # the one host sync
    chunks = zip(table.split(step), flat_index.split(counts), counts, strict=True)
    for k, (chunk, index, rows_in) in enumerate(chunks):
        if rows_in == 0:
            continue  # an unsupervised span (image tokens, a prompt, padding): no cost, zero gradient
        rows = chunk if rows_in == chunk.shape[0] else chunk.index_select(0, index - k * step)
        # cross_entropy (fused log-softmax + NLL) beats logsumexp - gather on CPU and CUDA alike.
        ce = F.cross_entropy(rows.to(dtype), flat_targets.index_select(0, index), reduction="none")
        # Differentiable as well: the probe takes the gradient of each S_i through this sum.
        loss_sum.index_add_(0, torch.div(index, per_example, rounding_mode="floor"), ce)
    return loss_sum, count


def _per_example_labels(labels: Tensor, n: int, what: str) -> Tensor:
    if labels.numel() != n:
        raise ValueError(f"{what} needs one label per example: got labels {tuple(labels.shape)} for n = {n}")
    return labels.reshape(n)


def _classification_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 2:
        raise ValueError(
            f"classification needs logits (n, C) and one class id per example; got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)} (sequence labels: loss='causal_lm' or 'token')"
        )
    if labels.is_floating_point():
        raise ValueError(
            "classification needs integer class labels; for float targets use loss='multilabel' or 'regression'"
        )
    y = _per_example_labels(labels, logits.shape[0], "classification")
    dtype = _upcast_dtype(logits.dtype)
    S = F.cross_entropy(logits.to(dtype), y, ignore_index=IGNORE_INDEX, reduction="none")
    return S, (y != IGNORE_INDEX).to(dtype)


def _elementwise_terms(logits: Tensor, labels: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Multilabel BCE or regression squared error: mean over each example's non-ignored entries."""
    n = logits.shape[0]
    if logits.numel() != labels.numel() or labels.shape[:1] != logits.shape[:1]:
        raise ValueError(
            f"{kind} needs one label per output: got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    dtype = _upcast_dtype(logits.dtype)
    z = logits.to(dtype).reshape(n, -1)
    y = labels.reshape(n, -1)
    keep = y != IGNORE_INDEX
    y = torch.where(keep, y, torch.zeros_like(y)).to(dtype)
    if kind == "multilabel":
        per = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    else:
        per = (z - y) ** 2
    items = keep.sum(1)
    S = torch.where(keep, per, torch.zeros_like(per)).sum(1) / items.clamp(min=1).to(dtype)
    return S, (items > 0).to(dtype)


# Scalar rescalings between a model's ``loss`` and its cross-entropy node (the division by
# ``num_items_in_batch``, a loss scale): they leave the per-token terms as they are.
_SCALE_NODES = ("DivBackward0", "DivBackward1", "MulBackward0", "MulBackward1")
_MAX_SCALINGS = 4  # rescalings followed above the cross-entropy; more: another graph


def _model_loss_rows(output: Any) -> tuple[Tensor, Tensor] | None:
    """``(log_probs (R, V), targets (R,))`` saved by the model's own token cross-entropy, or ``None``.

    transformers computes its loss as ``nll_loss(log_softmax(logits.float()), targets)``; autograd
    keeps the log-probabilities for the backward, so the per-token terms ``-log p[r, y_r]`` are one
    gather away instead of a second log-softmax over tensors of size tokens x vocabulary (which was
    almost all of the meter's cost). Only that exact graph is read: the loss node, at most a few
    scalar rescalings, then ``NllLoss`` (no class weights, ignore index -100) over ``LogSoftmax``
    in at least float32. Anything else (label smoothing, an added auxiliary loss, a compiled graph,
    no ``loss`` in the output) gives ``None`` and the terms are recomputed from the logits.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, Tensor) or loss.dim() != 0 or loss.grad_fn is None:
        return None
    node: Any = loss.grad_fn
    try:
        for _ in range(_MAX_SCALINGS):
            if type(node).__name__ not in _SCALE_NODES:
                break
            node = node.next_functions[0][0]
        if type(node).__name__ != "NllLossBackward0" or node._saved_weight is not None:
            return None
        if int(node._saved_ignore_index) % 2**64 != IGNORE_INDEX % 2**64:  # autograd reports it unsigned
            return None
        if type(node.next_functions[0][0]).__name__ != "LogSoftmaxBackward0":
            return None
        log_probs, targets = node._saved_self, node._saved_target
    except (AttributeError, IndexError, RuntimeError):  # another graph, or saved tensors already freed
        return None
    if log_probs.dim() != 2 or targets.shape != log_probs.shape[:1]:
        return None
    if log_probs.dtype != _upcast_dtype(log_probs.dtype):
        # A loss in half precision: recompute in float32 as the definition says. (transformers casts
        # float64 logits down to float32 for its loss; that is the precision of the meter's sums.)
        return None
    return log_probs, targets


def _saved_token_losses(output: Any, targets: Tensor) -> Tensor | None:
    """Per-token losses ``(n, L)`` (0 where ``targets`` is -100) read from the model's own loss.

    Used only when the model's targets agree with ``targets`` (``(n, L)``, the definition's) at
    every position the definition supervises, with rows in (example, position) order over ``L`` or
    ``L - 1`` positions (transformers pads then shifts; older versions cut the last position).
    Positions the model supervises and ``targets`` ignores (e.g. another task of a packed row) are
    left out, as in the recomputation. See :func:`_model_loss_rows`.
    """
    saved = _model_loss_rows(output)
    if saved is None or targets.dim() != 2:
        return None
    log_probs, model_targets = saved
    n, length = targets.shape
    ours = targets.to(model_targets.device)
    if log_probs.shape[0] == n * (length - 1) and length > 1:
        if bool((ours[:, -1] != IGNORE_INDEX).any()):
            return None
        ours = ours[:, :-1]
    elif log_probs.shape[0] != n * length:
        return None
    flat = ours.reshape(-1)
    supervised = flat != IGNORE_INDEX
    if not torch.equal(model_targets, flat) and not torch.equal(
        torch.where(supervised, model_targets, IGNORE_INDEX), flat
    ):
        return None
    nll = -log_probs.gather(1, flat.clamp(min=0).unsqueeze(1)).squeeze(1)
    per_token = torch.where(supervised, nll, torch.zeros_like(nll)).reshape(n, -1)
    return per_token if per_token.shape[1] == length else F.pad(per_token, (0, 1))


@torch.no_grad()
def per_token_losses(output: Any, targets: Tensor) -> Tensor:
    """Token cross-entropy ``(n, L)`` of a model output against aligned ``targets`` (0 where -100).

    ``targets`` are the token kinds' targets, already aligned with the logits (for ``causal_lm``:
    the labels padded with -100 and shifted by one). Read from the model's own loss when its graph
    allows (see the module docstring), else computed at the supervised positions only. Float32 (or
    float64 logits' dtype), detached.
    """
    saved = _saved_token_losses(output, targets)  # float32 or float64 (half precision is recomputed)
    if saved is not None:
        return saved
    logits = extract_logits(output)
    if logits is None:
        raise TypeError(
            f"per-token losses need logits; the model returned {type(output).__name__} without them"
        )
    logits = logits.detach()
    if logits.dim() < 3 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"per-token losses need one label per logit position: labels {tuple(targets.shape)} do not match "
            f"logits {tuple(logits.shape)}"
        )
    flat_targets = targets.to(logits.device).reshape(-1)
    flat_index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    table = logits.reshape(-1, logits.shape[-1])
    out = torch.zeros(flat_targets.shape, dtype=_upcast_dtype(logits.dtype), device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))  # bounds the upcast copy, as the sums do
    for index in flat_index.split(step):
        rows = table.index_select(0, index).to(out.dtype)
        out[index] = F.cross_entropy(rows, flat_targets.index_select(0, index), reduction="none")
    return out.view(targets.shape)


def _kind_terms(
    logits: Tensor, labels: Tensor | None, kind: str, shift_labels: Tensor | None, output: Any = None
) -> tuple[Tensor, Tensor]:
    """``(S, N)`` of a built-in kind in the upcast dtype of ``logits``; differentiable unless
    ``output`` (the model output, read for its own saved per-token terms) is given."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; {_CHOICES}")
    if kind in _TOKEN_KINDS:
        if shift_labels is None:
            if labels is None:
                raise ValueError(f"loss={kind!r} needs labels (or shift_labels)")
            labels = labels.to(logits.device)
            # transformers pads then shifts: position t predicts token t+1, the last predicts nothing.
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:] if kind == "causal_lm" else labels
        else:
            targets = shift_labels.to(logits.device)
        saved = None if output is None else _saved_token_losses(output, targets)
        if saved is None:
            return _token_terms(logits, targets)
        return saved.sum(1), (targets != IGNORE_INDEX).reshape(targets.shape[0], -1).sum(1).to(saved.dtype)
    if labels is None:
        raise ValueError(f"loss={kind!r} needs labels")
    labels = labels.to(logits.device)
    if kind == "classification":
        return _classification_terms(logits, labels)
    return _elementwise_terms(logits, labels, kind)


def _user_losses(out: Any, n: int) -> tuple[Tensor, Tensor]:
    """``(l, N)`` from what a user loss returned: ``l`` or ``(l, N)``, each ``(n,)``; ``N`` detached."""
    losses, weights = out if isinstance(out, tuple) else (out, None)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or (n >= 0 and losses.shape[0] != n):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        want = f"({n},)" if n >= 0 else "(n,)"
        raise ValueError(f"a callable loss must return per-example losses of shape {want}, got {got}")
    if weights is None:
        return losses, torch.ones_like(losses.detach())
    weights = torch.as_tensor(weights, device=losses.device).detach().to(losses.dtype)
    if weights.shape != losses.shape:
        raise ValueError(
            f"a callable loss's weights must have the shape of its losses {tuple(losses.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    return losses, weights


@torch.no_grad()
def per_example_loss(
    output: Any,
    labels: Tensor | None,
    kind: LossSpec,
    *,
    shift_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed loss ``S_i`` and item count ``N_i`` per example (definitions in the module docstring).

    Args:
        output: a model output (``ModelOutput``, dict, or tuple with logits; or a fused output with
            per-token ``log_probs`` and ``label_mask`` and no logits) or a logits tensor:
            ``(B, L, V)`` for the token kinds, ``(B, C)`` or ``(B,)`` otherwise; any float dtype.
        labels: ``(B, L)`` token ids, ``(B,)`` class ids or float targets; -100 = ignored.
        kind: one of :data:`LOSS_KINDS`, a :class:`LogitsLoss` or a callable ``fn(logits, labels)``
            (see :func:`resolve_loss_kind` for ``"auto"``).
        shift_labels: already-shifted targets (padding-free collators): used as given by the token kinds.

    Returns:
        ``(S, N)``, both float32 of shape ``(B,)``, detached (computed without a graph).
    """
    if isinstance(kind, str) and kind not in LOSS_KINDS:
        raise ValueError(
            f"per_example_loss needs a resolved kind, got {kind!r} (resolve 'auto' with resolve_loss_kind); {_CHOICES}"
        )
    fused = _fused_terms(output)
    if fused is not None:
        if kind not in _TOKEN_KINDS:
            raise ValueError(
                f"the model returned per-token log_probs and no logits (a fused output), which give token losses "
                f"only; loss={kind!r} needs the logits"
            )
        S, N = fused
    else:
        logits = extract_logits(output)
        if logits is None:
            raise TypeError(
                f"cannot find logits in the model output ({type(output).__name__}): return .logits (or per-token "
                "log_probs with a label_mask), or pass the logits"
            )
        logits = logits.detach()
        if callable(kind):
            losses, N = _user_losses(kind(logits, labels), logits.shape[0])
            S = torch.where(N > 0, losses * N, torch.zeros_like(losses))  # N_i = 0: nothing, even a 0/0
        else:
            S, N = _kind_terms(logits, labels, kind, shift_labels, output=output)
    return S.detach().float(), N.detach().float()


# ------------------------------------------------------------------ detection


_WRAPPER_CLASSES = {
    "DistributedDataParallel",
    "DataParallel",
    "FullyShardedDataParallel",
    "DeepSpeedEngine",
    "PipelineEngine",
}


def unwrap_model(model: Any) -> Any:
    """The model inside PEFT, DDP / DataParallel, FSDP1, DeepSpeed, ``torch.compile`` and TRL wrappers.

    FSDP2's ``fully_shard`` keeps the model's class in the MRO and needs no unwrapping.
    """
    for _ in range(16):
        get_base = getattr(model, "get_base_model", None)  # PEFT
        if callable(get_base) and (base := get_base()) is not model:
            model = base
            continue
        inner = getattr(model, "module", None)
        if type(model).__name__ in _WRAPPER_CLASSES and isinstance(inner, nn.Module):
            model = inner
            continue
        for attr in ("_orig_mod", "pretrained_model"):  # torch.compile; TRL value-head models
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model
    return model


_CLASSIFICATION_HEADS = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForVideoClassification",
    "ForMultipleChoice",
)
_TOKEN_HEADS = ("ForTokenClassification", "ForMaskedLM", "ForAudioFrameClassification")
_CAUSAL_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "ForConditionalGeneration",
    "ForImageTextToText",
    "ForVision2Seq",
)
_UNSUPPORTED_HEADS = ("ForQuestionAnswering", "ForPreTraining", "ForNextSentencePrediction", "ForCTC")


def _head(model: Any) -> str | None:
    """The first class in the model's MRO whose name ends in a known task-head suffix."""
    for cls in type(model).__mro__:
        name = cls.__name__
        for heads in (_CLASSIFICATION_HEADS, _TOKEN_HEADS, _CAUSAL_HEADS, _UNSUPPORTED_HEADS):
            if any(name.endswith(h) for h in heads):
                return name
    return None


def _classification_kind(config: Any, labels: Tensor | None) -> str:
    """The head's loss as transformers picks it: ``problem_type``, else ``num_labels`` and label dtype."""
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "regression"
    if problem == "multi_label_classification":
        return "multilabel"
    if problem == "single_label_classification":
        return "classification"
    if getattr(config, "num_labels", None) == 1:
        return "regression"
    if labels is not None and labels.is_floating_point():
        return "multilabel"
    return "classification"  # transformers' choice for integer labels


def _from_tensors(name: str, logits: Tensor | None, labels: Tensor | None) -> str:
    """Tie-break for models without a recognised head; only unambiguous shapes decide."""
    where = f"{name}: " if name else ""
    if logits is None or labels is None:
        raise ValueError(
            f"loss='auto' cannot tell the loss of {where or 'this model: '}it has no recognised Hugging Face task "
            f"head and no logits and labels to look at; {_CHOICES}"
        )
    integer = not labels.is_floating_point()
    n = logits.shape[0]
    if logits.dim() == 2 and integer and labels.numel() == n:
        return "classification"
    if not integer and labels.numel() == logits.numel() == n:
        return "regression"  # one output per example, as transformers' num_labels == 1
    if logits.dim() >= 3 and integer and labels.shape == logits.shape[:-1]:
        raise ValueError(
            f"loss='auto' cannot tell whether the sequence labels of {name or 'this model'} are shifted (causal LM) "
            f"or aligned with the logits (encoder-decoder, token classification, masked LM); {_CHOICES}"
        )
    raise ValueError(
        f"loss='auto' cannot infer the loss of {name or 'this model'} from logits {tuple(logits.shape)} and labels "
        f"{tuple(labels.shape)} ({labels.dtype}); {_CHOICES}"
    )


def resolve_loss_kind(
    model: Any,
    loss: LossSpec = "auto",
    *,
    logits: Tensor | None = None,
    labels: Tensor | None = None,
) -> LossSpec:
    """The loss kind to use: ``loss`` itself unless it is ``"auto"``, else detected from the model.

    Detection (after :func:`unwrap_model`), first match wins:

    1. a classification head (``...ForSequenceClassification``, ``...ForImageClassification``,
       ``...ForMultipleChoice``, ...): ``config.problem_type``, else ``regression`` for
       ``num_labels == 1``, ``multilabel`` for float labels, ``classification`` otherwise (as
       transformers decides);
    2. ``...ForTokenClassification`` / ``...ForMaskedLM``: ``token``;
    3. ``config.is_encoder_decoder`` (T5, BART, Whisper, ...): ``token``;
    4. ``...ForCausalLM``, ``...LMHeadModel``, ``...ForConditionalGeneration`` (decoder-only
       vision-language models such as LLaVA), ``...ForImageTextToText``: ``causal_lm``;
    5. no recognised head: ``classification`` for ``(n, C)`` logits with one integer label per
       example, ``regression`` for one float output and label per example.

    Raises:
        ValueError: for an unknown kind name, a head without a per-example loss here (question
            answering, pre-training), or when nothing above decides; the message names the choices.
    """
    if callable(loss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be 'auto', a kind name or a callable, got {type(loss).__name__}")
    if loss != "auto":
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss must be 'auto', one of {LOSS_KINDS} or a callable, got {loss!r}")
        return loss
    base = unwrap_model(model) if model is not None else None
    config = getattr(base, "config", None)
    head = _head(base) if base is not None else None
    if head is not None:
        if any(head.endswith(h) for h in _CLASSIFICATION_HEADS):
            return _classification_kind(config, labels)
        if any(head.endswith(h) for h in _TOKEN_HEADS):
            return "token"
        if any(head.endswith(h) for h in _UNSUPPORTED_HEADS):
            raise ValueError(
                f"{head} has no per-example loss built in here (several outputs or label kinds); pass a callable: "
                "LogitsLoss(fn) or, for the probe, fn(model, batch) -> per-example losses"
            )
    if getattr(config, "is_encoder_decoder", False):
        return "token"
    if head is not None:
        return "causal_lm"
    return _from_tensors(type(base).__name__ if base is not None else "", logits, labels)


# ------------------------------------------------------------------ the probe side: run the model


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


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _wants_no_cache(model: nn.Module, kwargs: dict) -> bool:
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
    return _accepts(model, "use_cache")


def _decoder_input_ids(model: nn.Module, labels: Tensor) -> Tensor:
    """Decoder inputs of an encoder-decoder model from its labels, as its own forward builds them.

    The model's ``prepare_decoder_input_ids_from_labels`` (T5, BART, ...) or ``_shift_right``;
    otherwise the labels shifted right behind ``decoder_start_token_id`` with -100 replaced by the
    pad token (what transformers' ``shift_tokens_right`` does).
    """
    base = unwrap_model(model)
    for name in ("prepare_decoder_input_ids_from_labels", "_shift_right"):
        fn = getattr(base, name, None)
        if callable(fn):
            try:
                return fn(labels=labels) if name.startswith("prepare") else fn(labels)
            except (AttributeError, NotImplementedError, TypeError):
                continue
    config = getattr(base, "config", None)
    decoder = getattr(config, "decoder", None) or config
    start = getattr(config, "decoder_start_token_id", None)
    start = getattr(decoder, "decoder_start_token_id", None) if start is None else start
    pad = getattr(config, "pad_token_id", None)
    pad = getattr(decoder, "pad_token_id", None) if pad is None else pad
    if start is None or pad is None:
        raise ValueError(
            f"{type(base).__name__} is an encoder-decoder model and the batch has no decoder_input_ids; the probe "
            "cannot build them from the labels (config has no decoder_start_token_id / pad_token_id): put "
            "decoder_input_ids in the batch (DataCollatorForSeq2Seq(model=...) does)"
        )
    out = labels.new_full(labels.shape, pad)
    out[..., 1:] = labels[..., :-1]
    out[..., 0] = start
    return out.masked_fill(out == IGNORE_INDEX, pad)


def model_inputs(model: nn.Module, batch: Any) -> tuple[tuple, dict, Tensor | None, Tensor | None]:
    """``(args, kwargs, labels, shift_labels)``: what the model needs from a Trainer-style batch.

    Labels are withheld from the model (the loss is computed per example here); an encoder-decoder
    model without ``decoder_input_ids`` / ``decoder_inputs_embeds`` gets them built from the
    sequence labels (:func:`_decoder_input_ids`); Hugging Face models get ``use_cache=False``.
    """
    args, kwargs, labels = split_batch(batch)
    shift = batch.get("shift_labels") if isinstance(batch, Mapping) else None
    config = getattr(unwrap_model(model), "config", None)
    if (
        getattr(config, "is_encoder_decoder", False)
        and isinstance(labels, Tensor)
        and labels.dim() == 2
        and not labels.is_floating_point()
        and "decoder_input_ids" not in kwargs
        and "decoder_inputs_embeds" not in kwargs
    ):
        kwargs = {**kwargs, "decoder_input_ids": _decoder_input_ids(model, labels)}
    if _wants_no_cache(model, kwargs):
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs, labels, shift


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(...)`` on the inputs :func:`model_inputs` builds from the batch."""
    args, kwargs, _, _ = model_inputs(model, batch)
    return model(*args, **kwargs)


def per_example_losses(model: nn.Module, batch: Any, loss: LossSpec = "auto") -> PerExampleLoss:
    """Run the model on the batch; per-example losses ``l_i = S_i / max(N_i, 1)`` with graph, weights ``N_i``.

    The probe's side of :func:`per_example_loss`: the same terms, with the autograd graph, in the
    model's precision (at least float32). ``loss``: ``"auto"``, a kind, a :class:`LogitsLoss`, or a
    plain callable ``fn(model, batch) -> l`` or ``(l, N)`` that runs the model itself.
    """
    if callable(loss) and not isinstance(loss, LogitsLoss):
        losses, weights = _user_losses(loss(model, batch), -1)
        return PerExampleLoss(losses, weights, "callable")
    if isinstance(loss, str) and loss != "auto" and loss not in LOSS_KINDS:
        raise ValueError(f"loss must be 'auto', one of {LOSS_KINDS} or a callable, got {loss!r}")
    args, kwargs, labels, shift = model_inputs(model, batch)
    if labels is None and shift is None:
        raise ValueError(
            "the built-in losses need `labels` in the batch (a dict with 'labels', or an (inputs, labels) pair); "
            "add them or pass loss=callable(model, batch) -> per-example losses (n,)"
        )
    output = model(*args, **kwargs)
    logits = extract_logits(output)
    if isinstance(loss, LogitsLoss):
        if logits is None:
            raise TypeError(
                f"a LogitsLoss needs logits; the model returned {type(output).__name__} without them"
            )
        losses, weights = _user_losses(loss(logits, labels), logits.shape[0])
        return PerExampleLoss(losses, weights, "callable")
    kind = str(resolve_loss_kind(model, loss, logits=logits, labels=labels))
    fused = _fused_terms(output)
    if fused is not None and kind in _TOKEN_KINDS:
        S, N = fused
    elif logits is None:
        raise TypeError(
            f"cannot find logits in the model output ({type(output).__name__}); "
            "pass loss=callable(model, batch) -> per-example losses (n,)"
        )
    else:
        S, N = _kind_terms(logits, labels, kind, shift)
    N = N.detach()
    return PerExampleLoss(S / N.clamp(min=1), N, kind)
