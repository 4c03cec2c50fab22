"""Bootstrap confidence intervals, permutation p-values and vectorised correlation statistics.

The resampling itself is scipy's (``scipy.stats.bootstrap``, ``scipy.stats.permutation_test``);
this module supplies statistics that accept a resampling axis, so that thousands of resamples are
evaluated as one array operation:

* Pearson  ``r = sum (x - xbar)(y - ybar) / sqrt(sum (x - xbar)^2 sum (y - ybar)^2)``
* Spearman ``rho`` = Pearson ``r`` of the average ranks (ties share their mean rank)
* Kendall  ``tau_b = (n_c - n_d) / sqrt((n_0 - n_x)(n_0 - n_y))`` over all pairs ``i < j``
  (``n_x``, ``n_y``: pairs tied in x, in y), the same variant as ``scipy.stats.kendalltau``.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = [
    "pearson_r",
    "spearman_r",
    "kendall_tau_b",
    "CORRELATIONS",
    "bootstrap_ci",
    "permutation_pvalue",
    "resample_batch",
    "stream",
]


def stream(seed: int, *keys: str) -> np.random.Generator:
    """A generator for one test, seeded by ``seed`` and the test's names (feature, groups, ...).

    One generator per test, rather than one shared by a loop over features, keeps a feature's
    bootstrap CI and permutation p-value the same whichever other features are tested with it.
    ``zlib.crc32`` rather than ``hash()`` because Python salts string hashes per process.
    """
    return np.random.default_rng([int(seed), *(zlib.crc32(str(k).encode()) for k in keys)])


def pearson_r(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along ``axis`` (NaN where either side is constant)."""
    xm = x - x.mean(axis=axis, keepdims=True)
    ym = y - y.mean(axis=axis, keepdims=True)
    num = (xm * ym).sum(axis=axis)
    den = np.sqrt((xm * xm).sum(axis=axis) * (ym * ym).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.clip(r, -1.0, 1.0)


def spearman_r(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rank correlation along ``axis`` (average ranks for ties)."""
    return pearson_r(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


def kendall_tau_b(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Kendall's tau-b along ``axis`` by explicit pair signs (O(n^2) memory per resample)."""
    x = np.moveaxis(np.asarray(x, float), axis, -1)
    y = np.moveaxis(np.asarray(y, float), axis, -1)
    n = x.shape[-1]
    iu, ju = np.triu_indices(n, k=1)
    sx = np.sign(x[..., ju] - x[..., iu])
    sy = np.sign(y[..., ju] - y[..., iu])
    num = (sx * sy).sum(axis=-1)
    den = np.sqrt(np.abs(sx).sum(axis=-1) * np.abs(sy).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


CORRELATIONS: dict[str, Callable[..., np.ndarray]] = {
    "pearson": pearson_r,
    "spearman": spearman_r,
    "kendall": kendall_tau_b,
}


def resample_batch(n: int, method: str) -> int | None:
    # Kendall holds n(n-1)/2 pair signs per resample; keep a batch near 2e6 numbers.
    if method == "kendall":
        return max(1, int(2e6 // max(1, n * (n - 1) // 2)))
    return None


def bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    *,
    n_resamples: int,
    rng: np.random.Generator,
    paired: bool = False,
    confidence: float = 0.95,
    method: str = "BCa",
    batch: int | None = None,
) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` interval; BCa by default, percentile if BCa is undefined.

    BCa needs a non-degenerate jackknife; with heavy ties or tiny samples it can be NaN, and then
    the percentile interval of the same resamples is reported instead.
    """
    if n_resamples <= 0:
        return np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            data,
            statistic,
            n_resamples=n_resamples,
            vectorized=True,
            paired=paired,
            confidence_level=confidence,
            method=method,
            rng=rng,
            batch=batch,
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if method != "percentile" and not (np.isfinite(low) and np.isfinite(high)):
            dist = res.bootstrap_distribution
            dist = dist[np.isfinite(dist)]
            if dist.size:
                alpha = (1 - confidence) / 2
                low, high = (float(q) for q in np.quantile(dist, [alpha, 1 - alpha]))
    return low, high


def permutation_pvalue(
    x: np.ndarray,
    y: np.ndarray,
    statistic: Callable[..., np.ndarray],
    *,
    n_resamples: int,
    rng: np.random.Generator,
    batch: int | None = None,
) -> float:
    """Two-sided permutation p-value of an association statistic (x permuted against a fixed y).

    ``scipy.stats.permutation_test`` with ``permutation_type="pairings"``. Only ``x`` is passed as
    data (``y`` stays fixed), so there are ``n!`` distinct pairings, enumerated exactly when that is
    fewer than ``n_resamples``.
    """
    if n_resamples <= 0:
        return np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.permutation_test(
            (x,),
            lambda a, axis: statistic(a, y, axis=axis),
            permutation_type="pairings",
            vectorized=True,
            n_resamples=n_resamples,
            alternative="two-sided",
            rng=rng,
            batch=batch,
        )
    return float(res.pvalue)
