"""Run-store throughput: write N rows through RunWriter.log_many and load them back.

    python benchmarks/bench_store.py [--rows 1000000]

Prints rows/s for writing (in 10 flushes, as a long run would) and for load_runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dynamics import RunWriter, load_runs

TASKS = ["ctr", "report", "edema", "findings", "rec", "reg", "vqa"]
NAMES = ["loss", "grad_norm", "fisher_se", "fisher_rho", "n_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.rows
    per_step = len(TASKS) * len(NAMES)
    idx = np.arange(n)
    # Unique (step, name, task) keys, so load_runs' last-value-wins rule keeps every row.
    steps = idx // per_step
    names = np.array(NAMES, dtype=object)[(idx // len(TASKS)) % len(NAMES)]
    tasks = np.array(TASKS, dtype=object)[idx % len(TASKS)]
    values = np.random.default_rng(0).normal(size=n)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        chunk = n // 10
        t0 = time.perf_counter()
        with RunWriter(run, tasks=TASKS, flush_every=chunk) as writer:
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                writer.log_many(steps[sl], names[sl], values[sl], tasks[sl])
        t1 = time.perf_counter()
        rs = load_runs(run)
        t2 = time.perf_counter()
        assert len(rs.metrics) == n, (len(rs.metrics), n)
        size = sum(p.stat().st_size for p in run.rglob("*.parquet"))
    print(f"rows           {n:,}")
    print(f"write          {t1 - t0:6.2f} s   {n / (t1 - t0):12,.0f} rows/s   ({size / 1e6:.1f} MB on disk)")
    print(f"load_runs      {t2 - t1:6.2f} s   {n / (t2 - t1):12,.0f} rows/s")


if __name__ == "__main__":
    main()
