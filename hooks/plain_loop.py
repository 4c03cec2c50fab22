"""Recipe: training dynamics from a plain PyTorch loop (no Hugging Face Trainer).

    python hooks/plain_loop.py --out runs/plain/dynamics --steps 60

A multi-head style classifier on three synthetic tasks. The loop changes in three places:
create a ``LoopRecorder``, wrap ``optimizer.step()`` in ``with rec.update(optimizer):``, and
close it at the end. The batch carries ``task_ids``; the recorder's forward pre-hook removes them
before ``model.forward`` and reads the per-task losses off the logits the model already computed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

TASKS = ["shape", "color", "size"]


class Classifier(nn.Module):
    """16 features -> 4 classes; the loss is returned when labels are given (HF style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Task ``k`` labels depend on a different slice of the features (tasks share the body)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    task_ids = torch.arange(n) % len(TASKS)
    score = torch.stack([x[:, 0:4].sum(1), x[:, 4:8].sum(1), x[:, 0:8].sum(1) * 0.5], dim=1)
    labels = torch.bucketize(score[torch.arange(n), task_ids], torch.tensor([-1.0, 0.0, 1.0]))
    return {"x": x, "labels": labels, "task_ids": task_ids}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plain_loop/dynamics", help="run store directory")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import dynamics

    torch.manual_seed(args.seed)
    data = make_data(args.batch_size * args.steps, seed=args.seed)
    probe = {k: v[: args.probe_size] for k, v in make_data(args.probe_size, seed=args.seed + 1).items()}
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    rec = dynamics.LoopRecorder(
        model, tasks=TASKS, out_dir=args.out, probe_every=args.probe_every, probe_size=args.probe_size,
        probe_batch=probe, tags={"recipe": "plain_loop", "seed": args.seed},
    )  # fmt: skip
    model.train()
    for step in range(args.steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        batch = {k: v[rows] for k, v in data.items()}
        loss = model(**batch)["loss"]  # task_ids are stripped by the recorder's hook
        loss.backward()
        with rec.update(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 20 == 0:
            logs = rec.logs()
            print(f"step {step + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in logs.items() if "/loss/" in k))

    # Final per-task accuracy on held-out data, recorded as the run's scores.
    model.eval()
    test = make_data(600, seed=args.seed + 2)
    with torch.no_grad():
        pred = model(test["x"])["logits"].argmax(1)
    rec.record_scores(
        {
            t: {"accuracy": float((pred == test["labels"])[test["task_ids"] == k].float().mean())}
            for k, t in enumerate(TASKS)
        }
    )
    rec.close()
    print(f"run store: {rec.run_dir}")
    return Path(str(rec.run_dir))


if __name__ == "__main__":
    main()
