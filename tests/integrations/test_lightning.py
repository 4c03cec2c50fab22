"""The Lightning callback: per-task losses equal the module's own loss, accumulation, probes, DDP."""

from __future__ import annotations

import copy
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from dynamics.integrations.recorder import DynamicsWarning  # noqa: E402
from dynamics.lightning import DynamicsCallback  # noqa: E402
from tests.integrations.hook_helpers import TASKS, ItemDataset, hf_task_losses, store_table  # noqa: E402
from tests.tiny_models import llama_batch, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "hooks"


class Module(pl.LightningModule):
    """An ordinary module: calls its HF model with the batch's keyword arguments, logs the loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Positional(Module):
    """Calls its model positionally: the hooks cannot see labels."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )


class MicroBatches(pl.Callback):
    """The module's own loss and supervised target tokens of every micro-batch, by optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[tuple[float, int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = int((batch["labels"][:, 1:] != -100).sum())
        # global_step is already the step this micro-batch belongs to at its last micro-batch;
        # earlier micro-batches of an accumulation window belong to global_step + 1.
        step = int(trainer.global_step) + (0 if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 else 1)
        # Lightning hands on the loss divided by accumulate_grad_batches (what it backpropagates).
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        self.by_step.setdefault(step, []).append((loss, n))


def _data(names: bool, n: int = 24):
    batch, ids = llama_batch(n=n, seed=1)
    data = ItemDataset(batch, ids)
    if names:
        for item in data.items:
            item["task_ids"] = TASKS[item["task_ids"]]
    return batch, ids, data


def _fit(tmp_path: Path, module, data, callback, *, accumulate: int = 1, steps: int = 3, **kw: Any):
    micro = MicroBatches()
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"),
        log_every_n_steps=1,
        callbacks=[callback, micro],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=False))
    callback.close()
    return micro


@pytest.mark.parametrize(
    ("accumulate", "names"), [(1, False), (2, True)], ids=["no_accumulation", "accumulate_2"]
)
def test_token_weighted_task_losses_equal_the_modules_loss(tmp_path, accumulate, names):
    batch, ids, data = _data(names)
    model = tiny_llama()
    initial = copy.deepcopy(model)
    callback = DynamicsCallback(tasks=TASKS, probe_every=0)
    micro = _fit(tmp_path, Module(model), data, callback, accumulate=accumulate)
    run_dir = tmp_path / "dynamics"
    loss, tokens = store_table(run_dir, "loss"), store_table(run_dir, "n_tokens")
    mean = ((loss * tokens[loss.columns]).sum(axis=1) / tokens.sum(axis=1)).to_dict()
    assert sorted(mean) == sorted(micro.by_step) == [1, 2, 3]
    for step, parts in micro.by_step.items():
        assert len(parts) == accumulate
        # The step's loss over all its target tokens (with no accumulation: the logged loss itself).
        expected = sum(value * n for value, n in parts) / sum(n for _, n in parts)
        assert mean[step] == pytest.approx(expected, rel=1e-5)
        assert tokens.loc[step].sum() == sum(n for _, n in parts)
        per_step = 4 * accumulate
        present = {TASKS[int(i)] for i in ids[(step - 1) * per_step : step * per_step]}
        assert present == set(loss.columns[loss.loc[step].notna()])
    first = 4 * accumulate
    ref = hf_task_losses(initial, {k: v[:first] for k, v in batch.items()}, ids[:first])
    for task, value in ref.items():
        assert loss.loc[1, task] == pytest.approx(value, rel=1e-5)


def test_probes_run_and_scalars_reach_the_loggers(tmp_path):
    _, _, data = _data(names=False)
    callback = DynamicsCallback(tasks=TASKS, probe_every=2, probe_size=6)
    _fit(tmp_path, Module(tiny_llama()), data, callback, accumulate=2, steps=4)
    run_dir = tmp_path / "dynamics"
    assert sorted(store_table(run_dir, "grad_norm").index) == [2, 4]
    assert sorted(store_table(run_dir, "update_cosine").index) == [2, 4]
    import pandas as pd

    logged = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv")
    # Stamped like Lightning's own metrics of the same step (the steps completed before it).
    rows = logged.dropna(subset=["dynamics/loss/a"]).set_index("step")
    assert sorted(rows.index) == [0, 1, 2, 3]
    assert rows.loc[1, "dynamics/grad_norm/a"] == pytest.approx(store_table(run_dir, "grad_norm").loc[2, "a"])


def test_a_positional_model_says_once_what_to_do(tmp_path):
    _, _, data = _data(names=False)
    callback = DynamicsCallback(tasks=TASKS, probe_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, Positional(tiny_llama()), data, callback)
    messages = [str(w.message) for w in caught if issubclass(w.category, DynamicsWarning)]
    assert sum("callback.observe(logits, labels, task_ids)" in m for m in messages) == 1


def test_lightning_recipe_under_ddp_with_two_processes(tmp_path):
    """Two gloo processes (Lightning's own ddp launcher, accumulation 2, probes): step 1's per-task
    losses are those of the union of both ranks' examples at the initial weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--accumulate",
        "2",
        "--batch-size",
        "6",
        "--probe-every",
        "2",
    ]
    args += ["--devices", "2", "--strategy", "ddp"]
    done = subprocess.run(
        [sys.executable, str(HOOKS / "lightning_loop.py"), *args],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = runpy.run_path(str(HOOKS / "lightning_loop.py"))
    run_dir = tmp_path / "dynamics"
    n = store_table(run_dir, "n_examples")
    assert n.sum(axis=1).to_dict() == {1: 24.0, 2: 24.0}  # 2 ranks x 2 micro-batches x 6
    # Lightning shards (and, for training, always shuffles) with DistributedSampler(seed=PL_GLOBAL_SEED).
    data = recipe["MultiTaskText"](120, seed=0)
    shards = [
        list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0))[:12] for r in (0, 1)
    ]
    items = [data.items[i] for shard in shards for i in shard]
    batch = {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "attention_mask", "labels")}
    ids = torch.tensor([recipe["TASKS"].index(item["task_ids"]) for item in items])
    module = recipe["build_module"](seed=0)
    ref = hf_task_losses(module.model, batch, ids, tasks=recipe["TASKS"])
    loss = store_table(run_dir, "loss")
    for task, value in ref.items():
        assert loss.loc[1, task] == pytest.approx(value, rel=1e-5)
    assert sorted(store_table(run_dir, "grad_norm").index) == [2]


def test_lightning_recipe_single_process(tmp_path):
    run_dir = runpy.run_path(str(HOOKS / "lightning_loop.py"))["main"](
        ["--out", str(tmp_path), "--steps", "4", "--probe-every", "2"]
    )
    loss = store_table(run_dir, "loss")
    assert sorted(loss.index) == [1, 2, 3, 4] and loss.notna().all().all()
    assert sorted(store_table(run_dir, "fisher_se").index) == [2, 4]


def test_the_older_pytorch_lightning_package(tmp_path):
    old = pytest.importorskip("pytorch_lightning")
    from dynamics.lightning import PLDynamicsCallback

    class OldModule(old.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _, _, data = _data(names=True)
    callback = PLDynamicsCallback(tasks=TASKS, probe_every=0)
    assert isinstance(callback, old.Callback)
    trainer = old.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=2,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(OldModule(), DataLoader(data, batch_size=4, shuffle=False))
    callback.close()
    assert sorted(store_table(tmp_path / "dynamics", "train_loss").index) == [1, 2]
