"""The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

``G`` is the expected per-example gradient and ``Sigma`` the per-example gradient covariance. From
the per-example Gram ``K`` of ``n`` examples (``K_ij = <g_i, g_j>``) the unbiased estimators are the
paper's Appendix A pair with ``B_small = 1`` and ``B_big = n``:

* ``|G|^2_est = (1^T K 1 - tr K) / (n (n - 1))``  (the mean off-diagonal entry of ``K``:
  ``E <g_i, g_j> = |G|^2`` for ``i != j``);
* ``tr(Sigma)_est = (tr K - 1^T K 1 / n) / (n - 1)``  (the unbiased sample variance
  ``sum_i |g_i - g_bar|^2 / (n - 1)``);
* ``B_simple = tr(Sigma)_est / |G|^2_est``.

Per-example gradients here are ``g_i = grad l_i`` of each example's own loss (unweighted by tokens).
The estimate is NaN when undefined: ``n < 2``, or ``|G|^2_est <= 0`` (the mean gradient is not
distinguishable from noise at this probe size; a ratio of unbiased estimates is then meaningless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoiseScale:
    """``b_simple = trace_sigma / grad_sq`` (NaN when undefined)."""

    b_simple: float
    trace_sigma: float
    grad_sq: float


def noise_scale(gram: Tensor) -> NoiseScale:
    """Unbiased ``tr(Sigma)``, ``|G|^2`` and their ratio ``B_simple`` from ``K`` (module docstring)."""
    K = gram.detach().to(torch.float64).cpu()
    n = K.shape[0]
    if n < 2:
        return NoiseScale(math.nan, math.nan, math.nan)
    tr = float(K.diagonal().sum())
    tot = float(K.sum())
    trace_sigma = (tr - tot / n) / (n - 1)
    grad_sq = (tot - tr) / (n * (n - 1))
    b = trace_sigma / grad_sq if grad_sq > 0 else math.nan
    return NoiseScale(b, trace_sigma, grad_sq)
