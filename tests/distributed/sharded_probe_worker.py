"""One rank of sharded probes: ``torchrun --nproc_per_node 2 sharded_probe_worker.py --mode fsdp2 --out F``.

Every rank builds the same seeded float64 model, shards it (FSDP2 ``fully_shard`` per decoder /
encoder layer and on the root, FSDP1 with ``use_orig_params=True``, or DeepSpeed ZeRO-3), and calls
``dynamics.probe`` directly on the same batch, twice (the first probe verifies the example axis, the
second reuses the verdicts). Rank 0 writes every case's rows, coverage and Gram matrix as JSON to
``--out``; the test compares them with probes of the unsharded model in one process.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from dynamics import probe
from tests import tiny_models as tm

TASKS = ["a", "b", "c"]
# (model, method, reshard_after_forward) per mode; FSDP1 and ZeRO-3 have no reshard switch here
CASES = {
    "fsdp2": [
        ("llama", "auto", True),
        ("llava", "auto", True),
        ("llava", "auto", False),
        ("llava", "exact", True),
    ],
    "fsdp1": [("llama", "auto", True), ("llava", "auto", True)],
    "zero3": [("llama", "auto", True), ("llava", "auto", True)],
}


def case_name(model: str, method: str, reshard: bool) -> str:
    return f"{model}-{method}-{'reshard' if reshard else 'keep'}"


def model_and_batch(name: str):
    """The seeded float64 model and probe batch both the ranks and the single-process reference use."""
    if name == "llava":
        batch, task_ids = tm.llava_batch(n=6, text_len=6, n_tasks=3, seed=1, dtype=torch.float64)
        return tm.tiny_llava(seed=0, dtype=torch.float64), batch, task_ids
    batch, task_ids = tm.llama_batch(n=6, seq_len=10, n_tasks=3, seed=1)
    return tm.tiny_llama(seed=0, dtype=torch.float64), batch, task_ids


def units(model) -> list:
    """The decoder (and vision encoder) layers: one FSDP unit each, as the common recipes wrap them."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]


def shard(model, mode: str, reshard: bool):
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in units(model):
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        return model
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(m) for m in units(model)})
        return FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    if mode == "zero3":
        import sys

        import deepspeed
        import deepspeed.comm.torch  # noqa: F401 - the module, not the torch attribute of deepspeed.comm

        # its CPU shared-memory collectives need a C++ build (minutes); gloo's suffice here
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        return engine.module
    raise ValueError(f"unknown mode {mode!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=sorted(CASES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {}
    for name, method, reshard in CASES[args.mode]:
        model, batch, task_ids = model_and_batch(name)
        model = shard(model, args.mode, reshard)
        results = []
        for _ in range(2):
            res = probe(model, batch, task_ids=task_ids, tasks=TASKS, method=method)
            results.append({"rows": res.to_rows(0), "coverage": res.coverage, "gram": res.gram.tolist()})
        out[case_name(name, method, reshard)] = results
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
