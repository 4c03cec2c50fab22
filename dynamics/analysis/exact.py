"""Exact small-sample p-values: every permutation enumerated, none approximated.

With a handful of runs an asymptotic p-value can be far below anything the data can support (with
4 runs and a perfect rank correlation, the t approximation of Spearman's test says ``p = 0`` while
only 24 orderings exist). For ``n <= EXACT_MAX_N`` the statistics layer therefore reports p-values
from the exact permutation distribution, the same numbers as the scipy call named for each test:

* correlations (Spearman, Pearson): all ``n!`` pairings of ``x`` with ``y``, two-sided
  ``p = min(1, 2 min(P(T <= t), P(T >= t)))`` exactly as ``scipy.stats.permutation_test(...,
  permutation_type="pairings", n_resamples=np.inf)``; Kendall's tau: ``scipy.stats.kendalltau(...,
  method="exact")`` when nothing is tied, else the same enumeration;
* within-group (stratified) correlations: all ``prod_g n_g!`` permutations of ``y`` inside the
  groups, the statistic recomputed on the residualised values each time;
* Wilcoxon signed-rank (zeros dropped): ``scipy.stats.wilcoxon(d, method="exact")`` without ties;
  with tied ``|d|``, all ``2^n`` sign flips of the sum of positive ranks (the numbers of
  ``method=PermutationMethod(n_resamples=inf)``, enumerated vectorised);
* Mann-Whitney U: all ``C(n_a + n_b, n_a)`` splits (``PermutationMethod``, as above);
* paired / unpaired mean differences: ``scipy.stats.permutation_test`` with all sign flips
  (``"samples"``) or splits (``"independent"``).

Above the threshold the number of permutations explodes and the classical approximations are good;
there the layer uses scipy's default method and keeps a Monte Carlo permutation p as a column.

A Spearman feature without ties shares its null distribution with every other tie-free feature
(only the target's ranks matter), so that distribution is enumerated once per target and reused:
hundreds of features cost one enumeration.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from scipy import stats

from dynamics.analysis.resampling import CORRELATIONS

__all__ = [
    "EXACT_MAX_N",
    "all_permutations",
    "two_sided_p",
    "exact_correlation_p",
    "stratified_correlation_p",
    "exact_method",
    "exact_wilcoxon",
]

EXACT_MAX_N = 10
"""Largest sample (runs, pairs, or runs over both groups) whose p-values are computed exactly.

10! = 3.6 million pairings is the largest full enumeration that stays a few seconds."""

_CHUNK = 1 << 18  # permutations evaluated per array operation


def exact_method() -> stats.PermutationMethod:
    """The scipy method object that enumerates every permutation."""
    return stats.PermutationMethod(n_resamples=np.inf)


@functools.lru_cache(maxsize=4)
def all_permutations(n: int) -> np.ndarray:
    """Every permutation of ``range(n)``, shape ``(n!, n)``, built by inserting one item at a time."""
    if n < 0 or n > 12:
        raise ValueError(f"n must be in [0, 12] for a full enumeration, got {n}")
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(n):
        # Insert the new item k at every position of every permutation of range(k).
        parts = [np.insert(perms, j, k, axis=1) for j in range(k + 1)]
        perms = np.concatenate(parts, axis=0)
    perms.setflags(write=False)
    return perms


def two_sided_p(null: np.ndarray, observed: float) -> float:
    """scipy's exact two-sided permutation p: ``min(1, 2 min(P(T <= t), P(T >= t)))``.

    The tolerance ``100 eps |t|`` is scipy's, so values equal in theory but not in floating point
    count as ties.
    """
    null = np.asarray(null, float)
    null = null[np.isfinite(null)]
    if null.size == 0 or not np.isfinite(observed):
        return np.nan
    gamma = abs(np.finfo(float).eps * 100 * observed)
    less = np.count_nonzero(null <= observed + gamma) / null.size
    greater = np.count_nonzero(null >= observed - gamma) / null.size
    return float(min(1.0, 2.0 * min(less, greater)))


def _positive_rank_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    ranks = stats.rankdata(np.abs(x), axis=axis)
    return np.where(x > 0, ranks, 0.0).sum(axis=axis)


def exact_wilcoxon(d: np.ndarray) -> tuple[float, float]:
    """(statistic, p) of the exact two-sided Wilcoxon signed-rank test of ``d`` (zeros dropped).

    The statistic is scipy's ``min(R+, R-)``; the p-value enumerates all sign flips.
    """
    d = np.asarray(d, float)
    d = d[d != 0]
    if d.size == 0:
        return np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.unique(np.abs(d)).size == d.size:
            res = stats.wilcoxon(d, method="exact")
            return float(res.statistic), float(res.pvalue)
        perm = stats.permutation_test(
            (d,), _positive_rank_sum, permutation_type="samples", vectorized=True, n_resamples=np.inf
        )
    r_plus = float(_positive_rank_sum(d))
    total = d.size * (d.size + 1) / 2
    return min(r_plus, total - r_plus), float(perm.pvalue)


def _pearson_null(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of ``x`` with every permutation of ``y`` (chunked)."""
    perms = all_permutations(x.size)
    xc = x - x.mean()
    yc = y - y.mean()
    den = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    out = np.empty(perms.shape[0])
    for start in range(0, perms.shape[0], _CHUNK):
        block = yc[perms[start : start + _CHUNK]]
        out[start : start + _CHUNK] = block @ xc / den
    return np.clip(out, -1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _spearman_null_tiefree(ry: tuple[float, ...]) -> np.ndarray:
    """Null of Spearman's rho for any tie-free ``x`` against target ranks ``ry`` (cached per target)."""
    y = np.asarray(ry, float)
    null = _pearson_null(np.arange(1.0, y.size + 1.0), y)
    null.setflags(write=False)
    return null


def _kendall_null(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    perms = all_permutations(x.size)
    out = np.empty(perms.shape[0])
    chunk = max(1, _CHUNK // max(1, x.size))
    for start in range(0, perms.shape[0], chunk):
        block = y[perms[start : start + chunk]]
        out[start : start + chunk] = CORRELATIONS["kendall"](np.broadcast_to(x, block.shape), block)
    return out


def exact_correlation_p(x: np.ndarray, y: np.ndarray, method: str = "spearman") -> float:
    """Exact two-sided permutation p-value of the correlation of ``x`` and ``y`` (module docstring).

    Equal to ``scipy.stats.permutation_test((x,), lambda a: r(a, y), permutation_type="pairings",
    n_resamples=np.inf)`` with ``r`` the chosen correlation, and to ``kendalltau(method="exact")``
    for Kendall without ties. Needs ``len(x) <= EXACT_MAX_N``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = x.size
    if n > EXACT_MAX_N:
        raise ValueError(f"an exact permutation p needs n <= {EXACT_MAX_N}, got n = {n}")
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    if method == "kendall":
        if np.unique(x).size == n and np.unique(y).size == n:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(stats.kendalltau(x, y, method="exact").pvalue)
        return two_sided_p(_kendall_null(x, y), float(CORRELATIONS["kendall"](x, y)))
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
        observed = float(CORRELATIONS["pearson"](x, y))
        if np.unique(x).size == n:  # tie-free: the null depends on the target's ranks only
            return two_sided_p(_spearman_null_tiefree(tuple(y)), observed)
        return two_sided_p(_pearson_null(x, y), observed)
    if method == "pearson":
        return two_sided_p(_pearson_null(x, y), float(CORRELATIONS["pearson"](x, y)))
    raise ValueError(f"method must be one of {sorted(CORRELATIONS)}, got {method!r}")


def _within_permutations(cells: np.ndarray, limit: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Index arrays that permute positions only inside each cell: all of them when there are at most
    ``limit``, else ``limit`` random ones. Returns (indices (k, n), exact)."""
    n = cells.size
    members = [np.flatnonzero(cells == c) for c in np.unique(cells)]
    total = math.prod(math.factorial(m.size) for m in members)
    if total <= limit:
        out = np.tile(np.arange(n), (total, 1))
        reps = total
        inner = 1
        for m in members:
            p = all_permutations(m.size).astype(np.int64)
            k = p.shape[0]
            reps //= k
            # Cartesian product: each cell's permutations repeat in blocks over the others'.
            idx = np.tile(np.repeat(np.arange(k), inner), reps)
            out[:, m] = m[p[idx]]
            inner *= k
        return out, True
    out = np.tile(np.arange(n), (limit, 1))
    for m in members:
        out[:, m] = m[rng.permuted(np.tile(np.arange(m.size), (limit, 1)), axis=1)]
    return out, False


def stratified_correlation_p(
    x: np.ndarray,
    y: np.ndarray,
    design: np.ndarray,
    cells: np.ndarray,
    *,
    method: str = "spearman",
    n_resamples: int = 9999,
    rng: np.random.Generator | None = None,
) -> tuple[float, bool]:
    """Two-sided permutation p of the partial correlation of ``x`` and ``y`` given ``design``.

    ``y`` is permuted only inside each ``cells`` value (runs of one construction, one model, ...),
    so what the groups share is kept and only the within-group pairing is tested; for every
    permutation both sides are residualised on ``design`` (intercept plus group dummies) and the
    Pearson correlation of the residuals is the statistic (ranks first for Spearman). Every
    permutation is enumerated when there are at most ``n_resamples`` + 1 of them (exact), else a
    Monte Carlo p with scipy's ``+1`` adjustment. Returns (p, exact).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
    proj = np.eye(x.size) - design @ np.linalg.pinv(design)
    rx = proj @ x
    rx = rx - rx.mean()
    sx = np.sqrt(rx @ rx)
    if sx <= 1e-12 * max(1.0, np.abs(x).max()):
        return np.nan, True
    rng = rng if rng is not None else np.random.default_rng(0)
    perms, exact = _within_permutations(np.asarray(cells), n_resamples + 1, rng)

    def r_of(yy: np.ndarray) -> np.ndarray:
        ry = yy @ proj.T
        ry = ry - ry.mean(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.clip(ry @ rx / (sx * np.sqrt((ry * ry).sum(axis=-1))), -1.0, 1.0)

    observed = float(r_of(y[None, :])[0])
    null = np.concatenate([r_of(y[perms[s : s + _CHUNK]]) for s in range(0, perms.shape[0], _CHUNK)])
    if exact:
        return two_sided_p(null, observed), True
    gamma = abs(np.finfo(float).eps * 100 * observed)
    k = null.size
    less = (np.count_nonzero(null <= observed + gamma) + 1) / (k + 1)
    greater = (np.count_nonzero(null >= observed - gamma) + 1) / (k + 1)
    return float(min(1.0, 2 * min(less, greater))), False
