"""What a captured forward did, as a hashable key: the structure part of :mod:`.axis_cache`'s key.

Two forwards with equal keys ran the same code path on the same shapes, so the example-axis
verdicts of one hold for the other (:mod:`.axis_cache` says why).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dynamics.signals.calls import ModuleCall
from dynamics.signals.capture import Capture
from dynamics.signals.elementwise_uses import ElementwiseUse
from dynamics.signals.plan import Plan


def _signature(t: Any) -> Any:
    return (tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else None


def forward_structure(cap: Capture, pl: Plan) -> tuple[Any, dict[int, nn.Module]]:
    """Per hooked module its calls' shapes, and the hooked modules by id.

    The description holds each call's input and output shapes and dtypes, whether it reaches the
    loss, the loss graph's size and each parameter's number of uses.
    """
    per_module = []
    for mid, m in cap.hooked.items():
        calls = tuple(
            (
                tuple(_signature(t) for t, _ in c.in_versions),
                tuple(_signature(c.out_leaves[k]) for k in c.grad_idx),
                c.live,
            )
            for c in cap.calls.get(mid, [])
        )
        per_module.append((mid, type(m), calls))
    uses = tuple(
        (u.key, u.shape, u.dtype, u.x is None, u.matmul) for us in pl.elementwise.values() for u in us
    )
    return (tuple(per_module), pl.graph_size, pl.uses, uses), dict(cap.hooked)


def call_key(call: ModuleCall | ElementwiseUse, cap: Capture) -> tuple[Any, int]:
    """``(id(module), index of the call among that module's calls)``, or ``("elementwise", index)``
    for a use of :mod:`.elementwise_uses`: stable across equal structures."""
    if isinstance(call, ElementwiseUse):
        return ("elementwise", call.key)
    calls = cap.calls[id(call.module)]
    for i, c in enumerate(calls):
        if c is call:
            return (id(call.module), i)
    raise KeyError("call not captured")
