"""The framework-agnostic core of the training hooks: it wires the parts together.

One :class:`Recorder` serves the HF Trainer callback, the plain-loop API and the TRL / Lightning
adapters. The parts, one concern each:

* :class:`~.config.RecorderConfig`: the options (one copy for every adapter);
* :class:`~.loss_meter.LossMeter`: per-task training losses of every optimizer step;
* :class:`~.probe_scheduler.ProbeScheduler`: when to probe, on which batch, at which parameters;
* :class:`~.store_sink.StoreSink`: rows into the run store (rank 0);
* :class:`~.scores.ScoreBook` and :mod:`.scores`: evaluation curves and final scores.

Life of optimizer step ``s`` (1-based, the Trainer's ``global_step`` after the update):

1. every training forward reaches :meth:`Recorder.observe` (through the forward hook of
   :mod:`.task_ids`), which queues the per-example losses on the device;
2. :meth:`Recorder.before_update` (at the step's start, before any update) and
   :meth:`Recorder.after_update` (after ``optimizer.step()``) bracket the update; on probe steps
   the probe runs at ``theta_{s-1}`` with the update as direction (see :mod:`.probe_scheduler`);
3. :meth:`Recorder.end_step` closes the step: one ``index_add`` and an asynchronous all-reduce
   of its ``(3, T + 1)`` sums. Closed steps whose sums are on the host go to the store at every
   step's end; it writes them in the background within ``flush_seconds`` (probe and evaluation
   rows at once). Nothing here waits on disk; only :meth:`logs` and
   :meth:`close` wait for the (already running) reduction of the last steps.

Everything the user's data can get wrong (no task ids, ids out of range, no labels, a probe that
raises) produces one clear warning (with counts over the run) and is skipped; training never stops
because of the recorder. ``benchmarks/bench_overhead.py`` measures the cost.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamics.integrations import distributed as dist_utils
from dynamics.integrations.config import (
    DEFAULT_FLUSH_SECONDS,
    DEFAULT_PROBE_EVERY,
    DEFAULT_PROBE_SIZE,
    DEFAULT_SYNC_EVERY,
    RecorderConfig,
)
from dynamics.integrations.loss_meter import EXAMPLES, LOSS, TOKENS, LossMeter, StepSums, per_example_ids
from dynamics.integrations.probe_scheduler import MAX_PROBE_FAILURES, ProbeScheduler
from dynamics.integrations.scores import ScoreBook, eval_rows, parse_eval_metrics
from dynamics.integrations.store_sink import StoreSink, step_rows
from dynamics.integrations.task_ids import TaskIdHook, encode_task_ids
from dynamics.store.schema import tb_tag

__all__ = [
    "DEFAULT_FLUSH_SECONDS",
    "DEFAULT_PROBE_EVERY",
    "DEFAULT_PROBE_SIZE",
    "DEFAULT_SYNC_EVERY",
    "MAX_PROBE_FAILURES",
    "DynamicsWarning",
    "Recorder",
    "RecorderConfig",
    "parse_eval_metrics",
]


class DynamicsWarning(UserWarning):
    """A problem the recorder worked around (bad input, a failed probe); training went on."""


class Recorder:
    """Per-task losses every step, probes on a schedule, rows to the run store, scalars for logs.

    Args:
        tasks: task names (or give ``config``).
        config: a :class:`RecorderConfig`; keyword ``options`` (its field names) replace its values.
    """

    def __init__(
        self, tasks: Sequence[str] | None = None, *, config: RecorderConfig | None = None, **options: Any
    ) -> None:
        self.cfg = RecorderConfig.build(tasks, config, **options)
        self.tasks = self.cfg.tasks
        self.n_tasks = len(self.tasks)
        self.problems: dict[str, int] = {}
        self._warned: set[str] = set()
        self.meter = LossMeter(self.n_tasks, self.cfg.loss, self.warn_once)
        self.prober = ProbeScheduler(
            self.tasks,
            probe_every=self.cfg.probe_every,
            probe_kwargs=self.cfg.probe_kwargs,
            update_direction=self.cfg.update_direction,
            warn=self.warn_once,
            paused=self._paused,
        )
        self.sink = StoreSink(
            self.tasks,
            out_dir=self.cfg.out_dir,
            tags=self.cfg.tags,
            meta=self.cfg.meta,
            flush_seconds=self.cfg.flush_seconds,
            overwrite=self.cfg.overwrite,
        )
        self.scores = ScoreBook(self.tasks)
        self.model: nn.Module | None = None
        self._hook: TaskIdHook | None = None
        self._device: torch.device | None = None
        self._window = np.zeros((3, self.n_tasks))
        self._probe_logs: list[tuple[int, dict[str, float]]] = []
        # Over the run: examples seen, examples whose task id was out of range (cumulative counts).
        self._seen = 0.0
        self._dropped = 0.0
        self._dropped_warned = 0.0
        self._first_dropped_step: int | None = None
        if self.cfg.probe_batch is not None:
            self.set_probe_batch(self.cfg.probe_batch)

    # ------------------------------------------------------------------ configuration views
    @property
    def probe_every(self) -> int:
        return self.cfg.probe_every

    @property
    def probe_size(self) -> int:
        return self.cfg.probe_size

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def out_dir(self) -> Path | None:
        return self.sink.out_dir

    def config(self) -> dict[str, Any]:
        """The configuration as stored in ``run.json``."""
        return self.cfg.to_meta()

    # ------------------------------------------------------------------ setup
    def attach_model(self, model: nn.Module, *, sharded: str | None = None) -> None:
        """Hook ``model`` (the module the training loop calls, wrapped or not) and check that
        probes are possible (``sharded``: a reason they are not, if the caller knows one)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        # Hook and probe inside DDP / DataParallel: the wrapper passes task_ids on to the module,
        # and DDP's own forward broadcasts buffers and arms its gradient reducer, which a probe
        # must not do. FSDP is hooked as it is (its forward gathers the parameters).
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        if self._hook is not None and self._hook.module is model:
            return
        if self._hook is not None:
            self._hook.remove()
        self.model = model
        self.meter.model = dist_utils.unwrap_model(model)  # the loss kind comes from the real model
        self.prober.model = model
        self._hook = TaskIdHook(model, self.observe)
        reason = sharded or dist_utils.sharding_reason(model)
        if reason:
            self.disable_probes(
                reason,
                f"dynamics: probes are off because {reason}. Per-task losses are still recorded (they need "
                "no gradients). Probes work under DDP, DeepSpeed ZeRO-1/2/3, FSDP2 and FSDP1 with "
                "use_orig_params=True.",
            )

    def detach_model(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @contextmanager
    def _paused(self) -> Iterator[None]:
        hook = self._hook
        if hook is None:
            yield
            return
        was, hook.paused = hook.paused, True
        try:
            yield
        finally:
            hook.paused = was

    def set_probe_batch(self, batch: Mapping[str, Any], task_ids: Any = None) -> None:
        """Hold ``batch`` (model kwargs) as the probe batch; ``task_ids`` default to ``batch['task_ids']``."""
        self.prober.set_batch(batch, task_ids)

    def hold_probe_batch_from(
        self, dataset: Any, collate: Any, *, tasks: Sequence[str] | None = None
    ) -> None:
        """Draw and hold the probe batch from the training data (``probe_size`` task-stratified items).

        The same seeded selection from the same dataset on every rank, so every rank probes the same
        held batch (see :mod:`~dynamics.integrations.probe_scheduler`). Data it cannot draw from turn
        probes off with one message; per-task losses go on.
        """
        from dynamics.integrations.probe_batch import build_probe_batch

        try:
            batch, task_ids = build_probe_batch(
                dataset, collate, self.n_tasks, self.cfg.probe_size, seed=self.cfg.seed, tasks=tasks
            )
            self.set_probe_batch(batch, task_ids)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            self.disable_probes(
                "no probe batch",
                f"dynamics: could not draw a probe batch from the training data ({type(err).__name__}: {err}); "
                "probes are off, per-task losses are still recorded. Pass probe_batch= or probe_dataset=.",
            )

    @property
    def has_probe_batch(self) -> bool:
        return self.prober.has_batch

    @property
    def probes_off(self) -> str | None:
        """Why probes are off (``None`` while they are on)."""
        return self.prober.off

    def start(
        self,
        *,
        out_dir: str | Path | None = None,
        meta: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        main_process: bool | None = None,
    ) -> None:
        """Open the run store (main process) and reset the logging window; call before the first step.

        ``resume_step`` > 0 says training really resumes from a checkpoint at that step (the store
        then drops its rows after that step and appends); otherwise an existing run in ``out_dir``
        is refused by the store (or replaced with ``overwrite=True``) here, before the first step.
        """
        if out_dir is not None and self.sink.out_dir is None:
            self.sink.out_dir = Path(out_dir)
        self.sink.main_process = dist_utils.is_main_process() if main_process is None else bool(main_process)
        self.sink.resume_step = int(resume_step) if resume_step else None
        self.sink.meta.update(meta or {})
        self.sink.meta.setdefault("world_size", dist_utils.world_size())
        self.sink.meta["callback"] = self.config()
        if self.model is not None:
            params = list(self.model.parameters())
            self.sink.meta.setdefault("model_class", type(dist_utils.unwrap_model(self.model)).__name__)
            self.sink.meta.setdefault("n_params", int(sum(p.numel() for p in params)))
            self.sink.meta.setdefault(
                "n_trainable_params", int(sum(p.numel() for p in params if p.requires_grad))
            )
        self._window[:] = 0
        self._probe_logs.clear()
        self.sink.open()

    @property
    def writer(self) -> Any:
        """The :class:`~dynamics.store.writer.RunWriter` (main process with an ``out_dir``), else ``None``."""
        return self.sink.open()

    @property
    def main_process(self) -> bool:
        return self.sink.main_process

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
        """Consumer of the forward hook: one training forward's ids, kwargs and output.

        ``task_ids``: per example ``(B,)`` or per token ``(B, L)``; indices or task names.
        """
        try:
            self.meter.observe(encode_task_ids(task_ids, self.tasks), kwargs, output)
        except Exception as err:  # the recorder must never stop training
            self.warn_once(
                f"observe:{type(err).__name__}",
                f"dynamics: per-task loss skipped for a batch ({type(err).__name__}: {err}); training continues.",
            )

    def observe_logits(
        self,
        logits: Any,
        labels: torch.Tensor,
        task_ids: Any,
        *,
        shift_labels: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch's logits (or model output) and labels (for models called without the hook)."""
        self.meter.observe_output(
            logits, labels, encode_task_ids(task_ids, self.tasks), shift_labels=shift_labels
        )

    def observe_losses(
        self, loss_sum: torch.Tensor, task_ids: Any, counts: torch.Tensor | None = None
    ) -> None:
        """Add per-example summed losses ``S_i`` with item counts ``N_i`` (default 1 each).

        Ids outside ``0..T-1`` are not checked here; they are reported (with counts) and left out.
        """
        loss_sum = loss_sum.detach().reshape(-1)
        ids = per_example_ids(encode_task_ids(task_ids, self.tasks), loss_sum.numel())
        counts = torch.ones_like(loss_sum) if counts is None else counts.detach().reshape(-1)
        # Copies: the caller may reuse its buffers before the step closes.
        self.meter.add(loss_sum.clone(), counts.clone().to(loss_sum.device), ids)

    def end_step(self, step: int, lr: float | None = None) -> None:
        """Close optimizer step ``step`` (a collective: every rank calls it once per step, in order)."""
        self.meter.close_step(step, lr, device=self._device_guess())
        # Every step whose sums are on the host goes to the writer now, whose own background clock
        # puts rows on disk within ``flush_seconds`` of being handed over. Handing over only every
        # ``flush_seconds`` let a long next step (a probe, a hung collective) hold rows past that
        # bound, and a kill then lost them (tests/faults/test_sigkill.py, the stalled step).
        self._handoff(block=self.meter.n_waiting >= self.cfg.sync_every)

    def _device_guess(self) -> torch.device | None:
        if self._device is None and self.model is not None:
            try:
                self._device = next(self.model.parameters()).device
            except StopIteration:
                pass
        return self._device

    def _handoff(self, block: bool, *, flush: bool = False) -> None:
        """Closed steps whose sums are on the host -> window, counts, store rows; with ``flush``, ask
        the writer to write them now (in the background) instead of on its own clock."""
        ready = self.meter.ready(block=block)
        if ready:
            self._account(ready)
            if self.sink.main_process:
                self.sink.write_rows(step_rows(ready, self.tasks))
        if flush:
            self.sink.request_flush()

    def _account(self, ready: Sequence[StepSums]) -> None:
        for s in ready:
            self._window += s.sums[:, : self.n_tasks]
            self._seen += float(s.sums[EXAMPLES].sum())
            dropped = float(s.sums[EXAMPLES, self.n_tasks])
            if dropped and self._first_dropped_step is None:
                self._first_dropped_step = s.step
            self._dropped += dropped
        if self._dropped > self._dropped_warned and "task_id_range" not in self._warned:
            self._warn_dropped(final=False)

    def _warn_dropped(self, *, final: bool) -> None:
        if not self.sink.main_process:  # the sums are global: one rank says it
            return
        self._dropped_warned = self._dropped
        key = "task_id_range" if not final else "task_id_range:final"
        self.problems["task_id_range"] = int(self._dropped)
        self._warned.discard(key)
        self.warn_once(
            key,
            f"dynamics: dropped {int(self._dropped)} of {int(self._seen)} training examples over the run "
            f"{'' if final else 'so far '}(the first at step {self._first_dropped_step}): their task ids are "
            f"outside the declared tasks {self.tasks} (valid ids 0..{self.n_tasks - 1}); they are left out of "
            "the per-task losses (training continues). Declare every task in tasks=[...] or fix the dataset's "
            "task_ids.",
        )
        self.problems["task_id_range"] = int(self._dropped)

    def sync(self) -> None:
        """Hand every closed step to the store now (waits for their reductions; not a new collective)."""
        self._handoff(block=True, flush=True)

    def logs(self) -> dict[str, float]:
        """Scalars since the last call, keyed ``dynamics/<name>/<task>``.

        Per-task losses are token-weighted over the window's steps; counts are summed; probe
        metrics are the latest probe's values if a probe ran in the window and no adapter took
        them (see :meth:`pop_probe_logs`).
        """
        # No flush request: the store's clock writes within flush_seconds, and a request at every
        # logging step would write one Parquet part per step at logging_steps=1.
        self._handoff(block=True)
        out: dict[str, float] = {}
        window = self._window
        for a, task in enumerate(self.tasks):
            if window[TOKENS, a] > 0:
                out[tb_tag("loss", task)] = float(window[LOSS, a] / window[TOKENS, a])
            if window[EXAMPLES].sum() > 0:
                out[tb_tag("n_examples", task)] = float(window[EXAMPLES, a])
                out[tb_tag("n_tokens", task)] = float(window[TOKENS, a])
        if window[TOKENS].sum() > 0:
            out[tb_tag("train_loss")] = float(window[LOSS].sum() / window[TOKENS].sum())
        if self._probe_logs:
            out.update(self._probe_logs[-1][1])
        self._window = np.zeros_like(window)
        self._probe_logs = []
        return out

    def pop_probe_logs(self) -> list[tuple[int, dict[str, float]]]:
        """The probes' scalars not yet logged, each with its own step, oldest first (and forget them)."""
        out, self._probe_logs = self._probe_logs, []
        return out

    # ------------------------------------------------------------------ probes
    def should_probe(self, step: int) -> bool:
        return self.prober.due(step)

    def before_update(self, step: int) -> None:
        """Call at the start of step ``step``, before any update (the parameters are ``theta_{s-1}``)."""
        self._record_probe(self.prober.before_update(step))

    def cancel_update(self) -> None:
        """The step did not happen (an exception in it): drop the parameter copy, skip its probe."""
        self.prober.cancel_update()

    def after_update(self, step: int) -> None:
        """Call right after ``optimizer.step()``: probe at ``theta_{s-1}`` with ``Delta_s`` as direction."""
        self._record_probe(self.prober.after_update(step))

    def disable_probes(self, reason: str, message: str) -> None:
        """Turn probes off for the rest of the run and say why, once."""
        self.prober.disable(reason, message)

    def run_probe(self, step: int, direction: Sequence[torch.Tensor] | None = None) -> None:
        """Probe the held batch now and record its rows (a failed probe is reported and skipped).

        The probe's per-task loss on the probe batch is stored as ``probe_loss``; ``loss`` is the
        training loss of the step's own batches.
        """
        self._record_probe(self.prober.run(step, direction))

    def _record_probe(self, rows: list[tuple[int, str, str, str, float]]) -> None:
        if not rows:
            return
        if self.sink.main_process:
            self.sink.write_rows(rows)
            self.sink.request_flush()
        step = rows[0][0]
        self._probe_logs.append(
            (step, {tb_tag(name, task, task_b): value for _, name, task, task_b, value in rows})
        )

    # ------------------------------------------------------------------ scores and lifecycle
    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final evaluation scores ``{task: {metric: value}}`` (the main process writes).

        For every metric reported for all declared tasks, the multi-task average is added under
        task ``""`` unless given.
        """
        merged = self.scores.add(scores)
        if self.sink.main_process:
            self.sink.write_scores(merged)

    def record_eval(self, step: int, metrics: Mapping[str, Any], prefix: str = "eval") -> None:
        """One evaluation at ``step`` (``{prefix}_<task>_<metric>`` / ``{prefix}_<metric>`` keys):
        curve rows ``eval_<metric>`` per task, and its per-task non-loss metrics as final scores
        (a later evaluation replaces them). See :mod:`.scores`."""
        parsed = parse_eval_metrics(metrics, self.tasks, prefix, with_global=True)
        if not parsed:
            return
        if self.sink.main_process:
            self.sink.write_rows(eval_rows(step, parsed))
            self.sink.request_flush()
        final = self.scores.final_from_eval(parsed)
        if final:
            self.record_scores(final)

    def flush(self) -> None:
        """Hand every closed step to the store and write it (synchronously)."""
        self._handoff(block=True)
        self.sink.flush()

    def close(self) -> None:
        """Hand over what is pending, flush and close the store, remove the hooks."""
        self._handoff(block=True)
        if self._dropped > self._dropped_warned:
            self._warn_dropped(final=True)
        self.sink.close()
        self.detach_model()
