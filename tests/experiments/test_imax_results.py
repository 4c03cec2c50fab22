"""results.md tables from run stores (synthetic RunSet), the attainable-p helpers, presets and the resume guard."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dynamics.experiments.imax_dmax import results as R
from dynamics.experiments.imax_dmax.constructions import ARMS
from dynamics.experiments.imax_dmax.pipeline import _check_config, run_name
from dynamics.experiments.imax_dmax.presets import (
    FULL,
    MAIN,
    QUICK,
    get_preset,
    parse_replicate,
    preset_from_json,
)
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.store.reader import RunSet

# Per (model, arm): the score of task 0; task t adds 0.01 * t.
BASE = {
    ("a", "IMAX"): 0.60, ("a", "DMAX"): 0.50, ("a", "DMAX-mixed"): 0.55, ("a", "DMAX-3stage"): 0.525,
    ("b", "IMAX"): 0.40, ("b", "DMAX"): 0.45, ("b", "DMAX-mixed"): 0.42, ("b", "DMAX-3stage"): 0.44,
}  # fmt: skip


def _runset():
    runs, scores = [], []
    for (model, arm), b in BASE.items():
        rid = f"{model}-{arm}"
        runs.append(
            {"run_id": rid, "construction": arm, "model": model, "seed": "d0-st0-i0", "path": "/nonexistent"}
        )
        vals = [b + 0.01 * i for i in range(len(TASK_NAMES))]
        for t, v in zip(TASK_NAMES, vals, strict=True):
            scores += [
                {"run_id": rid, "task": t, "metric": "score", "value": v},
                {"run_id": rid, "task": t, "metric": "score_home", "value": v + 0.1},
                {"run_id": rid, "task": t, "metric": "score_shifted", "value": v - 0.1},
            ]
        scores.append({"run_id": rid, "task": "", "metric": "multitask_score", "value": float(np.mean(vals))})
    metrics = pd.DataFrame(
        {
            "run_id": [r["run_id"] for r in runs],
            "step": 1,
            "name": "loss",
            "task": "",
            "task_b": "",
            "value": 1.0,
        }
    )
    return RunSet.from_frames(pd.DataFrame(runs), metrics, pd.DataFrame(scores))


def _baselines(v=0.5):
    return {"d0-st0-i0": {k: {t: {"score": v} for t in TASK_NAMES} for k in ("majority", "blind")}}


def test_learning_table_counts_runs_beating_their_replicates_majority():
    per_run = R.run_scores(_runset())
    lt = R.learning_table(per_run, _baselines(), list(ARMS))
    # calculation (offset 0): IMAX runs 0.60, 0.40 -> one reaches 0.55; DMAX 0.50, 0.45 -> none
    assert (lt.loc["calculation", "beat_IMAX"], lt.loc["calculation", "n_IMAX"]) == (1, 2)
    assert lt.loc["calculation", "beat_DMAX"] == 0
    # vqa (offset 0.06): DMAX-mixed 0.61, 0.48 -> one
    assert lt.loc["vqa", "beat_DMAX-mixed"] == 1
    assert lt.loc["vqa", "IMAX"] == pytest.approx((0.66 + 0.46) / 2)


def test_gap_closed_by_hand():
    per_run = R.run_scores(_runset())
    m = R.paired_means(per_run, ["IMAX", "DMAX", "DMAX-3stage"], ["calculation"])
    imax, dmax, three = (0.60 + 0.40) / 2, (0.50 + 0.45) / 2, (0.525 + 0.44) / 2
    assert m.loc["IMAX", "calculation"] == pytest.approx(imax)
    assert R.gap_closed(imax, dmax, three) == pytest.approx((three - dmax) / (imax - dmax))
    assert np.isnan(R.gap_closed(0.5, 0.495, 0.6))  # no gap to close


def test_min_p_signed_rank_is_the_exact_wilcoxon_minimum():
    for n in range(1, 9):
        d = np.arange(1, n + 1, dtype=float)  # every pair the same sign: the most extreme pattern
        assert R.min_p_signed_rank(n) == pytest.approx(stats.wilcoxon(d, method="exact").pvalue)
        # brute force over all 2^n sign flips of the mean difference
        flips = [np.mean(d * s) for s in itertools.product([-1, 1], repeat=n)]
        assert R.min_p_signed_rank(n) == pytest.approx(np.mean(np.abs(flips) >= np.mean(d) - 1e-12))


def test_min_p_permutation_corr_is_the_exact_permutation_minimum():
    for n in (3, 4, 5):
        x = np.arange(n, dtype=float)
        res = stats.permutation_test(
            (x, x),
            lambda a, b: stats.spearmanr(a, b).statistic,
            permutation_type="pairings",
            n_resamples=10**6,
        )
        assert R.min_p_permutation_corr(n) == pytest.approx(res.pvalue)


def test_write_results_leads_with_what_the_run_supports(tmp_path):
    rs = _runset()
    st = {"images": 10, "entries": 75, "tasks_per_image": 4.1, "entries_per_image": 7.5,
          "entries_per_task": {t: 1 for t in TASK_NAMES}, "sources_per_task": {t: [0] for t in TASK_NAMES}}  # fmt: skip
    data = {"d0-st0-i0": {c: st for c in ("IMAX", "DMAX", "DMAX-mixed")} | {"eval": {"images": 3}}}
    text = R.write_results(tmp_path, rs, MAIN.to_json(), data, _baselines(0.1), []).read_text()
    head = text.splitlines()[2]
    assert "What this run can and cannot support" in head and "2 pair(s) per arm pair" in head
    assert "2/2^2 = **0.5**" in head and "no arm difference here can be significant" in head
    assert "No pretrained start" in text  # no pretrained/ folder next to these synthetic runs
    assert "| IMAX − DMAX | density and source coverage together" in text
    assert "no Fisher signals" in text  # this synthetic store has no probe signals


def test_presets_and_fingerprint(tmp_path):
    for p in (QUICK, MAIN, FULL):
        assert preset_from_json(json.loads(json.dumps(p.to_json()))) == p
    assert get_preset("quick") is QUICK and get_preset("main") is MAIN
    assert (
        len(FULL.models) >= 5
        and len({r[0] for r in FULL.replicates}) > 1
        and len({r[1] for r in FULL.replicates}) > 1
    )
    assert set(FULL.arms) == set(ARMS)
    more = FULL.with_overrides(models=["llava"], seeds=["5", "1:2:3"], arms=["imax", "DMAX"])
    assert (
        more.models == ("llava",)
        and more.replicates == ((5, 5, 5), (1, 2, 3))
        and more.arms == ("IMAX", "DMAX")
    )
    assert more.seeds == ("d5-st5-i5", "d1-st2-i3")
    assert more.fingerprint() == FULL.fingerprint()  # models, seeds and arms may grow in a resumed folder
    assert FULL.with_overrides(heterogeneity=0.0).fingerprint() != FULL.fingerprint()
    assert FULL.with_overrides(finetune="lora").fingerprint() != FULL.fingerprint()
    with pytest.raises(ValueError, match="unknown architectures"):
        FULL.with_overrides(models=["gpt4v"])
    with pytest.raises(ValueError, match="unknown arm"):
        FULL.with_overrides(arms=["CMAX"])
    with pytest.raises(ValueError, match="DATA:STYLE:INIT"):
        parse_replicate("1:2")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    _check_config(tmp_path, QUICK)
    _check_config(tmp_path, QUICK.with_overrides(seeds=[1]))
    with pytest.raises(ValueError, match="different configuration"):
        _check_config(tmp_path, QUICK.with_overrides(heterogeneity=0.5))
    assert run_name("llava", "DMAX-mixed", (1, 2, 3)) == "llava-DMAX-mixed-d1-st2-i3"
