"""The reproduction's processes, with real processes and a real SIGKILL: workers die with the
pipeline, and a second reproduction into the same folder refuses while the first one runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynamics.cli import app
from dynamics.experiments.imax_dmax.pipeline import OutLock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.parametrize(
    "when",
    [
        "training",  # the workers have armed their guard and are training (the kernel kills them)
        pytest.param("spawned", marks=pytest.mark.slow),  # killed while the workers still start up
    ],
)
def test_sigkill_of_the_pipeline_kills_its_workers_and_frees_the_folder(tmp_path, when):
    out = tmp_path / "out"
    # A preset long enough that the workers are still training when the parent is killed.
    script = textwrap.dedent(
        f"""
        from dataclasses import replace
        from dynamics.experiments.imax_dmax.pipeline import reproduce
        from dynamics.experiments.imax_dmax.train import TrainConfig
        from tests.experiments.test_imax_pipeline import TINY
        p = replace(TINY, models=("idefics3", "qwen2_vl"), train=replace(TINY.train, epochs=200.0))
        reproduce({str(out)!r}, preset=p, workers=2, progress=False)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        workers: list[int] = []

        def ready() -> bool:
            if len(workers) < 2:
                return False
            # "training": a stage-0 job has started in a worker (its imports are done, its guard armed)
            return when == "spawned" or any((out / "pretrained").glob("*"))

        while time.monotonic() < deadline and not ready():
            assert proc.poll() is None, "the reproduction ended before its workers started"
            workers = [k for k in _children(proc.pid) if "spawn_main" in _cmdline(k)]
            time.sleep(0.2)
        assert ready(), f"workers not seen: {_children(proc.pid)}"
        # While it runs, a second reproduction into the same folder refuses with a clear message.
        result = CliRunner().invoke(
            app, ["reproduce", "imax-dmax", "--quick", "--out", str(out), "--no-progress"]
        )
        assert result.exit_code == 2
        assert "another `dynamics reproduce`" in result.output and f"pid {proc.pid}" in result.output
        everything = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 60  # generous: the machine may be loaded
        while time.monotonic() < deadline and any(_alive(k) for k in everything):
            time.sleep(0.2)
        assert not [k for k in everything if _alive(k)], "processes outlived the killed pipeline"
        with OutLock(out):  # the kernel released the dead pipeline's lock: the folder is free again
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
