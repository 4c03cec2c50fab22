"""Parameters sharded across ranks (FSDP2 DTensors, FSDP1 flat parameters, DeepSpeed ZeRO-3 partitions).

The probe's products need no parameter values at all (:mod:`.capture`); only a module-local
re-run (:mod:`.module_grads`) needs whole parameters, and :func:`gathered` provides them for the
few parameters it covers: ``DTensor.full_tensor()`` for FSDP2, ``deepspeed.zero.GatheredParameters``
for ZeRO-3. Both are collectives: every rank probes the same batch with the same plan, so every
rank gathers the same parameters in the same order. Exact per-example autograd differentiates
through the tensors the forward used (FSDP2's unsharded parameters, ZeRO-3's gathered ones); under
FSDP1, whose modules use views of a flat parameter that is freed after the first backward, the
parameters only the module-local or exact paths could cover are left out of ``K`` and named in the
coverage (``left_out``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from torch import Tensor, nn


def is_dtensor(p: Tensor) -> bool:
    return any(c.__name__ == "DTensor" for c in type(p).__mro__)


def is_zero3(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_fsdp1(p: Tensor) -> bool:
    """FSDP1's flat parameter, or an original parameter it flattened (``use_orig_params=True``)."""
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` holds only this rank's shard (FSDP2, FSDP1, ZeRO-3)."""
    return is_dtensor(p) or is_zero3(p) or is_fsdp1(p)


def can_gather(params: Sequence[Tensor]) -> bool:
    """Whether :func:`gathered` can make these parameters whole (FSDP1 gathers whole units only)."""
    return not any(is_fsdp1(p) for p in params)


@contextmanager
def gathered(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Whole (detached) values of ``params`` for the duration of the block; a collective if sharded.

    Unsharded parameters are handed through. Raises ValueError for a shard it cannot gather
    (FSDP1's, which its ``summon_full_params`` gathers only a whole unit at a time, outside the
    forward-backward); the caller then treats the parameters as not covered.
    """
    params = list(params)
    if not any(is_sharded(p) for p in params):
        yield [p.detach() for p in params]
        return
    # ZeRO-3 parameters still available after the probe's forward (their module's release runs only
    # when the backward reaches its inputs) are whole already; gathering them again would fail on exit
    zero3 = [p for p in params if is_zero3(p) and getattr(cast(Any, p).ds_status, "name", "") != "AVAILABLE"]
    if not can_gather(params):
        raise ValueError("an FSDP1 parameter cannot be gathered on its own")
    if any(is_zero3(p) for p in params):
        if not zero3:
            yield [p.detach() for p in params]
            return
        import deepspeed  # present wherever ZeRO-3 parameters exist

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield [p.detach() for p in params]
        return
    yield [cast(Any, p.detach()).full_tensor() if is_dtensor(p) else p.detach() for p in params]


def _fsdp2_modules(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _fsdp1_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"]


def unsupported_reason(model: nn.Module, params: Sequence[Tensor] | None = None) -> str | None:
    """Why the probe cannot run on this (sharded) model, or None if it can.

    Supported: whole parameters (single process, DDP, ZeRO-1/2), FSDP2 (``fully_shard``: DTensor
    parameters sharded along dimension 0, unsharded by FSDP for every forward), FSDP1 with
    ``use_orig_params=True``, and DeepSpeed ZeRO-3. Not supported: DTensor parameters without
    FSDP2 or sharded along another dimension (tensor / sequence parallelism: the layers' inputs
    and output gradients are themselves shards), and FSDP1 with flat parameters
    (``use_orig_params=False``: modules use views of one flat parameter per unit, which the
    probe cannot attribute to parameters).
    """
    params = list(model.parameters()) if params is None else list(params)
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        if not _fsdp2_modules(model):
            return "parameters are sharded DTensors without FSDP2 (tensor parallelism is not supported by the probe)"
        for p in dtensors:
            for placement in cast(Any, p).placements:
                name = type(placement).__name__
                if name == "Shard" and placement.dim != 0 or name not in ("Shard", "Replicate"):
                    return (
                        f"a parameter is placed as {placement} (tensor parallelism is not supported by the "
                        "probe; FSDP2 alone shards along dimension 0)"
                    )
    if any(getattr(p, "_is_flat_param", False) for p in params):
        return (
            "parameters are sharded by FSDP1 into flat parameters (use_orig_params=False), which hide "
            "them from the probe; wrap with use_orig_params=True"
        )
    return None
