"""A full disk, simulated by a real failing write (RLIMIT_FSIZE=0 makes every file write fail with
EFBIG): training goes on, the error is reported once, nothing already on disk is lost."""

from __future__ import annotations

import pytest

from tests.faults import fault_helpers as fh

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("recovers", [True, False])
def test_a_full_disk_never_stops_training_nor_loses_what_is_on_disk(tmp_path, recovers):
    out = tmp_path / "run"
    # 0.1 s steps at the default flush interval: the disk fills at step 50 (rows of steps 1..~20 are
    # on disk by then), and is freed again at step 65 or never.
    args = ["--steps", "75", "--step-seconds", "0.1", "--disk-full-at", "50"]
    args += ["--disk-back-at", "65"] if recovers else []
    # Output to a pipe: a log file would be a write that fails too.
    proc = fh.start_job("loop", out, None, *args, "--sync-every", "4", pipe=True)
    try:
        log, _ = proc.communicate(timeout=180)
    finally:
        fh.stop(proc)
    assert proc.returncode == 0, log[-3000:]
    assert "step 75" in log and "finished" in log  # every step trained, scores recorded, closed
    assert log.count("could not write") == 1, log[-3000:]  # reported once, not once per flush
    assert "File too large" in log or "disk is full" in log
    runs, _ = fh.load_quietly(out)
    steps = sorted(set(runs.metrics.loc[runs.metrics["name"] == "train_loss", "step"]))
    if recovers:
        assert steps == list(range(1, 76))  # the buffered rows were retried once there was room
        assert set(runs.scores.task) >= {"a", "b", "c"}
    else:
        # The rows written before the disk filled are all there, in order; the rest could not be.
        assert steps == list(range(1, len(steps) + 1)) and 8 <= len(steps) < 50
        assert "rows that could not be written" in log
