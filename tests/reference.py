"""Brute-force references for the signals: explicit per-example gradients and dense matrices.

Nothing here imports :mod:`dynamics`. Per-example losses are written out row by row (mask and mean
over each row's supervised tokens), per-example gradients come from a plain loop of
``torch.autograd.grad``, and every signal is computed from the explicit (n x P) gradient matrix:
task gradients as weighted sums of gradient vectors, the empirical Fisher as the dense P x P
matrix ``G^T G / n`` with ``numpy.linalg.eigh``, the noise scale from the sample mean and variance
of the gradient vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out["logits"]
    return out.logits


def ref_losses(model, batch, kind: str) -> tuple[torch.Tensor, np.ndarray]:
    """Per-example losses (with graph) and weights ``N_i`` from one eval-mode forward pass."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    logits = _logits(model(**inputs))
    labels = batch["labels"]
    losses, weights = [], []
    for i in range(labels.shape[0]):
        if kind in ("causal_lm", "token"):  # token: one label per position, no shift (seq2seq, tagging)
            shift = 1 if kind == "causal_lm" else 0
            pred = logits[i, : logits.shape[1] - shift].to(torch.promote_types(logits.dtype, torch.float32))
            target = labels[i, shift:]
            keep = target != -100
            if keep.any():
                losses.append(F.cross_entropy(pred[keep], target[keep], reduction="mean"))
            else:
                losses.append(pred.sum() * 0.0)
            weights.append(float(keep.sum()))
        else:
            losses.append(F.cross_entropy(logits[i : i + 1].double(), labels[i : i + 1]).to(logits.dtype))
            weights.append(1.0)
    return torch.stack(losses), np.array(weights)


def ref_grads(model, batch, params, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, losses, weights)``: G (n x P) float64 by a loop of autograd.grad, one example at a time."""
    was = model.training
    model.eval()
    try:
        losses, weights = ref_losses(model, batch, kind)
        rows = []
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(gs, params, strict=True)
                    ]
                )
            )
    finally:
        model.train(was)
    G = torch.stack(rows).double().cpu().numpy()
    return G, losses.detach().double().cpu().numpy(), weights


@dataclass
class RefSignals:
    gram: np.ndarray
    task_grad: np.ndarray  # (T, P), NaN rows for missing tasks
    task_norm: np.ndarray
    task_cos: np.ndarray
    task_loss: np.ndarray
    conflict_rate: float
    eigvals: np.ndarray
    trace: float
    se: float
    rho: float
    eff_rank: float
    noise_scale: float


def ref_signals(
    G: np.ndarray,
    losses: np.ndarray,
    weights: np.ndarray,
    task_ids,
    n_tasks: int,
    eps: float,
    dense_fisher: bool = True,
) -> RefSignals:
    """All signals from the explicit gradient matrix ``G`` (n x P).

    The Fisher spectrum: ``numpy.linalg.eigh`` of the dense P x P ``G^T G / n``, or, with
    ``dense_fisher=False`` (P too large), the squared singular values of ``G`` over ``n``.
    Eigenvalues at or below ``n * eps * lambda_max`` count as zero.
    """
    task_ids = np.asarray(task_ids)
    n, P = G.shape
    K = G @ G.T
    task_grad = np.full((n_tasks, P), np.nan)
    task_loss = np.full(n_tasks, np.nan)
    for a in range(n_tasks):
        members = np.flatnonzero(task_ids == a)
        total = weights[members].sum()
        if len(members) == 0 or total == 0:
            continue
        task_grad[a] = sum(weights[i] / total * G[i] for i in members)
        task_loss[a] = sum(weights[i] / total * losses[i] for i in members)
    norm = np.linalg.norm(task_grad, axis=1)
    cos = np.full((n_tasks, n_tasks), np.nan)
    pairs = []
    for a in range(n_tasks):
        for b in range(n_tasks):
            if np.isfinite(norm[a]) and np.isfinite(norm[b]) and norm[a] > 0 and norm[b] > 0:
                cos[a, b] = task_grad[a] @ task_grad[b] / (norm[a] * norm[b])
                if a < b:
                    pairs.append(cos[a, b])
    conflict = float(np.mean(np.array(pairs) < 0)) if pairs else math.nan

    if dense_fisher:
        fisher = G.T @ G / n  # dense P x P empirical Fisher
        lam = np.linalg.eigh(fisher)[0][::-1]
        trace = float(np.trace(fisher))
    else:
        lam = np.linalg.svd(G, compute_uv=False) ** 2 / n
        trace = float((G**2).sum() / n)
    top = lam[0] if len(lam) else 0.0
    lam = lam[lam > n * eps * top] if top > 0 else lam[:0]
    if len(lam):
        p = lam / lam.sum()
        se = float(-(p * np.log(p)).sum())
        rho = float(p[0])
    else:
        se = rho = math.nan

    if n >= 2:
        mean = G.mean(0)
        tr_sigma = ((G - mean) ** 2).sum() / (n - 1)
        g2 = mean @ mean - tr_sigma / n
        noise = tr_sigma / g2 if g2 > 0 else math.nan
    else:
        noise = math.nan
    return RefSignals(
        gram=K,
        task_grad=task_grad,
        task_norm=norm,
        task_cos=cos,
        task_loss=task_loss,
        conflict_rate=conflict,
        eigvals=lam,
        trace=trace,
        se=se,
        rho=rho,
        eff_rank=math.exp(se) if np.isfinite(se) else math.nan,
        noise_scale=float(noise),
    )


def ref_hessian(model, batch, params, kind: str) -> np.ndarray:
    """Dense Hessian of the token-weighted batch loss w.r.t. ``params`` by double autograd, row by row."""
    was = model.training
    model.eval()
    try:
        losses, weights = ref_losses(model, batch, kind)
        w = torch.as_tensor(weights, dtype=losses.dtype)
        loss = (losses * w).sum() / w.sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for k in range(flat.numel()):
            hs = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if h is None else h).reshape(-1)
                        for h, p in zip(hs, params, strict=True)
                    ]
                )
            )
    finally:
        model.train(was)
    return torch.stack(rows).double().cpu().numpy()
