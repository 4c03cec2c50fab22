"""A tiny end-to-end reproduction (stage 0 + four arms): artefacts, numbers from the stores, resuming."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from dynamics import load_runs
from dynamics.experiments.imax_dmax.constructions import ARMS
from dynamics.experiments.imax_dmax.pipeline import OutLock, ReproductionRunning, reproduce
from dynamics.experiments.imax_dmax.presets import Preset
from dynamics.experiments.imax_dmax.pretrain import PretrainConfig
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.train import DONE_FILE, TrainConfig
from dynamics.experiments.imax_dmax.zoo import Dims

TINY = Preset(
    name="tiny",
    models=("idefics3",),
    replicates=((0, 0, 0),),
    n_images=12,
    n_eval=7,
    n_probe=2,
    train=TrainConfig(
        epochs=1.0,
        batch_size=16,
        probe_every=3,
        probe_size=14,
        dims=Dims(hidden=32, intermediate=64, layers=1, vision_layers=1),
    ),
    pretrain=PretrainConfig(n_images=32, epochs=1.0, batch_size=16),
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
    assert runs == sorted(f"idefics3-{a}-d0-st0-i0" for a in ARMS)
    assert (out / "pretrained" / "idefics3-st0-i0" / "model.pt").exists()

    rs = load_runs(str(out / "runs"))
    assert set(rs.runs["construction"]) == set(ARMS) and set(rs.runs["pretrained"]) == {"yes"}
    # results.md's multi-task numbers are the stores' numbers.
    sc = rs.scores.merge(rs.runs[["run_id", "construction"]], on="run_id")
    mts = sc[(sc["task"] == "") & (sc["metric"] == "multitask_score")].set_index("construction")["value"]
    per_task = sc[(sc["task"] != "") & (sc["metric"] == "score")].groupby("construction")["value"].mean()
    pd.testing.assert_series_equal(mts.sort_index(), per_task.sort_index(), check_names=False)
    row = re.search(r"\| IMAX − DMAX \| [^|]+\| ([0-9.]+) \| ([0-9.]+) \| ([-+0-9.]+) \|", path.read_text())
    assert float(row.group(1)) == pytest.approx(mts["IMAX"], abs=5e-4)
    assert float(row.group(2)) == pytest.approx(mts["DMAX"], abs=5e-4)
    assert set(sc["task"]) == {"", *TASK_NAMES}
    data = json.loads((out / "data.json").read_text())["d0-st0-i0"]
    assert (
        data["IMAX"]["entries_per_task"]
        == data["DMAX"]["entries_per_task"]
        == data["DMAX-mixed"]["entries_per_task"]
    )
    # every run carries the score ranges (INTERFACES.md item 5) and the common-probe rows
    for run_dir in (out / "runs").iterdir():
        assert json.loads((run_dir / "run.json").read_text())["meta"]["score_ranges"] == {
            t: {"score": [0.0, 1.0]} for t in TASK_NAMES
        }
    assert {"fisher_se_common", "fisher_rho_common"} <= set(rs.metrics["name"])
    three = rs.runs.set_index("construction").loc["DMAX-3stage", "path"]
    assert (
        json.loads((out / "runs" / "idefics3-DMAX-3stage-d0-st0-i0" / "pseudo.json").read_text())[
            "real_entries"
        ]
        > 0
    )
    assert three

    # Resume: finished runs and checkpoints are kept as they are, an interrupted run is trained again.
    done = out / "runs" / "idefics3-IMAX-d0-st0-i0" / DONE_FILE
    stamp = done.stat().st_mtime_ns
    ckpt = (out / "pretrained" / "idefics3-st0-i0" / "model.pt").stat().st_mtime_ns
    broken = out / "runs" / "idefics3-DMAX-d0-st0-i0"
    (broken / DONE_FILE).unlink()
    reproduce(out, preset=TINY, progress=False, workers=1, arms=["IMAX", "DMAX"])
    assert done.stat().st_mtime_ns == stamp
    assert (out / "pretrained" / "idefics3-st0-i0" / "model.pt").stat().st_mtime_ns == ckpt
    assert (broken / DONE_FILE).exists()

    # A different configuration in the same folder is refused; so is a second reproduction at once.
    with pytest.raises(ValueError, match="different configuration"):
        reproduce(out, preset=TINY, heterogeneity=0.0, progress=False, workers=1)
    with OutLock(out), pytest.raises(ReproductionRunning, match="another `dynamics reproduce`"):
        reproduce(out, preset=TINY, progress=False, workers=1)
    shutil.rmtree(out)
