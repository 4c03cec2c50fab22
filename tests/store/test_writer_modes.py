"""RunWriter: what opening an existing run does, the training lock, bad values, time-based flushing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynamics import RunWriter, load_runs
from dynamics.store.writer import DEFAULT_FLUSH_SECONDS, RunExistsError, RunLockedError

TASKS = ["a", "b"]


def _parts(run_dir):
    return sorted((run_dir / "metrics").glob("part-*.parquet"))


# ------------------------------------------------------------------ existing runs
def test_a_new_training_into_an_existing_run_is_refused(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, tags={"seed": 0}) as w:
        w.log_many(range(5), "loss", 1.0, "a")
    before = sorted(p.read_bytes() for p in _parts(tmp_path / "r"))
    with pytest.raises(RunExistsError, match=r"resume_from_checkpoint.*overwrite") as err:
        RunWriter(tmp_path / "r", tasks=TASKS, tags={"seed": 1})
    assert isinstance(err.value, FileExistsError)
    with pytest.raises(RunExistsError):
        RunWriter(tmp_path / "r", tasks=TASKS, resume_step=0)  # step 0 is a fresh start, not a resume
    assert sorted(p.read_bytes() for p in _parts(tmp_path / "r")) == before  # nothing touched
    assert json.loads((tmp_path / "r" / "run.json").read_text())["tags"] == {"seed": 0}
    # The refused writers released the lock: a real resume still works.
    RunWriter(tmp_path / "r", tasks=TASKS, resume_step=4).close()


def test_overwrite_replaces_the_run(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        w.log_many(range(5), "loss", 1.0, "a")
        w.log_scores({"a": {"acc": 0.5}})
        old_id = w.run_id
    with RunWriter(tmp_path / "r", tasks=["x"], overwrite=True, tags={"seed": 9}) as w:
        w.log(0, "loss", 2.0, "x")
    rs = load_runs(tmp_path / "r")
    assert rs.runs.run_id.tolist() != [old_id] and rs.runs.seed.tolist() == [9]
    assert rs.metrics.value.tolist() == [2.0] and rs.scores.empty


def test_resume_drops_later_steps_of_every_metric_from_disk(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600) as w:
        for step in range(1, 21):
            w.log(step, "loss", float(step), "a")
            if step % 10 == 0:
                w.log(step, "grad_cosine", 0.5, "a", "b")
            if step % 3 == 0:
                w.flush()  # several parts, some straddling the checkpoint
    with RunWriter(tmp_path / "r", tasks=TASKS, resume_step=10) as w:
        w.log_many(range(11, 16), "loss", -1.0, "a")
    raw = pq.read_table(tmp_path / "r" / "metrics").to_pandas()
    assert not raw.duplicated(["step", "name", "task", "task_b"]).any() and raw.run_id.nunique() == 1
    loss = raw[raw.name == "loss"].sort_values("step")
    assert loss.step.tolist() == list(range(1, 16))
    assert loss.value.tolist() == [float(s) for s in range(1, 11)] + [-1.0] * 5
    assert raw[raw.name == "grad_cosine"].step.tolist() == [10]


def test_resume_into_an_empty_directory_starts_the_run(tmp_path):
    with RunWriter(tmp_path / "r", tasks=TASKS, resume_step=7) as w:
        w.log(8, "loss", 1.0)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["resumes"][0]["step"] == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resume_step": 3, "overwrite": True},
        {"resume_step": 3, "append": True},
        {"overwrite": True, "append": True},
        {"resume_step": -1},
        {"resume_step": 2.5},
        {"flush_seconds": 0},
    ],
)
def test_contradictory_or_bad_modes_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        RunWriter(tmp_path / "r", tasks=TASKS, **kwargs)


# ------------------------------------------------------------------ two writers
_HOLD = textwrap.dedent(
    """
    import sys, time
    from dynamics.store.writer import RunWriter
    w = RunWriter(sys.argv[1], tasks=["a", "b"])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_second_training_writer_from_another_process_gets_a_clear_error(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        for kwargs in ({"resume_step": 2}, {"overwrite": True}, {}):  # not even to replace it
            with pytest.raises(RunLockedError, match=rf"another training writer \(pid {proc.pid} "):
                RunWriter(tmp_path / "r", tasks=TASKS, **kwargs)
        RunWriter(tmp_path / "r", tasks=TASKS, append=True).close()  # an evaluator may
    finally:
        proc.kill()
        proc.wait()
    RunWriter(tmp_path / "r", tasks=TASKS, resume_step=2).close()  # the kernel freed the lock


def test_a_stale_writer_in_this_process_is_closed_and_an_evaluator_may_append(tmp_path):
    stale = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600)
    stale.log(1, "loss", 1.0, "a")  # buffered only
    with pytest.warns(UserWarning, match="closing the earlier writer"):
        w = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600, resume_step=1)
    assert stale.closed and load_runs(tmp_path / "r").metrics.step.tolist() == [1]
    w.log_many(range(2, 4), "loss", 1.0, "a")
    w.flush()
    with RunWriter(tmp_path / "r", tasks=["a"], append=True) as ev:  # an evaluation script
        assert ev.run_id == w.run_id
        ev.log_scores({"a": {"acc": 0.9}})
        ev.log(2, "eval_loss", 0.3, "a")
    w.log_many(range(4, 6), "loss", 2.0, "a")
    w.log_scores({"b": {"acc": 0.1}})  # merged with the evaluator's, not replacing them
    w.close()
    rs = load_runs(tmp_path / "r")
    assert sorted(rs.metrics[rs.metrics.name == "loss"].step) == [1, 2, 3, 4, 5]
    assert rs.metrics[rs.metrics.name == "eval_loss"].value.tolist() == [0.3]
    assert rs.scores.set_index("task").value.to_dict() == {"a": 0.9, "b": 0.1}
    names = [p.name for p in _parts(tmp_path / "r")]
    writers = {n.split("-")[2].removesuffix(".parquet") for n in names}
    assert len(names) == len(set(names)) == 4 and writers == {stale.writer_id, w.writer_id, ev.writer_id}
    with pytest.raises(FileNotFoundError, match="holds none"):
        RunWriter(tmp_path / "nothing", tasks=TASKS, append=True)
    with pytest.raises(ValueError, match="not declared"):
        RunWriter(tmp_path / "r", tasks=["zzz"], append=True)


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize(
    ("step", "value", "error", "match"),
    [
        (10**19, 1.0, ValueError, r"metric 'loss': step 10000000000000000000 is outside int64"),
        (10**30, 1.0, ValueError, r"metric 'loss': step 10{30} is negative or outside int64"),
        (-1, 1.0, ValueError, r"metric 'loss': step -1 is negative"),
        ("3", 1.0, TypeError, r"metric 'loss': step .*3.* not an integer"),
        (None, 1.0, TypeError, r"metric 'loss': step None is a NoneType"),
        (True, 1.0, TypeError, r"metric 'loss': step True is a bool"),
        (1.5, 1.0, ValueError, r"metric 'loss': step 1.5 is not a finite integer"),
        (
            3,
            "1.5",
            TypeError,
            r"metric 'loss' \(task 'a'\) at step 3: value '1.5' \(str\) is not a real number",
        ),
        (3, "abc", TypeError, r"metric 'loss' \(task 'a'\) at step 3: value 'abc'"),
        (3, True, TypeError, r"at step 3: value True \(bool\)"),
        (3, None, TypeError, r"at step 3: value None \(NoneType\)"),
        (3, 1 + 2j, TypeError, r"at step 3: value .*complex"),
    ],
)
def test_bad_steps_and_values_name_the_metric_the_step_and_the_problem(tmp_path, step, value, error, match):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        with pytest.raises(error, match=match):
            w.log(step, "loss", value, task="a")
        w.log(4, "loss", 1.0, task="a")  # the writer is still usable, and nothing bad got in
    assert load_runs(tmp_path / "r").metrics.step.tolist() == [4]


def test_bad_value_in_a_batch_names_its_own_step(tmp_path):
    with (
        RunWriter(tmp_path / "r", tasks=TASKS) as w,
        pytest.raises(TypeError, match=r"'grad_norm' at step 7"),
    ):
        w.log_many([5, 6, 7], "grad_norm", [1.0, 2.0, "x"])
    with RunWriter(tmp_path / "s", tasks=TASKS) as w, pytest.raises(ValueError, match=r"'loss': step -3"):
        w.log_many(np.array([1, 2, -3]), "loss", 1.0)


def test_tensors_and_numpy_scalars_are_values(tmp_path):
    weight = torch.tensor(2.0, requires_grad=True)
    with RunWriter(tmp_path / "r", tasks=TASKS) as w:
        w.log(np.int64(1), "loss", weight * 3, task="a")  # requires grad: detached
        w.log(2, "loss", np.float32(0.5), task="a")
        w.log_many(torch.tensor([3, 4]), "loss", [torch.tensor(1.0), weight], "a")
        w.log_many([5, 6], "loss", torch.tensor([1.0, 2.0], requires_grad=True), "b")
    m = load_runs(tmp_path / "r").metrics
    assert m.step.tolist() == [1, 2, 3, 4, 5, 6] and m.value.tolist() == [6.0, 0.5, 1.0, 2.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "loss|x"}, r"metric name must not contain '\|'"),
        ({"name": " loss"}, "leading/trailing blanks"),
        ({"name": "lo\nss"}, "control characters"),
        ({"name": 3}, "must be a string, got 3"),
        ({"name": "train/loss", "task": "a"}, "with '/' can only be a global metric"),
    ],
)
def test_names_without_the_separators_the_formats_use(tmp_path, kwargs, match):
    with RunWriter(tmp_path / "r", tasks=TASKS) as w, pytest.raises(ValueError, match=match):
        w.log(**{"step": 0, "value": 1.0, "name": "loss", **kwargs})
    for bad in (["a/b"], ["a|b"], [""], [" a"]):
        with pytest.raises(TypeError, match="task name must"):
            RunWriter(tmp_path / "t", tasks=bad)
    with RunWriter(tmp_path / "u", tasks=TASKS) as w:
        w.log(0, "train/loss", 1.0)  # a global metric keeps its TensorBoard-style name


# ------------------------------------------------------------------ durability by time
def test_rows_reach_disk_within_flush_seconds_without_a_flush_call(tmp_path):
    assert 1 <= DEFAULT_FLUSH_SECONDS <= 5
    w = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=0.3)
    t0 = time.monotonic()
    w.log(0, "loss", 1.0)
    while not _parts(tmp_path / "r"):
        assert time.monotonic() - t0 < 5, "the background flush never wrote"
        time.sleep(0.01)
    assert 0.25 <= time.monotonic() - t0  # not before its time either
    assert load_runs(tmp_path / "r").metrics.step.tolist() == [0]
    w.close()
    assert not w._thread.is_alive()


def test_request_flush_returns_at_once_and_the_thread_writes(tmp_path, monkeypatch):
    import dynamics.store.writer as writer_module

    release = threading.Event()
    real = writer_module._write_table

    def slow_disk(path, table):
        release.wait(10)
        real(path, table)

    monkeypatch.setattr(writer_module, "_write_table", slow_disk)
    w = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600)
    w.log_many(range(100), "loss", 1.0)
    t0 = time.monotonic()
    w.request_flush()
    w.log(100, "loss", 1.0)  # logging never waits on the (stuck) disk either
    assert time.monotonic() - t0 < 0.5
    release.set()
    w.close()
    assert load_runs(tmp_path / "r").metrics.step.tolist() == list(range(101))


_NO_HEAVY_IMPORTS = textwrap.dedent(
    """
    import sys
    from dynamics.store.writer import RunWriter
    w = RunWriter(sys.argv[1], tasks=["a"])
    w.log_many(range(10), "loss", 1.0, "a")
    w.flush()
    w.log_many(range(10, 20), "loss", 1.0, "a")
    heavy = sorted(m for m in ("pandas", "scipy", "matplotlib") if m in sys.modules)
    print("heavy:", heavy, flush=True)
    # exit without close(): the atexit flush writes rows 10..19
    """
)


def test_the_store_writer_imports_nothing_heavy_and_flushes_at_exit(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _NO_HEAVY_IMPORTS, str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "heavy: []" in out.stdout, out.stdout + out.stderr
    assert load_runs(tmp_path / "r").metrics.step.tolist() == list(range(20))


_CHAINED = textwrap.dedent(
    """
    import signal, sys, time
    seen = []
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # e.g. a framework's graceful stop
    from dynamics.store import writer as wm
    w = wm.RunWriter(sys.argv[1], tasks=["a"], flush_seconds=3600)
    w.log_many(range(5), "loss", 1.0, "a")
    flushes = []
    real = w._flush
    w._flush = lambda **kw: (flushes.append(kw), real(**kw))[1]
    print("ready", flush=True)
    while not seen:
        time.sleep(0.01)
    # The handler ran and returned without writing; the background thread writes soon after.
    assert not flushes, flushes
    time.sleep(1.5)
    print("chained", seen, "stop", wm.stop_requested(), "flushed", len(flushes) > 0, flush=True)
    import os; os._exit(0)  # no atexit: only the background flush can have written
    """
)


def test_a_python_sigterm_handler_is_chained_and_nothing_flushes_inside_it(tmp_path):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-c", _CHAINED, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"chained [{int(signal.SIGTERM)}] stop {int(signal.SIGTERM)} flushed True" in out
    assert load_runs(tmp_path / "r").metrics.step.tolist() == list(range(5))


def test_a_writer_dropped_without_close_writes_its_rows_and_frees_the_run(tmp_path):
    import gc

    w = RunWriter(tmp_path / "r", tasks=TASKS, flush_seconds=3600)
    w.log(1, "loss", 1.0)
    del w
    gc.collect()
    assert load_runs(tmp_path / "r").metrics.step.tolist() == [1]
    RunWriter(tmp_path / "r", tasks=TASKS, resume_step=1).close()  # no RunLockedError: the lock was freed
