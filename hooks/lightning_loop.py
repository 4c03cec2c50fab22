"""Recipe: training dynamics from a PyTorch Lightning script, with one added callback.

    python hooks/lightning_loop.py --out runs/lightning --steps 20
    python hooks/lightning_loop.py --out runs/lightning_ddp --devices 2 --strategy ddp   # 2 CPU processes

What your script needs: each batch is a dict that carries ``task_ids`` (an index into ``TASKS``
or the task's name per example), the ``training_step`` calls its model with the batch's keyword
arguments (``self.model(**batch)``), and

    from dynamics.lightning import DynamicsCallback
    trainer = lightning.Trainer(..., callbacks=[DynamicsCallback(tasks=TASKS)])

Per-task losses are recorded every optimizer step (gradient accumulation and DDP included),
probes every ``probe_every`` steps, into ``<default_root_dir>/dynamics`` and into the trainer's
loggers as ``dynamics/<name>/<task>``. The model is a tiny Llama built from a config: the recipe
runs offline in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

TASKS = ["caption", "vqa", "report"]
VOCAB = 64


class MultiTaskText(Dataset):
    """Synthetic examples: task ``k``'s text counts up in steps of ``k + 1``; task ids as names."""

    def __init__(self, n: int, *, text_len: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            task = i % len(TASKS)
            start = int(torch.randint(3, VOCAB, (1,), generator=gen))
            ids = 3 + (start + (task + 1) * torch.arange(text_len)) % (VOCAB - 3)
            labels = ids.clone()
            labels[: 1 + task] = -100  # a task-dependent "prompt": unequal token counts per example
            self.items.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "labels": labels,
                    "task_ids": TASKS[task],
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def build_module(lr: float = 3e-3, seed: int = 0) -> Any:
    """A LightningModule around a tiny Llama; nothing in it knows about dynamics."""
    import lightning.pytorch as pl
    from transformers import LlamaConfig, LlamaForCausalLM

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
            )
            self.model = LlamaForCausalLM(config)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.log("train_loss", loss, on_step=True, prog_bar=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return CausalLM()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="runs/lightning", help="default_root_dir (the store goes in <out>/dynamics)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--accumulate", type=int, default=2, help="accumulate_grad_batches")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2: two CPU processes)")
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import lightning.pytorch as pl

    from dynamics.lightning import DynamicsCallback

    pl.seed_everything(args.seed, verbose=False)
    loader = DataLoader(MultiTaskText(120, seed=args.seed), batch_size=args.batch_size, shuffle=False)
    # -- the added line ---------------------------------------------------------------------------
    callback = DynamicsCallback(
        tasks=TASKS, probe_every=args.probe_every, probe_size=args.probe_size, tags={"seed": args.seed}
    )
    # ---------------------------------------------------------------------------------------------
    trainer = pl.Trainer(
        default_root_dir=args.out,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        log_every_n_steps=5,
        logger=pl.loggers.CSVLogger(args.out, name="logs"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(build_module(seed=args.seed), loader)
    callback.close()
    if trainer.is_global_zero:
        print(f"run store: {callback.run_dir}")
    return Path(args.out) / "dynamics"


if __name__ == "__main__":
    main()
