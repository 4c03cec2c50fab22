"""The per-example gradient Gram matrix ``K_ij = <g_i, g_j>`` over a chosen parameter set.

``g_i`` is the gradient of example ``i``'s own loss ``l_i`` (:mod:`.losses`). :func:`compute_gram`
takes the per-example losses of ONE forward pass that ran inside a :class:`~.capture.Capture`, and

* ``method="auto"`` (fast path): one backward pass of ``sum_i l_i`` to the captured layer outputs
  (and a second one, with distinct per-example weights, that verifies the example axis of every
  captured output, :mod:`.example_axis`, or discovers the example of each row of a call that sees
  several examples' rows at once, :mod:`.row_map`); Linear/Embedding/Conv weights by ghost products or
  materialised per-example gradients, whichever is cheaper per parameter (:mod:`.products`);
  normalisation layers by closed forms (:mod:`.layer_rules`), parameters used elementwise (scales,
  added or expanded tensors) by theirs (:mod:`.elementwise_uses`); other parameters by module-local
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
from typing import Any

import torch
from torch import Tensor, nn

from dynamics.signals.axis_cache import AxisMemo, Verdict
from dynamics.signals.backward import backward_to_outputs
from dynamics.signals.cache_key import call_key, forward_structure
from dynamics.signals.calls import ModuleCall
from dynamics.signals.capture import Capture
from dynamics.signals.elementwise_uses import elementwise_per_example_grads, matmul_factor
from dynamics.signals.gram_exact import per_example_grads
from dynamics.signals.layer_kinds import module_kind
from dynamics.signals.layer_rules import rule_kind, rule_per_example_grads
from dynamics.signals.module_grads import module_per_example_grads
from dynamics.signals.plan import NO_GRAD_MESSAGE, Plan, plan
from dynamics.signals.products import (
    Factored,
    GramBuilder,
    conv_bias_grad,
    conv_weight_factor,
    embedding_factor,
    factor_by_example,
    linear_bias_grad,
    linear_weight_factor,
    transposed_linear_weight_factor,
)
from dynamics.signals.row_map import reusable, row_view, sum_rows
from dynamics.signals.sharding import can_gather, gathered, is_sharded

METHODS = ("auto", "ghost", "materialize", "exact")


@dataclass
class GramResult:
    """``gram`` (n x n float64), ``example_dots`` (n,) ``<g_i, d>`` or None, ``paths``: param ids by path.

    ``paths["left_out"]``: sharded parameters that only exact autograd could cover; they are not
    part of ``gram`` (the exact path would need whole parameters and a per-example backward
    through the sharded model).
    """

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

    Steps: :func:`~.plan.plan` the paths; look up known verdicts; one backward pass to the captured
    outputs (two without verdicts); factored products; module-local gradients; exact autograd for
    the rest.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if capture is None and method != "exact":
        raise ValueError("the fast path needs the forward pass to run inside a Capture")
    n = losses.shape[0]
    builder = GramBuilder(n, losses.device, "auto" if method in ("auto", "exact") else method)
    direction = direction or {}
    paths: dict[str, list[int]] = {"rule": [], "module": [], "exact": [], "unused": [], "left_out": []}
    freed = False
    if capture is None:
        if losses.sum().grad_fn is None:
            raise ValueError(NO_GRAD_MESSAGE)
        exact_params = list(params)
    else:
        pl = plan(capture, losses.sum(), n, allow_fast=method != "exact")
        paths["unused"] = [id(p) for p in pl.unused]
        known, store = _known_verdicts(memo, capture, pl)
        keep_graph = _may_fall_back(capture, pl, known, recompute)
        nonlocal_calls, verdicts = backward_to_outputs(
            losses, pl.calls_needed, keep_graph, known, one_pass=capture.one_backward, rows=pl.rows
        )
        if store is not None and verdicts is not None:
            store({call_key(c, capture): v for c in pl.calls_needed if reusable(v := verdicts[id(c)])})
        exact_params = list(pl.exact)
        exact_params += _add_factored(builder, capture, pl, params, nonlocal_calls, direction)
        exact_params += _add_elementwise(builder, capture, pl, params, nonlocal_calls, direction, paths)
        exact_params += _add_modules(builder, capture, pl, nonlocal_calls, direction, paths)
        for calls in capture.calls.values():
            for c in calls:
                c.dys = []  # free the output gradients early
        for uses in pl.elementwise.values():
            for u in uses:
                u.dys = []
        freed = not keep_graph
    _add_exact(builder, losses, exact_params, capture, direction, paths, recompute if freed else None, freed)
    gram = builder.finish()
    paths["ghost"] = builder.paths["ghost"]
    paths["materialized"] = builder.paths["materialized"]
    return GramResult(gram, builder.dots if direction else None, paths, builder.eps)


def _known_verdicts(
    memo: AxisMemo | None, capture: Capture, pl: Plan
) -> tuple[dict[int, Verdict] | None, Callable[[dict[Any, Verdict]], None] | None]:
    """Verdicts by ``id(call)`` from an earlier probe of the same inputs (None unless all are known),
    and how to store new ones (None without a memo)."""
    if memo is None:
        return None, None
    structure, modules = forward_structure(capture, pl)
    known = None
    cached = memo.lookup(structure, modules)
    if cached is not None:
        keys = {id(c): call_key(c, capture) for c in pl.calls_needed}
        if all(k in cached for k in keys.values()):
            known = {cid: cached[k] for cid, k in keys.items()}
    return known, lambda verdicts: memo.store(structure, modules, verdicts)


def _may_fall_back(
    capture: Capture, pl: Plan, known: dict[int, Verdict] | None, recompute: Callable[[], Tensor] | None
) -> bool:
    """Whether the graph must outlive the backward pass: the exact fallback may need it.

    It is freed during the backward (less memory) only when the known verdicts send nothing to
    the exact path (a known row map passes; unknown ones, e.g. of a row-mapped call, may fail) and
    a module re-run that fails its check can have the losses recomputed.
    """
    return (
        bool(pl.exact)
        or known is None
        or any(v is False for v in known.values())
        or (
            recompute is None
            and any(not (rule_kind(m) and _direct(m, ps, capture)) for m, ps in pl.module.values())
        )
    )


def _factors_of(
    capture: Capture, p: Tensor, calls: list[ModuleCall], n: int
) -> tuple[list[Factored], list[Tensor]]:
    """The factored terms (weights, embeddings) and dense terms (biases) of ``g_i(p)`` over ``calls``."""
    factors, dense = [], []
    for call in calls:
        names = capture.names_in(call.module, p)
        c = call if call.row_map is None else row_view(call)  # per-row terms, grouped by example below
        fs, ds = _call_terms(c, names)
        if call.row_map is not None:
            fs = [factor_by_example(f, call.row_map, n) for f in fs]
            ds = [sum_rows(d, call.row_map, n) for d in ds]
        factors += fs
        dense += ds
    return factors, dense


def _call_terms(c: ModuleCall, names: list[str]) -> tuple[list[Factored], list[Tensor]]:
    """One call's factored and dense terms, per example (per row for a :func:`~.row_map.row_view`)."""
    factors, dense = [], []
    if c.kind in ("linear", "linear_t"):
        if "weight" in names:
            factors.append(
                linear_weight_factor(c) if c.kind == "linear" else transposed_linear_weight_factor(c)
            )
        if "bias" in names:
            dense.append(linear_bias_grad(c))
    elif c.kind == "conv":
        if "weight" in names:
            factors.append(conv_weight_factor(c))
        if "bias" in names:
            dense.append(conv_bias_grad(c))
    else:
        factors.append(embedding_factor(c))
    return factors, dense


def _add_factored(
    builder: GramBuilder,
    capture: Capture,
    pl: Plan,
    params: list[Tensor],
    nonlocal_calls: set[int],
    direction: dict[int, Tensor],
) -> list[Tensor]:
    """Add the factored parameters' blocks; returns those whose calls failed the axis check."""
    by_id = {id(p): p for p in params}
    failed = []
    for pid, calls in pl.factored.items():
        p = by_id[pid]
        if any(id(c) in nonlocal_calls for c in calls):
            failed.append(p)
            continue
        factors, dense = _factors_of(capture, p, calls, builder.n)
        builder.add_factored(pid, capture.shape(p), factors, dense, direction.get(pid))
    return failed


def _add_elementwise(
    builder: GramBuilder,
    capture: Capture,
    pl: Plan,
    params: list[Tensor],
    nonlocal_calls: set[int],
    direction: dict[int, Tensor],
    paths: dict[str, list[int]],
) -> list[Tensor]:
    """Add the parameters used elementwise (closed forms, :mod:`.elementwise_uses`); returns the failures."""
    by_id = {id(p): p for p in params}
    failed = []
    for pid, uses in pl.elementwise.items():
        if any(id(u) in nonlocal_calls for u in uses):
            failed.append(by_id[pid])
            continue
        if uses[0].matmul:  # factored like a Linear layer's weight: ghost or materialised products
            factors = [matmul_factor(u, builder.n) for u in uses]
            builder.add_factored(pid, capture.shape(by_id[pid]), factors, [], direction.get(pid))
            continue
        try:
            grads = elementwise_per_example_grads(uses, capture.shape(by_id[pid]), builder.n)
        except RuntimeError:  # a shared chain's backward node could not be called: exact autograd
            failed.append(by_id[pid])
            continue
        builder.add_dense(grads, direction.get(pid))
        paths["rule"].append(pid)
    return failed


def _add_modules(
    builder: GramBuilder,
    capture: Capture,
    pl: Plan,
    nonlocal_calls: set[int],
    direction: dict[int, Tensor],
    paths: dict[str, list[int]],
) -> list[Tensor]:
    """Add the parameters of the module path (closed-form rules, module-local vjp); returns the failures."""
    failed: list[Tensor] = []
    n = builder.n
    for module, ps in pl.module.values():
        calls = pl.live_calls(capture, module)
        if any(id(c) in nonlocal_calls for c in calls):
            failed.extend(ps)
            continue
        grads: list[Tensor] | None
        if rule_kind(module) and _direct(module, ps, capture):
            names = [capture.names_in(module, p)[0] for p in ps]
            shapes = [capture.shape(p) for p in ps]
            grads = rule_per_example_grads(
                module, module_kind(module), ps, calls, n, names=names, shapes=shapes
            )
            path = "rule"
        elif any(c.row_map is not None for c in calls):  # a re-run splits batch-first inputs only
            failed.extend(ps)
            continue
        else:
            names = [capture.param_name(module, p) for p in ps]
            others = [(k, q) for k, q in module.named_parameters() if k not in names]
            if not can_gather([*ps, *(q for _, q in others)]):
                failed.extend(ps)
                continue
            if any(is_sharded(q) for q in [*ps, *(q for _, q in others)]):
                # a sharded module's re-run needs all its parameters whole (a collective, same on every rank)
                with gathered([*ps, *(q for _, q in others)]) as whole:
                    fixed = {k: w for (k, _), w in zip(others, whole[len(ps) :], strict=True)}
                    grads = module_per_example_grads(module, names, whole[: len(ps)], calls, n, fixed)
            else:
                grads = module_per_example_grads(module, names, ps, calls, n)
            path = "module"
        if grads is None:  # the per-example re-run did not reproduce the module's outputs
            failed.extend(ps)
            continue
        for p, g in zip(ps, grads, strict=True):
            builder.add_dense(g, direction.get(id(p)))
            paths[path].append(id(p))
    return failed


def _add_exact(
    builder: GramBuilder,
    losses: Tensor,
    params: list[Tensor],
    capture: Capture | None,
    direction: dict[int, Tensor],
    paths: dict[str, list[int]],
    recompute: Callable[[], Tensor] | None,
    freed: bool,
) -> None:
    """Exact per-example autograd for ``params``.

    A sharded parameter is differentiated through the tensor its module used in the forward (the
    unsharded FSDP2 parameter; the ZeRO-3 parameter itself); one without such a leaf (FSDP1's flat
    parameter views) is left out of ``K`` (``paths["left_out"]``).
    """
    targets = []
    for p in params:
        leaf = capture.leaf_of(p) if capture is not None and is_sharded(p) else p
        if leaf is None:
            paths["left_out"].append(id(p))
        else:
            targets.append((p, leaf))
    if not targets:
        return
    if freed:
        assert recompute is not None, "the graph was freed although a parameter needs exact autograd"
        losses = recompute()  # rare: a module re-run failed after the graph was freed
    for (p, _), g in zip(targets, per_example_grads(losses, [leaf for _, leaf in targets]), strict=True):
        builder.add_dense(g.reshape(builder.n, *capture_shape(capture, p)), direction.get(id(p)))
        paths["exact"].append(id(p))


def capture_shape(capture: Capture | None, p: Tensor) -> torch.Size:
    return p.shape if capture is None else capture.shape(p)


def _direct(module: nn.Module, ps: list[Tensor], capture: Capture) -> bool:
    """Whether the module owns every parameter in ``ps`` itself (the closed-form rules need that)."""
    return all(capture.names_in(module, p) for p in ps)
