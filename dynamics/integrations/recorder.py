"""The framework-agnostic core of the training hooks: accumulate, reduce, probe, write, report.

One :class:`Recorder` serves the HF Trainer callback and the plain-loop API alike. Its life per
optimizer step ``s`` (1-based, the Trainer's ``global_step`` after the update):

1. every training forward hands ``(task_ids, labels, logits)`` to :meth:`Recorder.observe`, which
   computes the per-example ``(S_i, N_i)`` (see :mod:`dynamics.signals.losses`) and queues them with the
   task ids, on the device; nothing is reduced or copied to the host per micro-batch;
2. :meth:`Recorder.before_update` / :meth:`Recorder.after_update` bracket ``optimizer.step()``; on
   probe steps (``s % probe_every == 0``) they run the probe at the parameters the update was
   computed from, ``theta_{s-1}``, with the update ``Delta_s = theta_s - theta_{s-1}`` as the
   ``direction`` (so ``update_cosine`` is the cosine between each task's gradient and the step the
   optimizer actually took from the same point). To do so the probed parameters are copied before
   the step and swapped back for the probe only, then the updated tensors are put back untouched:
   training continues bit-for-bit as without the probe. Cost: two copies of the probed parameters,
   on probe steps only; ``update_direction=False`` skips them and probes before the step;
3. :meth:`Recorder.end_step` closes the step. Every ``sync_every`` steps (and whenever logs are
   requested) the queued values of all pending steps become per-step, per-task sums
   ``[sum S_i, sum N_i, #examples]`` in one ``index_add`` (a ``(K, 3, T+1)`` tensor; column ``T``
   collects examples whose id is out of range, reported then), are summed over ranks in ONE
   collective, moved to the host in one copy and written as store rows by rank 0.

Everything the user's data can get wrong (no task ids, ids out of range, no labels, a probe that
raises) produces one clear warning and is skipped; training never stops because of the recorder.

Defaults and overhead. The probe costs 1.2 to 2.4 training steps on a probe batch the size of a
training step's batch (one forward and one backward with captured layer inputs, the Gram products,
an n x n eigen-decomposition; measured on the benchmark VLM). Probing every 100 steps adds at
most 2.4 % to the wall time. Per-step losses cost one row gather and one cross-entropy over the
supervised positions' logits (which already exist) per micro-batch, and nothing else until the
sync: the per-task reduction, one small collective and the host copy happen once every
``sync_every`` steps. On the benchmark VLM that is about 2 % of a step's time in the hooks
(0.5 ms per micro-batch of 8 x 112 tokens, vocabulary 1024, one CPU thread), and within noise of
the baseline end to end. ``benchmarks/bench_overhead.py`` measures both.
"""

from __future__ import annotations

import threading
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamics.integrations import distributed as dist_utils
from dynamics.integrations.loss_meter import task_sums
from dynamics.integrations.probe_batch import split_task_ids, to_device
from dynamics.integrations.task_ids import TASK_IDS_KEY, TaskIdHook
from dynamics.signals.losses import LossSpec, extract_logits, per_example_loss, resolve_loss_kind
from dynamics.store.schema import tb_tag

__all__ = ["DEFAULT_PROBE_EVERY", "DEFAULT_PROBE_SIZE", "DynamicsWarning", "Recorder"]

# Probe every 100 optimizer steps: a probe of 32 examples costs 1.2-2.4 training steps of 32
# examples (benchmarks/bench_overhead.py), so <= 2.4 % overhead, which with <= 2 % for the per-step
# losses keeps the total under the 5 % target (see module docstring).
DEFAULT_PROBE_EVERY = 100
# 32 examples: enough for a stable n x n Gram spectrum and >= 4 examples per task for up to 8
# tasks, while one probe stays about the cost of one or two training steps of a typical batch.
DEFAULT_PROBE_SIZE = 32
DEFAULT_SYNC_EVERY = 16
# A probe can fail for a passing reason (an odd batch, memory pressure); one that fails this many
# times in a row fails for a lasting one (an unsupported layer), and retrying only costs time.
MAX_PROBE_FAILURES = 3

_LOSS, _TOKENS, _EXAMPLES = 0, 1, 2

# One micro-batch's per-example summed losses S_i, item counts N_i and task ids (all 1-D, on device).
_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class DynamicsWarning(UserWarning):
    """A problem the recorder worked around (bad input, a failed probe); training went on."""


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if not all(isinstance(t, str) and t for t in tasks):
        raise TypeError(f"every task name must be a non-empty string, got {list(tasks)!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {list(tasks)!r}")
    return list(tasks)


def _nonneg_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Recorder:
    """Per-task losses every step, probes on a schedule, rows to the run store, scalars for logs.

    Args:
        tasks: task names; a batch's ``task_ids`` index into this list.
        out_dir: run store directory (written by rank 0 only); ``None`` keeps rows in logs only.
        tags: run tags for the store (``construction``, ``model``, ``seed``, ...).
        meta: extra run metadata for ``run.json``.
        probe_every: probe every this many optimizer steps; 0 turns probes off.
        probe_size: examples in the held probe batch (stratified by task).
        loss: per-example loss kind for the training loss (see :mod:`dynamics.signals.losses`), or ``"auto"``.
        probe_kwargs: passed to :func:`dynamics.probe` (``loss``, ``params``, ``method``, ``hessian``...).
        update_direction: compute ``update_cosine`` (copies the probed parameters on probe steps).
        sync_every: steps between host syncs of the per-step sums (and their all-reduce).
        seed: seed of the probe-batch selection (never the training RNG).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        out_dir: str | Path | None = None,
        tags: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        probe_every: int = DEFAULT_PROBE_EVERY,
        probe_size: int = DEFAULT_PROBE_SIZE,
        loss: LossSpec = "auto",
        probe_kwargs: Mapping[str, Any] | None = None,
        update_direction: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        seed: int = 0,
    ) -> None:
        self.tasks = _check_tasks(tasks)
        self.n_tasks = len(self.tasks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.tags = dict(tags or {})
        self.meta = dict(meta or {})
        self.probe_every = _nonneg_int("probe_every", probe_every, 0)
        self.probe_size = _nonneg_int("probe_size", probe_size, 1)
        self.sync_every = _nonneg_int("sync_every", sync_every, 1)
        self.seed = int(seed)
        self.update_direction = bool(update_direction)
        self.probe_kwargs = dict(probe_kwargs or {})
        for reserved in ("task_ids", "tasks", "direction"):
            if reserved in self.probe_kwargs:
                raise ValueError(f"probe_kwargs may not set {reserved!r}: the recorder passes it")
        if not (callable(loss) or loss == "auto" or isinstance(loss, str)):
            raise TypeError(f"loss must be 'auto', a loss kind name or a callable, got {loss!r}")
        self._loss_kind: LossSpec | None = None if loss == "auto" else loss

        self.model: nn.Module | None = None
        self._hook: TaskIdHook | None = None
        self._writer: Any = None
        self._lock = threading.Lock()
        # This step's micro-batches as (S, N, task ids) per example, reduced only at sync time.
        self._parts: list[_Part] = []
        self._device: torch.device | None = None
        self._pending: list[tuple[int, list[_Part], float | None]] = []
        self._window = np.zeros((3, self.n_tasks))
        self._window_probe: dict[str, float] = {}
        self._warned: set[str] = set()
        self._probe_batch: dict[str, Any] | None = None
        self._probe_task_ids: torch.Tensor | None = None
        self._probe_off: str | None = None if self.probe_every else "probe_every=0"
        self._probe_failures = 0  # consecutive
        self._snapshot: tuple[int, list[torch.Tensor]] | None = None
        self.problems: dict[str, int] = {}
        self._scores: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ setup
    def attach_model(self, model: nn.Module, *, sharded: str | None = None) -> None:
        """Hook ``model`` (the module the training loop calls, DDP-wrapped or not) and check that
        probes are possible."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        # Hook and probe the wrapped module: the wrapper passes task_ids on to it, and DDP's own
        # forward broadcasts buffers (a collective) and arms its gradient reducer, which a probe
        # running on rank 0 alone must not do.
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if self._hook is not None and self._hook.module is model:
            return
        if self._hook is not None:
            self._hook.remove()
        self.model = model
        self._hook = TaskIdHook(model, self.observe)
        reason = sharded or dist_utils.sharding_reason(model)
        if reason:
            self.disable_probes(
                reason,
                f"dynamics: probes are off because {reason}: each rank holds only a shard of every parameter, "
                "so per-example gradients, their Gram matrix, norms and cosines would be computed on shards and "
                "be wrong. Per-task losses are still recorded (they need no gradients). To probe, train with "
                "DDP or DeepSpeed ZeRO-1/2.",
            )

    def detach_model(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def set_probe_batch(self, batch: Mapping[str, Any], task_ids: Any = None) -> None:
        """Hold ``batch`` (model kwargs) as the probe batch; ``task_ids`` default to ``batch['task_ids']``."""
        if task_ids is not None:
            batch = {**batch, TASK_IDS_KEY: task_ids}
        batch, task_ids = split_task_ids(batch, n_tasks=self.n_tasks)
        self._probe_batch = dict(batch)
        self._probe_task_ids = task_ids

    @property
    def has_probe_batch(self) -> bool:
        return self._probe_batch is not None

    @property
    def probes_off(self) -> str | None:
        """Why probes are off (``None`` while they are on)."""
        return self._probe_off

    def config(self) -> dict[str, Any]:
        return {
            "probe_every": self.probe_every,
            "probe_size": self.probe_size,
            "loss": self._loss_kind
            if isinstance(self._loss_kind, str) or self._loss_kind is None
            else "callable",
            "update_direction": self.update_direction,
            "sync_every": self.sync_every,
            "seed": self.seed,
            "probe_kwargs": {k: v for k, v in self.probe_kwargs.items() if k != "params"},
        }

    def start(self, *, out_dir: str | Path | None = None, meta: Mapping[str, Any] | None = None) -> None:
        """Open the run store (rank 0) and reset the logging window. Safe to call again on resume."""
        if out_dir is not None and self.out_dir is None:
            self.out_dir = Path(out_dir)
        self.meta.update(meta or {})
        self._window[:] = 0
        self._window_probe.clear()
        self._writer_or_none()

    def _writer_or_none(self) -> Any:
        if self._writer is not None or self.out_dir is None or not dist_utils.is_main_process():
            return self._writer
        from dynamics.store.writer import RunWriter

        meta = {"world_size": dist_utils.world_size(), "callback": self.config(), **self.meta}
        if self.model is not None:
            params = list(self.model.parameters())
            meta.setdefault("model_class", type(self.model).__name__)
            meta.setdefault("n_params", int(sum(p.numel() for p in params)))
            meta.setdefault("n_trainable_params", int(sum(p.numel() for p in params if p.requires_grad)))
        self._writer = RunWriter(self.out_dir, tasks=self.tasks, tags=self.tags, meta=meta)
        return self._writer

    @property
    def writer(self) -> Any:
        """The :class:`~dynamics.store.writer.RunWriter` (rank 0 with an ``out_dir``), else ``None``."""
        return self._writer_or_none()

    # ------------------------------------------------------------------ warnings
    def warn_once(self, key: str, message: str) -> None:
        """Warn (:class:`DynamicsWarning`) the first time ``key`` happens; count every time in ``problems``."""
        self.problems[key] = self.problems.get(key, 0) + 1
        if key in self._warned:
            return
        self._warned.add(key)
        if dist_utils.world_size() > 1:
            message = f"[rank {dist_utils.rank()}] {message}"
        warnings.warn(message, DynamicsWarning, stacklevel=3)

    # ------------------------------------------------------------------ per-task losses
    def observe(self, task_ids: Any, kwargs: Mapping[str, Any], output: Any) -> None:
        """Consumer of the forward hook: one training forward's ids, kwargs and output."""
        try:
            if task_ids is None:
                self.warn_once(
                    "no_task_ids",
                    "dynamics: a training batch has no 'task_ids', so its per-task losses are not recorded "
                    "(training continues). Put one task index per example under batch['task_ids']; with the HF "
                    "Trainer use dynamics.attach(trainer, ...) so that remove_unused_columns keeps that column.",
                )
                return
            labels = kwargs.get("labels")
            if labels is None:
                self.warn_once(
                    "no_labels",
                    "dynamics: a training forward got no 'labels' keyword, so per-task losses cannot be computed "
                    "for it (training continues). Pass labels to the model, or call observe(logits, labels, "
                    "task_ids) yourself (e.g. when a compute_loss_func or label smoother pops the labels).",
                )
                return
            logits = extract_logits(output)
            if logits is None:
                self.warn_once(
                    "no_logits",
                    f"dynamics: the model returned no logits ({type(output).__name__}), so per-task losses cannot "
                    "be computed (training continues). Return .logits, or call observe(logits, labels, task_ids).",
                )
                return
            self.observe_logits(logits, labels, task_ids, shift_labels=kwargs.get("shift_labels"))
        except Exception as err:  # the recorder must never stop training
            self.warn_once(
                f"observe:{type(err).__name__}",
                f"dynamics: per-task loss skipped for a batch ({type(err).__name__}: {err}); training continues.",
            )

    def observe_logits(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        task_ids: Any,
        *,
        shift_labels: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch's logits and labels (explicit path for models called without the hook)."""
        ids = self._task_id_tensor(task_ids, int(logits.shape[0]))
        if self._loss_kind is None:
            self._loss_kind = resolve_loss_kind(self.model, logits=logits, labels=labels)
        kind = "token" if shift_labels is not None and self._loss_kind == "causal_lm" else self._loss_kind
        loss_sum, count = per_example_loss(logits, labels, kind, shift_labels=shift_labels)
        self._queue(loss_sum, count, ids)  # fresh tensors: no copy needed

    def observe_losses(
        self, loss_sum: torch.Tensor, task_ids: Any, counts: torch.Tensor | None = None
    ) -> None:
        """Add per-example summed losses ``S_i`` with item counts ``N_i`` (default 1 each).

        Ids outside ``0..T-1`` are not checked on the host here; :meth:`sync` reports them (once)
        and leaves them out.
        """
        loss_sum = loss_sum.detach().reshape(-1)
        ids = self._task_id_tensor(task_ids, loss_sum.numel())
        counts = (
            torch.ones_like(loss_sum) if counts is None else counts.detach().reshape(-1).to(loss_sum.device)
        )
        # Copies: the caller may reuse its buffers before the next sync reads them.
        self._queue(loss_sum.clone(), counts.clone(), ids)

    def _queue(self, loss_sum: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor) -> None:
        """Hold one micro-batch's per-example values until :meth:`sync` (no device work per batch:
        the per-task sums of all pending steps are one ``index_add`` there)."""
        ids = ids.to(loss_sum.device, copy=True)  # the batch's id tensor may be refilled in place
        with self._lock:
            self._parts.append((loss_sum, counts, ids))
            if self._device is None:
                self._device = loss_sum.device

    def _task_id_tensor(self, task_ids: Any, batch_size: int) -> torch.Tensor:
        """``task_ids`` as a 1-D LongTensor of one id per example (shape and dtype checked, not range)."""
        ids = torch.as_tensor(task_ids) if not isinstance(task_ids, torch.Tensor) else task_ids
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be integers (an index into tasks), got dtype {ids.dtype}")
        ids = ids.reshape(-1) if ids.dim() > 1 and ids.numel() == batch_size else ids
        if ids.dim() != 1 or ids.numel() != batch_size:
            raise ValueError(
                f"task_ids has shape {tuple(ids.shape)} but the batch has {batch_size} examples; "
                "give exactly one task index per example"
            )
        return ids.long()

    def end_step(self, step: int, lr: float | None = None) -> None:
        """Close optimizer step ``step``: queue its micro-batches; every ``sync_every`` steps, sync and write.

        A collective under torch.distributed: every rank must call it once per optimizer step.
        """
        with self._lock:
            parts, self._parts = self._parts, []
        self._pending.append((int(step), parts, lr))
        if len(self._pending) >= self.sync_every:
            self.sync()

    def _pending_totals(
        self, pending: Sequence[tuple[int, list[_Part], float | None]], device: torch.device
    ) -> torch.Tensor:
        """Per-step, per-task sums of ``pending`` steps as a ``(K, 3, T + 1)`` float64 tensor.

        Entry ``[k, :, a]`` is ``[sum S_i, sum N_i, #examples]`` over the examples of step ``k``
        with task id ``a``; column ``T`` collects ids outside ``0..T-1``. Step ``k``'s task ``a``
        is bin ``k (T + 1) + a`` of one :func:`task_sums` call: one kernel for all steps.
        """
        n_cols = self.n_tasks + 1
        parts = [(k, part) for k, (_, step_parts, _) in enumerate(pending) for part in step_parts]
        if not parts:
            return torch.zeros(len(pending), 3, n_cols, dtype=torch.float64, device=device)
        loss_sum = torch.cat([p[0].to(device, torch.float64) for _, p in parts])
        counts = torch.cat([p[1].to(device, torch.float64) for _, p in parts])
        ids = torch.cat([p[2].to(device) for _, p in parts])
        step_of = torch.cat([torch.full((p[0].numel(),), k, device=device) for k, p in parts])
        ids = torch.where((ids < 0) | (ids >= self.n_tasks), self.n_tasks, ids)
        sums = task_sums(loss_sum, counts, step_of * n_cols + ids, len(pending) * n_cols)
        return sums.view(3, len(pending), n_cols).transpose(0, 1).contiguous()

    def sync(self) -> None:
        """Reduce the pending steps over ranks (one collective), write them (rank 0), add to the window."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        device = dist_utils.reduce_device(self._device)
        totals = (
            dist_utils.all_reduce_sum(self._pending_totals(pending, device)).cpu().numpy()
        )  # (K, 3, T + 1)
        dropped = totals[:, _EXAMPLES, self.n_tasks]
        if dropped.any() and dist_utils.is_main_process():  # totals are global: one rank says it
            first = pending[int(np.flatnonzero(dropped)[0])][0]
            self.warn_once(
                "task_id_range",
                f"dynamics: {int(dropped.sum())} training examples (the first at step {first}) have task ids outside "
                f"the declared tasks {self.tasks} (valid ids 0..{self.n_tasks - 1}); they are left out of the "
                "per-task losses (training continues). Declare every task in tasks=[...] or fix the dataset's task_ids.",
            )
        totals = totals[:, :, : self.n_tasks]
        self._window += totals.sum(axis=0)
        writer = self._writer_or_none()
        if writer is None:
            return
        steps, names, tasks, values = [], [], [], []
        for (step, _, lr), sums in zip(pending, totals, strict=True):
            if sums[_EXAMPLES].sum() > 0:
                for a, task in enumerate(self.tasks):
                    if sums[_TOKENS, a] > 0:
                        steps.append(step), names.append("loss"), tasks.append(task)
                        values.append(sums[_LOSS, a] / sums[_TOKENS, a])
                    for row, name in ((_EXAMPLES, "n_examples"), (_TOKENS, "n_tokens")):
                        (
                            steps.append(step),
                            names.append(name),
                            tasks.append(task),
                            values.append(sums[row, a]),
                        )
                if sums[_TOKENS].sum() > 0:
                    steps.append(step), names.append("train_loss"), tasks.append("")
                    values.append(sums[_LOSS].sum() / sums[_TOKENS].sum())
            if lr is not None:
                steps.append(step), names.append("lr"), tasks.append(""), values.append(float(lr))
        if steps:
            writer.log_many(steps, names, values, tasks)

    def logs(self) -> dict[str, float]:
        """Scalars since the last call, keyed ``dynamics/<name>/<task>`` (syncs; a collective).

        Per-task losses are token-weighted over the window's steps; counts are summed; probe metrics
        are the latest probe's values (only if a probe ran in the window).
        """
        self.sync()
        out: dict[str, float] = {}
        window = self._window
        for a, task in enumerate(self.tasks):
            if window[_TOKENS, a] > 0:
                out[tb_tag("loss", task)] = float(window[_LOSS, a] / window[_TOKENS, a])
            if window[_EXAMPLES].sum() > 0:
                out[tb_tag("n_examples", task)] = float(window[_EXAMPLES, a])
                out[tb_tag("n_tokens", task)] = float(window[_TOKENS, a])
        if window[_TOKENS].sum() > 0:
            out[tb_tag("train_loss")] = float(window[_LOSS].sum() / window[_TOKENS].sum())
        out.update(self._window_probe)
        self._window = np.zeros_like(window)
        self._window_probe = {}
        return out

    # ------------------------------------------------------------------ probes
    def should_probe(self, step: int) -> bool:
        return (
            self._probe_off is None
            and self.probe_every > 0
            and step % self.probe_every == 0
            and self.model is not None
            and dist_utils.is_main_process()
        )

    def _probe_params(self) -> list[torch.Tensor]:
        params = self.probe_kwargs.get("params")
        if params is not None:  # the probe's own order: the mapping's values, or the sequence
            return list(params.values()) if isinstance(params, Mapping) else list(params)
        assert self.model is not None
        return [p for p in self.model.parameters() if p.requires_grad]

    def before_update(self, step: int) -> None:
        """Call right before ``optimizer.step()`` of step ``step`` (the parameters are ``theta_{s-1}``)."""
        if not self.should_probe(step):
            return
        if not self._ensure_probe_batch():
            return
        if self.update_direction:
            with torch.no_grad():
                self._snapshot = (step, [p.detach().clone() for p in self._probe_params()])
        else:
            self.run_probe(step)

    def cancel_update(self) -> None:
        """The step did not happen (an exception in it): drop the parameter copy, skip its probe."""
        self._snapshot = None

    def after_update(self, step: int) -> None:
        """Call right after ``optimizer.step()``: probe at ``theta_{s-1}`` with ``Delta_s`` as direction."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or snapshot[0] != step:
            return
        params = self._probe_params()
        before = snapshot[1]
        after = [p.data for p in params]
        with torch.no_grad():
            direction = [a - b for a, b in zip(after, before, strict=True)]
        try:
            for p, b in zip(params, before, strict=True):
                p.data = b
            self.run_probe(step, direction=direction)
        finally:
            for p, a in zip(params, after, strict=True):
                p.data = a  # the very tensors the optimizer wrote: training is untouched

    def disable_probes(self, reason: str, message: str) -> None:
        """Turn probes off for the rest of the run and say why, once."""
        if self._probe_off is None:
            self._probe_off = reason
            self.warn_once(f"probes_off:{reason}", message)

    def _ensure_probe_batch(self) -> bool:
        if self._probe_batch is None:
            self.disable_probes(
                "no probe batch",
                "dynamics: probes are off: there is no probe batch. Pass probe_batch= (a collated batch holding "
                "task_ids) or probe_dataset= (a map-style dataset of dicts with task_ids); per-task losses are "
                "still recorded.",
            )
            return False
        return True

    def run_probe(self, step: int, direction: Sequence[torch.Tensor] | None = None) -> None:
        """Probe the held batch now and record its rows; a failed probe is reported and skipped.

        :func:`dynamics.probe` runs the model in eval mode (no dropout noise in the gradients, no
        batch-norm statistics update) inside a forked RNG and restores every module's mode, and it
        never touches ``p.grad``: training afterwards is the same as without the probe. Our hook
        is paused so the probe's forwards do not count as training batches.

        The probe's per-task loss on the probe batch is stored by the probe as ``probe_loss``;
        ``loss`` is the training loss of the step's own batches.
        """
        if self._probe_off is not None or self.model is None or not self._ensure_probe_batch():
            return
        from dynamics.probing import probe

        model = self.model
        assert self._hook is not None and self._probe_batch is not None and self._probe_task_ids is not None
        self._hook.paused = True
        try:
            device = next(model.parameters()).device
            if self._probe_task_ids.device != device:
                self._probe_batch = to_device(self._probe_batch, device)
                self._probe_task_ids = self._probe_task_ids.to(device)
            result = probe(
                model,
                self._probe_batch,
                task_ids=self._probe_task_ids,
                tasks=self.tasks,
                direction=direction,
                **self.probe_kwargs,
            )
            rows = result.to_rows(step)
            self._probe_failures = 0
        except Exception as err:  # the recorder must never stop training
            where = traceback.extract_tb(err.__traceback__)[-1]
            self._probe_failures += 1
            what = (
                f"dynamics: the probe at step {step} raised {type(err).__name__} ({Path(where.filename).name}:"
                f"{where.lineno}): {err}."
            )
            if self._probe_failures >= MAX_PROBE_FAILURES:
                self.disable_probes(
                    f"the probe raised {type(err).__name__}",
                    f"{what} That is {self._probe_failures} failed probes in a row, so probes are off for the "
                    "rest of this run; per-task losses are still recorded and nothing logged so far is lost. "
                    "Restrict the probe to supported parameters (probe_kwargs={'params': ...}) or set probe_every=0.",
                )
            else:
                self.warn_once(
                    f"probe_failed:{type(err).__name__}",
                    f"{what} This probe is skipped and the next one is tried; training goes on and nothing "
                    f"logged so far is lost (after {MAX_PROBE_FAILURES} failures in a row probes are switched off).",
                )
            return
        finally:
            self._hook.paused = False
        writer = self._writer_or_none()
        if writer is not None and rows:
            writer.log_rows(rows)
        for _, name, task, task_b, value in rows:
            self._window_probe[tb_tag(name, task, task_b)] = float(value)

    # ------------------------------------------------------------------ scores and lifecycle
    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final evaluation scores ``{task: {metric: value}}`` (rank 0 writes).

        For every metric reported for all declared tasks, the multi-task average is added under
        task ``""`` unless given.
        """
        if not isinstance(scores, Mapping) or not all(isinstance(v, Mapping) for v in scores.values()):
            raise TypeError("record_scores expects {task: {metric: value}}, e.g. {'vqa': {'accuracy': 0.71}}")
        unknown = set(scores) - set(self.tasks) - {""}
        if unknown:
            raise ValueError(
                f"unknown task(s) {sorted(unknown)} in scores; this run declares tasks {self.tasks}"
            )
        for task, metrics in scores.items():
            self._scores.setdefault(task, {}).update({str(m): float(v) for m, v in metrics.items()})
        per_task = {t: m for t, m in self._scores.items() if t}
        common = set.intersection(*(set(per_task.get(t, {})) for t in self.tasks))
        overall = {m: float(np.mean([per_task[t][m] for t in self.tasks])) for m in sorted(common)}
        overall.update(self._scores.get("", {}))  # an overall score the user gave wins
        writer = self._writer_or_none()
        if writer is not None:
            writer.log_scores({**per_task, **({"": overall} if overall else {})})

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Sync what is pending (a collective), flush and close the store, remove the hooks."""
        self.sync()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.detach_model()


# What Trainer.evaluate adds about speed, not quality: never a score.
_SPEED_METRICS = frozenset(
    {
        "runtime",
        "samples_per_second",
        "steps_per_second",
        "model_preparation_time",
        "jit_compilation_time",
        "epoch",
    }
)


def parse_eval_metrics(
    metrics: Mapping[str, Any], tasks: Iterable[str], prefix: str = "eval"
) -> dict[str, dict[str, float]]:
    """``{prefix}_<task>_<metric>`` keys -> ``{task: {metric: value}}`` (longest matching task name wins)."""
    by_length = sorted(tasks, key=len, reverse=True)
    out: dict[str, dict[str, float]] = {}
    head = f"{prefix}_"
    for key, value in metrics.items():
        if (
            not key.startswith(head)
            or isinstance(value, bool)
            or not isinstance(value, (int, float, np.number))
        ):
            continue
        rest = key[len(head) :]
        for task in by_length:
            if rest.startswith(task + "_") and len(rest) > len(task) + 1:
                metric = rest[len(task) + 1 :]
                if metric not in _SPEED_METRICS:
                    out.setdefault(task, {})[metric] = float(value)
                break
    return out
