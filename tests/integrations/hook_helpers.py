"""Datasets, Trainer factory and brute-force references for the integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

TASKS = ["a", "b", "c"]


class ItemDataset(Dataset):
    """The rows of a tiny_models batch as dict items (``task_ids`` an int per item, optional)."""

    def __init__(
        self, batch: dict[str, torch.Tensor], task_ids: torch.Tensor, with_task_ids: bool = True
    ) -> None:
        n = task_ids.shape[0]
        self.items = []
        for i in range(n):
            item = {k: v[i] for k, v in batch.items()}
            if with_task_ids:
                item["task_ids"] = int(task_ids[i])
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def run_settings(out: Path) -> dict[str, Any]:
    """TrainingArguments every trainer test shares: 3 steps of 4 examples, a log every step, CPU,
    sequential batches (so tests know which examples form each step)."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )


def trainer_for(
    model, dataset, out: Path, *, callbacks=None, eval_dataset=None, compute_metrics=None, trainer_cls=None,
    args_cls=None, **overrides,
):  # fmt: skip
    """A CPU Trainer with sequential batches (so tests know which examples form each step)."""
    from transformers import Trainer, TrainingArguments

    trainer_cls = trainer_cls or Trainer
    args_cls = args_cls or TrainingArguments

    kwargs: dict[str, Any] = {**run_settings(out), "seed": 0, **overrides}
    return trainer_cls(
        model=model,
        args=args_cls(**kwargs),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        compute_metrics=compute_metrics,
    )


def logged_losses(trainer) -> dict[int, float]:
    """The Trainer's own logged training loss per step."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def store_table(run_dir: Path, name: str):
    """``step x task`` table of one metric from the store (read back with load_runs)."""
    from dynamics import load_runs

    m = load_runs(run_dir).metrics
    return m[m["name"] == name].pivot_table(index="step", columns="task", values="value")


@torch.no_grad()
def hf_task_losses(
    model, batch: dict[str, torch.Tensor], task_ids: torch.Tensor, tasks=TASKS
) -> dict[str, float]:
    """Reference: transformers' own loss (``model(**sub).loss``) on each task's examples alone."""
    was = model.training
    model.eval()
    out = {}
    for a, task in enumerate(tasks):
        rows = task_ids == a
        if rows.any():
            out[task] = float(model(**{k: v[rows] for k, v in batch.items()}).loss)
    model.train(was)
    return out


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[int]]:
    """S_i and N_i by explicit loops over tokens, float64 log-softmax."""
    sums, counts = [], []
    logp = torch.log_softmax(logits.double(), dim=-1)
    for i in range(targets.shape[0]):
        s, n = 0.0, 0
        for t in range(targets.shape[1]):
            y = int(targets[i, t])
            if y != -100:
                s -= float(logp[i, t, y])
                n += 1
        sums.append(s)
        counts.append(n)
    return sums, counts
