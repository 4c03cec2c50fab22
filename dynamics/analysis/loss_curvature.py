"""Loss-curve curvature: the smoothed second derivative of log-loss over training steps (offline).

Method: local polynomial regression (Fan & Gijbels 1996, ch. 3) of ``y = log(loss)`` on the step
``x``, evaluated on a regular grid. At a grid point ``c`` with bandwidth ``h`` we fit by weighted
least squares

    y_j  ~  sum_{k=0..p} beta_k u_j^k,      u_j = (x_j - c) / h,      weight_j = K(u_j),

and read off ``y''(c) = 2 beta_2 / h**2``. ``K`` is the tricube kernel ``(1 - |u|^3)^3`` on
``|u| < 1`` and ``p`` (``degree``) defaults to 3: for the nu-th derivative the odd choice
``p - nu = 1`` has no extra bias at the ends of training (Fan & Gijbels, section 3.3).

Uneven step spacing is handled exactly: every logged point enters the fit at its own step. To make
this cheap for millions of points the points are binned (Wand 1994, "Fast computation of
multivariate kernel estimators"): the grid spacing is ``delta = h / resolution``, each bin keeps the
exact sufficient statistics ``S_q = sum d_j^q`` and ``T_q = sum y_j d_j^q`` of its points
(``d_j`` = offset of the point from its bin centre, in units of ``h``), and the kernel weight is
taken constant within a bin. Because ``u_j = d_j + l / resolution`` for a point in the bin ``l``
grid steps away, the weighted moments of every window follow from the binomial theorem,

    sum_j w u_j^m  =  sum_q C(m, q) sum_l w_l (l / resolution)^(m - q) S_q[i + l],

a handful of 1-D correlations over the bin axis. The result is an exact weighted least-squares fit
with a (finely) stepped kernel, so it still reproduces any cubic exactly.

A grid point gets NaN when fewer than ``degree + 2`` non-empty bins carry weight (a run too short
or a logging gap wider than the bandwidth). Non-positive or non-finite losses are dropped before
taking the log.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.ndimage import correlate1d

__all__ = ["loss_curvature", "curvature_on_grid", "DEFAULT_BANDWIDTH_FRACTION"]

DEFAULT_BANDWIDTH_FRACTION = 0.1
"""Default kernel half-width as a fraction of the logged step range."""


def _tricube(u: np.ndarray) -> np.ndarray:
    a = np.clip(1.0 - np.abs(u) ** 3, 0.0, None)
    return a**3


def curvature_on_grid(
    series: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    n_series: int,
    *,
    bandwidth: float | np.ndarray,
    degree: int = 3,
    resolution: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Second derivative of ``y`` over ``x`` for many series at once, on each series' own grid.

    Args:
        series: integer series id per point, in ``[0, n_series)``.
        x, y: step and value per point (any order; non-finite ``y`` must already be removed).
        bandwidth: kernel half-width ``h`` in units of ``x``; a scalar, or one value per series.
        degree: local polynomial degree ``p`` (2 or more).
        resolution: grid points per bandwidth (``delta = h / resolution``).

    Returns:
        ``(centers, d2)``: two ``(n_series, M)`` arrays; ``centers[s, i]`` is the step of grid point
        ``i`` of series ``s`` (NaN past the series' end) and ``d2`` the estimate there (NaN where not
        estimable). Grids start at each series' first step.
    """
    if degree < 2:
        raise ValueError(f"degree must be at least 2 to estimate a second derivative, got {degree}")
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2 grid points per bandwidth, got {resolution}")
    series = np.asarray(series, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    h = np.broadcast_to(np.asarray(bandwidth, dtype=np.float64), (n_series,)).copy()
    if np.any(~np.isfinite(h) | (h <= 0)):
        raise ValueError("bandwidth must be positive and finite (in steps)")
    if x.size == 0 or n_series == 0:
        return np.full((n_series, 0), np.nan), np.full((n_series, 0), np.nan)
    delta = h / resolution
    x0 = np.full(n_series, np.inf)
    np.minimum.at(x0, series, x)
    x1 = np.full(n_series, -np.inf)
    np.maximum.at(x1, series, x)
    present = np.isfinite(x0)
    x0 = np.where(present, x0, 0.0)
    x1 = np.where(present, x1, 0.0)
    bins_per_series = np.floor((x1 - x0) / delta).astype(np.int64) + 1
    n_bins = int(bins_per_series.max())
    rel = (x - x0[series]) / delta[series]
    b = np.minimum(np.floor(rel).astype(np.int64), bins_per_series[series] - 1)
    # Offsets from the bin centre in units of h: |d| <= 1 / (2 * resolution).
    d = (rel - (b + 0.5)) / resolution
    flat = series * n_bins + b
    size = n_series * n_bins

    # Per-bin sums. Points sorted by bin (the usual case: sorted by series, then step) are summed
    # over contiguous segments, which is several times faster than a scattered bincount.
    p = degree
    if flat.size > 1 and np.all(flat[1:] >= flat[:-1]):
        seg = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        dest = flat[seg]

        def bin_sum(w: np.ndarray) -> np.ndarray:
            out = np.zeros(size)
            out[dest] = np.add.reduceat(w, seg)
            return out.reshape(n_series, n_bins)
    else:

        def bin_sum(w: np.ndarray) -> np.ndarray:
            return np.bincount(flat, w, minlength=size).reshape(n_series, n_bins)

    s_moments = [np.bincount(flat, minlength=size).astype(np.float64).reshape(n_series, n_bins)]
    power = d.copy()
    for _ in range(1, 2 * p + 1):
        s_moments.append(bin_sum(power))
        np.multiply(power, d, out=power)
    t_moments = []
    power = y.copy()
    for _ in range(p + 1):
        t_moments.append(bin_sum(power))
        np.multiply(power, d, out=power)

    lags = np.arange(-(resolution - 1), resolution)
    u_lag = lags / resolution
    w = _tricube(u_lag)
    # kern[r] = w_l * (l / resolution)^r for r = 0..2p
    kern = [w * u_lag**r for r in range(2 * p + 1)]

    def window_sum(stat: np.ndarray, r: int) -> np.ndarray:
        return correlate1d(stat, kern[r], axis=1, mode="constant", cval=0.0)

    a_mom = np.zeros((2 * p + 1, n_series, n_bins))
    for m in range(2 * p + 1):
        for q in range(m + 1):
            a_mom[m] += math.comb(m, q) * window_sum(s_moments[q], m - q)
    b_mom = np.zeros((p + 1, n_series, n_bins))
    for m in range(p + 1):
        for q in range(m + 1):
            b_mom[m] += math.comb(m, q) * window_sum(t_moments[q], m - q)

    nonempty = (s_moments[0] > 0).astype(np.float64)
    support = correlate1d(nonempty, (w > 0).astype(np.float64), axis=1, mode="constant", cval=0.0)
    grid_index = np.arange(n_bins)
    inside = grid_index[None, :] < bins_per_series[:, None]
    valid = inside & (support >= p + 2) & present[:, None]

    idx = np.arange(p + 1)
    gram = np.moveaxis(a_mom[idx[:, None] + idx[None, :]], (0, 1), (-2, -1))  # (S, M, p+1, p+1)
    rhs = np.moveaxis(b_mom, 0, -1)  # (S, M, p+1)
    gram = np.where(valid[..., None, None], gram, np.eye(p + 1))
    rhs = np.where(valid[..., None], rhs, 0.0)
    try:
        beta = np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # a numerically singular window despite the support check
        beta = (np.linalg.pinv(gram) @ rhs[..., None])[..., 0]
    d2 = 2.0 * beta[..., 2] / h[:, None] ** 2
    d2 = np.where(valid, d2, np.nan)
    centers = x0[:, None] + (grid_index[None, :] + 0.5) * delta[:, None]
    centers = np.where(inside & present[:, None], centers, np.nan)
    return centers, d2


def loss_curvature(
    steps: ArrayLike,
    values: ArrayLike,
    *,
    bandwidth: float | None = None,
    degree: int = 3,
    log: bool = True,
    resolution: int = 10,
    at: ArrayLike | None = None,
) -> np.ndarray:
    """Smoothed second derivative of ``log(loss)`` with respect to the step, at ``at``.

    Local polynomial regression with a tricube kernel of half-width ``bandwidth`` (see the module
    docstring for the formulas); robust to noise (the kernel averages it away, the variance of the
    estimate falls like ``1 / (n h^5)``) and to uneven step spacing (each point is fitted at its own
    step, so dense logging early in training does not distort the curve).

    Args:
        steps: training steps of the logged losses (any order, need not be evenly spaced).
        values: the logged loss at each step; non-positive or non-finite values are dropped when
            ``log`` is true (the log is undefined), non-finite ones otherwise.
        bandwidth: kernel half-width in steps; default ``0.1 * (max(steps) - min(steps))``. Larger
            is smoother (more bias where the curvature changes fast, less noise).
        degree: degree of the local polynomial (3 by default; 2 is cheaper and noisier at the ends).
        log: differentiate ``log(values)`` (default) or the raw values.
        resolution: grid points per bandwidth; the estimate is computed on that grid and linearly
            interpolated to ``at``.
        at: steps at which to report the curvature (default: ``steps``).

    Returns:
        ``d^2 log(loss) / d step^2`` at each entry of ``at`` (units: 1 / step^2); NaN outside the
        logged range or where the window holds too few distinct steps.

    Example:
        >>> import numpy as np
        >>> from dynamics.analysis import loss_curvature
        >>> steps = np.sort(np.random.default_rng(0).choice(np.arange(1, 5001), 800, replace=False))
        >>> loss = np.exp(2.0 - 1e-3 * steps + 2e-7 * steps**2)  # d2 log(loss) = 4e-7
        >>> curv = loss_curvature(steps, loss)
        >>> bool(np.allclose(curv, 4e-7, rtol=1e-6))
        True
    """
    x = np.asarray(steps, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if x.shape != v.shape:
        raise ValueError(f"steps and values must have the same length, got {x.size} and {v.size}")
    query = x if at is None else np.asarray(at, dtype=np.float64).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(v) if log else v
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0 or np.ptp(x) == 0:
        return np.full(query.shape, np.nan)
    if bandwidth is None:
        bandwidth = DEFAULT_BANDWIDTH_FRACTION * float(np.ptp(x))
    if not (np.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive number of steps, got {bandwidth!r}")
    centers, d2 = curvature_on_grid(
        np.zeros(x.size, np.int64), x, y, 1, bandwidth=bandwidth, degree=degree, resolution=resolution
    )
    v2 = d2[0]
    if v2.size == 1:
        return np.where((query >= x.min()) & (query <= x.max()), v2[0], np.nan)
    # Linear interpolation between neighbouring grid points (extrapolated over the half grid step
    # at either end); NaN unless both neighbours are estimable and the query is in the logged range.
    in_range = (query >= x.min()) & (query <= x.max())
    pos = (np.where(in_range, query, x.min()) - x.min()) / (bandwidth / resolution) - 0.5
    lo = np.clip(np.floor(pos).astype(np.int64), 0, v2.size - 2)
    t = pos - lo
    with np.errstate(invalid="ignore"):
        out = v2[lo] * (1.0 - t) + v2[lo + 1] * t
    return np.where(in_range & np.isfinite(out), out, np.nan)
