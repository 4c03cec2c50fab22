"""The report's descriptive aggregation against brute-force loops, and its number formats."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dynamics.report.aggregate import binned_curves, phase_means
from dynamics.report.pages_geometry import cosine_matrix
from dynamics.report.style import fmt, fmt_p


def _rows(seed: int = 0) -> pd.DataFrame:
    """Three runs in two groups, logging at different step spacings, with a NaN and an inf."""
    rng = np.random.default_rng(seed)
    parts = []
    for run, group, every, last in [("r1", "A", 1, 100), ("r2", "A", 3, 100), ("r3", "B", 2, 80)]:
        steps = np.arange(every, last + 1, every)
        for task in ("a", "b"):
            parts.append(
                pd.DataFrame(
                    {
                        "run_id": run,
                        "group": group,
                        "step": steps,
                        "task": task,
                        "task_b": "",
                        "value": rng.normal(size=len(steps)),
                    }
                )
            )
    rows = pd.concat(parts, ignore_index=True)
    rows.loc[5, "value"] = np.nan
    rows.loc[17, "value"] = np.inf
    return rows


def test_binned_curves_match_brute_force():
    rows = _rows()
    n_bins = 7
    got = binned_curves(rows, n_bins=n_bins, by=("task",))
    ok = rows[np.isfinite(rows["value"])]
    lo, hi = ok["step"].min(), ok["step"].max()
    width = (hi - lo) / n_bins
    expected = {}
    for group in ("A", "B"):
        for task in ("a", "b"):
            for b in range(n_bins):
                per_run = []
                for run in ok["run_id"].unique():
                    vals = [
                        v
                        for s, v, r, g, t in zip(
                            ok["step"], ok["value"], ok["run_id"], ok["group"], ok["task"], strict=True
                        )
                        if r == run
                        and g == group
                        and t == task
                        and min(int((s - lo) // width), n_bins - 1) == b
                    ]
                    if vals:
                        per_run.append(sum(vals) / len(vals))
                if per_run:
                    mean = sum(per_run) / len(per_run)
                    sd = (
                        math.sqrt(sum((x - mean) ** 2 for x in per_run) / (len(per_run) - 1))
                        if len(per_run) > 1
                        else float("nan")
                    )
                    expected[(group, task, lo + (b + 0.5) * width)] = (mean, sd, len(per_run))
    assert len(got) == len(expected)
    for row in got.itertuples():
        mean, sd, n = _lookup(expected, row)
        assert row.mean == pytest.approx(mean, rel=1e-12)
        assert row.n_runs == n
        if n > 1:
            assert row.sd == pytest.approx(sd, rel=1e-12)
        else:
            assert np.isnan(row.sd)


def _lookup(expected: dict, row) -> tuple[float, float, int]:
    for (g, t, centre), value in expected.items():
        if g == row.group and t == row.task and abs(centre - row.step) < 1e-9:
            return value
    raise AssertionError(f"unexpected bin {row}")


def test_binned_curves_keep_steps_when_few():
    rows = _rows()
    got = binned_curves(rows[rows["run_id"] == "r3"], n_bins=1000, by=("task",))
    # r3 logs 40 steps per task; with more bins than steps every logged step is its own point.
    assert sorted(got["step"].unique()) == list(range(2, 81, 2))


def test_phase_means_match_brute_force():
    rows = _rows(1)
    n_steps = pd.Series({"r1": 100, "r2": 100, "r3": 80})
    got = phase_means(rows, n_steps, by=("task",))
    ok = rows[np.isfinite(rows["value"])]
    for row in got.itertuples():
        per_run = []
        for run in ok["run_id"].unique():
            vals = []
            for s, v, r, g, t in zip(
                ok["step"], ok["value"], ok["run_id"], ok["group"], ok["task"], strict=True
            ):
                if r != run or g != row.group or t != row.task:
                    continue
                frac = s / n_steps[run]
                phase = "early" if frac <= 1 / 3 else "middle" if frac <= 2 / 3 else "late"
                if phase == row.phase:
                    vals.append(v)
            if vals:
                per_run.append(sum(vals) / len(vals))
        assert row.n_runs == len(per_run)
        assert row.value == pytest.approx(sum(per_run) / len(per_run), rel=1e-12)
    assert len(got) == 2 * 3 * 2  # groups x phases x tasks


def test_cosine_matrix_is_lower_triangle_either_order():
    rows = pd.DataFrame({"task": ["a", "c", "b"], "task_b": ["b", "a", "b"], "value": [0.5, -0.2, 1.0]})
    mat = cosine_matrix(rows, ["a", "b", "c"])
    assert list(mat.index) == ["b", "c"] and list(mat.columns) == ["a", "b"]
    assert mat.loc["b", "a"] == 0.5
    assert mat.loc["c", "a"] == -0.2  # logged as (c, a): same cell as (a, c)
    assert np.isnan(mat.loc["c", "b"])  # never logged
    assert np.isnan(mat.loc["b", "b"])  # the diagonal is not drawn


@pytest.mark.parametrize(
    ("x", "text"),
    [(0.09999, "0.100"), (1234.5, "1230"), (-0.0123456, "-0.0123"), (2.0, "2.00"), (1e-7, "1.00e-07"), (0.0, "0"),
     (float("nan"), "n/a")],
)  # fmt: skip
def test_fmt(x, text):
    assert fmt(x) == text


@pytest.mark.parametrize(
    ("p", "text"), [(0.5, "0.50"), (0.0312, "0.03"), (0.0049, "0.0049"), (3.14e-5, "3.1e-05")]
)
def test_fmt_p(p, text):
    assert fmt_p(p) == text


def test_report_and_features_share_one_phase_rule_at_the_boundaries():
    """A point at exactly 1/3 or 2/3 of the run falls into the same phase for the report's heatmaps
    and for features()' phase means."""
    from dynamics.analysis import features
    from dynamics.store.reader import RunSet

    steps = np.arange(1, 31)  # 10/30 and 20/30 lie exactly on the boundaries
    metrics = pd.DataFrame({"run_id": "r", "step": steps, "name": "grad_cosine", "task": "a", "task_b": "b",
                            "value": steps.astype(float)})  # fmt: skip
    feats = features(RunSet.from_frames(pd.DataFrame({"run_id": ["r"]}), metrics))
    got = phase_means(metrics.assign(group="g"), pd.Series({"r": 30}), by=("task", "task_b"))
    for phase in ("early", "middle", "late"):
        value = got.loc[got["phase"] == phase, "value"].iloc[0]
        assert value == pytest.approx(feats.loc["r", f"grad_cosine/a|b/{phase}"]), phase
    assert got.loc[got["phase"] == "early", "value"].iloc[0] == pytest.approx(5.5)  # steps 1..10
