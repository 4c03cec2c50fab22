"""The probe scheduler: when to probe, on which batch, at which parameters.

*When*: on optimizer steps ``s`` with ``s % probe_every == 0`` (1-based, the Trainer's
``global_step`` after the update), until probes are switched off (no probe batch, sharded
parameters the probe cannot handle, or ``MAX_PROBE_FAILURES`` failures in a row).

*On which batch*: one held, task-stratified batch for the whole run (see :mod:`.probe_batch`), so
changes over steps come from the parameters, not from resampling.

*At which parameters*: ``theta_{s-1}``, the point the step's update was computed from, with the
update ``Delta_s = theta_s - theta_{s-1}`` as the ``direction`` (``update_cosine`` is the cosine
between each task's gradient and the step the optimizer actually took). :meth:`before_update`
copies the probed parameters (at the step's start, before any update: under DeepSpeed the update
happens inside the last micro-batch's backward), :meth:`after_update` swaps the copy in for the
probe only and puts the updated tensors back untouched, so training continues bit-for-bit as
without the probe. Cost: two copies of the probed parameters on probe steps only;
``update_direction=False`` skips them and probes before the update.

*Under torch.distributed* every rank runs the same probe on the same held batch (the selection is
seeded and drawn from the same dataset on every rank): no rank idles while another probes, and the
collectives of a sharded forward/backward (FSDP, ZeRO-3) are matched on all ranks. Under DDP each
rank probes the unwrapped module on the whole held batch (identical replicas: identical values);
only rank 0 writes the rows.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamics.integrations.probe_batch import split_task_ids, to_device

__all__ = ["MAX_PROBE_FAILURES", "ProbeScheduler"]

# A probe can fail for a passing reason (an odd batch, memory pressure); one that fails this many
# times in a row fails for a lasting one (an unsupported layer), and retrying only costs time.
MAX_PROBE_FAILURES = 3

# A store row: (step, name, task, task_b, value).
Row = tuple[int, str, str, str, float]


class ProbeScheduler:
    """Runs :func:`dynamics.probe` on the held batch every ``probe_every`` steps (see the module docstring).

    Args:
        tasks: task names (the probe's per-task signals are keyed by them).
        probe_every: steps between probes (0: never).
        probe_kwargs: passed to :func:`dynamics.probe`.
        update_direction: probe at ``theta_{s-1}`` with the update as direction (copies parameters).
        warn: ``warn(key, message)``, once per key.
        paused: a context manager factory that pauses the training hooks while the probe runs.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        probe_every: int,
        probe_kwargs: Mapping[str, Any],
        update_direction: bool,
        warn: Callable[[str, str], None],
        paused: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.tasks = list(tasks)
        self.probe_every = probe_every
        self.probe_kwargs = dict(probe_kwargs)
        self.update_direction = update_direction
        self._warn = warn
        self._paused = paused
        self.model: nn.Module | None = None
        self._batch: dict[str, Any] | None = None
        self._task_ids: torch.Tensor | None = None
        self.off: str | None = None if probe_every else "probe_every=0"
        self._failures = 0  # consecutive
        self._snapshot: tuple[int, list[torch.Tensor]] | None = None
        self.n_run: list[int] = []  # the steps this rank probed (every rank probes; rank 0 writes)

    # ------------------------------------------------------------------ batch
    def set_batch(self, batch: Mapping[str, Any], task_ids: Any = None) -> None:
        """Hold ``batch`` (model kwargs) as the probe batch; ``task_ids`` default to ``batch['task_ids']``."""
        if task_ids is not None:
            batch = {**batch, "task_ids": task_ids}
        rest, ids = split_task_ids(batch, n_tasks=len(self.tasks), tasks=self.tasks)
        self._batch, self._task_ids = dict(rest), ids

    @property
    def has_batch(self) -> bool:
        return self._batch is not None

    def disable(self, reason: str, message: str) -> None:
        """Turn probes off for the rest of the run and say why, once."""
        if self.off is None:
            self.off = reason
            self._warn(f"probes_off:{reason}", message)

    # ------------------------------------------------------------------ when
    def due(self, step: int) -> bool:
        return (
            self.off is None
            and self.probe_every > 0
            and step % self.probe_every == 0
            and self.model is not None
        )

    def _params(self) -> list[torch.Tensor]:
        params = self.probe_kwargs.get("params")
        if params is not None:  # the probe's own order: the mapping's values, or the sequence
            return list(params.values()) if isinstance(params, Mapping) else list(params)
        assert self.model is not None
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ensure_batch(self) -> bool:
        if self._batch is None:
            self.disable(
                "no probe batch",
                "dynamics: probes are off: there is no probe batch. Pass probe_batch= (a collated batch holding "
                "task_ids) or probe_dataset= (a map-style dataset of dicts with task_ids); per-task losses are "
                "still recorded.",
            )
            return False
        return True

    # ------------------------------------------------------------------ at which parameters
    def before_update(self, step: int) -> list[Row]:
        """At the start of step ``step`` (parameters ``theta_{s-1}``): copy them, or probe now."""
        if not self.due(step) or not self._ensure_batch():
            return []
        if self._snapshot is not None and self._snapshot[0] == step:
            return []  # already copied for this step
        if not self.update_direction:
            return self.run(step)
        with torch.no_grad():
            self._snapshot = (step, [p.detach().clone() for p in self._params()])
        return []

    def cancel_update(self) -> None:
        """The step did not happen: drop the parameter copy, skip its probe."""
        self._snapshot = None

    def after_update(self, step: int) -> list[Row]:
        """After the update of step ``step``: probe at ``theta_{s-1}`` with ``Delta_s`` as direction."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or snapshot[0] != step:
            return []
        params = self._params()
        before = snapshot[1]
        after = [p.data for p in params]
        with torch.no_grad():
            direction = [a - b for a, b in zip(after, before, strict=True)]
        try:
            for p, b in zip(params, before, strict=True):
                p.data = b
            return self.run(step, direction=direction)
        finally:
            for p, a in zip(params, after, strict=True):
                p.data = a  # the very tensors the optimizer wrote: training is untouched

    # ------------------------------------------------------------------ the probe
    def run(self, step: int, direction: Sequence[torch.Tensor] | None = None) -> list[Row]:
        """Probe the held batch now; its store rows, or ``[]`` for a failed probe (reported, skipped).

        :func:`dynamics.probe` runs the model in eval mode inside a forked RNG, restores every
        module's mode and never touches ``p.grad``: training afterwards is as without the probe.
        The training hooks are paused so the probe's forwards do not count as training batches.
        """
        if self.off is not None or self.model is None or not self._ensure_batch():
            return []
        from dynamics.probing import probe

        model = self.model
        assert self._batch is not None and self._task_ids is not None
        with self._paused():
            try:
                device = next(model.parameters()).device
                if self._task_ids.device != device:
                    self._batch = to_device(self._batch, device)
                    self._task_ids = self._task_ids.to(device)
                result = probe(
                    model,
                    self._batch,
                    task_ids=self._task_ids,
                    tasks=self.tasks,
                    direction=direction,
                    **self.probe_kwargs,
                )
                rows = [
                    (int(s), str(n), str(t), str(tb), float(v)) for s, n, t, tb, v in result.to_rows(step)
                ]
                self._failures = 0
                self.n_run.append(int(step))
                return rows
            except Exception as err:  # the recorder must never stop training
                self._failed(step, err)
                return []

    def _failed(self, step: int, err: Exception) -> None:
        where = traceback.extract_tb(err.__traceback__)[-1]
        self._failures += 1
        what = (
            f"dynamics: the probe at step {step} raised {type(err).__name__} ({Path(where.filename).name}:"
            f"{where.lineno}): {err}."
        )
        if self._failures >= MAX_PROBE_FAILURES:
            self.disable(
                f"the probe raised {type(err).__name__}",
                f"{what} That is {self._failures} failed probes in a row, so probes are off for the "
                "rest of this run; per-task losses are still recorded and nothing logged so far is lost. "
                "Restrict the probe to supported parameters (probe_kwargs={'params': ...}) or set probe_every=0.",
            )
        else:
            self._warn(
                f"probe_failed:{type(err).__name__}",
                f"{what} This probe is skipped and the next one is tried; training goes on and nothing "
                f"logged so far is lost (after {MAX_PROBE_FAILURES} failures in a row probes are switched off).",
            )
