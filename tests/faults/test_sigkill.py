"""SIGKILL at a random (seeded) point of a real job: the store holds every step older than one
flush interval, loading it never fails, and nothing is kept that the job did not do."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dynamics.store.writer import DEFAULT_FLUSH_SECONDS
from tests.faults import fault_helpers as fh
from tests.faults.jobs import TASKS, writer_value

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(
    ("seed", "flush_seconds", "window"),
    [(0, None, (DEFAULT_FLUSH_SECONDS + 1.5, DEFAULT_FLUSH_SECONDS + 3.5)), (1, 0.5, (1.8, 3.0))],
)
def test_writer_killed_keeps_every_row_older_than_one_flush_interval(tmp_path, seed, flush_seconds, window):
    out, side = tmp_path / "run", tmp_path / "done.txt"
    args = ["--step-seconds", "0.02"] + (["--flush-seconds", str(flush_seconds)] if flush_seconds else [])
    proc = fh.start_job("writer", out, side, *args)
    try:
        t_kill = fh.kill_at_random_point(proc, side, out, seed=seed, lo=window[0], hi=window[1])
    finally:
        fh.stop(proc)
    interval = flush_seconds or DEFAULT_FLUSH_SECONDS
    kept, due = fh.assert_kept_all_but_the_last_interval(out, side, t_kill, interval, name="loss")
    runs, _ = fh.load_quietly(out)
    m = runs.metrics[runs.metrics["name"] == "loss"]
    # Whole steps only (one log_many call is one unit), each value exactly what was logged.
    assert (m.groupby("step").size() == len(TASKS)).all()
    assert all(v == writer_value(s, t) for s, t, v in zip(m.step, m.task, m.value, strict=True))
    assert len(due) >= 20


def test_plain_loop_killed_keeps_every_step_older_than_one_flush_interval(tmp_path):
    # Steps of 0.4 s (a real model's pace): a recorder that syncs its sums every 16 steps would
    # hold the rows for 6.4 s, longer than the flush interval.
    out, side = tmp_path / "run", tmp_path / "done.txt"
    proc = fh.start_job("loop", out, side, "--step-seconds", "0.4")
    try:
        fh.wait_for_steps(proc, side, 1, out)
        interval = fh.flush_interval(out)  # the recorder's default, as run.json records it
        t_kill = fh.kill_at_random_point(proc, side, out, seed=2, lo=interval + 2, hi=interval + 3.5)
    finally:
        fh.stop(proc)
    fh.assert_kept_all_but_the_last_interval(out, side, t_kill, interval, name="train_loss")


def test_hf_trainer_killed_keeps_every_step_older_than_one_flush_interval(tmp_path):
    out, side = tmp_path / "out", tmp_path / "done.txt"
    proc = fh.start_job("hf", out, side, "--step-seconds", "0.4")
    try:
        fh.wait_for_steps(proc, side, 1, out)
        interval = fh.flush_interval(out / "dynamics")
        t_kill = fh.kill_at_random_point(proc, side, out, seed=3, lo=interval + 2, hi=interval + 3.5)
    finally:
        fh.stop(proc)
    fh.assert_kept_all_but_the_last_interval(out / "dynamics", side, t_kill, interval, name="train_loss")


@pytest.mark.parametrize("kind", ["loop", "hf"])
def test_killed_in_a_stalled_step_keeps_every_step_before_it(tmp_path, kind):
    # A step that never ends (a hung collective, a long checkpoint save) after fast ones: the steps
    # before it must reach the disk on the store's clock, not wait for the next step to end.
    out, side = tmp_path / "out", tmp_path / "done.txt"
    proc = fh.start_job(kind, out, side, "--step-seconds", "0.1", "--stall-after", "10")
    run_dir = out / "dynamics" if kind == "hf" else out
    try:
        fh.wait_for_steps(proc, side, 10, out)
        interval = fh.flush_interval(run_dir)
        t_last = fh.done_steps(side)[-1][1]
        time.sleep(max(0.0, t_last + interval + fh.WRITE_SLACK + 1.0 - time.time()))
        assert len(fh.done_steps(side)) == 10, "the stalled step ended"
        t_kill = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        fh.stop(proc)
    kept, due = fh.assert_kept_all_but_the_last_interval(run_dir, side, t_kill, interval, name="train_loss")
    assert due == set(range(1, 11))
