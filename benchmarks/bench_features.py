"""Speed of ``dynamics.analysis.features`` on a large synthetic run collection.

    python benchmarks/bench_features.py [--runs 100] [--steps 10000] [--tasks 7] [--probe-every 10]

Builds ``runs x steps x tasks`` per-task losses logged every step, plus a global learning rate every
step and probe signals every ``probe_every`` steps (per-task grad_norm, pairwise grad_cosine,
global fisher_se / fisher_rho / noise_scale), and times ``features()`` on it. Side by side, for
scale, it times the plain pandas one-liner that computes only the per-series mean and last value
(``groupby([...]).value.agg(["mean", "last"])``), which is a lower bound for any pandas
implementation of the full feature set.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import pandas as pd

from dynamics.analysis import features
from dynamics.store.reader import RunSet


def synthetic_runset(n_runs: int, n_steps: int, n_tasks: int, probe_every: int, seed: int = 0) -> RunSet:
    rng = np.random.default_rng(seed)
    tasks = [f"task{i}" for i in range(n_tasks)]
    steps = np.arange(1, n_steps + 1)
    probe = steps[probe_every - 1 :: probe_every]
    pairs = list(itertools.combinations(tasks, 2))
    frames = []
    for r in range(n_runs):
        rid = f"run{r:03d}"
        decay = rng.uniform(2, 6, size=(n_tasks, 1))
        loss = 0.5 + 2.0 * np.exp(-decay * steps / n_steps) + 0.05 * rng.standard_normal((n_tasks, n_steps))
        frames.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "step": np.tile(steps, n_tasks),
                    "name": "loss",
                    "task": np.repeat(tasks, n_steps),
                    "task_b": "",
                    "value": loss.ravel(),
                }
            )
        )
        frames.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "step": steps,
                    "name": "lr",
                    "task": "",
                    "task_b": "",
                    "value": 1e-3 * (1 - steps / n_steps),
                }
            )
        )
        k = probe.size
        frames.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "step": np.tile(probe, n_tasks),
                    "name": "grad_norm",
                    "task": np.repeat(tasks, k),
                    "task_b": "",
                    "value": np.abs(rng.standard_normal(n_tasks * k)),
                }
            )
        )
        frames.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "step": np.tile(probe, len(pairs)),
                    "name": "grad_cosine",
                    "task": np.repeat([a for a, _ in pairs], k),
                    "task_b": np.repeat([b for _, b in pairs], k),
                    "value": np.tanh(rng.standard_normal(len(pairs) * k)),
                }
            )
        )
        for name in ("fisher_se", "fisher_rho", "noise_scale"):
            frames.append(
                pd.DataFrame(
                    {
                        "run_id": rid,
                        "step": probe,
                        "name": name,
                        "task": "",
                        "task_b": "",
                        "value": rng.random(k),
                    }
                )
            )
    metrics = pd.concat(frames, ignore_index=True)
    runs = pd.DataFrame(
        {
            "run_id": [f"run{r:03d}" for r in range(n_runs)],
            "construction": ["IMAX", "DMAX"] * (n_runs // 2) + ["IMAX"] * (n_runs % 2),
            "model": [f"m{r // 2 % 7}" for r in range(n_runs)],
        }
    )
    scores = pd.DataFrame(
        {
            "run_id": np.repeat(runs["run_id"], n_tasks),
            "task": tasks * n_runs,
            "metric": "accuracy",
            "value": rng.random(n_runs * n_tasks),
        }
    )
    return RunSet.from_frames(runs, metrics, scores)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    rs = synthetic_runset(args.runs, args.steps, args.tasks, args.probe_every)
    n_rows = len(rs.metrics)
    print(f"built {rs} in {time.perf_counter() - t0:.1f} s")

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        feats = features(rs)
        times.append(time.perf_counter() - t0)
    best = min(times)
    n_feat = len(feats.attrs["feature_columns"])
    print(
        f"features(): {best:.2f} s (best of {args.repeat}), {n_rows / best / 1e6:.1f} M rows/s, "
        f"{len(feats)} runs x {n_feat} feature columns"
    )

    t0 = time.perf_counter()
    rs.metrics.groupby(["run_id", "name", "task", "task_b"], sort=False)["value"].agg(["mean", "last"])
    naive = time.perf_counter() - t0
    print(
        f"pandas groupby mean+last only: {naive:.2f} s, {n_rows / naive / 1e6:.1f} M rows/s "
        f"(features / that = {best / naive:.2f})"
    )


if __name__ == "__main__":
    main()
