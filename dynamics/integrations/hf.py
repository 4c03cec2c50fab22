"""Hugging Face Trainer hooks: :class:`DynamicsCallback` and :func:`attach`.

Two lines in an existing script::

    trainer = Trainer(model=model, args=args, train_dataset=ds, ...)   # items carry "task_ids"
    dynamics.attach(trainer, tasks=["vqa", "report", "grounding"], tags={"construction": "IMAX"})
    trainer.train()

``attach`` inserts the callback at the FRONT of the Trainer's callback list, so that in ``on_log``
it adds ``dynamics/<name>/<task>`` scalars to the logs before TensorBoard, wandb, mlflow and every
other ``report_to`` integration read them; and it keeps the ``task_ids`` column through
``remove_unused_columns``. Passing the callback to ``Trainer(callbacks=[...])`` works too: at the
end of the Trainer's ``__init__`` it finds its Trainer and binds itself the same way.

Hook points in the Trainer's optimizer step ``s`` (``global_step`` becomes ``s``):
``on_pre_optimizer_step`` (copy the probed parameters on probe steps), ``on_optimizer_step`` (probe
at the pre-update parameters with the update as direction), ``on_step_end`` (close the step).
This is the only module of the package that imports transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dynamics.integrations import distributed as dist_utils
from dynamics.integrations.probe_batch import build_probe_batch
from dynamics.integrations.recorder import (
    DEFAULT_PROBE_EVERY,
    DEFAULT_PROBE_SIZE,
    DEFAULT_SYNC_EVERY,
    Recorder,
    parse_eval_metrics,
)
from dynamics.integrations.task_ids import TASK_IDS_KEY
from dynamics.signals.losses import LossSpec

__all__ = ["DynamicsCallback", "attach"]


class DynamicsCallback(TrainerCallback):
    """Per-task losses every step, probes every ``probe_every`` steps, a run store, and log scalars.

    Args:
        tasks: task names; ``batch["task_ids"]`` holds an index into this list per example.
        probe_every: optimizer steps between probes (0: no probes). Default 100 keeps the overhead
            under 5 % (see :mod:`dynamics.integrations.recorder`).
        probe_size: examples in the held, task-stratified probe batch.
        tags: run tags for the statistics layer (e.g. ``construction``, ``model``, ``seed``).
        out_dir: run store directory; default ``<args.output_dir>/dynamics``.
        meta: extra metadata for ``run.json``.
        loss: per-example training loss kind (``"auto"``: from the model class and shapes).
        probe_batch: a collated batch (dict with ``task_ids``) to probe; default: drawn from the
            training dataset through the training collator, stratified by task.
        probe_dataset: a map-style dataset of dict items (with ``task_ids``) to draw it from instead.
        probe_kwargs: passed to :func:`dynamics.probe` (``params``, ``method``, ``hessian``, ...).
        update_direction: log ``update_cosine`` (copies the probed parameters on probe steps).
        sync_every: steps between host syncs of the per-step sums.
        seed: seed of the probe-batch selection.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        probe_every: int = DEFAULT_PROBE_EVERY,
        probe_size: int = DEFAULT_PROBE_SIZE,
        tags: Mapping[str, Any] | None = None,
        out_dir: str | Path | None = None,
        meta: Mapping[str, Any] | None = None,
        loss: LossSpec = "auto",
        probe_batch: Mapping[str, Any] | None = None,
        probe_dataset: Any = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        update_direction: bool = True,
        sync_every: int = DEFAULT_SYNC_EVERY,
        seed: int = 0,
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
        if probe_batch is not None:
            self.recorder.set_probe_batch(probe_batch)
        self.probe_dataset = probe_dataset
        self.trainer: Trainer | None = None
        self._lr: float | None = None

    @property
    def tasks(self) -> list[str]:
        return self.recorder.tasks

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Trainer) -> DynamicsCallback:
        """Give the callback its Trainer: hook the model, keep ``task_ids``, go first in the callbacks."""
        self.trainer = trainer
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        if trainer.args.remove_unused_columns and hasattr(trainer, "_set_signature_columns_if_needed"):
            # Trainer drops batch keys that model.forward does not name; our pre-hook removes
            # task_ids before forward, so the column may pass.
            trainer._set_signature_columns_if_needed()
            if TASK_IDS_KEY not in trainer._signature_columns:
                trainer._signature_columns.append(TASK_IDS_KEY)
        self.recorder.attach_model(trainer.model, sharded=dist_utils.sharding_reason(None, trainer))
        return self

    def _find_trainer(self) -> Trainer | None:
        """The Trainer whose callbacks hold this callback, found on the call stack (callbacks are not
        handed their Trainer; ``attach`` is the explicit route)."""
        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and self in getattr(
                candidate.callback_handler, "callbacks", []
            ):
                return candidate
            frame = frame.f_back
        return None

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer is None:
            trainer = self._find_trainer()
            if trainer is not None:
                self.bind(trainer)

    # ------------------------------------------------------------------ training
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer is None and (trainer := self._find_trainer()) is not None:
            self.bind(trainer)
        model = self.trainer.model if self.trainer is not None else kwargs.get("model")
        if model is not None:
            sharded = dist_utils.sharding_reason(None, self.trainer) if self.trainer is not None else None
            self.recorder.attach_model(model, sharded=sharded)
        self.recorder.start(
            out_dir=Path(args.output_dir) / "dynamics",
            meta={"trainer": {"output_dir": str(args.output_dir), "resumed_at_step": int(state.global_step)}},
        )
        dataloader = kwargs.get("train_dataloader")
        collate = getattr(dataloader, "collate_fn", None)
        # Without attach() the collator may already exist: keep task_ids in the very list it reads.
        columns = getattr(collate, "signature_columns", None)
        if isinstance(columns, list) and TASK_IDS_KEY not in columns:
            columns.append(TASK_IDS_KEY)
        if not self.recorder.has_probe_batch and self.recorder.probes_off is None:
            self._build_probe_batch(dataloader, collate)

    def _build_probe_batch(self, dataloader: Any, collate: Any) -> None:
        dataset = (
            self.probe_dataset if self.probe_dataset is not None else getattr(dataloader, "dataset", None)
        )
        if collate is None and self.trainer is not None:
            collate = self.trainer.data_collator
        if dataset is None or collate is None:
            return  # the recorder warns once, at the first probe step
        try:
            batch, task_ids = build_probe_batch(
                dataset, collate, self.recorder.n_tasks, self.recorder.probe_size, seed=self.recorder.seed
            )
            self.recorder.set_probe_batch(batch, task_ids)
        except (TypeError, ValueError, KeyError, IndexError) as err:
            self.recorder.disable_probes(
                "no probe batch",
                f"dynamics: could not draw a probe batch from the training data ({type(err).__name__}: {err}); "
                "probes are off, per-task losses are still recorded. Pass probe_batch= or probe_dataset=.",
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None)
        self._lr = float(groups[0]["lr"]) if groups else None  # the rate this update uses
        self.recorder.before_update(state.global_step + 1)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.after_update(state.global_step + 1)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.end_step(state.global_step, lr=self._lr)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Only training logs (they carry "loss"); eval and end-of-train summaries are left alone.
        if logs is not None and "loss" in logs:
            logs.update(self.recorder.logs())

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        scores = parse_eval_metrics(metrics or {}, self.recorder.tasks)
        if scores:
            self.recorder.record_scores(scores)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.sync()  # the store holds every step up to the checkpoint
        self.recorder.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.sync()
        self.recorder.flush()

    # ------------------------------------------------------------------ user API
    def record_scores(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record final per-task scores ``{task: {metric: value}}`` (e.g. from your own evaluation)."""
        self.recorder.record_scores(scores)

    @property
    def run_dir(self) -> Path | None:
        """The run store directory (known once training has begun or ``out_dir`` was given)."""
        return self.recorder.out_dir

    def close(self) -> None:
        """Flush and close the store and remove the model hooks (optional: flushed at exit anyway)."""
        self.recorder.close()


def attach(
    trainer: Trainer,
    *,
    tasks: Sequence[str],
    probe_every: int = DEFAULT_PROBE_EVERY,
    probe_size: int = DEFAULT_PROBE_SIZE,
    tags: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    **kwargs: Any,
) -> DynamicsCallback:
    """Add a :class:`DynamicsCallback` to ``trainer`` (first in its callbacks) and return it.

    Other keyword arguments go to :class:`DynamicsCallback` (``probe_batch``, ``probe_kwargs``, ...).
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach expects a transformers.Trainer, got {type(trainer).__name__}")
    callback = DynamicsCallback(
        tasks, probe_every=probe_every, probe_size=probe_size, tags=tags, out_dir=out_dir, **kwargs
    )
    callback.bind(trainer)
    if any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__):  # TRL: collator, packing
        from dynamics.integrations.trl import adapt

        adapt(trainer, callback)
    return callback
