"""results.md tables from run stores (synthetic RunSet), presets and the resume guard."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dynamics.experiments.imax_dmax import results as R
from dynamics.experiments.imax_dmax.pipeline import _check_config, run_name
from dynamics.experiments.imax_dmax.presets import FULL, QUICK, get_preset, preset_from_json
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.store.reader import RunSet


def _runset():
    # Two models x two constructions x one seed; task t's score = base + 0.01 * t_index.
    runs, scores = [], []
    base = {("a", "IMAX"): 0.60, ("a", "DMAX"): 0.50, ("b", "IMAX"): 0.40, ("b", "DMAX"): 0.45}
    for (model, cons), b in base.items():
        rid = f"{model}-{cons}"
        runs.append({"run_id": rid, "construction": cons, "model": model, "seed": "0"})
        vals = [b + 0.01 * i for i in range(len(TASK_NAMES))]
        scores += [
            {"run_id": rid, "task": t, "metric": "score", "value": v}
            for t, v in zip(TASK_NAMES, vals, strict=True)
        ]
        scores += [{"run_id": rid, "task": t, "metric": "accuracy", "value": 0.0} for t in TASK_NAMES]
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


def test_multitask_table_by_hand():
    per_run = R.run_scores(_runset())
    assert set(per_run.columns) >= {"construction", "model", "seed", "multitask_score", *TASK_NAMES}
    mt = R.multitask_table(per_run)
    off = 0.01 * np.mean(range(len(TASK_NAMES)))  # mean of the per-task offsets, 0.03
    assert mt.loc["a", "IMAX"] == pytest.approx(0.60 + off)
    assert mt.loc["a", "diff"] == pytest.approx(0.10)
    assert mt.loc["a", "rel_pct"] == pytest.approx(100 * 0.10 / (0.50 + off))
    assert mt.loc["b", "diff"] == pytest.approx(-0.05)
    assert mt.loc["a", "n_seeds"] == 1


def test_task_table_counts_runs_beating_the_majority_baseline():
    per_run = R.run_scores(_runset())
    base = {k: {t: {"score": 0.5} for t in TASK_NAMES} for k in ("majority", "blind")}
    tt = R.task_table(per_run, base)
    # calculation (offset 0): run scores 0.60, 0.50, 0.40, 0.45; only 0.60 >= 0.5 + 0.05
    assert tt.loc["calculation", "beat"] == 1 and tt.loc["calculation", "worst_run"] == pytest.approx(0.40)
    # vqa (offset 0.06): 0.66, 0.56, 0.46, 0.51 -> two runs reach 0.55
    assert tt.loc["vqa", "beat"] == 2
    assert (tt.loc["vqa", "beat_IMAX"], tt.loc["vqa", "beat_DMAX"]) == (1, 1)
    assert tt.loc["vqa", "n_IMAX"] == 2
    assert tt.loc["vqa", "IMAX"] == pytest.approx((0.66 + 0.46) / 2)


def test_write_results_reads_numbers_from_the_runset(tmp_path):
    rs = _runset()
    data = {c: {"images": 10, "entries": 75, "tasks_per_image": 4.1, "entries_per_image": 7.5,
                "entries_per_task": {t: 1 for t in TASK_NAMES}} for c in ("IMAX", "DMAX")}  # fmt: skip
    data["eval"] = {"images": 3}
    base = {k: {t: {"score": 0.1} for t in TASK_NAMES} for k in ("majority", "blind")}
    path = R.write_results(tmp_path, rs, QUICK.to_json(), data, base, [])
    text = path.read_text()
    assert "| a | 0.630 | 0.530 | +0.100 |" in text
    assert "IMAX scores higher for 1 of 2 models." in text
    assert "no Fisher" in text  # this synthetic store has no probe signals


def test_presets_and_fingerprint(tmp_path):
    assert preset_from_json(json.loads(json.dumps(FULL.to_json()))) == FULL
    assert get_preset("quick") is QUICK
    more = FULL.with_overrides(models=["llava"], seeds=[5])
    assert more.models == ("llava",) and more.seeds == (5,)
    assert more.fingerprint() == FULL.fingerprint()  # models and seeds may grow in a resumed folder
    assert FULL.with_overrides(heterogeneity=0.0).fingerprint() != FULL.fingerprint()
    with pytest.raises(ValueError, match="unknown architectures"):
        FULL.with_overrides(models=["gpt4v"])
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    _check_config(tmp_path, QUICK)
    _check_config(tmp_path, QUICK.with_overrides(seeds=[1]))
    with pytest.raises(ValueError, match="different configuration"):
        _check_config(tmp_path, QUICK.with_overrides(heterogeneity=0.5))
    assert run_name("llava", "IMAX", 1) == "llava-IMAX-s1"
