"""A plain loop over an FSDP1-wrapped tiny Llama (torchrun, gloo, CPU) or, unsharded, in one process.

    torchrun --nproc_per_node 2 tests/integrations/fsdp1_worker.py OUT      # FSDP1, 2 ranks
    python tests/integrations/fsdp1_worker.py OUT                           # the same global batches

Each step's global batch (8 examples) is split over the ranks; the loss is normalised by the
global token count, so both runs take the same steps. The HF Trainer cannot run FSDP on CPU
(accelerate falls back to DDP with ``use_cpu``), hence a plain loop.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import dynamics
from tests.tiny_models import llama_batch, tiny_llama

TASKS = ["a", "b", "c"]
STEPS, GLOBAL = 3, 8


def main(out: str) -> None:
    sharded = "RANK" in __import__("os").environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model = tiny_llama(seed=0)
    if sharded:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    rec = dynamics.LoopRecorder(model, tasks=TASKS, out_dir=out, probe_every=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    per_rank = GLOBAL // world
    for k in range(STEPS):
        batch, ids = llama_batch(n=GLOBAL, seed=k)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        mine = {name: v[rows] for name, v in batch.items()}
        out_ = model(**mine, task_ids=ids[rows])
        # global token-mean loss: the local token sum over all ranks' target tokens
        targets = (batch["labels"][:, 1:] != -100).sum()
        local = (mine["labels"][:, 1:] != -100).sum()
        (out_.loss * local / targets * world).backward()  # FSDP averages gradients over ranks
        with rec.update(opt):
            opt.step()
        opt.zero_grad()
    rec.close()
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
