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
per-task sums are all-reduced, every rank probes the same held batch, rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamics.integrations.config import RecorderConfig
from dynamics.integrations.probe_batch import build_probe_batch
from dynamics.integrations.recorder import Recorder

__all__ = ["LoopRecorder"]


class LoopRecorder:
    """Per-task losses, probes and a run store for a hand-written training loop.

    Args:
        model: the module the loop calls (its forward gets ``task_ids`` stripped by a pre-hook).
        tasks: task names; ``task_ids`` index into this list or name the tasks.
        out_dir: run store directory (rank 0 writes); ``None`` for logs only.
        config: a :class:`~dynamics.integrations.config.RecorderConfig`.
        start_step: the optimizer step the loop resumes after (0 for a fresh run; > 0 resumes the
            run in ``out_dir``, dropping its rows after that step).
        **options: :class:`RecorderConfig` fields (``probe_every``, ``probe_size``, ``tags``,
            ``probe_batch``, ``probe_dataset`` with ``collate_fn``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tasks: Sequence[str] | None = None,
        out_dir: str | Path | None = None,
        config: RecorderConfig | None = None,
        start_step: int = 0,
        **options: Any,
    ) -> None:
        if out_dir is not None:
            options["out_dir"] = out_dir
        self.recorder = Recorder(tasks, config=config, **options)
        cfg = self.recorder.cfg
        self.recorder.attach_model(model)
        if cfg.probe_batch is None and cfg.probe_dataset is not None:
            collate = cfg.collate_fn or torch.utils.data.default_collate
            batch, task_ids = build_probe_batch(
                cfg.probe_dataset, collate, len(cfg.tasks), cfg.probe_size, seed=cfg.seed, tasks=cfg.tasks
            )
            self.recorder.set_probe_batch(batch, task_ids)
        self.step = int(start_step)
        self.recorder.start(resume_step=self.step or None)

    @property
    def tasks(self) -> list[str]:
        return self.recorder.tasks

    def observe(self, logits: Any, labels: torch.Tensor, task_ids: Any) -> None:
        """Report one micro-batch's logits (or model output) and labels (for models called without ``labels=``)."""
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
        ``direction``; afterwards the step is closed. A collective under torch.distributed: every
        rank must enter it once per optimizer step.
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
        """Scalars ``dynamics/<name>/<task>`` since the last call."""
        return self.recorder.logs()

    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final per-task scores ``{task: {metric: value}}``."""
        self.recorder.record_scores(scores)

    def record_eval(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "eval") -> None:
        """Record one evaluation (``eval_<task>_<metric>`` keys) as score curves at ``step``
        (default: the current step) and its non-loss metrics as final scores."""
        self.recorder.record_eval(self.step if step is None else step, metrics, prefix)

    @property
    def run_dir(self) -> Path | None:
        return self.recorder.out_dir

    def flush(self) -> None:
        """Write every closed step to the store now."""
        self.recorder.flush()

    def close(self) -> None:
        """Flush and close the store; remove the hooks."""
        self.recorder.close()

    def __enter__(self) -> LoopRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
