"""Recipe: training dynamics in a DDP job launched with torchrun (HF Trainer; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 hooks/torchrun_ddp.py --out runs/ddp --steps 20
    python hooks/torchrun_ddp.py --out runs/single --steps 20      # the same global batches, 1 process

Nothing DDP-specific is needed in the script: ``dynamics.attach`` runs on every rank, per-task
loss sums are all-reduced over ranks (so they are the losses of the global batch), rank 0 probes
and writes the run store, and no rank waits on a collective the others skip. ``--global-batch-size``
is split over the ranks, so the two commands above train on the same global batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling recipe, when run as a script

from hf_trainer import TASKS, MultiTaskData, build_model  # noqa: E402


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="runs/torchrun_ddp", help="Trainer output_dir (store in <out>/dynamics)"
    )
    parser.add_argument("--model", choices=["llama", "llava"], default="llama")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--global-batch-size", type=int, default=8, help="examples per optimizer step, all ranks"
    )
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--probe-size", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history", default=None, help="write each rank's log history to <dir>/rank<r>.json")
    args = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    import dynamics

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, rest = divmod(args.global_batch_size, world * args.grad_accum)
    if rest or per_device < 1:
        raise SystemExit(
            f"--global-batch-size {args.global_batch_size} must be a multiple of world size x grad accum"
        )
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        ddp_backend="gloo" if world > 1 and not cuda else None,
        train_sampling_strategy="sequential",  # the same global batches for any world size
        seed=args.seed,
        disable_tqdm=True,
    )
    torch.manual_seed(args.seed)
    data = MultiTaskData(args.global_batch_size * args.steps, images=args.model == "llava", seed=args.seed)
    trainer = Trainer(model=build_model(args.model), args=training_args, train_dataset=data)
    callback = dynamics.attach(
        trainer, tasks=TASKS, probe_every=args.probe_every, probe_size=args.probe_size,
        tags={"world_size": world, "seed": args.seed},
    )  # fmt: skip
    trainer.train()
    callback.close()
    if args.history:
        import json

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        Path(args.history).mkdir(parents=True, exist_ok=True)
        record = {"log_history": trainer.state.log_history, "probes_run": callback.recorder.prober.n_run}
        (Path(args.history) / f"rank{rank}.json").write_text(json.dumps(record))
    if trainer.is_world_process_zero():
        print(f"run store: {callback.run_dir}")
    if torch.distributed.is_initialized():
        # Leave together and tear the group down before exit: otherwise gloo aborts a rank at
        # interpreter shutdown now and then (torch 2.13, with or without dynamics attached).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return callback.run_dir


if __name__ == "__main__":
    main()
