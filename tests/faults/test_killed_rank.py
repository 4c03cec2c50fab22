"""torchrun x2 over gloo, one rank SIGKILLed: the other exits within seconds, its rows on disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults import fault_helpers as fh

pytestmark = pytest.mark.faults

EXIT_WITHIN = 10.0  # seconds from the kill until the surviving rank is gone (torchrun's own grace is 30 s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by torchrun) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("killed_rank", [1, 0])
def test_a_killed_rank_lets_the_other_exit_within_seconds_with_its_rows_on_disk(tmp_path, killed_rank):
    out, side = tmp_path / "run", tmp_path / "done.txt"
    # sync_every=1: the per-step sums reach the writer every step (one all-reduce per step).
    args = ["--ddp", "--sync-every", "1", "--probe-every", "0", "--step-seconds", "0.1"]
    proc = fh.start_job("loop", out, side, *args, torchrun=True)
    try:
        fh.wait_for_steps(proc, side, 1, out, timeout=180)
        pids = {r: int(Path(f"{side}.rank{r}.pid").read_text()) for r in (0, 1)}
        interval = fh.flush_interval(out)
        time.sleep(interval + 1.5)
        t_kill = time.time()
        os.kill(pids[killed_rank], 9)
        survivor = pids[1 - killed_rank]
        while _alive(survivor) and time.time() - t_kill < 60:
            time.sleep(0.05)
        took = time.time() - t_kill
        proc.wait(timeout=60)
    finally:
        fh.stop(proc)
    print(f"rank {1 - killed_rank} exited {took:.2f} s after rank {killed_rank} was killed")
    assert took < EXIT_WITHIN, f"rank {1 - killed_rank} took {took:.1f} s to exit:\n{fh.job_log(out)[-3000:]}"
    assert proc.returncode != 0  # torchrun reports the failure
    # Rank 0 is the writer: whether it was killed or left on its own, what it had flushed is kept.
    fh.assert_kept_all_but_the_last_interval(out, side, t_kill, interval, name="train_loss")
