"""Two gloo ranks under ``torchrun`` for the distributed tests: start them, wait, and never leave any behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start_two_ranks(args: list[str], log: IO[str], **env: str) -> subprocess.Popen:
    """``torchrun`` of ``args`` on 2 ranks (repo on PYTHONPATH, 1 thread), output to ``log``.

    ``log`` is a file, not a pipe (a full pipe would stall the ranks); the launcher gets its own
    process group, so :func:`wait_ranks` can kill it and its ranks, nothing else.
    """
    return subprocess.Popen(
        [*TORCHRUN, *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def wait_ranks(job: subprocess.Popen, log: IO[str], timeout: float, what: str) -> str:
    """Wait for the job (a hang fails the test instead of blocking the suite); its log; asserts exit 0."""
    try:
        job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun ({what}) did not finish in {timeout} s (a collective waiting forever?)")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # the launcher and its ranks, nothing else
            job.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert job.returncode == 0, output[-4000:]
    return output
