"""Hugging Face Trainer hooks: :class:`DynamicsCallback`, :func:`attach` and :func:`evaluate_per_task`.

Two lines in an existing script::

    cb = dynamics.attach(trainer, tasks=["vqa", "report", "grounding"], tags={"construction": "IMAX"})
    trainer.train()

``attach`` hands the callback its Trainer explicitly and inserts it at the FRONT of the Trainer's
callbacks, so that in ``on_log`` it adds ``dynamics/<name>/<task>`` scalars to the training logs
before TensorBoard, wandb, mlflow and every other ``report_to`` integration read them. Probe values
are logged through ``trainer.log`` at the end of their own step (so every reporter gets them with
their own step, none dropped). Rank checks use ``state.is_world_process_zero`` (the callback
contract); the callback never reads the Trainer's private state, except in one place
(:func:`_keep_task_ids_column`, commented there).

Hook points in the Trainer's optimizer step ``s`` (``global_step`` becomes ``s``):
``on_step_begin`` (copy the probed parameters on probe steps, before any update: DeepSpeed updates
inside the last micro-batch's backward), ``on_optimizer_step`` (probe at the pre-update parameters
with the update as direction), ``on_step_end`` (close the step, log the probe), ``on_log`` (the
per-task losses of the logging window), ``on_evaluate`` (score curves and final scores).
This is the only module of the package that imports transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dynamics.integrations import distributed as dist_utils
from dynamics.integrations.config import RecorderConfig
from dynamics.integrations.recorder import Recorder
from dynamics.integrations.task_ids import TASK_IDS_KEY, encode_task_ids, split_by_task

__all__ = ["DynamicsCallback", "attach", "evaluate_per_task"]


class DynamicsCallback(TrainerCallback):
    """Per-task losses every step, probes every ``probe_every`` steps, a run store, and log scalars.

    Args:
        tasks: task names; ``batch["task_ids"]`` holds per example (or per token) an index into
            this list or the task's name.
        config: a :class:`~dynamics.integrations.config.RecorderConfig`.
        **options: its fields as keywords (``probe_every``, ``probe_size``, ``tags``, ``out_dir``
            (default ``<args.output_dir>/dynamics``), ``meta``, ``loss``, ``probe_batch``,
            ``probe_dataset``, ``probe_kwargs``, ``update_direction``, ``flush_seconds``,
            ``overwrite``, ``seed``, ...).

    Use :func:`attach` (or call :meth:`bind` with the Trainer): a callback given to
    ``Trainer(callbacks=[...])`` and never bound still records per-task losses into the store, but
    it runs after the reporters in ``on_log`` and cannot keep ``task_ids`` in a ``datasets.Dataset``.
    """

    def __init__(
        self, tasks: Sequence[str] | None = None, *, config: RecorderConfig | None = None, **options: Any
    ) -> None:
        self.recorder = Recorder(tasks, config=config, **options)
        self.trainer: Trainer | None = None
        self._lr: float | None = None
        self._layout_written = False

    @property
    def tasks(self) -> list[str]:
        return self.recorder.tasks

    @property
    def config(self) -> RecorderConfig:
        return self.recorder.cfg

    # ------------------------------------------------------------------ binding
    def bind(self, trainer: Trainer) -> DynamicsCallback:
        """Give the callback its Trainer: hook the model, keep ``task_ids``, go first in the callbacks."""
        self.trainer = trainer
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        _keep_task_ids_column(trainer)
        _encode_task_names(trainer, self.tasks)
        _keep_task_ids_from_generate(trainer)
        if trainer.model is not None:
            self.recorder.attach_model(trainer.model, sharded=dist_utils.sharding_reason(None, trainer))
        return self

    # ------------------------------------------------------------------ training
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        dataloader = kwargs.get("train_dataloader")
        collate = getattr(dataloader, "collate_fn", None)
        if self.trainer is None:
            self.recorder.warn_once(
                "unbound",
                "dynamics: DynamicsCallback was passed to Trainer(callbacks=...) without its Trainer, so its "
                "per-task scalars reach the Trainer's logs after the reporters read them, and task_ids in a "
                "datasets.Dataset are dropped by remove_unused_columns. Use cb = dynamics.attach(trainer, "
                "tasks=...) (or cb.bind(trainer)) before trainer.train().",
            )
            _keep_task_ids_in_collator(collate)
        model = self.trainer.model if self.trainer is not None else kwargs.get("model")
        if model is not None:
            sharded = dist_utils.sharding_reason(None, self.trainer) if self.trainer is not None else None
            self.recorder.attach_model(model, sharded=sharded)
        resumed = int(state.global_step)  # > 0 only when train() resumes from a checkpoint
        self.recorder.start(
            out_dir=Path(str(args.output_dir)) / "dynamics",
            meta={"trainer": {"output_dir": str(args.output_dir), "resumed_at_step": resumed}},
            resume_step=resumed or None,
            main_process=state.is_world_process_zero,
        )
        if not self.recorder.has_probe_batch and self.recorder.probes_off is None:
            self._build_probe_batch(dataloader, collate)

    def _build_probe_batch(self, dataloader: Any, collate: Any) -> None:
        cfg = self.recorder.cfg
        dataset = cfg.probe_dataset if cfg.probe_dataset is not None else getattr(dataloader, "dataset", None)
        if collate is None and self.trainer is not None:
            collate = self.trainer.data_collator
        if dataset is None or collate is None:
            return  # the recorder warns once, at the first probe step
        self.recorder.hold_probe_batch_from(dataset, collate, tasks=self.tasks)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.before_update(state.global_step + 1)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None)
        self._lr = float(groups[0]["lr"]) if groups else None  # the rate this update uses

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.after_update(state.global_step + 1)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.end_step(state.global_step, lr=self._lr)
        if self.trainer is not None:
            # The probe's scalars go out now, stamped with this step (global_step == s here), as
            # their own log entry: none waits for (or is overwritten before) the next logging step.
            for _, scalars in self.recorder.pop_probe_logs():
                self.trainer.log(dict(scalars))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Only training logs (they carry "loss"); eval, probe and end-of-train entries are left alone.
        if logs is not None and "loss" in logs:
            logs.update(self.recorder.logs())
        if not self._layout_written and state.is_world_process_zero and self.trainer is not None:
            self._layout_written = _tensorboard_layout(self.trainer)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.recorder.record_eval(state.global_step, metrics or {})

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.recorder.flush()  # the store holds every step up to the checkpoint

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
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
    trainer: Trainer, *, tasks: Sequence[str], config: RecorderConfig | None = None, **options: Any
) -> DynamicsCallback:
    """Add a :class:`DynamicsCallback` to ``trainer`` (first in its callbacks) and return it.

    ``options`` are :class:`~dynamics.integrations.config.RecorderConfig` fields (``probe_every``,
    ``probe_size``, ``tags``, ``out_dir``, ...). For a TRL trainer, its adapter
    (``dynamics.integrations.trl.adapt``) is applied too.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach expects a transformers.Trainer, got {type(trainer).__name__}")
    callback = DynamicsCallback(tasks, config=config, **options).bind(trainer)
    if any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__):  # TRL: collator, packing
        from dynamics.integrations.trl import adapt

        adapt(trainer, callback)
    return callback


def evaluate_per_task(
    trainer: Trainer,
    eval_dataset: Any = None,
    *,
    tasks: Sequence[str] | None = None,
    metric_key_prefix: str = "eval",
) -> dict[str, float]:
    """Evaluate each task separately from ONE eval set whose items carry ``task_ids`` (indices or names).

    Runs ``trainer.evaluate({task: subset, ...})``, so the metrics come back as
    ``{metric_key_prefix}_<task>_<metric>`` and an attached callback stores them per task (a score
    curve at the current step; the non-loss metrics also as final scores). ``tasks`` default to the
    attached callback's. For evaluation *during* training, pass ``eval_dataset=split_by_task(ds, TASKS)``
    to the Trainer instead.
    """
    if tasks is None:
        bound = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DynamicsCallback)]
        if not bound:
            raise ValueError("evaluate_per_task needs tasks=[...] (no DynamicsCallback is attached)")
        tasks = bound[0].tasks
    dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
    if dataset is None:
        raise ValueError("evaluate_per_task needs an eval set: pass eval_dataset= or give the Trainer one")
    return trainer.evaluate(split_by_task(dataset, tasks), metric_key_prefix=metric_key_prefix)


# Per-task signals: in TensorBoard's "Custom Scalars" tab, one chart per signal with every task
# (or task pair) as a line. Tags are the HF TensorBoard callback's: "train/" + our log keys.
_PER_TASK_SIGNALS = (
    "loss",
    "probe_loss",
    "grad_norm",
    "update_cosine",
    "grad_cosine",
    "n_tokens",
    "n_examples",
)


def _tensorboard_layout(trainer: Trainer) -> bool:
    """Give TensorBoard a custom-scalars layout once its writer exists; ``True`` once done (or moot)."""
    from transformers.integrations import TensorBoardCallback

    boards = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
    if not boards:
        return True
    writer = getattr(boards[0], "tb_writer", None)
    add = getattr(writer, "add_custom_scalars", None)
    if not callable(add):
        return writer is not None  # a writer without layouts (tensorboardX variants): nothing to do
    layout = {
        "dynamics": {name: ["Multiline", [rf"^train/dynamics/{name}/.*"]] for name in _PER_TASK_SIGNALS},
        "dynamics eval": {"eval_loss": ["Multiline", [r"^eval/.*_loss$"]]},
    }
    add(layout)
    return True


# ---------------------------------------------------------------------- Trainer surgery
# The few places that must reach into the Trainer, each in one function.


def _keep_task_ids_column(trainer: Trainer) -> None:
    """Let ``task_ids`` through ``remove_unused_columns``.

    The Trainer drops every dataset column / batch key that ``model.forward`` does not name; our
    forward pre-hook removes ``task_ids`` before ``forward`` runs, so the column may pass. There is
    no public way to add a column to the Trainer's list, so this is the ONE place that edits the
    Trainer's private ``_signature_columns`` (filled from the model's signature on first use; we
    fill it the same way, then append).
    """
    if not trainer.args.remove_unused_columns or not hasattr(trainer, "_set_signature_columns_if_needed"):
        return
    trainer._set_signature_columns_if_needed()
    columns = getattr(trainer, "_signature_columns", None)
    if isinstance(columns, list) and TASK_IDS_KEY not in columns:
        columns.append(TASK_IDS_KEY)


def _keep_task_ids_in_collator(collate: Any) -> None:
    """Unbound callback: the column filter already wraps the collator; keep ``task_ids`` in the very
    list it reads (``RemoveColumnsCollator.signature_columns``)."""
    columns = getattr(collate, "signature_columns", None)
    if isinstance(columns, list) and TASK_IDS_KEY not in columns:
        columns.append(TASK_IDS_KEY)


class _TaskNameCollator:
    """Turns task names in each example's ``task_ids`` into indices, then calls the Trainer's collator
    (collators drop or reject strings). Other attributes are the wrapped collator's."""

    def __init__(self, collate: Any, tasks: Sequence[str]) -> None:
        self.collate = collate
        self.tasks = list(tasks)

    def __call__(self, features: list[Any]) -> Any:
        features = [
            {**f, TASK_IDS_KEY: encode_task_ids(f[TASK_IDS_KEY], self.tasks)}
            if isinstance(f, Mapping) and not isinstance(f.get(TASK_IDS_KEY, 0), (int, float))
            else f
            for f in features
        ]
        return self.collate(features)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collate, name)


def _encode_task_names(trainer: Trainer, tasks: Sequence[str]) -> None:
    """``task_ids`` may be task names in the data (lists of dicts, torch datasets, ``datasets.Dataset``)."""
    collate = trainer.data_collator
    if collate is not None and not isinstance(collate, _TaskNameCollator):
        trainer.data_collator = _TaskNameCollator(collate, tasks)


def _keep_task_ids_from_generate(trainer: Trainer) -> None:
    """Seq2SeqTrainer (``predict_with_generate``) passes evaluation batches to ``model.generate``,
    which rejects unknown keywords: evaluation never needs ``task_ids``, so they are dropped from
    the batches ``prediction_step`` gets (training batches keep them)."""
    from transformers import Seq2SeqTrainer

    if not isinstance(trainer, Seq2SeqTrainer) or getattr(trainer.prediction_step, "_dynamics", False):
        return
    original = trainer.prediction_step

    @functools.wraps(original)
    def prediction_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, Mapping) and TASK_IDS_KEY in inputs:
            inputs = {k: v for k, v in inputs.items() if k != TASK_IDS_KEY}
        return original(model, inputs, *args, **kwargs)

    prediction_step._dynamics = True  # type: ignore[attr-defined]
    trainer.prediction_step = prediction_step  # type: ignore[method-assign]
