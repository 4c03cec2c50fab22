"""TRL trainers (``SFTTrainer``, ``DPOTrainer``): what :func:`dynamics.attach` adds for them.

``attach`` calls :func:`adapt` when the trainer is a TRL trainer, so the two documented lines stay
all a user writes::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds)   # rows carry "task_ids"
    dynamics.attach(trainer, tasks=["math", "code", "chat"])
    trainer.train()

What TRL does differently from the plain Trainer, and what this module does about it:

* **The collator drops ``task_ids``.** TRL's collators build their batch from the keys they know.
  :class:`TaskIdCollator` wraps the trainer's collator: it takes ``task_ids`` (an index into
  ``tasks`` or the task's name) off every example, calls the original collator on the rest and
  puts the ids back into the batch, laid out like ``input_ids``.
* **Packing mixes tasks in one row.** ``packing=True`` concatenates examples (of different tasks)
  into rows and, before packing, keeps only the ``input_ids`` and ``labels`` columns. Once this
  module is imported, ``SFTTrainer`` turns each example's task id into a per-token column before
  packing, which TRL's packers then cut and concatenate exactly like ``input_ids`` (see
  :func:`keep_task_ids_through_packing`). Batches then carry per-token ids ``(B, L)`` (padding
  ``-1``), also for ``padding_free=True``, which flattens a batch into one row.
* **Fused outputs.** TRL's models return per-token log-probabilities of the target tokens and a
  label mask (``log_probs``, ``label_mask``, no logits). For a packed row ``r`` and task ``a`` the
  row's tokens of that task form one segment, and

      S_{r,a} = - sum_{t in r, task(t) = a} log p(y_t),      N_{r,a} = #{t in r : task(t) = a, y_t != -100}

  go to :meth:`Recorder.observe_losses` as one example each. ``SFTTrainer`` divides the step's sum
  of ``-log p`` by ``num_items_in_batch`` (all supervised target tokens of the step, on all ranks),
  so ``sum_a S_a / sum_a N_a`` over the step is exactly its logged loss.
* **DPO** has no per-token training loss: its loss is per preference pair. :class:`_DpoMeter`
  wraps ``compute_loss``, captures the policy's and the reference's sequence log-probs from the
  same forwards TRL runs (no extra forward), and records per task ``loss`` (for the default
  sigmoid loss: ``-log sigmoid(r_c - r_r)`` with rewards ``r = beta (log pi - log pi_ref)``, one
  item per pair), ``reward_chosen``, ``reward_rejected``, ``reward_margin`` and ``reward_accuracy``
  (means over the step's pairs of the task). Other DPO losses get the reward rows only, and one
  message says so.

Probes need one task per example and a forward that returns logits for the probe's loss: they are
kept for unpacked SFT data and switched off, with one message saying why, for packed or
padding-free rows and for DPO (whose batches are pairs). This is the only module that imports trl.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynamics.integrations import distributed as dist_utils
from dynamics.integrations.task_ids import TASK_IDS_KEY

__all__ = ["TaskIdCollator", "adapt", "keep_task_ids_through_packing", "names_to_indices", "segment_losses"]

PAD_TASK_ID = -1  # per-token ids of padding positions: no token, no example


# ---------------------------------------------------------------------------- task ids through data


class TaskIdCollator:
    """Wrap a collator so that ``task_ids`` survive it.

    Each example's ``task_ids`` is an int index into ``tasks``, a task name, or (packed rows) a
    list of either, one per token. The batch gets ``task_ids`` as a ``(B,)`` long tensor when every
    example has one id and the batch has one row per example; otherwise per token, ``(B, L)`` like
    ``input_ids`` (right padding with ``-1``; rows flattened by a padding-free collator are
    concatenated the same way). Names not in ``tasks`` become ``len(tasks)`` (the recorder reports
    such ids once and leaves them out).

    Args:
        collate: the trainer's collator.
        tasks: the run's task names.
        warn: ``warn(key, message)`` for one-time problems (the recorder's ``warn_once``).
        per_example: always one id per example (preference pairs: a batch has two rows per example).
    """

    def __init__(
        self,
        collate: Callable[[list[Any]], Any],
        tasks: Sequence[str],
        warn: Callable[[str, str], None],
        *,
        per_example: bool = False,
    ) -> None:
        self.collate = collate
        self.per_example = per_example
        self.tasks = list(tasks)
        self._index = {name: i for i, name in enumerate(self.tasks)}
        self._warn = warn

    def __getattr__(self, name: str) -> Any:  # padding_free, pad_token_id, ...: the wrapped collator's
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)

    def _id(self, value: Any) -> int:
        if isinstance(value, str):
            if value not in self._index:
                self._warn(
                    f"unknown_task_name:{value}",
                    f"dynamics: the task name {value!r} in the training data is not among the declared tasks "
                    f"{self.tasks}; its examples are left out of the per-task losses (training continues). "
                    "Declare it in tasks=[...].",
                )
            return self._index.get(value, len(self.tasks))
        if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"task_ids must be task indices or task names, got {value!r}")
        return int(value)

    def __call__(self, examples: list[Any]) -> Any:
        if not examples or not isinstance(examples[0], Mapping) or TASK_IDS_KEY not in examples[0]:
            return self.collate(examples)
        raw = [ex.get(TASK_IDS_KEY) for ex in examples]
        # Copies without the key: TRL's collators may reject unknown keys, and the examples may be
        # the user's own dicts.
        batch = self.collate([{k: v for k, v in ex.items() if k != TASK_IDS_KEY} for ex in examples])
        if not isinstance(batch, MutableMapping):
            return batch
        try:
            batch[TASK_IDS_KEY] = self._layout(examples, raw, batch)
        except (TypeError, ValueError) as err:
            self._warn(
                "task_ids_layout",
                f"dynamics: could not lay out task_ids for a batch ({err}); its per-task losses are not "
                "recorded (training continues).",
            )
        return batch

    def _layout(self, examples: list[Any], raw: list[Any], batch: Mapping[str, Any]) -> torch.Tensor:
        input_ids = batch.get("input_ids")
        per_token = [isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) for v in raw]
        rows = (
            int(input_ids.shape[0]) if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
        )
        if not any(per_token) and (self.per_example or rows in (None, len(examples))):
            return torch.tensor([self._id(v) for v in raw], dtype=torch.long)
        if input_ids is None or rows is None:
            raise ValueError("per-token task ids need a 2-D input_ids in the batch")
        tokens = []
        for ex, value, is_list in zip(examples, raw, per_token, strict=True):
            n = len(ex["input_ids"])
            ids = (
                [self._id(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
                if is_list
                else None
            )
            if ids is not None and len(ids) != n:
                raise ValueError(f"{len(ids)} per-token task ids for {n} tokens")
            tokens.append(torch.tensor(ids if ids is not None else [self._id(value)] * n, dtype=torch.long))
        width = int(input_ids.shape[1])
        if rows == len(examples):
            out = torch.full((rows, width), PAD_TASK_ID, dtype=torch.long)
            for i, row in enumerate(tokens):
                out[i, : min(width, row.numel())] = row[:width]
            return out
        if rows == 1:  # a padding-free collator concatenated the examples into one row
            flat = torch.cat(tokens)[:width]
            out = torch.full((1, width), PAD_TASK_ID, dtype=torch.long)
            out[0, : flat.numel()] = flat
            return out
        raise ValueError(f"{len(examples)} examples became {rows} rows; cannot place their task ids")


_ORIGINAL_PREPARE: Callable[..., Any] | None = None


def keep_task_ids_through_packing() -> None:
    """Make ``SFTTrainer`` keep ``task_ids`` when it packs (idempotent; done when this module is imported).

    TRL's packing path keeps only ``input_ids`` and ``labels``. With a ``task_ids`` column present,
    the patched preparation runs TRL's own preparation without packing and without truncation
    (packing cuts examples to ``max_length`` itself), repeats each example's id over its tokens,
    and then packs ``input_ids``, ``labels`` and the per-token ids with TRL's ``pack_dataset``,
    shuffling before and after packing as TRL does, so the packed rows are the same as without
    this module. It must run before the ``SFTTrainer`` is built (the dataset is prepared in its
    ``__init__``); :func:`adapt` says so when a packed dataset has lost its ids.
    """
    global _ORIGINAL_PREPARE
    from trl import SFTTrainer

    if _ORIGINAL_PREPARE is not None:
        return
    original = SFTTrainer._prepare_dataset
    _ORIGINAL_PREPARE = original

    @functools.wraps(original)
    def _prepare_dataset(
        self: Any,
        dataset: Any,
        processing_class: Any,
        args: Any,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Any:
        from trl.data_utils import get_dataset_column_names, pack_dataset

        if not packing or args.max_length is None or TASK_IDS_KEY not in get_dataset_column_names(dataset):
            return original(self, dataset, processing_class, args, packing, formatting_func, dataset_name)
        max_length = args.max_length
        args.max_length = None  # whole examples: the packer truncates or splits them
        try:
            dataset = original(self, dataset, processing_class, args, False, formatting_func, dataset_name)
        finally:
            args.max_length = max_length
        map_kwargs: dict[str, Any] = {}
        from datasets import Dataset

        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc
        dataset = dataset.map(
            lambda ex: {TASK_IDS_KEY: [ex[TASK_IDS_KEY]] * len(ex["input_ids"])}, **map_kwargs
        )
        # TRL's order: (shuffle), pack, (shuffle); the first shuffle was the end of `original`.
        dataset = dataset.select_columns(["input_ids", "labels", TASK_IDS_KEY])
        dataset = pack_dataset(dataset, max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    SFTTrainer._prepare_dataset = _prepare_dataset  # type: ignore[method-assign]


# ---------------------------------------------------------------------------- per-task losses


def _fused(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(log_probs, label_mask)`` of a TRL fused output, else ``None``."""
    log_probs = getattr(output, "log_probs", None)
    if log_probs is None and isinstance(output, Mapping):
        log_probs = output.get("log_probs")
    if not isinstance(log_probs, torch.Tensor):
        return None
    mask = getattr(output, "label_mask", None)
    if mask is None and isinstance(output, Mapping):
        mask = output.get("label_mask")
    if not isinstance(mask, torch.Tensor):
        mask = log_probs != 0
    return log_probs, mask


@torch.no_grad()
def segment_losses(
    token_loss: torch.Tensor,
    token_mask: torch.Tensor,
    token_ids: torch.Tensor,
    n_tasks: int,
    docs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per segment: summed loss ``S``, supervised tokens ``N`` and the task id.

    A segment is one (row, task) pair, or, when ``docs`` numbers the examples packed into each row
    (from ``position_ids``), one (row, example, task): then every segment is one original example.
    ``token_loss`` is zero where ``token_mask`` is false; ``token_ids`` holds ``-1`` on positions
    that are no token (padding); ids outside ``0..n_tasks-1`` become ``n_tasks`` (the recorder
    reports and drops them). A segment without supervised tokens still counts as one example
    (``N = 0``), as a fully masked example does.
    """
    ids = token_ids.to(token_loss.device).long()
    present = ids >= 0
    ids = torch.where(ids >= n_tasks, n_tasks, ids)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    doc = torch.zeros_like(ids) if docs is None else docs.to(ids.device).long()
    keys = torch.stack([rows, doc, ids], dim=-1)[present]
    segments, inverse = torch.unique(keys, dim=0, return_inverse=True)
    loss_sum = torch.zeros(segments.shape[0], dtype=torch.float32, device=ids.device)
    counts = torch.zeros_like(loss_sum)
    loss_sum.index_add_(0, inverse, token_loss[present].float())
    counts.index_add_(0, inverse, token_mask[present].float())
    return loss_sum, counts, segments[:, 2]


class _Observer:
    """The recorder's consumer of training forwards, extended for TRL's outputs and packed rows.

    Fused outputs and per-token task ids go to :meth:`Recorder.observe_losses` (per example, or per
    (row, task) segment); everything else goes to the recorder's own ``observe`` unchanged.
    """

    def __init__(self, recorder: Any, observe: Callable[[Any, dict[str, Any], Any], None]) -> None:
        self.recorder = recorder
        self.observe = observe
        self.skip = False  # DPO: the meter records, not the forward hook

    def __call__(self, task_ids: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.skip:
            return
        fused = _fused(output)
        per_token = isinstance(task_ids, torch.Tensor) and task_ids.dim() == 2
        if task_ids is None or (fused is None and not per_token):
            self.observe(task_ids, kwargs, output)
            return
        try:
            self._observe(task_ids, kwargs, output, fused)
        except Exception as err:  # the recorder must never stop training
            self.recorder.warn_once(
                f"observe:{type(err).__name__}",
                f"dynamics: per-task loss skipped for a batch ({type(err).__name__}: {err}); training continues.",
            )

    def _observe(
        self,
        task_ids: Any,
        kwargs: dict[str, Any],
        output: Any,
        fused: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        ids = torch.as_tensor(task_ids)
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if fused is not None:
            log_probs, mask = fused
            token_loss = -log_probs.detach().float() * mask  # zero on ignored positions already
            aligned = shift_labels is not None or log_probs.shape[-1] == ids.shape[-1]
        else:
            token_loss, mask = self._token_losses(output, labels, shift_labels)
            aligned = shift_labels is not None
        if ids.dim() == 1:
            self.recorder.observe_losses(token_loss.sum(dim=1), ids, mask.sum(dim=1).float())
            return
        # Causal targets: position t scores token t + 1, which belongs to token t + 1's task.
        token_ids = ids if aligned else ids[:, 1:]
        width = token_loss.shape[1]
        token_ids = token_ids[:, -width:]  # prompt-learning PEFT prepends virtual positions
        if token_ids.shape != token_loss.shape:
            raise ValueError(
                f"per-token task ids of shape {tuple(token_ids.shape)} do not match the per-token losses "
                f"of shape {tuple(token_loss.shape)}"
            )
        docs = None
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape == ids.shape:
            # Padding-free rows: each example restarts its positions at 0, so count examples exactly.
            docs = (position_ids == 0).long().cumsum(dim=1)
            docs = (docs if aligned else docs[:, 1:])[:, -width:]
        loss_sum, counts, seg_ids = segment_losses(token_loss, mask, token_ids, self.recorder.n_tasks, docs)
        self.recorder.observe_losses(loss_sum, seg_ids, counts)

    def _token_losses(self, output: Any, labels: Any, shift_labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token CE of a causal LM's logits: ``(B, L-1)`` (``(B, L)`` with ``shift_labels``)."""
        from dynamics.signals.losses import IGNORE_INDEX, per_token_losses

        if labels is None and shift_labels is None:
            raise ValueError("packed rows need labels and logits (or a fused output) to split losses by task")
        if shift_labels is None:  # the definition's causal targets (pad, shift), less the last position
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = per_token_losses(output, targets)[:, :-1]
            targets = targets[:, :-1]
        else:
            targets = shift_labels
            loss = per_token_losses(output, targets)
        return loss, targets.to(loss.device) != IGNORE_INDEX


def _install_observer(recorder: Any) -> _Observer:
    observer = recorder.__dict__.get("observe")
    if isinstance(observer, _Observer):
        return observer
    # Bridge (see adapt): the recorder's forward hook calls `recorder.observe`; an instance
    # attribute routes later hooks through the observer, the current hook gets it directly.
    observer = _Observer(recorder, type(recorder).observe.__get__(recorder))
    recorder.observe = observer
    hook = getattr(recorder, "_hook", None)
    if hook is not None:
        hook.consumer = observer
    return observer


# ---------------------------------------------------------------------------- DPO


def _drop_task_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    kwargs.pop(TASK_IDS_KEY, None)
    return args, kwargs


class _DpoMeter:
    """Per-task DPO loss and rewards from the log-probs of the forwards ``DPOTrainer`` runs.

    Wraps ``trainer.compute_loss``: it takes ``task_ids`` (one per pair) off the inputs, lets TRL
    compute the loss while forward hooks on the policy (and reference) model keep the outputs'
    per-token log-probs, then, per pair ``i`` with sequence log-probs ``c_i, r_i`` (policy) and
    ``c'_i, r'_i`` (reference), ``rc_i = beta (c_i - c'_i)``, ``rr_i = beta (r_i - r'_i)``.
    """

    METRICS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def __init__(self, trainer: Any, recorder: Any, observer: _Observer) -> None:
        self.trainer = trainer
        self.recorder = recorder
        self.observer = observer
        self.beta = float(trainer.beta)
        self.loss_supported = (
            list(trainer.loss_types) == ["sigmoid"]
            and list(trainer.loss_weights) == [1.0]
            and trainer.f_divergence_type == "reverse_kl"
            and trainer.ld_alpha is None
            and not trainer.use_weighting
            and not trainer.aux_loss_enabled
            and getattr(trainer, "label_smoothing", 0.0) == 0.0
        )
        # Per-step, per-task sums of the reward metrics (and their pair counts), host-side.
        self._sums = np.zeros((len(self.METRICS) + 1, recorder.n_tasks))
        self._window = np.zeros_like(self._sums)
        self._captured: list[torch.Tensor] = []
        original = trainer.compute_loss
        self._original = original
        trainer.compute_loss = self.compute_loss
        if trainer.ref_model is not None:  # e.g. precomputing reference log-probs calls it with the batch
            trainer.ref_model.register_forward_pre_hook(_drop_task_ids, with_kwargs=True)

    def _capture(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        fused = _fused(output)
        if fused is not None:
            self._captured.append(fused[0].detach())

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        task_ids = inputs.pop(TASK_IDS_KEY, None)  # also in evaluation: the reference model takes no task_ids
        if task_ids is None or not self.trainer.model.training:
            return self._original(model, inputs, *args, **kwargs)
        modules = [model] + ([self.trainer.ref_model] if self.trainer.ref_model is not None else [])
        handles = [m.register_forward_hook(self._capture, with_kwargs=True) for m in modules]
        self._captured = []
        self.observer.skip = True
        try:
            result = self._original(model, inputs, *args, **kwargs)
        finally:
            self.observer.skip = False
            for h in handles:
                h.remove()
        try:
            self._record(task_ids, inputs)
        except Exception as err:  # the recorder must never stop training
            self.recorder.warn_once(
                f"dpo:{type(err).__name__}",
                f"dynamics: per-task DPO values skipped for a batch ({type(err).__name__}: {err}); training continues.",
            )
        return result

    @torch.no_grad()
    def _record(self, task_ids: Any, inputs: Mapping[str, Any]) -> None:
        seq_len = inputs["completion_mask"].shape[1] - 1
        logps = [lp[:, -seq_len:].float().sum(dim=1) for lp in self._captured]
        self._captured = []
        policy = logps[0]
        if "ref_chosen_logps" in inputs:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(policy)
        elif len(logps) >= 2:
            ref = logps[1]
        else:
            raise ValueError("the reference model's log-probs were not seen")
        ids = torch.as_tensor(task_ids).reshape(-1).to(policy.device).long()
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        reward_c = self.beta * (chosen - ref_chosen)
        reward_r = self.beta * (rejected - ref_rejected)
        margin = reward_c - reward_r
        if self.loss_supported:
            self.recorder.observe_losses(-F.logsigmoid(margin), ids)
        values = torch.stack(
            [reward_c, reward_r, margin, (margin > 0).to(margin.dtype), torch.ones_like(margin)]
        )
        ids = torch.where((ids < 0) | (ids >= self.recorder.n_tasks), self.recorder.n_tasks, ids)
        sums = torch.zeros(values.shape[0], self.recorder.n_tasks + 1, dtype=torch.float64, device=ids.device)
        sums.index_add_(1, ids, values.double())
        self._sums += sums[:, : self.recorder.n_tasks].cpu().numpy()

    def end_step(self, step: int) -> None:
        """Write the step's per-task reward means (a collective under torch.distributed)."""
        local, self._sums = self._sums, np.zeros_like(self._sums)
        device = dist_utils.reduce_device(None)
        sums = dist_utils.all_reduce_sum(torch.tensor(local, device=device)).cpu().numpy()
        self._window += sums
        writer = self.recorder.writer
        if writer is None:
            return
        rows = [
            (step, name, task, "", float(sums[m, a] / sums[-1, a]))
            for a, task in enumerate(self.recorder.tasks)
            if sums[-1, a] > 0
            for m, name in enumerate(self.METRICS)
        ]
        writer.log_rows(rows)

    def logs(self) -> dict[str, float]:
        from dynamics.store.schema import tb_tag

        window, self._window = self._window, np.zeros_like(self._window)
        return {
            tb_tag(name, task): float(window[m, a] / window[-1, a])
            for a, task in enumerate(self.recorder.tasks)
            if window[-1, a] > 0
            for m, name in enumerate(self.METRICS)
        }


def _dpo_callback(meter: _DpoMeter) -> Any:
    from transformers import TrainerCallback

    class DpoRewardsCallback(TrainerCallback):
        """Closes each step's reward rows; adds their window means to the training logs."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.end_step(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs is not None and "loss" in logs:
                logs.update(meter.logs())

    return DpoRewardsCallback()


def names_to_indices(dataset: Any, tasks: Sequence[str]) -> Any:
    """``dataset`` with task names in its ``task_ids`` column replaced by their indices in ``tasks``.

    Per example or per token (packed rows); names not in ``tasks`` become ``len(tasks)`` (the
    recorder reports such ids once). Datasets without names, or that are not ``datasets``
    datasets, are returned unchanged (the collator converts names batch by batch then).
    """
    from datasets import Dataset, IterableDataset

    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset
    columns = dataset.column_names or []
    if TASK_IDS_KEY not in columns:
        return dataset
    first = next(iter(dataset))[TASK_IDS_KEY]
    sample = first[0] if isinstance(first, list) and first else first
    if not isinstance(sample, str):
        return dataset
    index = {name: i for i, name in enumerate(tasks)}

    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        values = batch[TASK_IDS_KEY]
        if values and isinstance(values[0], list):
            return {TASK_IDS_KEY: [[index.get(v, len(index)) for v in row] for row in values]}
        return {TASK_IDS_KEY: [index.get(v, len(index)) for v in values]}

    return dataset.map(convert, batched=True)


# ---------------------------------------------------------------------------- entry point


def adapt(trainer: Any, callback: Any) -> None:
    """Fit a bound :class:`~dynamics.integrations.hf.DynamicsCallback` to a TRL trainer.

    Wraps the collator (task ids survive it), routes fused outputs and packed rows to per-task
    losses, adds the DPO meter for ``DPOTrainer``, and switches probes off where they cannot run
    (packed rows, DPO pairs) with one message. Safe to call twice.
    """
    from trl import DPOTrainer, SFTTrainer

    recorder = callback.recorder
    observer = _install_observer(recorder)
    if not isinstance(trainer.data_collator, TaskIdCollator):
        trainer.data_collator = TaskIdCollator(
            trainer.data_collator,
            recorder.tasks,
            recorder.warn_once,
            per_example=isinstance(trainer, DPOTrainer),
        )
    # Task names as indices once, so the probe-batch builder and the recorder see ints.
    trainer.train_dataset = names_to_indices(trainer.train_dataset, recorder.tasks)
    args = trainer.args
    columns = getattr(trainer.train_dataset, "column_names", None)
    has_ids = columns is None or TASK_IDS_KEY in columns
    if isinstance(trainer, SFTTrainer):
        packed = bool(getattr(args, "packing", False) or getattr(trainer, "padding_free", False))
        if packed:
            recorder.disable_probes(
                "packed rows",
                "dynamics: probes are off for packed / padding-free SFT batches: a probe needs one task per "
                "example, and packed rows mix tasks. Per-task losses are recorded per packed segment. To probe, "
                "pass probe_batch= (an unpacked collated batch with task_ids) and train without packing.",
            )
        if not has_ids and getattr(args, "packing", False):
            recorder.warn_once(
                "packing_dropped_task_ids",
                "dynamics: this SFTTrainer packed its dataset without 'task_ids' (TRL keeps only input_ids and "
                "labels when packing), so per-task losses cannot be recorded. Import dynamics (or call "
                "dynamics.integrations.trl.keep_task_ids_through_packing()) before building the "
                "SFTTrainer, and the ids are packed per token along with the tokens.",
            )
    elif isinstance(trainer, DPOTrainer):
        if getattr(trainer, "_dynamics_dpo", None) is None:
            meter = _DpoMeter(trainer, recorder, observer)
            setattr(trainer, "_dynamics_dpo", meter)  # noqa: B010  (adapt may be called twice)
            handler = trainer.callback_handler
            position = handler.callbacks.index(callback) + 1 if callback in handler.callbacks else 0
            handler.callbacks.insert(position, _dpo_callback(meter))
            recorder.disable_probes(
                "DPO pairs",
                "dynamics: probes are off for DPOTrainer: its batches are chosen/rejected pairs with no per-example "
                "language-model loss to probe.",
            )
            recorder.warn_once(
                "dpo_recorded",
                "dynamics: DPOTrainer: recording per task "
                + (
                    "'loss' (the sigmoid DPO loss per pair), "
                    if meter.loss_supported
                    else f"no 'loss' (loss_type={list(trainer.loss_types)} with these options is not reproduced "
                    "per pair; only the default sigmoid DPO loss is), "
                )
                + "'reward_chosen', 'reward_rejected', 'reward_margin' and 'reward_accuracy' (means over the "
                "step's pairs). Not recorded: gradient probes.",
            )
    else:
        recorder.warn_once(
            "trl_trainer",
            f"dynamics: {type(trainer).__name__} is not one of the TRL trainers dynamics adapts (SFTTrainer, "
            "DPOTrainer); its task_ids are kept through the collator and per-task losses are recorded only if "
            "its training forward returns logits or per-token log-probs with labels.",
        )


keep_task_ids_through_packing()
