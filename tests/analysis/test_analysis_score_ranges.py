"""Declared score ranges (run.json meta["score_ranges"]): lower-is-better metrics mapped into [0, 1],
the one definition of the overall score, and `dynamics summary` / `report` on such runs with no flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from dynamics import RunWriter, load_runs
from dynamics.analysis import features, multitask_score
from dynamics.analysis.scores import declared_score_ranges
from dynamics.cli import app

RANGES = {"calc": {"mae": [2.0, 0.0]}, "vqa": {"accuracy": [0.0, 1.0]}}


def _write(root, n_pairs=3):
    """Reproduction-like runs: a task scored by MAE (lower is better, natural range [0, 2]), a task
    scored by accuracy plus an extra metric, and a stored run-level score computed by the writer."""
    rng = np.random.default_rng(0)
    for c in ("DMAX", "IMAX"):
        for m in range(n_pairs):
            mae = float(rng.uniform(0.3, 1.5)) - (0.2 if c == "IMAX" else 0.0)
            acc = float(rng.uniform(0.4, 0.8)) + (0.05 if c == "IMAX" else 0.0)
            overall = np.mean([1 - mae / 2.0, acc])
            tags = {"construction": c, "model": f"m{m}", "seed": 0}
            with RunWriter(
                root / f"{c}-{m}", tasks=["calc", "vqa"], tags=tags, meta={"score_ranges": RANGES}
            ) as w:
                steps = np.arange(1, 31)
                for t in ("calc", "vqa"):
                    w.log_many(steps, "loss", 2 / np.sqrt(steps) + 0.01 * rng.standard_normal(30), t)
                w.log_scores({"calc": {"mae": mae, "rmse": 2 * mae}, "vqa": {"accuracy": acc, "bleu": 0.1},
                              "": {"multitask_score": overall}})  # fmt: skip
    return root


def test_declared_ranges_map_lower_is_better_metrics_and_match_the_stored_score(tmp_path):
    runs = load_runs(_write(tmp_path))
    assert declared_score_ranges(runs) == {"calc": {"mae": (2.0, 0.0)}, "vqa": {"accuracy": (0.0, 1.0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "multitask_score is NaN" warning any more
        feats = features(runs)
    # One definition: the declared metrics, mapped by (v - worst) / (best - worst), averaged over tasks,
    # is the number the writer stored as its run-level score.
    np.testing.assert_allclose(feats["multitask_score"], feats["score/all/multitask_score"], rtol=1e-12)
    mae = feats["score/calc/mae"]
    expected = ((mae - 2.0) / (0.0 - 2.0)).clip(0, 1) / 2 + feats["score/vqa/accuracy"] / 2
    np.testing.assert_allclose(feats["multitask_score"], expected, rtol=1e-12)


def test_declared_ranges_clip_into_the_unit_interval():
    import pandas as pd

    s = pd.DataFrame({"run_id": ["a", "b"], "task": "calc", "metric": "mae", "value": [3.0, -1.0]})
    out = multitask_score(s, score_ranges={"calc": {"mae": [2.0, 0.0]}})
    assert out.to_dict() == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="worst == best"):
        multitask_score(s, score_ranges={"calc": {"mae": [1.0, 1.0]}})


def test_without_a_declaration_the_error_names_the_metadata_and_the_stored_score(tmp_path):
    import pandas as pd

    from dynamics.store.reader import RunSet

    scores = pd.DataFrame({"run_id": "r", "task": ["calc", ""], "metric": ["mae", "multitask_score"],
                           "value": [0.5, 0.7]})  # fmt: skip
    metrics = pd.DataFrame(
        {"run_id": "r", "step": [1], "name": "loss", "task": "calc", "task_b": "", "value": [1.0]}
    )
    with pytest.warns(UserWarning, match=r"score_ranges.*score/all/multitask_score"):
        features(RunSet.from_frames(pd.DataFrame({"run_id": ["r"]}), metrics, scores))


def test_summary_and_report_work_with_no_flags(tmp_path):
    root = _write(tmp_path / "runs", n_pairs=2)
    runner = CliRunner()
    result = runner.invoke(app, ["summary", str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (
        "Correlation with multitask_score" in result.output
        and "no finding can be significant" in result.output
    )
    result = runner.invoke(app, ["report", str(root), "-o", str(tmp_path / "r.pdf"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "left out Feature-score" not in result.output and "left out Early" not in result.output
