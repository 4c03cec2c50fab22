"""A truncated part, a half-written run.json, a temporary file left by a kill mid-flush: loading
never fails, says what it skipped, and loses nothing else."""

from __future__ import annotations

import json

import pytest

from dynamics import RunWriter, load_runs
from dynamics.store.writer import RunExistsError

pytestmark = pytest.mark.faults

TASKS = ["a", "b"]


def _three_parts(run_dir):
    with RunWriter(run_dir, tasks=TASKS, run_id="r1", tags={"seed": 3}, flush_seconds=3600) as w:
        for chunk in range(3):
            w.log_many(range(chunk * 10, chunk * 10 + 10), "loss", 1.0, "a")
            w.flush()
    return sorted((run_dir / "metrics").glob("part-*.parquet"))


def test_a_truncated_part_is_skipped_by_name_and_the_others_load(tmp_path):
    parts = _three_parts(tmp_path / "r")
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=rf"skipping unreadable part .*{parts[1].name}"):
        rs = load_runs(tmp_path / "r")
    assert rs.metrics.step.tolist() == [*range(10), *range(20, 30)]
    # A resume leaves the damaged part alone (and says so) and still drops later steps elsewhere.
    with pytest.warns(UserWarning, match="leaving unreadable part"):
        RunWriter(tmp_path / "r", tasks=TASKS, resume_step=5).close()
    with pytest.warns(UserWarning, match="skipping unreadable part"):
        assert load_runs(tmp_path / "r").metrics.step.tolist() == list(range(6))


def test_a_half_written_run_json_still_loads_every_row(tmp_path):
    _three_parts(tmp_path / "r")
    run_json = tmp_path / "r" / "run.json"
    text = run_json.read_text()
    run_json.write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match=r"run.json is unreadable.*restore run.json"):
        rs = load_runs(tmp_path / "r")
    assert rs.runs.run_id.tolist() == ["r1"] and rs.runs.tasks.tolist() == [["a"]]
    assert rs.metrics.step.tolist() == list(range(30))
    # A writer will not guess: a new training is refused, a resume names the fix, overwrite replaces.
    with pytest.raises(RunExistsError, match="overwrite"):
        RunWriter(tmp_path / "r", tasks=TASKS)
    with pytest.raises(ValueError, match=r"run.json is unreadable.*overwrite=True"):
        RunWriter(tmp_path / "r", tasks=TASKS, resume_step=5)
    RunWriter(tmp_path / "r", tasks=TASKS, overwrite=True).close()
    assert json.loads(run_json.read_text())["tasks"] == TASKS and load_runs(tmp_path / "r").metrics.empty


def test_a_temporary_file_left_mid_flush_is_named_and_ignored_by_raw_readers(tmp_path):
    import pyarrow.parquet as pq

    _three_parts(tmp_path / "r")
    (tmp_path / "r" / "metrics" / ".part-000004-deadbeef.parquet.tmp").write_bytes(b"PAR1 torn")
    with pytest.warns(UserWarning, match=r"skipping 1 temporary file.*\.part-000004-deadbeef\.parquet\.tmp"):
        assert len(load_runs(tmp_path / "r").metrics) == 30
    assert pq.read_table(tmp_path / "r" / "metrics").num_rows == 30  # hidden: pyarrow's dataset skips it
