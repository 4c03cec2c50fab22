"""Top Hessian eigenvalue of the probe-batch loss by Lanczos on Hessian-vector products.

For the batch training loss ``L(theta)`` and the chosen parameters, ``H v = d/dtheta <grad L, v>``
(one double-backward pass, Pearlmutter's trick); ``H`` is never formed. Lanczos builds an
orthonormal Krylov basis ``q_1, q_2, ...`` (``q_1`` random, seeded; full re-orthogonalisation)
and the tridiagonal ``T_k = Q_k^T H Q_k``; its largest eigenvalue (Ritz value) converges to
``lambda_max(H)`` from below. Iteration stops when the Ritz value changes by at most
``tol * |lambda|`` between two steps, when the Krylov space is exhausted (exact then), or after
``max_iter`` products. Memory: ``max_iter`` vectors the size of the chosen parameters.

The returned value is the largest *algebraic* eigenvalue (the sharpness direction), not the
largest in magnitude.

Double backward must exist for every op of the model. Fused attention kernels (SDPA's
flash/efficient kernels, flash-attention) and autograd Functions marked ``once_differentiable`` do
not have it. They leave an error node in the gradient's graph, which is looked for before the
first product, so the result is a clear error (load such models with
``attn_implementation="eager"``), never a silently truncated Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_NO_DOUBLE_BACKWARD = (
    "Hessian-vector products need a double backward through every op of the model, and one op here "
    'has none{attn}. Load the model with attn_implementation="eager" (e.g. '
    "AutoModel.from_pretrained(..., attn_implementation='eager') or model.set_attn_implementation('eager')), "
    "replace custom autograd Functions marked once_differentiable, or call probe(..., hessian=False). "
    "Original error: {err}"
)


@dataclass
class HessianTop:
    """``value``: top eigenvalue estimate; ``iters``: Hessian-vector products used; ``converged``."""

    value: float
    iters: int
    converged: bool


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


_ERROR_NODES = frozenset({"Error", "DelayedError", "NotImplemented"})


def _first_error_node(tensors: Sequence[Tensor]) -> str | None:
    """Name of a node that raises when differentiated, found in the graph of ``tensors``."""
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[int] = set()
    keep = []  # node objects stay alive while their ids are in `seen`
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        name = type(node).__name__
        if name in _ERROR_NODES:
            return name
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return None


def _attn_hint(model: torch.nn.Module | None) -> str:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl and impl != "eager":
        return f" (the model's attention implementation is {impl!r})"
    return ""


def hessian_top_eigenvalue(
    loss: Callable[[], Tensor] | Tensor,
    params: Sequence[Tensor],
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    model: torch.nn.Module | None = None,
) -> HessianTop:
    """Largest eigenvalue of the Hessian of ``loss`` w.r.t. ``params`` (see module docstring).

    ``loss`` is a scalar with its graph, or a closure returning one. ``model`` only improves the
    error message when an op has no double backward.
    """
    if max_iter < 1:
        raise ValueError(f"hessian_iters must be >= 1, got {max_iter}")
    if tol <= 0:
        raise ValueError(f"hessian_tol must be > 0, got {tol}")
    params = list(params)
    value = loss() if callable(loss) else loss
    grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    pairs = [(g, p) for g, p in zip(grads, params, strict=True) if g is not None and g.requires_grad]
    bad = _first_error_node([g for g, _ in pairs])
    if bad is not None:
        # An op without double backward leaves an error node in the gradient's graph. Autograd
        # raises only if that node is reached, and it may not be: the Hessian would then be
        # silently wrong (too small), so refuse here.
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(attn=_attn_hint(model), err=f"graph node {bad}"))
    if not pairs:
        return HessianTop(0.0, 0, True)  # the loss is (at most) linear in these parameters

    index = {id(p): k for k, p in enumerate(params)}
    sel_idx = [index[id(p)] for _, p in pairs]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        try:
            out = torch.autograd.grad(
                [g for g, _ in pairs],
                params,
                grad_outputs=[v[k] for k in sel_idx],
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError as err:
            raise RuntimeError(_NO_DOUBLE_BACKWARD.format(attn=_attn_hint(model), err=err)) from err
        return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(out, params, strict=True)]

    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
    norm = math.sqrt(_dot(q, q))
    q = [x / norm for x in q]
    basis: list[list[Tensor]] = [q]
    alphas: list[float] = []
    betas: list[float] = []
    prev = math.nan
    theta = math.nan
    for k in range(max_iter):
        w = hvp(basis[-1])
        alpha = _dot(w, basis[-1])
        alphas.append(alpha)
        # full re-orthogonalisation (twice is enough) keeps the Ritz values free of ghosts
        for _ in range(2):
            for b in basis:
                c = _dot(w, b)
                w = [x - c * y for x, y in zip(w, b, strict=True)]
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        theta = float(torch.linalg.eigvalsh(tri)[-1])
        beta = math.sqrt(max(_dot(w, w), 0.0))
        scale = max(abs(theta), max(abs(a) for a in alphas), 1e-300)
        if beta <= 1e-10 * scale:
            return HessianTop(theta, k + 1, True)  # invariant subspace: Ritz value is exact
        if k > 0 and abs(theta - prev) <= tol * abs(theta):
            return HessianTop(theta, k + 1, True)
        prev = theta
        betas.append(beta)
        basis.append([x / beta for x in w])
    return HessianTop(theta, max_iter, False)
