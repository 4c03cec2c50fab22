"""A tiny end-to-end reproduction: artefacts, numbers from the stores, resuming."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from dynamics import load_runs
from dynamics.experiments.imax_dmax.pipeline import reproduce
from dynamics.experiments.imax_dmax.presets import Preset
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.train import DONE_FILE, TrainConfig
from dynamics.experiments.imax_dmax.zoo import Dims

TINY = Preset(
    name="tiny",
    models=("idefics3",),
    seeds=(0,),
    n_images=12,
    n_eval=4,
    train=TrainConfig(
        epochs=1.0,
        batch_size=16,
        probe_every=3,
        probe_size=14,
        dims=Dims(hidden=32, intermediate=64, layers=1, vision_layers=1),
    ),
)


def test_tiny_reproduction_writes_artefacts_and_resumes(tmp_path):
    out = tmp_path / "out"
    path = reproduce(out, preset=TINY, progress=False, workers=1)
    assert path == out / "results.md"
    for name in (
        "config.json",
        "data.json",
        "baselines.json",
        "report.pdf",
        "figures/multitask_by_model.png",
    ):
        assert (out / name).exists(), name
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["idefics3-DMAX-s0", "idefics3-IMAX-s0"]

    # results.md's multi-task row is the stores' numbers.
    rs = load_runs(str(out / "runs"))
    sc = rs.scores.merge(rs.runs[["run_id", "construction"]], on="run_id")
    mts = sc[(sc["task"] == "") & (sc["metric"] == "multitask_score")].set_index("construction")["value"]
    per_task = sc[(sc["task"] != "") & (sc["metric"] == "score")].groupby("construction")["value"].mean()
    pd.testing.assert_series_equal(mts.sort_index(), per_task.sort_index(), check_names=False)
    row = re.search(r"\| idefics3 \| ([0-9.]+) \| ([0-9.]+) \|", path.read_text())
    assert float(row.group(1)) == pytest.approx(mts["IMAX"], abs=5e-4)
    assert float(row.group(2)) == pytest.approx(mts["DMAX"], abs=5e-4)
    assert set(sc["task"]) == {"", *TASK_NAMES}
    data = json.loads((out / "data.json").read_text())
    assert data["IMAX"]["entries_per_task"] == data["DMAX"]["entries_per_task"]

    # Resume: finished runs are kept as they are, an interrupted one is trained again.
    done = out / "runs" / "idefics3-IMAX-s0" / DONE_FILE
    stamp = done.stat().st_mtime_ns
    broken = out / "runs" / "idefics3-DMAX-s0"
    (broken / DONE_FILE).unlink()
    reproduce(out, preset=TINY, progress=False, workers=1)
    assert done.stat().st_mtime_ns == stamp
    assert (broken / DONE_FILE).exists()
    assert len(load_runs(str(out / "runs")).runs) == 2

    # A different configuration in the same folder is refused.
    with pytest.raises(ValueError, match="different configuration"):
        reproduce(out, preset=TINY, heterogeneity=0.0, progress=False, workers=1)
    shutil.rmtree(out)
