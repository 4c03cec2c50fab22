"""Per-example gradients of a module's parameters from its captured calls (module-local, exact).

For a recorded call ``y = f(theta, x)`` of a module whose examples do not interact, and the output
gradient ``dy = dL/dy`` captured in the probe's backward pass (row ``i`` is ``d l_i / d y_i``),

    g_i(theta) = (d y_i / d theta)^T dy_i,

a vector-Jacobian product of this module alone. It is computed for all examples at once with
``torch.func.vmap`` over ``torch.func.vjp`` of ``torch.func.functional_call`` (each example is fed
as a batch of one, so module code that reads ``x.shape[0]`` keeps working), and with a plain loop
over examples where the module's code cannot be vmapped. Input tensors whose first dimension is
not ``n`` are shared by all examples (e.g. broadcast position ids). Works for any module: norms,
convolutions, embeddings with extra parameters, and ancestors re-run for a broadcast child.
That split of the inputs is a guess from shapes, so each re-run must reproduce the recorded
outputs (:func:`~.example_axis.reproduces`); where it does not, or where the module cannot be run
one example at a time at all (e.g. a vision tower fed patches flattened across images), the result
is None and the caller falls back to exact autograd.
The parameters are passed as detached aliases, so ``p.grad`` and the module are left untouched.
``fixed`` passes whole values for the module's other parameters (gathered under sharding, where
the registered ones are shards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynamics.signals.calls import ModuleCall, flat_leaves
from dynamics.signals.example_axis import reproduces


def call_per_example_grads(
    module: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    call: ModuleCall,
    n: int,
    fixed: Mapping[str, Tensor] | None = None,
) -> list[Tensor] | None:
    """``[G_p]`` (each ``(n, *p.shape)``) for one call, by vmapped vjp or, failing that, a loop.

    None when the per-example re-run does not reproduce the recorded outputs or fails: then the
    split of the inputs into per-example rows and shared tensors was wrong (:mod:`.example_axis`).
    """
    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    batched = [k for k, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == n]
    xs = tuple(leaves[k] for k in batched)
    dys = tuple(d.detach() for d in call.dys)
    recorded = [call.out_leaves[k] for k in call.grad_idx]
    shape_only = [not call.output_unchanged(k) for k in call.grad_idx]

    def run(theta: dict[str, Tensor], xs_i: Sequence[Tensor], add_batch_dim: bool) -> tuple[Tensor, ...]:
        lv = list(leaves)
        for k, x in zip(batched, xs_i, strict=True):
            lv[k] = x.unsqueeze(0) if add_batch_dim else x
        args, kwargs = tree_unflatten(lv, spec)
        out = torch.func.functional_call(module, {**constants, **theta}, tuple(args), kwargs)
        out_leaves = flat_leaves(out)
        return tuple(out_leaves[k] for k in call.grad_idx)

    def same(outs: Sequence[Any], rows: slice | None) -> bool:
        return len(outs) == len(recorded) and all(
            isinstance(o, Tensor) and reproduces(o, r if rows is None else r[rows], s)
            for o, r, s in zip(outs, recorded, shape_only, strict=True)
        )

    theta = {name: p.detach() for name, p in zip(names, params, strict=True)}
    constants = {k: v for k, v in (fixed or {}).items() if k not in theta}

    def one(
        xs_i: tuple[Tensor, ...], dys_i: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        outs, vjp_fn = torch.func.vjp(lambda th: run(th, xs_i, True), theta)  # type: ignore[misc]
        return vjp_fn(tuple(d.unsqueeze(0) for d in dys_i))[0], tuple(o.squeeze(0) for o in outs)

    try:
        with torch.enable_grad():
            g, outs = torch.func.vmap(one)(xs, dys)
    except Exception:  # noqa: BLE001 - any failure of vmap on user code -> the loop below
        pass
    else:
        return [g[name] for name in names] if same(outs, None) else None

    leaf_theta = {name: p.detach().requires_grad_(True) for name, p in zip(names, params, strict=True)}
    per: list[list[Tensor]] = [[] for _ in names]
    for i in range(n):
        try:
            with torch.enable_grad():
                outs = run(leaf_theta, [x[i : i + 1] for x in xs], False)
                if not same(outs, slice(i, i + 1)):
                    return None
                pairs = [(o, d[i : i + 1]) for o, d in zip(outs, dys, strict=True) if o.requires_grad]
                if pairs:
                    gs = torch.autograd.grad(
                        [o for o, _ in pairs],
                        list(leaf_theta.values()),
                        [d for _, d in pairs],
                        allow_unused=True,
                    )
                else:
                    gs = tuple(torch.zeros_like(p) for p in params)
        except Exception:  # noqa: BLE001 - the module cannot be re-run one example at a time
            return None
        for k, (gk, p) in enumerate(zip(gs, params, strict=True)):
            per[k].append(torch.zeros_like(p) if gk is None else gk)
    return [torch.stack(rows) for rows in per]


def module_per_example_grads(
    module: nn.Module,
    names: Sequence[str],
    params: Sequence[Tensor],
    calls: Sequence[ModuleCall],
    n: int,
    fixed: Mapping[str, Tensor] | None = None,
) -> list[Tensor] | None:
    """Sum over the module's live calls of :func:`call_per_example_grads`; None if any call fails."""
    total: list[Tensor] | None = None
    for call in calls:
        grads = call_per_example_grads(module, names, params, call, n, fixed)
        if grads is None:
            return None
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
    if total is None:
        return [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    return total
