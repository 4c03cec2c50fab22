"""FSDP1 (torchrun x2, gloo, CPU): per-task losses of the global batch, the unwrapped model's loss kind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dynamics import load_runs

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integrations" / "fsdp1_worker.py"


def _run(cmd: list[str], log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w+") as out:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            return job.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            pytest.fail(f"{cmd[2:4]} did not finish in 180 s:\n{log.read_text()[-3000:]}")


def test_fsdp1_two_ranks_record_the_single_process_per_task_losses(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    rc = _run([*torchrun, str(WORKER), str(tmp_path / "fsdp")], tmp_path / "fsdp.log")
    assert rc == 0, (tmp_path / "fsdp.log").read_text()[-4000:]
    assert _run([sys.executable, str(WORKER), str(tmp_path / "single")], tmp_path / "single.log") == 0
    fsdp = load_runs(tmp_path / "fsdp").metrics.set_index(["step", "name", "task", "task_b"])["value"]
    single = load_runs(tmp_path / "single").metrics.set_index(["step", "name", "task", "task_b"])["value"]
    for name in ("loss", "n_examples", "n_tokens", "train_loss"):
        a, b = fsdp.xs(name, level="name").sort_index(), single.xs(name, level="name").sort_index()
        assert list(a.index) == list(b.index), name
        assert a.tolist() == pytest.approx(b.tolist(), rel=1e-5), name
    assert sorted(fsdp.xs("loss", level="name").index.get_level_values("step").unique()) == [1, 2, 3]
    assert "per-task loss skipped" not in (tmp_path / "fsdp.log").read_text()
