"""The same signals for a plain PyTorch training loop (no HF Trainer).

::

    rec = dynamics.LoopRecorder(model, tasks=["a", "b"], out_dir="runs/x/dynamics", probe_batch=probe)
    for batch in loader:                       # batch = dict of model kwargs + "task_ids" + "labels"
        loss = model(**batch)["loss"]          # the hook strips task_ids, sees labels and logits
        loss.backward()
        with rec.update(optimizer):            # wraps the optimizer step (probes around it)
            optimizer.step()
        optimizer.zero_grad()
    rec.close()

Models called without keyword labels (``model(x)``) report explicitly instead:
``rec.observe(logits, labels, task_ids)`` (or ``rec.observe_losses(per_example_loss, task_ids)``)
after each forward. Under torch.distributed (torchrun), every rank runs the same code: the
per-task sums are all-reduced, rank 0 probes and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamics.integrations.probe_batch import build_probe_batch
from dynamics.integrations.recorder import (
    DEFAULT_PROBE_EVERY,
    DEFAULT_PROBE_SIZE,
    DEFAULT_SYNC_EVERY,
    Recorder,
)
from dynamics.signals.losses import LossSpec

__all__ = ["LoopRecorder"]


class LoopRecorder:
    """Per-task losses, probes and a run store for a hand-written training loop.

    Args:
        model: the module the loop calls (its forward gets ``task_ids`` stripped by a pre-hook).
        tasks: task names; ``task_ids`` index into this list.
        out_dir: run store directory (rank 0 writes); ``None`` for logs only.
        probe_every, probe_size, tags, meta, loss, probe_kwargs, update_direction, sync_every, seed:
            as for :class:`~dynamics.integrations.recorder.Recorder`.
        probe_batch: a batch dict (model kwargs plus ``task_ids``) to probe.
        probe_dataset: or a map-style dataset of dict items to draw a stratified probe batch from,
            collated with ``collate_fn`` (default ``torch.utils.data.default_collate``).
        start_step: the optimizer step the loop resumes after (0 for a fresh run).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tasks: Sequence[str],
        out_dir: str | Path | None,
        probe_every: int = DEFAULT_PROBE_EVERY,
        probe_size: int = DEFAULT_PROBE_SIZE,
        tags: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        loss: LossSpec = "auto",
        probe_batch: Mapping[str, Any] | None = None,
        probe_dataset: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        update_direction: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        self.recorder = Recorder(
            tasks,
            out_dir=out_dir,
            tags=tags,
            meta=meta,
            probe_every=probe_every,
            probe_size=probe_size,
            loss=loss,
            probe_kwargs=probe_kwargs,
            update_direction=update_direction,
            sync_every=sync_every,
            seed=seed,
        )
        self.recorder.attach_model(model)
        if probe_batch is not None:
            self.recorder.set_probe_batch(probe_batch)
        elif probe_dataset is not None:
            collate = collate_fn or torch.utils.data.default_collate
            batch, task_ids = build_probe_batch(
                probe_dataset, collate, len(self.recorder.tasks), probe_size, seed=seed
            )
            self.recorder.set_probe_batch(batch, task_ids)
        self.step = int(start_step)
        self.recorder.start()

    @property
    def tasks(self) -> list[str]:
        return self.recorder.tasks

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, task_ids: Any) -> None:
        """Report one micro-batch's logits and labels (for models called without ``labels=``)."""
        self.recorder.observe_logits(logits, labels, task_ids)

    def observe_losses(
        self, loss_sum: torch.Tensor, task_ids: Any, counts: torch.Tensor | None = None
    ) -> None:
        """Report per-example summed losses ``S_i`` and their item counts ``N_i`` (default 1)."""
        self.recorder.observe_losses(loss_sum, task_ids, counts)

    @contextmanager
    def update(self, optimizer: torch.optim.Optimizer | None = None) -> Iterator[int]:
        """Wrap one optimizer step; yields its number ``s`` (1-based).

        On probe steps the probe runs at the parameters before the step with the step itself as
        ``direction``; afterwards the step is closed (losses queued, synced every ``sync_every``).
        A collective under torch.distributed: every rank must enter it once per optimizer step.
        """
        step = self.step + 1
        groups = getattr(optimizer, "param_groups", None)
        lr = float(groups[0]["lr"]) if groups else None
        self.recorder.before_update(step)
        try:
            yield step
        except BaseException:
            self.recorder.cancel_update()
            raise
        self.recorder.after_update(step)
        self.recorder.end_step(step, lr=lr)
        self.step = step

    def logs(self) -> dict[str, float]:
        """Scalars ``dynamics/<name>/<task>`` since the last call (syncs; a collective)."""
        return self.recorder.logs()

    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final per-task scores ``{task: {metric: value}}``."""
        self.recorder.record_scores(scores)

    @property
    def run_dir(self) -> Path | None:
        return self.recorder.out_dir

    def flush(self) -> None:
        """Sync pending steps (a collective) and write them."""
        self.recorder.sync()
        self.recorder.flush()

    def close(self) -> None:
        """Sync, flush and close the store; remove the hooks (a collective under torch.distributed)."""
        self.recorder.close()

    def __enter__(self) -> LoopRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
