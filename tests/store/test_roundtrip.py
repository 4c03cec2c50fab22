"""Run store: what is logged is what is loaded, across runs, flushes and resumes."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dynamics import RunWriter, load_runs
from dynamics.store.reader import RunSet

TASKS = ["ctr", "report", "vqa"]


def _random_rows(rng: np.random.Generator, n: int, step0: int = 0) -> pd.DataFrame:
    steps = step0 + np.sort(rng.integers(0, 50, n))
    names = rng.choice(["loss", "grad_norm", "grad_cosine"], n)
    tasks = rng.choice(TASKS, n)
    task_b = np.where(names == "grad_cosine", rng.choice(TASKS, n), "")
    values = rng.normal(size=n)
    frame = pd.DataFrame({"step": steps, "name": names, "task": tasks, "task_b": task_b, "value": values})
    # Keys are unique by construction so the expected frame is unambiguous.
    return frame.drop_duplicates(["step", "name", "task", "task_b"], keep="last").reset_index(drop=True)


def test_rows_logged_are_rows_loaded_across_runs_and_flushes(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for r, flush_every in enumerate([1, 7, 50_000]):
        rows = _random_rows(rng, 300)
        with RunWriter(
            tmp_path / f"run{r}",
            tasks=TASKS,
            tags={"seed": r, "construction": "IMAX"},
            flush_every=flush_every,
        ) as w:
            half = len(rows) // 2
            for row in rows.iloc[:half].itertuples(index=False):
                w.log(row.step, row.name, row.value, task=row.task, task_b=row.task_b)
            rest = rows.iloc[half:]
            w.log_many(
                rest.step.to_numpy(),
                rest.name.to_numpy(),
                rest.value.to_numpy(),
                rest.task.to_numpy(),
                rest.task_b.to_numpy(),
            )
            expected[w.run_id] = rows
    rs = load_runs(tmp_path)
    assert len(rs.runs) == 3
    assert list(rs.metrics.dtypes.astype(str)) == ["str", "int64", "str", "str", "str", "float64"]
    for run_id, rows in expected.items():
        got = rs.metrics[rs.metrics.run_id == run_id].drop(columns="run_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(
            got.sort_values(list(got.columns[:4])).reset_index(drop=True),
            rows.astype(got.dtypes.to_dict()).sort_values(list(got.columns[:4])).reset_index(drop=True),
        )
    assert sorted(rs.runs["seed"].tolist()) == [0, 1, 2]
    assert set(rs.runs["construction"]) == {"IMAX"}
    assert rs.runs.set_index("run_id").loc[list(expected), "n_steps"].tolist() == [
        int(r.step.max()) for r in expected.values()
    ]


def test_each_flush_makes_one_part_named_for_its_writer(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600) as w:
        w.log_many(np.arange(12), "loss", np.arange(12.0), "vqa")
        w.flush()
        w.flush()  # nothing buffered: no empty part
        for s in range(12, 15):
            w.log(s, "loss", float(s), "vqa")
    parts = sorted(p.name for p in (tmp_path / "r" / "metrics").glob("part-*.parquet"))
    assert parts == [f"part-000001-{w.writer_id}.parquet", f"part-000002-{w.writer_id}.parquet"]
    assert load_runs(tmp_path / "r").metrics.value.tolist() == list(map(float, range(15)))


def test_flush_every_rows_wakes_the_background_flush(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600, flush_every=5) as w:
        w.log_many(np.arange(6), "loss", 1.0, "vqa")  # over flush_every: written soon, not at close
        deadline = time.monotonic() + 10
        while not list((tmp_path / "r" / "metrics").glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(load_runs(tmp_path / "r").metrics) == 6


def test_nan_and_inf_values_are_data(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        w.log_many([0, 1, 2], "loss", [math.nan, math.inf, -math.inf], "ctr")
    values = load_runs(tmp_path / "r").metrics.value.to_numpy()
    assert np.isnan(values[0]) and values[1] == math.inf and values[2] == -math.inf


def test_scores_round_trip_and_merge(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        w.log_scores({"ctr": {"mae": 0.1}, "vqa": {"accuracy": 0.5}})
        w.log_scores({"vqa": {"accuracy": 0.75}, "": {"multitask_score": 0.6}})
    scores = load_runs(tmp_path / "r").scores.set_index(["task", "metric"]).value
    assert scores[("ctr", "mae")] == 0.1 and scores[("vqa", "accuracy")] == 0.75
    assert scores[("", "multitask_score")] == 0.6 and len(scores) == 3


def test_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, tags={"seed": 1}) as w:
        w.log_many(np.arange(10), "loss", np.zeros(10), "vqa")
        run_id = w.run_id
    # Resume from a checkpoint at step 4: steps 5..9 are logged again with new values.
    with RunWriter(tmp_path / "r", tasks=TASKS, resume_step=4) as w:
        assert w.run_id == run_id
        w.log_many(np.arange(5, 12), "loss", np.ones(7), "vqa")
    m = load_runs(tmp_path / "r").metrics
    assert m.step.tolist() == list(range(12))
    assert m.value.tolist() == [0.0] * 5 + [1.0] * 7
    raw = pq.read_table(tmp_path / "r" / "metrics").to_pandas()  # a reader without our de-duplication
    assert sorted(raw.step) == list(range(12)) and set(raw.run_id) == {run_id}
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["tags"] == {"seed": 1} and [r["step"] for r in info["resumes"]] == [4]
    with pytest.raises(ValueError, match="resume with the same tasks"):
        RunWriter(tmp_path / "r", tasks=["other"], resume_step=4)


def test_from_frames_matches_loaded_dtypes(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, run_id="x") as w:
        w.log(3, "loss", 1.0, "ctr")
    loaded = load_runs(tmp_path / "r")
    built = RunSet.from_frames(
        pd.DataFrame({"run_id": ["x"]}),
        pd.DataFrame(
            {"run_id": ["x"], "step": [3], "name": ["loss"], "task": ["ctr"], "task_b": [""], "value": [1.0]}
        ),
    )
    pd.testing.assert_series_equal(built.metrics.dtypes, loaded.metrics.dtypes)
    assert built.runs.loc[0, "n_steps"] == 3 and built.runs.loc[0, "tasks"] == ["ctr"]


def test_run_json_has_identity_tasks_and_tags(tmp_path):
    with RunWriter(
        tmp_path / "r", tasks=TASKS, tags={"model": "llava", "seed": 0}, meta={"params": 123}
    ) as w:
        w.set_meta(world_size=2)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["tasks"] == TASKS and info["tags"] == {"model": "llava", "seed": 0}
    assert info["meta"] == {"params": 123, "world_size": 2}
    assert info["dynamics_version"] and info["created"]
