"""Vectorised summaries of many logged series at once (one series = one run x name x task [x task_b]).

Every statistic is computed for all series in one pass over flat arrays sorted by (series, step),
with ``np.bincount`` as the group-by; nothing loops over series in Python. For a series with
points ``(x_1, y_1) ... (x_n, y_n)`` sorted by step ``x``:

* ``mean``   = (1/n) sum_i y_i                                (arithmetic mean of the logged values)
* phase ``P = (lo, hi]`` (fractions of the horizon ``H``): the mean of the ``y_i`` with
  ``lo*H < x_i <= hi*H`` (``lo = 0`` includes everything up to ``hi*H``); NaN if none fall there
* ``final``  = y_n                                            (value at the last logged step)
* ``auc``    = sum_i (x_{i+1} - x_i) (y_i + y_{i+1}) / 2      (trapezoid rule, in value x steps;
  NaN for a single point)
* ``slope``  = sum (x_i - xbar)(y_i - ybar) / sum (x_i - xbar)^2   (least-squares trend per step;
  NaN when all points share one step)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dynamics.analysis.loss_curvature import curvature_on_grid

__all__ = [
    "SortedSeries",
    "sort_series",
    "basic_summaries",
    "curvature_summaries",
    "phase_windows",
    "phase_of",
    "DEFAULT_PHASES",
]

BASIC_STATS = ("mean", "final", "auc", "slope")
DEFAULT_PHASES = (1 / 3, 2 / 3)
"""early = (0, 1/3], middle = (1/3, 2/3], late = (2/3, 1] of the horizon: the one phase rule."""


def phase_of(frac: np.ndarray, bounds: tuple[float, ...] = DEFAULT_PHASES) -> np.ndarray:
    """Phase index of each point at fraction ``frac`` of its horizon for contiguous ``bounds``.

    The rule of :func:`phase_windows`: a point at exactly a boundary belongs to the phase that ends
    there (``frac = 1/3`` is early), ``frac <= 0`` is the first phase, ``frac > 1`` the last.
    """
    return np.searchsorted(np.asarray(bounds, float), np.asarray(frac, float), side="left")


@dataclass
class SortedSeries:
    """Flat arrays sorted by (series, step): ``series`` ids, steps ``x`` and values ``y``."""

    series: np.ndarray
    x: np.ndarray
    y: np.ndarray
    n_series: int

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.series, minlength=self.n_series)


def sort_series(series: np.ndarray, steps: np.ndarray, values: np.ndarray, n_series: int) -> SortedSeries:
    """Drop non-finite values and sort the points by (series, step)."""
    series = np.asarray(series, dtype=np.int64)
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    if not keep.all():
        series, steps, values = series[keep], steps[keep], values[keep]
    # Stable sort on the series id keeps the logged order inside a series; that order is almost
    # always already by step (the store appends in time), which we check before a full sort.
    if n_series < 2**16:
        order = np.argsort(series.astype(np.uint16), kind="stable")  # radix sort
    else:
        order = np.argsort(series, kind="stable")
    series, steps, values = series[order], steps[order], values[order]
    if series.size > 1:
        same = series[1:] == series[:-1]
        if np.any(same & (steps[1:] < steps[:-1])):
            order = np.lexsort((steps, series))
            series, steps, values = series[order], steps[order], values[order]
    return SortedSeries(series, steps.astype(np.float64), values, n_series)


def phase_windows(
    phases: tuple[float, ...] | Mapping[str, tuple[float, float]],
) -> dict[str, tuple[float, float]]:
    """Normalise ``phases`` to ``{name: (lo, hi)}`` fractions of the horizon.

    Two boundaries ``(b1, b2)`` give ``early = (0, b1]``, ``middle = (b1, b2]``, ``late = (b2, 1]``;
    a mapping names its own windows (they may overlap).
    """
    if isinstance(phases, Mapping):
        out = {str(k): (float(v[0]), float(v[1])) for k, v in phases.items()}
    else:
        bounds = tuple(float(b) for b in phases)
        if len(bounds) != 2:
            raise ValueError(
                f"phases must be two boundaries (early|middle|late), e.g. (1/3, 2/3), or a mapping "
                f"{{name: (lo, hi)}}; got {phases!r}"
            )
        out = {"early": (0.0, bounds[0]), "middle": (bounds[0], bounds[1]), "late": (bounds[1], 1.0)}
    for name, (lo, hi) in out.items():
        if not (0.0 <= lo < hi) or name in BASIC_STATS:
            raise ValueError(
                f"phase {name!r} = ({lo}, {hi}) is not a valid window: need 0 <= lo < hi "
                f"(fractions of the training horizon) and a name other than {BASIC_STATS}"
            )
    return out


def _phase_index(frac: np.ndarray, windows: Mapping) -> np.ndarray | None:
    """Window index of each point for non-overlapping windows (-1 outside all); None if they overlap."""
    bounds = list(windows.values())
    order = np.argsort([lo for lo, _ in bounds], kind="stable")
    los = [bounds[i][0] for i in order]
    his = [bounds[i][1] for i in order]
    if any(lo < hi for lo, hi in zip(los[1:], his[:-1], strict=True)):
        return None
    # k = number of windows ending before the point = index of the first window with hi >= frac.
    k = np.zeros(frac.shape, dtype=np.int8)
    for hi in his:
        k += frac > hi
    inside = k < len(his)
    contiguous = los[0] == 0 and all(lo == hi for lo, hi in zip(los[1:], his[:-1], strict=True))
    if not contiguous:
        lo_k = np.asarray(los + [np.inf])[k]
        inside &= (frac > lo_k) | (lo_k == 0)
    idx = np.asarray(order, dtype=np.int8)[np.minimum(k, len(his) - 1)]
    return np.where(inside, idx, -1)


def _phase_means(
    series: np.ndarray, x: np.ndarray, y: np.ndarray, n_series: int, horizon: np.ndarray, windows: Mapping
) -> dict[str, np.ndarray]:
    frac = x / horizon[series]
    names = list(windows)
    n_win = len(names)
    idx = _phase_index(frac, windows)
    if idx is not None:  # one pass for the usual early / middle / late split
        # Points outside every window go to an extra slot per series (no masked copies of the data).
        slots = n_win + 1
        flat = series * slots + np.where(idx >= 0, idx, n_win)
        n: np.ndarray = np.bincount(flat, minlength=n_series * slots).reshape(n_series, slots)[:, :n_win]
        tot: np.ndarray = np.bincount(flat, y, minlength=n_series * slots).reshape(n_series, slots)[:, :n_win]
    else:
        n = np.zeros((n_series, n_win))
        tot = np.zeros((n_series, n_win))
        for j, (lo, hi) in enumerate(windows.values()):
            inside = (frac <= hi) if lo == 0 else ((frac > lo) & (frac <= hi))
            n[:, j] = np.bincount(series[inside], minlength=n_series)
            tot[:, j] = np.bincount(series[inside], y[inside], minlength=n_series)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(n > 0, tot / np.maximum(n, 1), np.nan)
    return {name: means[:, j] for j, name in enumerate(names)}


def basic_summaries(ss: SortedSeries, horizon: np.ndarray, windows: Mapping) -> dict[str, np.ndarray]:
    """mean, phase means, final, auc, slope for every series (see the module docstring)."""
    s, x, y, m = ss.series, ss.x, ss.y, ss.n_series
    n = np.bincount(s, minlength=m).astype(np.float64)
    has = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(has, np.bincount(s, y, minlength=m) / n, np.nan)
        xbar = np.bincount(s, x, minlength=m) / n
        dx = x - xbar[s]
        dy = y - mean[s]
        sxx = np.bincount(s, dx * dx, minlength=m)
        sxy = np.bincount(s, dx * dy, minlength=m)
        slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), np.nan)
    final = np.full(m, np.nan)
    if s.size:
        last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
        final[s[last]] = y[last]
        same = s[1:] == s[:-1]
        trap = np.where(same, np.diff(x) * (y[1:] + y[:-1]) * 0.5, 0.0)
        auc: np.ndarray = np.bincount(s[:-1], trap, minlength=m)
    else:
        auc = np.zeros(m)
    auc = np.where(n >= 2, auc, np.nan)
    out = {"mean": mean}
    out.update(_phase_means(s, x, y, m, horizon, windows))
    out.update({"final": final, "auc": auc, "slope": slope})
    return out


def curvature_summaries(
    ss: SortedSeries,
    horizon: np.ndarray,
    windows: Mapping,
    *,
    bandwidth: float,
    degree: int = 3,
    resolution: int = 10,
) -> dict[str, np.ndarray]:
    """Mean loss-curve curvature ``d^2 log(y) / d step^2`` overall and per phase, for every series.

    The curvature is estimated on a regular grid of steps (see
    :mod:`dynamics.analysis.loss_curvature`), so these are time averages: a densely logged stretch
    of training does not weigh more than a sparsely logged one. Non-positive values are dropped.
    Keys: ``curv_mean`` and ``curv_<phase>``.
    """
    pos = ss.y > 0
    centers, d2 = curvature_on_grid(
        ss.series[pos],
        ss.x[pos],
        np.log(ss.y[pos]),
        ss.n_series,
        bandwidth=bandwidth,
        degree=degree,
        resolution=resolution,
    )
    ok = np.isfinite(d2)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"curv_mean": np.where(ok.any(axis=1), np.nansum(d2, axis=1) / ok.sum(axis=1), np.nan)}
        frac = centers / horizon[:, None]
        for name, (lo, hi) in windows.items():
            inside = ok & ((frac <= hi) if lo == 0 else ((frac > lo) & (frac <= hi)))
            cnt = inside.sum(axis=1)
            tot = np.where(inside, d2, 0.0).sum(axis=1)
            out[f"curv_{name}"] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return out
