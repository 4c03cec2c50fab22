"""A full disk, simulated by a real failing write (RLIMIT_FSIZE=0 makes every file write fail with
EFBIG): training goes on, the error is reported once, nothing already on disk is lost."""

from __future__ import annotations

import pytest

from tests.faults import fault_helpers as fh

pytestmark = pytest.mark.faults

FULL_FOR = 6.5  # seconds without disk space: longer than any default flush interval (3 s store, 5 s recorder)


def test_training_goes_on_through_a_full_disk_and_every_row_lands_once_there_is_room(tmp_path):
    out = tmp_path / "run"
    # 0.1 s steps: the disk fills at step 80, for FULL_FOR seconds; the first rows are on disk by
    # then (the store writes within the recorder's 5 s flush interval).
    args = [
        "--steps",
        "1000000",
        "--step-seconds",
        "0.1",
        "--disk-full-at",
        "80",
        "--disk-full-for",
        str(FULL_FOR),
    ]
    # Output to a pipe: a log file would be a write that fails too.
    proc = fh.start_job("loop", out, None, *args, "--sync-every", "4", pipe=True)
    log, before = [], {}
    try:
        for line in proc.stdout:  # live, to look at the disk when it fills
            log.append(line)
            if line.startswith("disk full"):
                before = {p.name: p.read_bytes() for p in (out / "metrics").glob("part-*.parquet")}
        proc.wait(timeout=180)
    finally:
        fh.stop(proc)
    text = "".join(log)
    assert proc.returncode == 0 and "finished" in text, text[-3000:]  # trained on, scores recorded, closed
    assert before, "nothing was on disk before the disk filled: the test proves nothing"
    assert text.count("could not write") == 1, text[-3000:]  # reported once, not once per flush
    assert "File too large" in text or "disk is full" in text
    after = {p.name: p.read_bytes() for p in (out / "metrics").glob("part-*.parquet")}
    assert all(after.get(name) == data for name, data in before.items())  # not a byte lost or changed
    runs, _ = fh.load_quietly(out)
    last = int(text.split("disk free at step ")[1].split()[0]) + 10
    # Every step is on disk: the rows buffered while the disk was full were written once it had room.
    assert sorted(set(runs.metrics.loc[runs.metrics["name"] == "train_loss", "step"])) == list(
        range(1, last + 1)
    )
    assert set(runs.scores.task) >= {"a", "b", "c"}


def test_a_disk_full_from_the_start_to_the_end_still_lets_training_finish(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "20", "--step-seconds", "0.02", "--disk-full-at", "1"]
    proc = fh.start_job("loop", out, None, *args, pipe=True)
    try:
        text, _ = proc.communicate(timeout=180)
    finally:
        fh.stop(proc)
    assert proc.returncode == 0 and "step 20" in text and "finished" in text, text[-3000:]
    assert text.count("could not write") == 1 and "rows that could not be written" in text, text[-3000:]
    runs, _ = fh.load_quietly(out)  # run.json, written before the disk filled, is intact
    assert len(runs.runs) == 1 and runs.metrics.empty
