"""Parameters sharded across ranks (FSDP2 DTensors, FSDP1 flat parameters, DeepSpeed ZeRO-3 partitions).

The probe's products need no parameter values at all (:mod:`.capture`); only a module-local
re-run (:mod:`.module_grads`) needs whole parameters, and :func:`gathered` provides them for the
few parameters it covers: ``DTensor.full_tensor()`` for FSDP2, ``deepspeed.zero.GatheredParameters``
for ZeRO-3. Both are collectives: every rank probes the same batch with the same plan, so every
rank gathers the same parameters in the same order. Exact per-example autograd through a sharded
model is not attempted; its parameters are left out of ``K`` and named in the coverage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from torch import Tensor


def is_dtensor(p: Tensor) -> bool:
    return any(c.__name__ == "DTensor" for c in type(p).__mro__)


def is_zero3(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` holds only this rank's shard (FSDP2, FSDP1's flat parameter, ZeRO-3)."""
    return is_dtensor(p) or is_zero3(p) or bool(getattr(p, "_is_flat_param", False))


def can_gather(params: Sequence[Tensor]) -> bool:
    """Whether :func:`gathered` can make these parameters whole (not an FSDP1 flat parameter)."""
    return not any(getattr(p, "_is_flat_param", False) for p in params)


@contextmanager
def gathered(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Whole (detached) values of ``params`` for the duration of the block; a collective if sharded.

    Unsharded parameters are handed through. Raises ValueError for a shard it cannot gather
    (an FSDP1 flat parameter); the caller then treats the parameters as not covered.
    """
    params = list(params)
    if not any(is_sharded(p) for p in params):
        yield [p.detach() for p in params]
        return
    zero3 = [p for p in params if is_zero3(p)]
    if not can_gather(params):
        raise ValueError("an FSDP1 flat parameter cannot be gathered on its own")
    if zero3:
        import deepspeed  # present wherever ZeRO-3 parameters exist

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield [p.detach() for p in params]
        return
    yield [cast(Any, p.detach()).full_tensor() if is_dtensor(p) else p.detach() for p in params]
