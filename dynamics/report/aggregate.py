"""Shape metric rows for drawing: binned curves (mean and spread over runs) and phase averages.

These are descriptive summaries of what a page draws, not tests: the statistics that the findings
quote come from :mod:`dynamics.analysis`.

Binned curves. Steps are cut into at most ``n_bins`` equal-width bins on ``[0, max step]``; each
run's values are first averaged within a bin (so a run logging every step and one logging every
tenth step weigh the same), then, per group and bin, over runs:
``mean = (1/n) sum_r x_r`` and ``sd = sqrt(sum_r (x_r - mean)^2 / (n - 1))`` (NaN for one run).

Phases. The statistics layer's rule (:func:`dynamics.analysis.series.phase_of`): a row at step s
of a run with n_steps S lies in phase ``early`` if s/S <= 1/3, ``middle`` if s/S <= 2/3, else
``late``; each run is averaged within a phase, then runs are averaged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dynamics.analysis.series import DEFAULT_PHASES, phase_of

__all__ = ["binned_curves", "phase_means", "PHASE_NAMES", "LOSS_BINS", "PROBE_BINS"]

PHASE_NAMES = ("early", "middle", "late")


def _finite(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[np.isfinite(rows["value"].to_numpy())]


LOSS_BINS = 150
PROBE_BINS = 60  # probe signals are sparser and noisier: fewer, wider bins


def binned_curves(
    rows: pd.DataFrame, *, n_bins: int = LOSS_BINS, by: tuple[str, ...] = ("task",)
) -> pd.DataFrame:
    """Per (group, *by, bin): columns ``step`` (bin centre), ``mean``, ``sd``, ``n_runs``.

    ``rows`` are metric rows with a ``group`` column (see ``ReportContext.metric``).
    """
    rows = _finite(rows)
    cols = ["group", *by, "step", "mean", "sd", "n_runs"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    steps = rows["step"].to_numpy()
    unique_steps = np.unique(steps)
    if len(unique_steps) <= n_bins:
        centre = steps.astype(float)
    else:
        lo, hi = float(unique_steps[0]), float(unique_steps[-1])
        width = (hi - lo) / n_bins
        index = np.minimum(((steps - lo) / width).astype(np.int64), n_bins - 1)
        centre = lo + (index + 0.5) * width
    keys = ["group", *by]
    frame = rows[["run_id", *keys]].assign(step=centre, value=rows["value"].to_numpy())
    per_run = (
        frame.groupby(["run_id", *keys, "step"], sort=False, observed=True)["value"].mean().reset_index()
    )
    out = (
        per_run.groupby([*keys, "step"], sort=True, observed=True)["value"]
        .agg(mean="mean", sd="std", n_runs="count")
        .reset_index()
    )
    return out[cols]


def phase_means(
    rows: pd.DataFrame, n_steps: pd.Series, *, by: tuple[str, ...] = ("task", "task_b"), phases=DEFAULT_PHASES
) -> pd.DataFrame:
    """Per (group, phase, *by): ``value`` = mean over runs of each run's phase mean; ``n_runs``.

    ``n_steps`` maps run_id to the run's last step (``RunSet.runs``'s ``n_steps``).
    """
    rows = _finite(rows)
    cols = ["group", "phase", *by, "value", "n_runs"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    total = rows["run_id"].map(n_steps).to_numpy(dtype=float)
    frac = rows["step"].to_numpy() / np.where(total > 0, total, 1.0)
    code = phase_of(frac, tuple(phases))
    phase = pd.Categorical.from_codes(np.minimum(code, 2), categories=list(PHASE_NAMES))
    frame = rows[["run_id", "group", *by, "value"]].assign(phase=phase)
    per_run = frame.groupby(["run_id", "group", "phase", *by], observed=True)["value"].mean().reset_index()
    out = (
        per_run.groupby(["group", "phase", *by], observed=True)["value"]
        .agg(value="mean", n_runs="count")
        .reset_index()
    )
    return out[cols]
