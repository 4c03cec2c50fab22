"""multitask_score and delta_m against hand-computed formulas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dynamics.analysis import delta_m, multitask_score


def _scores():
    return pd.DataFrame(
        {
            "run_id": ["r1"] * 4 + ["r2"] * 4,
            "task": ["vqa", "vqa", "report", "", "vqa", "vqa", "report", ""],
            "metric": ["accuracy", "f1", "wer", "average", "accuracy", "f1", "wer", "average"],
            "value": [70.0, 0.6, 0.30, 0.5, 80.0, 0.7, 0.20, 0.6],
        }
    )


def test_directions_ranges_and_per_task_averaging():
    s = _scores()
    got = multitask_score(s, ranges={"accuracy": (0, 100), "f1": (0, 1), "wer": (0, 1)})
    # vqa = mean(acc/100, f1); report = 1 - wer (lower is better); overall score "" left out.
    r1 = ((0.70 + 0.6) / 2 + (1 - 0.30)) / 2
    r2 = ((0.80 + 0.7) / 2 + (1 - 0.20)) / 2
    np.testing.assert_allclose(got.loc[["r1", "r2"]], [r1, r2])
    assert got.name == "multitask_score"
    # "observed": min-max over the runs given, per metric.
    obs = multitask_score(s, ranges="observed")
    np.testing.assert_allclose(obs.loc[["r1", "r2"]], [0.0, 1.0])
    # A lower-is-better metric without a range cannot be averaged: the error names the fix.
    with pytest.raises(ValueError, match=r"report/wer is lower-is-better.*ranges="):
        multitask_score(s)
    # Declared directions win over the name guess.
    flipped = multitask_score(s, directions={"report/wer": "higher"}, ranges={"accuracy": (0, 100)})
    np.testing.assert_allclose(flipped.loc["r1"], ((0.70 + 0.6) / 2 + 0.30) / 2)
    only_acc = multitask_score(s, metrics="accuracy")
    np.testing.assert_allclose(only_acc.loc[["r1", "r2"]], [70.0, 80.0])
    with pytest.raises(ValueError, match="not among"):
        multitask_score(s, metrics=["bleu"])
    with pytest.raises(ValueError, match="'higher' or 'lower'"):
        multitask_score(s, directions={"wer": "sideways"})


def test_missing_task_gives_nan_or_the_mean_of_what_is_there():
    s = pd.DataFrame(
        {"run_id": ["a", "a", "b"], "task": ["t1", "t2", "t1"], "metric": "acc", "value": [0.5, 0.7, 0.9]}
    )
    strict = multitask_score(s)
    assert strict.loc["a"] == pytest.approx(0.6) and np.isnan(strict.loc["b"])
    lenient = multitask_score(s, missing="mean")
    assert lenient.loc["b"] == pytest.approx(0.9)


def test_wide_features_frame_is_accepted():
    wide = pd.DataFrame(
        {
            "run_id": ["x", "y"],
            "score/t1/acc": [0.2, 0.4],
            "score/t2/acc": [0.6, 0.8],
            "score/all/acc": [9, 9],
        },
        index=["x", "y"],
    )
    np.testing.assert_allclose(multitask_score(wide).loc[["x", "y"]], [0.4, 0.6])


def test_delta_m_matches_the_formula_unpaired_and_paired():
    feats = pd.DataFrame(
        {
            "run_id": ["b1", "b2", "m1", "m2"],
            "construction": ["DMAX", "DMAX", "IMAX", "IMAX"],
            "model": ["A", "B", "A", "B"],
            "score/vqa/accuracy": [0.50, 0.60, 0.55, 0.60],
            "score/rep/error": [0.20, 0.40, 0.18, 0.30],
        }
    )
    out = delta_m(feats, by="construction", baseline="DMAX").set_index("run_id")
    base_acc, base_err = 0.55, 0.30
    expect_m1 = 100 / 2 * ((0.55 - base_acc) / base_acc - (0.18 - base_err) / base_err)
    expect_m2 = 100 / 2 * ((0.60 - base_acc) / base_acc - (0.30 - base_err) / base_err)
    np.testing.assert_allclose(out.loc[["m1", "m2"], "delta_m"], [expect_m1, expect_m2])
    assert (out["n_metrics"] == 2).all()
    paired = delta_m(feats, by="construction", baseline="DMAX", pair_on="model").set_index("run_id")
    np.testing.assert_allclose(
        paired.loc[["m1", "m2"], "delta_m"],
        [50 * (0.05 / 0.50 + 0.02 / 0.20), 50 * (0.0 / 0.60 + 0.10 / 0.40)],
    )
    with pytest.raises(ValueError, match="no run has construction == 'BASE'"):
        delta_m(feats, by="construction", baseline="BASE")
    with pytest.raises(ValueError, match="pair_on columns"):
        delta_m(feats, by="construction", baseline="DMAX", pair_on="seed")
