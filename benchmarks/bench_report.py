"""How long `dynamics report` takes on a realistic run set (default: 40 runs x 2,000 steps).

Writes synthetic runs with the real RunWriter (7 tasks, per-task losses every step, probe signals
every 10 steps: about 22k rows per run), then builds the full PDF report once and prints the total
and the time of each step, each as a share of the 30 s budget.

    python benchmarks/bench_report.py                 # 40 runs x 2000 steps
    python benchmarks/bench_report.py --runs 80 --figures
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script, not a test: the tests package is importable from the root

from dynamics.report import build_report  # noqa: E402
from tests.report.synthetic_runs import write_runs  # noqa: E402

TASKS = ("cls", "vqa", "report", "ground", "seg", "det", "caption")
BUDGET_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=40, help="number of runs (even: IMAX/DMAX x models x seeds)"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--figures", action="store_true", help="also export PNG and SVG figures")
    args = parser.parse_args()
    n_models = 4
    n_seeds = max(1, args.runs // (2 * n_models))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        t0 = time.perf_counter()
        dirs = write_runs(
            root,
            n_models=n_models,
            n_seeds=n_seeds,
            tasks=TASKS,
            n_steps=args.steps,
            probe_every=args.probe_every,
        )
        write_s = time.perf_counter() - t0
        result = build_report(
            [root],
            Path(tmp) / "report.pdf",
            figures_dir=Path(tmp) / "figs" if args.figures else None,
            progress=False,
        )
        size = (Path(tmp) / "report.pdf").stat().st_size

    print(
        f"runs: {len(dirs)} x {args.steps} steps, {len(TASKS)} tasks, probes every {args.probe_every} steps"
    )
    print(f"writing the runs (not part of the report): {write_s:.1f} s")
    print(f"{'step':<40} {'seconds':>8} {'of budget':>10}")
    for label, seconds in result.timings.items():
        print(f"{label:<40} {seconds:8.2f} {seconds / BUDGET_S:10.1%}")
    print(f"{'total build_report':<40} {result.seconds:8.2f} {result.seconds / BUDGET_S:10.1%}")
    print(f"pages: {result.n_pages} ({size / 1e6:.1f} MB), left out: {list(result.skipped) or 'none'}")
    print(
        f"budget {BUDGET_S:.0f} s: {'met' if result.seconds < BUDGET_S else 'MISSED'} (ratio {result.seconds / BUDGET_S:.2f})"
    )


if __name__ == "__main__":
    main()
