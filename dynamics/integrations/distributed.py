"""torch.distributed helpers for the recorder: who writes, how per-task sums are reduced, and
whether parameters are sharded (FSDP, DeepSpeed ZeRO-3) so that probes must be switched off.

Every function works without an initialised process group (single process), so the same code
path serves a laptop run and a torchrun job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "reduce_device",
    "all_reduce_sum",
    "sharding_reason",
    "unwrap_model",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 is the only process that writes the run store."""
    return rank() == 0


def reduce_device(fallback: torch.device | None = None) -> torch.device:
    """The device a collective on this process group needs: CUDA for NCCL, CPU for gloo.

    Without a process group, ``fallback`` (the device the accumulators already live on) or CPU.
    """
    if is_distributed():
        backend = str(dist.get_backend()).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if "gloo" in backend or not torch.cuda.is_available():
            return torch.device("cpu")
    return fallback if fallback is not None else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (a collective: every rank must call it, in the same order).

    Returns a new tensor on the same device as ``tensor``; a no-op copy without a process group.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    device = reduce_device(tensor.device)
    out = tensor.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP1 / DeepSpeed wrappers (PEFT is left to the loss
    module, which knows its base model): what the loss kind is resolved from."""
    for _ in range(16):  # wrappers of wrappers; bounded against cycles
        name = type(model).__name__
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and (
            isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            or name in ("FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine")
        ):
            model = inner
            continue
        break
    return model


def sharding_reason(model: nn.Module | None, trainer: object | None = None) -> str | None:
    """Why a probe cannot see whole parameters on this rank, or ``None`` if it can.

    FSDP (1 and 2) and DeepSpeed ZeRO-3 keep only a shard of every parameter on each rank: a
    per-example gradient computed locally is a shard too, so every inner product (the Gram matrix,
    gradient norms, cosines) would silently be wrong. ZeRO-1/2 shard only optimizer state and
    gradients after reduction, so parameters are whole and probes are exact.
    """
    if trainer is not None:
        if getattr(trainer, "is_fsdp_enabled", False):
            return "parameters are sharded by FSDP"
        if getattr(trainer, "is_deepspeed_enabled", False):
            plugin = getattr(
                getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None
            )
            if getattr(plugin, "zero_stage", None) == 3:
                return "parameters are partitioned by DeepSpeed ZeRO-3"
    if model is None:
        return None
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return "parameters are sharded by FSDP"
    for p in model.parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            return "parameters are partitioned by DeepSpeed ZeRO-3"
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return "parameters are sharded DTensors (FSDP2 / tensor parallel)"
        break  # one parameter is enough: sharding wraps all of them alike
    return None
