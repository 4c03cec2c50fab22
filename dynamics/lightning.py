"""PyTorch Lightning: a ``Callback`` that records per-task losses, probes and a run store.

::

    from dynamics.lightning import DynamicsCallback

    trainer = lightning.Trainer(callbacks=[DynamicsCallback(tasks=["a", "b", "c"])], ...)
    trainer.fit(module, datamodule)        # batches are dicts that carry "task_ids"

The ``LightningModule`` needs no change beyond ``task_ids`` in its batches (an index into
``tasks`` per example, or the task's name). Its ``training_step`` calls a model with the batch's
keyword arguments, ``labels`` among them, e.g. ``self.model(**batch)`` or ``self(**batch)``:

* the callback hooks the module itself and its direct children; whichever of them is called
  first with ``task_ids`` in a training forward is the model: ``task_ids`` is removed from that
  call's keyword arguments (the model never sees it), and its output and labels give the
  per-example losses ``(S_i, N_i)`` (see :mod:`dynamics.integrations.recorder`); that module is
  also the one the probe calls with the probe batch;
* optimizer step ``s`` is Lightning's ``global_step`` after the update: ``on_before_optimizer_step``
  runs the recorder's ``before_update(s)`` (copy of the probed parameters on probe steps), and the
  ``on_train_batch_end`` that sees ``global_step`` reach ``s`` runs ``after_update(s)`` (the probe at
  the pre-update weights, the update as direction) and ``end_step(s)``. Under gradient
  accumulation the micro-batches of a step all count for that step;
* under DDP (or any strategy that runs one process per device) every rank runs these hooks, the
  per-task sums are all-reduced, rank 0 writes the store; nothing else is a collective;
* every ``log_every_n_steps`` steps the ``dynamics/<name>/<task>`` scalars go to the trainer's
  loggers (TensorBoard, CSV, wandb, ...) at that step.

A ``training_step`` that calls its model positionally (``self.net(x)``) cannot be seen by the
hooks: report its per-example values with :meth:`DynamicsCallback.observe` (logits, labels,
task ids) or :meth:`DynamicsCallback.observe_losses`; the callback says so once otherwise.

Works with ``lightning`` (``lightning.pytorch``) and, through :data:`PLDynamicsCallback`, with the
older ``pytorch_lightning`` package. This is the only module of the package that imports Lightning.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamics.integrations.recorder import (
    DEFAULT_PROBE_EVERY,
    DEFAULT_PROBE_SIZE,
    DEFAULT_SYNC_EVERY,
    Recorder,
)
from dynamics.integrations.task_ids import TASK_IDS_KEY, TaskIdHook
from dynamics.signals.losses import LossSpec

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - only the older package installed
    from pytorch_lightning import Callback  # type: ignore[assignment]

# Also PLDynamicsCallback (for the older pytorch_lightning package), built on first access.
__all__ = ["DynamicsCallback"]


class _IndexedTasks:
    """A map-style dataset whose items' ``task_ids`` are task indices (names converted)."""

    def __init__(self, dataset: Any, ids: Any) -> None:
        self.dataset, self._ids = dataset, ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping) and isinstance(item.get(TASK_IDS_KEY), str):
            item = {**item, TASK_IDS_KEY: int(self._ids([item[TASK_IDS_KEY]])[0])}
        return item


class _DynamicsHooks:
    """The callback's behaviour, independent of which Lightning package's ``Callback`` it extends.

    Args:
        tasks: task names; ``batch["task_ids"]`` holds an index into this list (or a name) per example.
        out_dir: run store directory; default ``<trainer.default_root_dir>/dynamics``.
        probe_every, probe_size, tags, meta, loss, probe_kwargs, update_direction, sync_every, seed:
            as for :class:`~dynamics.integrations.recorder.Recorder`.
        probe_batch: a batch dict (model kwargs plus ``task_ids``) to probe; default: drawn from the
            training dataloader's dataset through its ``collate_fn``, stratified by task.
        probe_dataset: or a map-style dataset of dict items to draw it from.
        model: the module the ``training_step`` calls with the batch (default: found at the first
            training forward among the ``LightningModule`` and its direct children).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        out_dir: str | Path | None = None,
        probe_every: int = DEFAULT_PROBE_EVERY,
        probe_size: int = DEFAULT_PROBE_SIZE,
        tags: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        loss: LossSpec = "auto",
        probe_batch: Mapping[str, Any] | None = None,
        probe_dataset: Any = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        update_direction: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        seed: int = 0,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
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
        self._index = {name: i for i, name in enumerate(self.recorder.tasks)}
        if probe_batch is not None:
            self.recorder.set_probe_batch(self._with_int_ids(probe_batch))
        self.probe_dataset = probe_dataset
        self._model = model
        self._candidates: list[TaskIdHook] = []
        self._observed = False  # observe()/observe_losses() reported this step
        self._step = 0  # the last optimizer step closed
        self._lr: float | None = None

    @property
    def tasks(self) -> list[str]:
        return self.recorder.tasks

    @property
    def run_dir(self) -> Path | None:
        return self.recorder.out_dir

    # ------------------------------------------------------------------ task ids
    def _ids(self, task_ids: Any) -> Any:
        """Task names -> indices (unknown names -> ``len(tasks)``, reported once at sync)."""
        if isinstance(task_ids, (list, tuple)) and task_ids and isinstance(task_ids[0], str):
            return torch.tensor([self._index.get(t, len(self.tasks)) for t in task_ids])
        return task_ids

    def _with_int_ids(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        if TASK_IDS_KEY in batch:
            batch[TASK_IDS_KEY] = self._ids(batch[TASK_IDS_KEY])
        return batch

    # ------------------------------------------------------------------ finding the model
    def _consume(self, hook: TaskIdHook, task_ids: Any, kwargs: dict[str, Any], output: Any) -> None:
        """A candidate's training forward: the first one with task ids names the model."""
        if task_ids is None:
            return  # an inner call (e.g. the module's forward calling its child) or a batch without ids
        model = hook.module
        for candidate in self._candidates:
            candidate.remove()
        self._candidates = []
        self._model = model
        self.recorder.attach_model(model)  # from now on the recorder's own hook strips and observes
        self.recorder.observe(self._ids(task_ids), kwargs, output)

    def _hook_candidates(self, pl_module: nn.Module) -> None:
        if self._model is not None:
            self.recorder.attach_model(self._model)
            return
        if self._candidates:
            return
        modules = [pl_module, *(child for _, child in pl_module.named_children())]
        for module in modules:
            hook = TaskIdHook(module, lambda ids, kw, out: None)
            hook.consumer = functools.partial(self._consume, hook)
            self._candidates.append(hook)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Early, so that validation forwards (the sanity check) already have task_ids stripped.
        self._hook_candidates(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._hook_candidates(pl_module)
        self._step = int(trainer.global_step)
        out_dir = self.recorder.out_dir or Path(trainer.default_root_dir) / "dynamics"
        self.recorder.start(
            out_dir=out_dir,
            meta={
                "trainer": {
                    "framework": "lightning",
                    "module_class": type(pl_module).__name__,
                    "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
                    "resumed_at_step": self._step,
                }
            },
        )
        if not self.recorder.has_probe_batch and self.recorder.probes_off is None:
            self._build_probe_batch(trainer)

    def _build_probe_batch(self, trainer: Any) -> None:
        loader = getattr(trainer, "train_dataloader", None)
        dataset = self.probe_dataset if self.probe_dataset is not None else getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        if dataset is None:
            return  # the recorder warns once, at the first probe step
        self.recorder.hold_probe_batch_from(
            _IndexedTasks(dataset, self._ids), lambda items: self._with_int_ids(collate(items))
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Task names become indices in the very batch the training_step receives.
        if isinstance(batch, dict) and TASK_IDS_KEY in batch:
            batch[TASK_IDS_KEY] = self._ids(batch[TASK_IDS_KEY])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", None)
        self._lr = float(groups[0]["lr"]) if groups else None  # the rate this update uses
        self.recorder.before_update(int(trainer.global_step) + 1)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step == self._step:
            return  # an accumulation micro-batch: the step is not over
        if (
            self._model is None
            and not self._observed
            and isinstance(batch, Mapping)
            and TASK_IDS_KEY in batch
        ):
            self.recorder.warn_once(
                "lightning_unseen",
                "dynamics: a training step had task_ids in its batch but no training forward reached the hooks "
                "with them (the training_step calls its model positionally, or pops task_ids). Call the model "
                "with the batch's keyword arguments (self.model(**batch)), or report each micro-batch with "
                "callback.observe(logits, labels, task_ids) or callback.observe_losses(loss_sum, task_ids, counts).",
            )
        self.recorder.after_update(step)
        self.recorder.end_step(step, lr=self._lr)
        self._step, self._observed = step, False
        every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        if every and step % every == 0:
            scalars = self.recorder.logs()  # a collective: every rank calls it
            if scalars and trainer.is_global_zero:
                # Lightning stamps a training step's own metrics with the steps completed before it
                # (s - 1); the store keeps s, the step count after the update, as for the HF Trainer.
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=step - 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.recorder.sync()
        self.recorder.flush()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.recorder.sync()  # the store holds every step up to the checkpoint
        self.recorder.flush()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.recorder.cancel_update()

    # ------------------------------------------------------------------ user API
    def observe(self, logits: torch.Tensor, labels: torch.Tensor, task_ids: Any) -> None:
        """Report one micro-batch's logits and labels (for a model called positionally)."""
        self.recorder.observe_logits(logits, labels, self._ids(task_ids))
        self._observed = True

    def observe_losses(
        self, loss_sum: torch.Tensor, task_ids: Any, counts: torch.Tensor | None = None
    ) -> None:
        """Report per-example summed losses ``S_i`` and their item counts ``N_i`` (default 1)."""
        self.recorder.observe_losses(loss_sum, self._ids(task_ids), counts)
        self._observed = True

    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final per-task scores ``{task: {metric: value}}``."""
        self.recorder.record_scores(scores)

    def close(self) -> None:
        """Sync, flush and close the store; remove the hooks (a collective under torch.distributed)."""
        for candidate in self._candidates:
            candidate.remove()
        self._candidates = []
        self.recorder.close()


def _callback_class(base: type) -> type:
    return type(
        "DynamicsCallback",
        (_DynamicsHooks, base),
        {"__doc__": _DynamicsHooks.__doc__, "__module__": __name__},
    )


DynamicsCallback: Any = _callback_class(Callback)


def __getattr__(name: str) -> Any:
    # The older ``pytorch_lightning`` package has its own Callback base; built on first use.
    if name == "PLDynamicsCallback":
        import pytorch_lightning

        if Callback is pytorch_lightning.Callback:
            return DynamicsCallback
        cls = _callback_class(pytorch_lightning.Callback)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
