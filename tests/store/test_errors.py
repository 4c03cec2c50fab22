"""Run store: bad input is refused with a message that names the fix; nothing flushed is lost."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dynamics import RunWriter, load_runs

TASKS = ["a", "b"]


def test_unknown_task_names_the_declared_tasks(tmp_path):
    with (
        RunWriter(tmp_path / "r", tasks=TASKS) as w,
        pytest.raises(ValueError, match=r"unknown task 'c'.*\['a', 'b'\]"),
    ):
        w.log(0, "loss", 1.0, task="c")
    with RunWriter(tmp_path / "s", tasks=TASKS) as w, pytest.raises(ValueError, match="unknown task"):
        w.log(0, "grad_cosine", 1.0, task="a", task_b="zzz")


@pytest.mark.parametrize("step", [math.nan, math.inf, 1.5])
def test_non_finite_or_fractional_step_is_refused(tmp_path, step):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w, pytest.raises(ValueError, match="finite integer"):
        w.log(step, "loss", 1.0)


def test_mismatched_lengths_and_bad_arguments(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        with pytest.raises(ValueError, match="equal-length"):
            w.log_many([0, 1, 2], "loss", [1.0, 2.0])
        with pytest.raises(ValueError, match="non-empty string"):
            w.log(0, "", 1.0)
    with pytest.raises(RuntimeError, match="closed"):
        w.log(0, "loss", 1.0)
    with pytest.raises(TypeError, match="list of non-empty strings"):
        RunWriter(tmp_path / "t", tasks="ab")


def test_paths_that_are_not_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a run"):
        load_runs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no path matches"):
        load_runs(str(tmp_path / "nothing*"))


def test_corrupt_run_json_is_named_and_the_rows_still_load(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, run_id="the-run") as w:
        w.log(0, "loss", 1.0, task="b")
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"run.json is unreadable"):
        rs = load_runs(tmp_path / "r")
    assert rs.runs.run_id.tolist() == ["the-run"] and rs.runs.tasks.tolist() == [["b"]]
    assert rs.metrics.value.tolist() == [1.0]


def test_half_written_temp_part_is_skipped_with_a_warning(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        w.log_many([0, 1], "loss", [1.0, 2.0], "a")
    (tmp_path / "r" / "metrics" / "part-00001.parquet.tmp").write_bytes(b"PAR1 truncated")
    with pytest.warns(UserWarning, match=r"part-00001\.parquet\.tmp"):
        rs = load_runs(tmp_path / "r")
    assert rs.metrics.value.tolist() == [1.0, 2.0]


_CHILD = textwrap.dedent(
    """
    import sys, time
    from dynamics import RunWriter
    w = RunWriter(sys.argv[1], tasks=["a"], flush_seconds=3600)
    w.log_many(range(100), "loss", [float(i) for i in range(100)], "a")
    w.flush()
    w.log_many(range(100, 150), "loss", 0.0, "a")  # buffered, never flushed
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _start_child(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkill_after_flush_keeps_every_flushed_row(tmp_path):
    proc = _start_child(tmp_path / "r")
    proc.kill()
    proc.wait(timeout=10)
    m = load_runs(tmp_path / "r").metrics
    assert m.step.tolist() == list(range(100))  # the flushed rows, exactly; the unflushed 50 are gone


def test_sigterm_keeps_its_default_action_and_the_flushed_rows(tmp_path):
    # No Python handler is installed over SIGTERM's default: the process dies at once, as the sender
    # asked (even inside a blocking call), and what the background flush wrote is kept.
    proc = _start_child(tmp_path / "r")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    assert load_runs(tmp_path / "r").metrics.step.tolist() == list(range(100))


def test_reading_while_writing(tmp_path):
    w = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600)
    for start in (0, 10):
        w.log_many(range(start, start + 10), "loss", 1.0, "a")
        w.flush()
    w.log_many(range(20, 25), "loss", 1.0, "a")
    assert len(load_runs(tmp_path / "r").metrics) == 20  # two complete parts so far, 5 rows buffered
    w.close()
    assert len(load_runs(tmp_path / "r").metrics) == 25


def test_duplicate_run_ids_are_refused(tmp_path):
    for d in ("x", "y"):
        with RunWriter(tmp_path / d, tasks=TASKS, run_id="same") as w:
            w.log(0, "loss", 1.0)
    with pytest.raises(ValueError, match="appears in both"):
        load_runs(tmp_path)


def test_no_stray_files_after_clean_close(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, flush_every=3) as w:
        w.log_many(range(10), "loss", 1.0)
        w.flush()
        w.log_many(range(10, 12), "loss", 1.0)
        w.log_scores({"a": {"acc": 1.0}})
    names = sorted(os.listdir(tmp_path / "r")) + sorted(os.listdir(tmp_path / "r" / "metrics"))
    assert not [n for n in names if n.endswith(".tmp")]
