"""Real training jobs that the fault tests kill, starve of disk space or run twice.

    python -m tests.faults.jobs KIND --out RUN_DIR --side SIDE_FILE [options]

KIND is ``writer`` (rows through RunWriter directly), ``loop`` (a plain PyTorch loop with
dynamics.LoopRecorder; under torchrun with ``--ddp``) or ``hf`` (a Hugging Face Trainer on a tiny
Llama with dynamics.attach). After each completed step a job appends ``<step> <unix time>`` to
the side file (flushed per line, so it survives a SIGKILL): the tests compare what the store kept
with what the job had done. Everything runs at the library's defaults unless an option says so.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TASKS = ["a", "b", "c"]


def writer_value(step: int, task: str) -> float:
    """The value the writer job logs, so a test can check every kept row exactly."""
    return step + TASKS.index(task) / 10


class _Side:
    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - lives as long as the job

    def done(self, step: int) -> None:
        if self.file is not None:
            self.file.write(f"{step} {time.time():.6f}\n")


def _pid_file(side: str | None, rank: int) -> None:
    if side:
        Path(f"{side}.rank{rank}.pid").write_text(str(os.getpid()))


def writer_job(args: argparse.Namespace) -> None:
    from dynamics.store.writer import DEFAULT_FLUSH_SECONDS, RunWriter

    side = _Side(args.side)
    w = RunWriter(
        args.out,
        tasks=TASKS,
        resume_step=args.resume_step,
        overwrite=args.overwrite,
        flush_seconds=args.flush_seconds or DEFAULT_FLUSH_SECONDS,
    )
    for step in range(args.start + 1, args.start + args.steps + 1):
        w.log_many(step, "loss", [writer_value(step, t) for t in TASKS], TASKS)
        w.log(step, "lr", 1e-3)
        side.done(step)
        time.sleep(args.step_seconds)
    w.close()


def _classifier():
    import torch
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.head(self.body(x))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    return Classifier()


def loop_job(args: argparse.Namespace) -> None:
    import resource
    import signal

    import torch

    import dynamics

    rank = 0
    if args.ddp:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
    _pid_file(args.side, rank)
    side = _Side(args.side if rank == 0 else None)
    torch.manual_seed(0)
    model = _classifier()
    trained = torch.nn.parallel.DistributedDataParallel(model) if args.ddp else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    probe = {
        "x": torch.randn(12, 8, generator=gen),
        "labels": torch.arange(12) % 3,
        "task_ids": torch.arange(12) % 3,
    }
    extra = {} if args.sync_every is None else {"sync_every": args.sync_every}
    if args.probe_every is not None:
        extra["probe_every"] = args.probe_every
    rec = dynamics.LoopRecorder(trained, tasks=TASKS, out_dir=args.out, probe_batch=probe, **extra)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over RLIMIT_FSIZE fails (EFBIG) instead
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    full_since, freed_at = None, None
    for step in range(1, args.steps + 1):
        if freed_at is not None and step > freed_at + args.steps_after_free:
            break
        if step == args.disk_full_at:
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))  # every file write now fails
            full_since = time.monotonic()
            print("disk full", flush=True)
        if full_since is not None and time.monotonic() - full_since >= args.disk_full_for:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            full_since, freed_at = None, step
            print(f"disk free at step {step}", flush=True)
        x = torch.randn(6, 8, generator=gen)
        batch = {
            "x": x,
            "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(),
            "task_ids": torch.arange(6) % 3,
        }
        trained(**batch)["loss"].backward()
        with rec.update(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        side.done(step)
        print(f"step {step}", flush=True)
        time.sleep(args.stall_seconds if step == args.stall_after else args.step_seconds)
    rec.record_scores({t: {"accuracy": 0.5} for t in TASKS})
    rec.close()
    print("finished", flush=True)
    if args.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def hf_job(args: argparse.Namespace) -> None:
    from transformers import TrainerCallback

    import dynamics
    from tests.integrations.hook_helpers import ItemDataset, trainer_for
    from tests.tiny_models import llama_batch, tiny_llama

    side = _Side(args.side)

    class Slow(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # type: ignore[no-untyped-def]
            stalled = state.global_step == args.stall_after  # a hung collective, a long save
            time.sleep(args.stall_seconds if stalled else args.step_seconds)  # a bigger model's step time

        def on_step_end(self, a, state, control, **kw):  # type: ignore[no-untyped-def]
            side.done(state.global_step)  # added after dynamics' callback: runs after its end_step

    batch, task_ids = llama_batch(n=48, seq_len=10, seed=0)
    trainer = trainer_for(
        tiny_llama(), ItemDataset(batch, task_ids), Path(args.out), max_steps=args.steps, logging_steps=500
    )
    dynamics.attach(trainer, tasks=TASKS)  # the two lines, at the defaults
    trainer.add_callback(Slow())
    trainer.train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["writer", "loop", "hf"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--side", default=None)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--start", type=int, default=0, help="writer: the step it resumes after")
    parser.add_argument("--resume-step", type=int, default=None)
    parser.add_argument("--flush-seconds", type=float, default=None)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--stall-after", type=int, default=-1, help="the step after this one stalls")
    parser.add_argument("--stall-seconds", type=float, default=600.0)
    parser.add_argument("--sync-every", type=int, default=None)
    parser.add_argument("--probe-every", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--disk-full-at", type=int, default=-1)
    parser.add_argument("--steps-after-free", type=int, default=10)
    parser.add_argument("--disk-full-for", type=float, default=float("inf"), help="seconds, then freed")
    args = parser.parse_args(argv)
    {"writer": writer_job, "loop": loop_job, "hf": hf_job}[args.kind](args)


if __name__ == "__main__":
    main()
