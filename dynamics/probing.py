"""``probe()``: every first-order training signal of one probe batch, from one Gram matrix.

    from dynamics import probe
    res = probe(model, batch, task_ids=task_ids, tasks=["vqa", "report", "grounding"])
    rows = res.to_rows(step)          # tidy rows for the run store

What is computed (formulas in the docstrings of :mod:`dynamics.signals`):

* per-example losses ``l_i`` and gradients ``g_i = grad l_i`` over the chosen parameters
  (:mod:`~dynamics.signals.losses`, the same definition the training-side loss meter uses: for the
  token kinds ``l_i`` is the mean over the example's supervised tokens, token weighting as
  transformers' losses; labels of -100 weigh 0 for every kind). The model gets what it needs from
  a Trainer-style batch: labels are withheld, an encoder-decoder model gets its decoder inputs
  built from the labels;
* ``K = G G^T`` (n x n, :mod:`~dynamics.signals.gram`), in one forward and two backward passes
  (the second verifies which rows of each layer belong to which example; later probes of the same
  batch reuse its verdicts, :mod:`~dynamics.signals.axis_cache`, and need one backward pass);
* task geometry from ``W K W^T`` with ``w_ai = N_i / N_a`` (:mod:`~dynamics.signals.geometry`);
* the empirical Fisher spectrum from ``K / n`` (:mod:`~dynamics.signals.spectrum`);
* the gradient noise scale ``B_simple`` (:mod:`~dynamics.signals.noise_scale`);
* optionally the top Hessian eigenvalue (:mod:`~dynamics.signals.hessian`).

A probe never changes training: gradients come from ``torch.autograd.grad`` (``p.grad`` is not
touched), the model runs in eval mode (dropout off, batch-norm on running statistics, so no buffer
changes) and every module's train/eval flag is restored afterwards, and the global RNG state is
restored, so later dropout masks are the same as without the probe.

Degenerate batches never produce data: a probe batch without any supervised label, or with a
non-finite loss or gradient, raises :class:`DegenerateProbeError` (a ``ValueError``) before any
value exists; one with a single supervised example warns once (:class:`DegenerateProbeWarning`)
and leaves the spectrum summaries and the noise scale NaN, so they produce no rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynamics.signals.axis_cache import memo_for
from dynamics.signals.capture import Capture
from dynamics.signals.geometry import direction_cosine, task_geometry, task_weights
from dynamics.signals.gram import METHODS, compute_gram
from dynamics.signals.hessian import hessian_top_eigenvalue
from dynamics.signals.losses import LossSpec, per_example_losses
from dynamics.signals.noise_scale import noise_scale
from dynamics.signals.sharding import is_sharded, unsupported_reason
from dynamics.signals.spectrum import FisherSpectrum, fisher_spectrum

Row = tuple[int, str, str, str, float]


class DegenerateProbeError(ValueError):
    """The probe batch cannot give any signal: no supervised label, or a non-finite loss or gradient."""


class DegenerateProbeWarning(UserWarning):
    """The probe batch gives only some signals (one supervised example): the others are NaN, not logged."""


@dataclass
class ProbeResult:
    """Signals of one probe batch. Per-task tensors are indexed like ``task_names``.

    * ``gram`` (n x n, float64): ``K_ij = <g_i, g_j>``; ``losses`` (n,): ``l_i``;
    * ``task_counts`` (T,): examples per task; ``task_tokens`` (T,): ``N_a = sum_{i in a} N_i``;
    * ``task_loss`` (T,): ``sum_i w_ai l_i``, the task's token-weighted training loss;
    * ``task_grad_norm`` (T,): ``|g_a|``; ``task_cosine`` (T x T): ``cos(g_a, g_b)``;
      ``task_gram`` (T x T): ``W K W^T``;
    * ``conflict_rate``: share of task pairs with negative cosine;
    * ``fisher_eigvals``: non-zero eigenvalues of ``K / n`` (decreasing) = those of the empirical
      Fisher ``(1/n) sum_i g_i g_i^T``; ``fisher_trace = tr(K) / n``; ``fisher_se = -sum p log p``
      with ``p = lambda / sum lambda``; ``fisher_rho = lambda_1 / sum lambda``;
      ``fisher_eff_rank = exp(SE)``;
    * ``noise_scale``: ``B_simple = tr(Sigma) / |G|^2`` (unbiased estimators from ``K``);
    * ``hessian_top``: largest Hessian eigenvalue of the batch loss (None unless requested);
    * ``direction_cosine`` (T,): ``cos(g_a, direction)`` (None unless a direction was given);
    * ``missing_tasks``: tasks without examples (or without supervised tokens) in this batch:
      their entries are NaN, and they produce no rows;
    * ``coverage``: parameter names by the path that computed their gradients
      (``ghost``, ``materialized``, ``rule``, ``module``, ``exact``, ``unused``).
    """

    gram: Tensor
    losses: Tensor
    task_names: list[str]
    task_counts: Tensor
    task_tokens: Tensor
    task_loss: Tensor
    task_grad_norm: Tensor
    task_cosine: Tensor
    task_gram: Tensor
    conflict_rate: float
    fisher_eigvals: Tensor
    fisher_trace: float
    fisher_se: float
    fisher_rho: float
    fisher_eff_rank: float
    noise_scale: float
    missing_tasks: list[str]
    loss_kind: str
    hessian_top: float | None = None
    direction_cosine: Tensor | None = None
    coverage: dict[str, list[str]] = field(default_factory=dict)

    def to_rows(self, step: int) -> list[Row]:
        """Tidy ``(step, name, task, task_b, value)`` rows for the run store.

        Per task: ``probe_loss`` (the probe batch's task loss; ``loss`` is the training loss the hooks log), ``grad_norm``, ``update_cosine`` (with a direction); per task pair
        ``a < b``: ``grad_cosine``; global (task ""): ``conflict_rate``, ``fisher_se``, ``fisher_rho``,
        ``fisher_eff_rank``, ``fisher_trace``, ``noise_scale``, ``hessian_top``. Missing tasks and
        undefined (NaN) values give no row.
        """
        step = int(step)
        rows: list[Row] = []

        def add(name: str, value: Any, task: str = "", task_b: str = "") -> None:
            if value is None:
                return
            v = float(value)
            if math.isfinite(v):
                rows.append((step, name, task, task_b, v))

        names = self.task_names
        for a, task in enumerate(names):
            if task in self.missing_tasks:
                continue
            add("probe_loss", self.task_loss[a], task)
            add("grad_norm", self.task_grad_norm[a], task)
            if self.direction_cosine is not None:
                add("update_cosine", self.direction_cosine[a], task)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                add("grad_cosine", self.task_cosine[a, b], names[a], names[b])
        add("conflict_rate", self.conflict_rate)
        add("fisher_se", self.fisher_se)
        add("fisher_rho", self.fisher_rho)
        add("fisher_eff_rank", self.fisher_eff_rank)
        add("fisher_trace", self.fisher_trace)
        add("noise_scale", self.noise_scale)
        add("hessian_top", self.hessian_top)
        return rows


def _check_shardable(model: nn.Module, chosen: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Refuse parameter layouts the probe cannot see whole (tensor parallelism, FSDP1 flat parameters).

    FSDP2, FSDP1 with ``use_orig_params=True`` and ZeRO-3 are fine: the products need only the
    layers' inputs and output gradients (:mod:`~dynamics.signals.sharding`).
    """
    reason = unsupported_reason(model, [p for _, p in chosen])
    if reason is not None:
        raise ValueError(
            f"cannot probe this model: {reason}. Log per-task losses only, or probe the model unsharded "
            "(single process or DDP, passing the unwrapped module)."
        )
    return chosen


def _resolve_params(model: nn.Module, params: Any) -> list[tuple[str, Tensor]]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    if params is None:
        chosen: list[tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; pass params=... explicitly")
        return chosen
    items = list(params.values()) if isinstance(params, Mapping) else list(params)
    out: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for p in items:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must hold tensors (nn.Parameter), got {type(p).__name__}")
        if id(p) not in names:
            raise ValueError("params holds a tensor that is not a parameter of this model")
        if not p.requires_grad:
            raise ValueError(f"parameter {names[id(p)]!r} has requires_grad=False; probe only trainable ones")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((names[id(p)], p))
    if not out:
        raise ValueError("params is empty")
    return out


def _resolve_direction(direction: Any, chosen: list[tuple[str, Tensor]]) -> dict[int, Tensor] | None:
    if direction is None:
        return None
    if isinstance(direction, Mapping):
        missing = [n for n, _ in chosen if n not in direction]
        if missing:
            raise ValueError(f"direction lacks tensors for parameters {missing[:5]}")
        tensors = [direction[n] for n, _ in chosen]
    else:
        tensors = list(direction)
        if len(tensors) != len(chosen):
            raise ValueError(
                f"direction has {len(tensors)} tensors but {len(chosen)} parameters are probed; "
                "give one tensor per chosen parameter, in model.named_parameters() order, or a dict by name"
            )
    out = {}
    for (name, p), d in zip(chosen, tensors, strict=True):
        if not isinstance(d, Tensor) or d.shape != p.shape:
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"direction for {name!r} must be a tensor of shape {tuple(p.shape)}, got {got}")
        out[id(p)] = d.detach().to(p.device)
    return out


@contextmanager
def _probe_mode(model: nn.Module, device: torch.device):
    """Eval mode and a forked RNG inside; every module's train flag and the RNG state restored."""
    flags = [(m, m.training) for m in model.modules()]
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            model.eval()
            yield
        finally:
            for m, flag in flags:
                m.training = flag


def _few(index: Tensor) -> str:
    shown = index.flatten().tolist()
    return ", ".join(map(str, shown[:8])) + (f" (and {len(shown) - 8} more)" if len(shown) > 8 else "")


def _check_losses(losses: Tensor, weights: Tensor) -> None:
    """Refuse a batch that gives no signal at all, before any gradient is taken (nothing is logged)."""
    n = losses.shape[0]
    bad = ~torch.isfinite(losses.detach())
    if bad.any():
        raise DegenerateProbeError(
            f"the probe loss is not finite (NaN or inf) for example(s) {_few(bad.nonzero())} of {n}, so no signal "
            "of this probe batch is computed or logged. Look for NaN / inf inputs or weights, a float16 overflow, "
            "or a user loss that divides by an empty count."
        )
    w = weights.detach()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise DegenerateProbeError("the per-example loss weights must be finite and >= 0")
    if not (w > 0).any():
        raise DegenerateProbeError(
            f"no example of the probe batch ({n} examples) has a supervised label: every label is -100 (or every "
            "loss weight is 0), so there is no loss to differentiate and nothing is logged. Probe examples that "
            "carry targets (e.g. a max_length long enough to keep the completion)."
        )


def _check_gram(gram: Tensor) -> None:
    """Refuse non-finite per-example gradients (the losses were finite: an overflow in the backward)."""
    K = gram.detach()
    bad = ~torch.isfinite(K.diagonal())  # a non-finite g_i spoils row and column i: name i by K_ii
    if not bad.any():
        bad = ~torch.isfinite(K).all(dim=1)
    if bad.any():
        raise DegenerateProbeError(
            f"the per-example gradient is not finite (NaN or inf) for example(s) {_few(bad.nonzero())} of "
            f"{gram.shape[0]} although their losses are finite (an overflow in the backward pass, or NaN / inf "
            "parameters), so no signal of this probe batch is logged. Probe in float32 or check the parameters."
        )


def _one_supervised_example(weights: Tensor) -> bool:
    """Fewer than two examples carry weight: say so once; the caller blanks what needs two or more."""
    supervised = int((weights > 0).sum())
    if supervised >= 2:
        return False
    n = weights.shape[0]
    which = "one example" if n == 1 else f"only one example with a supervised label (of {n})"
    warnings.warn(
        f"dynamics: the probe batch has {which}. The Fisher spectrum summaries (fisher_se, fisher_rho, "
        "fisher_eff_rank) and the noise scale need two or more examples, so they are NaN and not logged; "
        "probe_loss, grad_norm and fisher_trace are. Probe a batch of several examples (probe_size).",
        DegenerateProbeWarning,
        stacklevel=3,
    )
    return True


def _task_names(task_ids: Tensor, tasks: Sequence[str] | None) -> list[str]:
    top = int(task_ids.max()) + 1 if task_ids.numel() else 0
    if tasks is None:
        return [str(a) for a in range(top)]
    tasks = [str(t) for t in tasks]
    if top > len(tasks):
        raise ValueError(f"task_ids go up to {top - 1} but only {len(tasks)} task names were given")
    if len(set(tasks)) != len(tasks):
        raise ValueError("task names must be unique")
    return tasks


def probe(
    model: nn.Module,
    batch: Any,
    *,
    task_ids: Tensor | Sequence[int],
    tasks: Sequence[str] | None = None,
    loss: LossSpec = "auto",
    params: Iterable[Tensor] | Mapping[str, Tensor] | None = None,
    method: str = "auto",
    direction: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
    hessian: bool = False,
    hessian_iters: int = 20,
    hessian_tol: float = 1e-3,
    cache_checks: bool = True,
) -> ProbeResult:
    """Per-example gradient Gram matrix of ``batch`` and every signal derived from it.

    Args:
        model: any ``nn.Module`` whose examples do not interact in eval mode (batch rows are
            examples); Hugging Face models, PEFT models and plain modules alike.
        batch: a dict of model inputs (with ``labels`` for the built-in losses), as the Trainer's
            collator builds it, an ``(inputs, labels)`` pair, or a tensor (callable loss only).
        task_ids: (n,) integers indexing ``tasks``.
        tasks: task names; default ``"0" .. "T-1"`` with ``T = max(task_ids) + 1``.
        loss: ``"auto"`` (from the model's class and config:
            :func:`~dynamics.signals.losses.resolve_loss_kind`), a kind of
            :data:`~dynamics.signals.losses.LOSS_KINDS` (``"causal_lm"``, ``"token"``,
            ``"classification"``, ``"multilabel"``, ``"regression"``), a
            :class:`~dynamics.signals.losses.LogitsLoss` (``fn(logits, labels)``, the form the
            training side accepts too), or a callable ``loss_fn(model, batch) -> (n,)`` per-example
            losses (optionally ``(losses, weights)``, e.g. token counts) that runs the model itself.
        params: parameters to probe; default every parameter with ``requires_grad`` (so only the
            adapters of a PEFT model).
        method: ``"auto"`` (fast path, exact fallback where needed), ``"ghost"`` / ``"materialize"``
            (fast path forcing one product for Linear/Embedding weights) or ``"exact"``
            (per-example autograd; about n backward passes).
        direction: tensors aligned with the probed parameters (``model.named_parameters()`` order,
            or a dict by name), e.g. the last optimizer update; gives ``direction_cosine``.
        hessian: also estimate the top Hessian eigenvalue of the batch loss (costs one extra
            forward and up to ``hessian_iters`` double-backward passes; needs eager attention).
        hessian_iters, hessian_tol: Lanczos iteration cap and relative tolerance.
        cache_checks: reuse the example-axis verdicts of an earlier probe of the same model, batch
            (compared by value), parameters and loss, which skips the check's backward pass
            (:mod:`~dynamics.signals.axis_cache` says why that is safe and when it is not);
            False verifies on every call.

    Raises:
        DegenerateProbeError: no supervised label in the batch, or a non-finite loss or gradient.

    Warns:
        DegenerateProbeWarning: only one example carries a supervised label.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    task_ids = torch.as_tensor(task_ids)
    if task_ids.dim() != 1 or task_ids.is_floating_point() or task_ids.is_complex():
        raise ValueError(f"task_ids must be a 1-D integer tensor of shape (n,), got {tuple(task_ids.shape)}")
    if task_ids.numel() == 0:
        raise ValueError("the probe batch is empty")
    if int(task_ids.min()) < 0:
        raise ValueError("task_ids must be >= 0")
    names = _task_names(task_ids, tasks)
    chosen = _check_shardable(model, _resolve_params(model, params))
    plist = [p for _, p in chosen]
    if hessian and any(is_sharded(p) for p in plist):
        raise ValueError("hessian=True needs whole parameters; under FSDP / ZeRO-3 probe with hessian=False")
    pname = {id(p): n for n, p in chosen}
    dir_map = _resolve_direction(direction, chosen)
    n = task_ids.shape[0]
    device = plist[0].device

    hess = None
    with _probe_mode(model, device), torch.enable_grad():
        # Sharded parameters: even the exact path needs the hooks, to find the tensors FSDP unshards.
        cap = Capture(model, plist, n=n) if method != "exact" or any(is_sharded(p) for p in plist) else None
        try:
            with cap if cap is not None else nullcontext():
                pel = per_example_losses(model, batch, loss)
        except Exception:
            if cap is None or not cap.expanded:
                raise
            cap = Capture(model, plist)  # the model's code rejected an expanded broadcast embedding
            with cap:
                pel = per_example_losses(model, batch, loss)
        if pel.losses.shape != (n,):
            raise ValueError(
                f"the loss gives {tuple(pel.losses.shape)} per-example values but task_ids has n = {n}; "
                "one task id per example is needed"
            )
        _check_losses(pel.losses, pel.weights)
        memo = memo_for(model, batch, plist, loss) if cache_checks and cap is not None else None
        gr = compute_gram(
            pel.losses,
            plist,
            cap,
            method,
            dir_map,
            memo,
            lambda: per_example_losses(model, batch, loss).losses,
        )
        _check_gram(gr.gram)
        losses = pel.losses.detach().to(torch.float64).cpu()
        weights = pel.weights.detach().cpu()
        kind = pel.kind
        del pel, cap  # free the graph before the Hessian pass
        if hessian:

            def batch_loss() -> Tensor:
                again = per_example_losses(model, batch, loss)
                w = again.weights.to(again.losses.dtype)
                return (again.losses * w).sum() / w.sum().clamp(min=1e-12)

            hess = hessian_top_eigenvalue(batch_loss, plist, hessian_iters, hessian_tol, model=model).value

    W, present = task_weights(task_ids, weights, len(names))
    geo = task_geometry(gr.gram, W, present)
    spec = fisher_spectrum(gr.gram, gr.eps)
    b_simple = noise_scale(gr.gram).b_simple
    if _one_supervised_example(weights):
        spec = FisherSpectrum(spec.eigvals, spec.trace, math.nan, math.nan, math.nan)
        b_simple = math.nan
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    onehot = torch.zeros(len(names), n, dtype=torch.float64)
    onehot[task_ids.cpu(), torch.arange(n)] = 1.0
    dcos = None
    if dir_map is not None and gr.example_dots is not None:
        dnorm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in dir_map.values()))
        dcos = direction_cosine(gr.example_dots, dnorm, W, geo.grad_norm)
    coverage = {k: [pname[i] for i in v] for k, v in gr.paths.items()}
    return ProbeResult(
        gram=gr.gram.detach().cpu(),
        losses=losses,
        task_names=names,
        task_counts=onehot.sum(1).long(),
        task_tokens=onehot @ weights.to(torch.float64),
        task_loss=torch.where(present, W @ losses, nan),
        task_grad_norm=geo.grad_norm,
        task_cosine=geo.cosine,
        task_gram=geo.gram,
        conflict_rate=geo.conflict_rate,
        fisher_eigvals=spec.eigvals,
        fisher_trace=spec.trace,
        fisher_se=spec.se,
        fisher_rho=spec.rho,
        fisher_eff_rank=spec.eff_rank,
        noise_scale=b_simple,
        missing_tasks=[t for t, ok in zip(names, present.tolist(), strict=True) if not ok],
        loss_kind=kind,
        hessian_top=hess,
        direction_cosine=dcos,
        coverage=coverage,
    )
