"""torch.distributed helpers for the recorder: who writes, how per-task sums are reduced, and
whether the parameter layout (tensor parallelism, FSDP1 flat parameters) rules probes out.

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
    """Why a probe cannot see the parameters it needs on this rank, or ``None`` if it can.

    FSDP2 (``fully_shard``), FSDP1 with ``use_orig_params=True`` and DeepSpeed ZeRO-3 are fine: the
    probe's products need only the layers' inputs and output gradients, whole on every rank, and
    the few parameters a module-local re-run or exact autograd needs are gathered (or left out,
    named in the coverage). Every rank must then run the probe on the same batch (its forward and
    backward are collectives). Not supported (a reason is returned): tensor / sequence parallelism
    (DTensor parameters without FSDP2, or sharded along another dimension) and FSDP1 with flat
    parameters (``use_orig_params=False``). See :func:`dynamics.signals.sharding.unsupported_reason`.
    ``trainer`` is accepted for callers that pass it; the model decides.
    """
    if model is None:
        return None
    from dynamics.signals.sharding import unsupported_reason

    return unsupported_reason(model)
