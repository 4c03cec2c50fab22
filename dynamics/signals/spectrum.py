"""The empirical Fisher spectrum from the per-example Gram matrix.

The empirical Fisher over the chosen parameters is ``F = (1/n) sum_i g_i g_i^T = (1/n) G^T G``
(P x P). Its non-zero eigenvalues equal those of ``K / n = (1/n) G G^T`` (n x n), so the spectrum
costs one n x n symmetric eigen-decomposition (float64), never a P x P matrix.

* ``eigvals``: eigenvalues of ``K / n`` in decreasing order, keeping those above
  ``n * eps * lambda_max`` (``eps`` = machine epsilon of the dtype ``K``'s products were computed in;
  smaller and negative eigenvalues are rounding noise of a positive semi-definite matrix and are
  treated as zero);
* ``trace = tr(F) = tr(K) / n`` (mean squared per-example gradient norm);
* with ``p_k = lambda_k / sum_j lambda_j``: spectral entropy ``SE = -sum_k p_k log p_k`` (natural
  log), dominant eigenvalue ratio ``rho = lambda_1 / sum_j lambda_j``, effective rank ``exp(SE)``.

All-zero gradients give an empty spectrum, ``trace = 0`` and NaN for SE, rho and effective rank. A
Gram matrix holding NaN or inf is refused with a ``ValueError`` (its spectrum is undefined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FisherSpectrum:
    """Non-zero spectrum of the empirical Fisher and its summaries (see module docstring)."""

    eigvals: Tensor
    trace: float
    se: float
    rho: float
    eff_rank: float


def fisher_eigvals(gram: Tensor, eps: float | None = None) -> Tensor:
    """Non-zero eigenvalues of ``K / n`` (float64, decreasing), clipped at ``n * eps * lambda_max``."""
    K = gram.detach().to(torch.float64).cpu()
    n = K.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if not torch.isfinite(K).all():
        # eigvalsh would fail to converge (or return NaN) on such a matrix: say what is wrong instead.
        raise ValueError(
            "the Gram matrix holds NaN or inf (a non-finite per-example loss or gradient): its spectrum is "
            "undefined; check the losses and gradients of the probe batch"
        )
    eps = torch.finfo(torch.float64).eps if eps is None else eps
    lam = torch.linalg.eigvalsh(0.5 * (K + K.T) / n).flip(0)
    top = float(lam[0]) if lam.numel() else 0.0
    if top <= 0:
        return lam[:0]
    return lam[lam > n * eps * top]


def fisher_spectrum(gram: Tensor, eps: float | None = None) -> FisherSpectrum:
    """Spectrum, trace, SE, rho and effective rank of the empirical Fisher from ``K``."""
    K = gram.detach().to(torch.float64).cpu()
    n = K.shape[0]
    lam = fisher_eigvals(K, eps)
    trace = float(K.diagonal().sum() / n) if n else math.nan
    if lam.numel() == 0:
        return FisherSpectrum(lam, trace, math.nan, math.nan, math.nan)
    p = lam / lam.sum()
    se = float(-(p * p.log()).sum())
    return FisherSpectrum(lam, trace, se, float(p[0]), math.exp(se))
