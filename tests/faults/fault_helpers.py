"""Start the fault jobs (tests.faults.jobs) as real processes, kill them, and compare the store with
what they had done."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from dynamics import load_runs

ROOT = Path(__file__).resolve().parents[2]
# A row logged at time t is on disk by t + flush_seconds + the time one write takes; this is a
# generous bound on the latter on a loaded 2-core machine (a part write takes milliseconds).
WRITE_SLACK = 1.0


def start_job(
    kind: str,
    out: Path,
    side: Path | None,
    *args: str,
    torchrun: bool = False,
    pipe: bool = False,
    log: Path | None = None,
) -> subprocess.Popen:
    """``python -m tests.faults.jobs KIND ...`` in its own process group, output to ``<out>.log`` (a
    file, not a pipe: a full pipe would stall the job) or, with ``pipe``, to ``proc.stdout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "-m", "tests.faults.jobs", kind, "--out", str(out)]
    cmd += [*(["--side", str(side)] if side else []), *args]
    stdout = subprocess.PIPE if pipe else open(log or f"{out}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True, text=pipe
    )


def flush_interval(run_dir: Path) -> float:
    """The flush interval the job's writer runs at: a recorder's configured ``flush_seconds`` when
    run.json records one (its callback configuration), else the store's default."""
    from dynamics.store.writer import DEFAULT_FLUSH_SECONDS

    def find(obj: object) -> float | None:
        if isinstance(obj, dict):
            if isinstance(obj.get("flush_seconds"), (int, float)):
                return float(obj["flush_seconds"])
            for value in obj.values():
                if (found := find(value)) is not None:
                    return found
        return None

    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_FLUSH_SECONDS
    return find(info.get("meta", {})) or DEFAULT_FLUSH_SECONDS


def job_log(out: Path, log: Path | None = None) -> str:
    return Path(log or f"{out}.log").read_text()


def done_steps(side: Path) -> list[tuple[int, float]]:
    """``(step, unix time)`` of every step the job completed (a torn last line is ignored)."""
    if not side.exists():
        return []
    rows = []
    for line in side.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].count(".") == 1 and len(parts[1].split(".")[1]) == 6:
            rows.append((int(parts[0]), float(parts[1])))
    return rows


def wait_for_steps(proc: subprocess.Popen, side: Path, n: int, out: Path, timeout: float = 120) -> float:
    """Wait until the job completed ``n`` steps; returns the time its first step completed."""
    deadline = time.monotonic() + timeout
    while len(done := done_steps(side)) < n:
        if proc.poll() is not None:
            raise AssertionError(
                f"the job exited ({proc.returncode}) before step {n}:\n{job_log(out)[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"the job did not reach step {n} in {timeout} s:\n{job_log(out)[-3000:]}")
        time.sleep(0.02)
    return done[0][1]


def kill_at_random_point(
    proc: subprocess.Popen, side: Path, out: Path, *, seed: int, lo: float, hi: float
) -> float:
    """SIGKILL the job (its whole process group) ``U(lo, hi)`` seconds (seeded) after its first step;
    returns the kill time."""
    first = wait_for_steps(proc, side, 1, out)
    delay = random.Random(seed).uniform(lo, hi)
    time.sleep(max(0.0, first + delay - time.time()))
    t_kill = time.time()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return t_kill


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def load_quietly(run_dir: Path):
    """load_runs, which must not fail; its warnings (a temporary file left by the kill) are returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_runs(run_dir)
    return runs, [str(w.message) for w in caught]


def assert_kept_all_but_the_last_interval(
    run_dir: Path, side: Path, t_kill: float, flush_seconds: float, *, name: str
) -> tuple[set[int], set[int]]:
    """Every step completed more than one flush interval before the kill has its ``name`` row on disk,
    and no row is kept for a step the job never started. Returns (steps kept, steps that had to be)."""
    done = done_steps(side)
    runs, _ = load_quietly(run_dir)
    kept = set(runs.metrics.loc[runs.metrics["name"] == name, "step"].tolist())
    due = {s for s, t in done if t <= t_kill - flush_seconds - WRITE_SLACK}
    assert due, "the kill came too early to test anything: no step was older than one flush interval"
    missing = sorted(due - kept)
    assert not missing, (
        f"{len(missing)} of {len(due)} steps older than one flush interval ({flush_seconds} s) were lost, "
        f"e.g. {missing[:5]}; kept {len(kept)} of {len(done)} completed steps"
    )
    last = max(s for s, _ in done)
    assert kept <= set(range(1, last + 2)), (
        f"rows for steps the job never ran: {sorted(kept - set(range(1, last + 2)))[:5]}"
    )
    assert len(runs.runs) == 1
    return kept, due
