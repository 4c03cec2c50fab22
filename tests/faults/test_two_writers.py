"""Two writers on one run, two trainings racing for one directory, a rerun, a resume after SIGKILL:
no sequence loses or silently replaces a row that was written."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from dynamics import RunWriter
from dynamics.store.writer import RunLockedError
from tests.faults import fault_helpers as fh
from tests.faults.jobs import TASKS, writer_value

pytestmark = pytest.mark.faults


def _raw(run_dir):
    """Every row as written, read without dynamics (no de-duplication): what DuckDB or polars see."""
    return pq.read_table(run_dir / "metrics").to_pandas()


def test_an_evaluator_appends_while_training_writes_and_a_second_training_is_refused(tmp_path):
    out, side = tmp_path / "run", tmp_path / "done.txt"
    proc = fh.start_job(
        "writer", out, side, "--steps", "120", "--step-seconds", "0.02", "--flush-seconds", "0.3"
    )
    try:
        fh.wait_for_steps(proc, side, 5, out)
        with pytest.raises(RunLockedError, match=r"another training writer \(pid \d+"):
            RunWriter(out, tasks=TASKS, resume_step=3)
        with RunWriter(out, tasks=TASKS, append=True, flush_seconds=0.1) as ev:
            for k in range(5):
                ev.log(k, "eval_loss", 0.5 + k, "a")
                ev.log_scores({"b": {f"acc{k}": 0.1 * k}})
                time.sleep(0.15)
        proc.wait(timeout=120)
    finally:
        fh.stop(proc)
    assert proc.returncode == 0, fh.job_log(out)[-3000:]
    raw = _raw(out)
    assert not raw.duplicated(["step", "name", "task", "task_b"]).any() and raw.run_id.nunique() == 1
    loss = raw[raw.name == "loss"]
    assert sorted(set(loss.step)) == list(range(1, 121)) and len(loss) == 120 * len(TASKS)
    assert all(v == writer_value(s, t) for s, t, v in zip(loss.step, loss.task, loss.value, strict=True))
    assert sorted(raw[raw.name == "eval_loss"].value) == [0.5, 1.5, 2.5, 3.5, 4.5]
    runs, _ = fh.load_quietly(out)
    assert sorted(runs.scores.metric) == [f"acc{k}" for k in range(5)]
    names = [p.name for p in (out / "metrics").glob("part-*.parquet")]
    assert len({n.rsplit("-", 1)[1] for n in names}) == 2  # two writer ids, never one name twice


def test_two_trainings_racing_for_one_directory_one_wins_whole(tmp_path):
    out = tmp_path / "run"
    logs = [tmp_path / f"job{i}.log" for i in range(2)]
    jobs = [
        fh.start_job("writer", out, None, "--steps", "40", "--step-seconds", "0.01", log=logs[i])
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in jobs]
    finally:
        for p in jobs:
            fh.stop(p)
    assert sorted(codes) == [0, 1], codes
    loser_log = fh.job_log(out, logs[codes.index(1)])
    assert "RunLockedError" in loser_log or "RunExistsError" in loser_log, loser_log[-2000:]
    raw = _raw(out)
    assert len(raw) == 40 * (len(TASKS) + 1) and not raw.duplicated(["step", "name", "task"]).any()


def test_a_rerun_into_the_same_directory_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "run"
    first = fh.start_job("writer", out, None, "--steps", "10")
    assert first.wait(timeout=120) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    again = fh.start_job("writer", out, None, "--steps", "5")
    assert again.wait(timeout=120) == 1
    log = fh.job_log(out)
    assert "RunExistsError" in log and "resume_from_checkpoint" in log and "overwrite" in log
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert after == before  # not a byte of the first run changed
    replaced = fh.start_job("writer", out, None, "--steps", "5", "--overwrite")
    assert replaced.wait(timeout=120) == 0
    raw = _raw(out)
    assert sorted(set(raw.step)) == [1, 2, 3, 4, 5] and raw.run_id.nunique() == 1


def test_sigkill_then_resume_from_a_checkpoint_keeps_each_step_once(tmp_path):
    out, side = tmp_path / "run", tmp_path / "done.txt"
    proc = fh.start_job("writer", out, side, "--step-seconds", "0.01", "--flush-seconds", "0.3")
    try:
        fh.kill_at_random_point(proc, side, out, seed=5, lo=1.5, hi=2.5)
    finally:
        fh.stop(proc)
    on_disk = int(_raw(out).step.max())
    checkpoint = on_disk - on_disk // 3  # the last checkpoint lies before the last flushed step
    resumed = fh.start_job(
        "writer", out, None, "--start", str(checkpoint), "--resume-step", str(checkpoint), "--steps", "20"
    )
    assert resumed.wait(timeout=120) == 0, fh.job_log(out)[-3000:]
    raw = _raw(out)
    assert not raw.duplicated(["step", "name", "task", "task_b"]).any() and raw.run_id.nunique() == 1
    assert sorted(set(raw.step)) == list(range(1, checkpoint + 21))
