"""The per-example gradient Gram matrix ``K_ij = <g_i, g_j>`` over a chosen parameter set.

``g_i`` is the gradient of example ``i``'s own loss ``l_i`` (:mod:`.losses`). :func:`compute_gram`
takes the per-example losses of ONE forward pass that ran inside a :class:`~.capture.Capture`, and

* ``method="auto"`` (fast path): one backward pass of ``sum_i l_i`` to the captured layer outputs
  (and a second one, with distinct per-example weights, that verifies the example axis of every
  captured output, :mod:`.example_axis`); Linear/Embedding/Conv weights by ghost products or
  materialised per-example gradients, whichever is cheaper per parameter (:mod:`.products`);
  normalisation layers by closed forms (:mod:`.layer_rules`); other parameters by module-local
  vector-Jacobian products (:mod:`.module_grads`); parameters the fast path cannot prove it covers,
  or whose example axis fails a check, by exact per-example autograd (:mod:`.gram_exact`). See
  :mod:`.capture` for the coverage rules;
* ``"ghost"`` / ``"materialize"``: the same, forcing one product for every factored parameter;
* ``"exact"``: exact per-example autograd for every parameter (the reference; ~n backward passes).

Optionally also ``<g_i, d>`` for a direction ``d`` given per parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dynamics.signals.axis_cache import AxisMemo
from dynamics.signals.capture import (
    Capture,
    backward_to_outputs,
    call_key,
    forward_structure,
    module_kind,
    plan,
)
from dynamics.signals.gram_exact import per_example_grads
from dynamics.signals.layer_rules import rule_kind, rule_per_example_grads
from dynamics.signals.module_grads import module_per_example_grads
from dynamics.signals.products import (
    GramBuilder,
    conv_bias_grad,
    conv_weight_factor,
    embedding_factor,
    linear_bias_grad,
    linear_weight_factor,
)

METHODS = ("auto", "ghost", "materialize", "exact")


@dataclass
class GramResult:
    """``gram`` (n x n float64), ``example_dots`` (n,) ``<g_i, d>`` or None, ``paths``: param ids by path."""

    gram: Tensor
    example_dots: Tensor | None
    paths: dict[str, list[int]] = field(default_factory=dict)
    eps: float = float(torch.finfo(torch.float64).eps)


def compute_gram(
    losses: Tensor,
    params: list[Tensor],
    capture: Capture | None,
    method: str = "auto",
    direction: dict[int, Tensor] | None = None,
    memo: AxisMemo | None = None,
    recompute: Callable[[], Tensor] | None = None,
) -> GramResult:
    """``K`` (and ``<g_i, d>``) from per-example ``losses`` (n,) of a forward run under ``capture``.

    ``capture`` may be None only for ``method="exact"``. ``direction`` maps ``id(param)`` to a tensor
    of the parameter's shape. ``memo`` holds example-axis verdicts of earlier probes of the same
    model and inputs (:mod:`.axis_cache`); with every verdict known, the check's backward pass is
    skipped. ``recompute`` re-runs the forward and returns the losses again (with a new graph).
    Given it, the graph of ``losses`` is freed by the backward pass whenever no verdict sends a
    parameter to exact autograd (with all verdicts known); should a module re-run then fail its
    check, the exact fallback runs on recomputed losses.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if capture is None and method != "exact":
        raise ValueError("the fast path needs the forward pass to run inside a Capture")
    n = losses.shape[0]
    total = losses.sum()
    fast = method != "exact"
    builder = GramBuilder(n, losses.device, "auto" if method in ("auto", "exact") else method)
    direction = direction or {}

    if fast:
        pl = plan(capture, total, n, allow_fast=True)
    else:
        if total.grad_fn is None:
            raise ValueError(
                "the probe loss does not depend on any parameter that requires grad; "
                "check `params` and that the model's parameters have requires_grad=True"
            )
        pl = None
    paths: dict[str, list[int]] = {"rule": [], "module": [], "exact": [], "unused": []}

    if pl is not None:
        paths["unused"] = [id(p) for p in pl.unused]
        known: dict[int, bool] | None = None
        structure = modules = None
        if memo is not None:
            structure, modules = forward_structure(capture, pl)
            cached = memo.lookup(structure, modules)
            if cached is not None:
                keys = {id(c): call_key(c, capture) for c in pl.calls_needed}
                if all(k in cached for k in keys.values()):
                    known = {cid: cached[k] for cid, k in keys.items()}
        # The exact fallback needs the graph for whatever fails a check; it is freed during the
        # backward (less memory) only when the known verdicts send nothing there and a module
        # re-run that fails its check can have the losses recomputed.
        may_fall_back = (
            bool(pl.exact)
            or known is None
            or not all(known.values())
            or (
                recompute is None
                and any(not (rule_kind(m) and _direct(m, ps)) for m, ps in pl.module.values())
            )
        )
        nonlocal_calls, verdicts = backward_to_outputs(losses, pl.calls_needed, may_fall_back, known)
        if memo is not None and verdicts is not None:
            memo.store(structure, modules, {call_key(c, capture): verdicts[id(c)] for c in pl.calls_needed})
        by_id = {id(p): p for p in params}
        exact_params = list(pl.exact)
        for pid, calls in pl.factored.items():
            p = by_id[pid]
            if any(id(c) in nonlocal_calls for c in calls):
                exact_params.append(p)
                continue
            factors, dense = [], []
            for c in calls:
                m = c.module
                if c.kind == "linear":
                    if m.weight is p:
                        factors.append(linear_weight_factor(c))
                    if getattr(m, "bias", None) is p:
                        dense.append(linear_bias_grad(c))
                elif c.kind == "conv":
                    if m.weight is p:
                        factors.append(conv_weight_factor(c))
                    if getattr(m, "bias", None) is p:
                        dense.append(conv_bias_grad(c))
                else:
                    factors.append(embedding_factor(c))
            builder.add_factored(pid, p.shape, factors, dense, direction.get(pid))
        for module, ps in pl.module.values():
            calls = [c for c in capture.calls.get(id(module), []) if c.live]
            if any(id(c) in nonlocal_calls for c in calls):
                exact_params.extend(ps)
                continue
            kind = module_kind(module)
            if rule_kind(module) and _direct(module, ps):
                grads = rule_per_example_grads(module, kind, ps, calls, n)
                path = "rule"
            else:
                names = [capture.param_name(module, p) for p in ps]
                grads = module_per_example_grads(module, names, ps, calls, n)
                path = "module"
            if grads is None:  # the per-example re-run did not reproduce the module's outputs
                exact_params.extend(ps)
                continue
            for p, g in zip(ps, grads, strict=True):
                builder.add_dense(g, direction.get(id(p)))
                paths[path].append(id(p))
        for calls in capture.calls.values():
            for c in calls:
                c.dys = []  # free the output gradients early
    else:
        exact_params = list(params)

    if exact_params:
        if pl is not None and not may_fall_back:
            assert recompute is not None, "the graph was freed although a parameter needs exact autograd"
            losses = recompute()  # rare: a module re-run failed after the graph was freed
        for p, g in zip(exact_params, per_example_grads(losses, exact_params), strict=True):
            builder.add_dense(g, direction.get(id(p)))
            paths["exact"].append(id(p))

    gram = builder.finish()
    paths["ghost"] = builder.paths["ghost"]
    paths["materialized"] = builder.paths["materialized"]
    has_dir = bool(direction)
    return GramResult(gram, builder.dots if has_dir else None, paths, builder.eps)


def _direct(module, ps: list[Tensor]) -> bool:
    """Whether the module owns every parameter in ``ps`` itself (the closed-form rules need that)."""
    return all(any(p is q for q in module._parameters.values()) for p in ps)
