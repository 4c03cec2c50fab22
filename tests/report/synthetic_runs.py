"""Synthetic run stores for the report tests and benchmark, written with the real RunWriter.

The data carry a planted structure so that the report has something to find: runs tagged
``construction=IMAX`` train with a lower Fisher spectral entropy (SE), a higher dominant eigenvalue
ratio (rho) and fewer gradient conflicts, and their final scores are higher. Everything is drawn
from a seeded generator, so a given call always writes the same runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynamics import RunWriter

DEFAULT_TASKS = ("cls", "vqa", "report", "ground")


def write_run(
    run_dir: Path,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_steps: int = 200,
    probe_every: int | None = 10,
    tags: dict | None = None,
    seed: int = 0,
    effect: float = 0.0,
    scores: bool = True,
    run_score: bool = False,
) -> Path:
    """Write one run: per-step per-task losses and, if ``probe_every``, probe signals.

    ``effect`` (+1 for IMAX, -1 for DMAX) shifts SE down, rho up, conflicts down and scores up.
    ``run_score`` adds the run-level score ``overall`` (task ""), the mean of the task accuracies.
    """
    rng = np.random.default_rng(seed)
    tasks = list(tasks)
    steps = np.arange(1, n_steps + 1)
    progress = steps / n_steps
    with RunWriter(run_dir, tasks=tasks, tags=tags or {}, run_id=run_dir.name) as w:
        for i, task in enumerate(tasks):
            start = 2.0 + 0.3 * i + 0.1 * rng.standard_normal()
            floor = 0.4 + 0.05 * i - 0.05 * effect
            loss = floor + (start - floor) * np.exp(-5 * progress) + 0.05 * rng.standard_normal(n_steps)
            w.log_many(steps, "loss", loss, task)
        w.log_many(steps, "lr", 1e-3 * (1 - progress))
        late_rho = 0.0
        if probe_every:
            ps = steps[probe_every - 1 :: probe_every]
            pp = ps / n_steps
            k = len(ps)
            for i, task in enumerate(tasks):
                norm = (1.5 + 0.2 * i) * np.exp(-2 * pp) + 0.1 + 0.05 * rng.standard_normal(k)
                w.log_many(ps, "grad_norm", np.abs(norm), task)
                w.log_many(ps, "update_cosine", 0.5 + 0.1 * rng.standard_normal(k), task)
            cosines = []
            for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
                base = 0.35 - 0.1 * abs(i - j) + 0.05 * effect
                cos = np.clip(base * (1 - 0.6 * pp) + 0.12 * rng.standard_normal(k), -1, 1)
                cosines.append(cos)
                w.log_many(ps, "grad_cosine", cos, a, b)
            if cosines:
                w.log_many(ps, "conflict_rate", (np.array(cosines) < 0).mean(axis=0))
            se = 3.0 - 0.8 * pp - 0.25 * effect + 0.05 * rng.standard_normal(k)
            rho = np.clip(0.2 + 0.25 * pp + 0.06 * effect + 0.02 * rng.standard_normal(k), 0.01, 1)
            w.log_many(ps, "fisher_se", se)
            w.log_many(ps, "fisher_rho", rho)
            w.log_many(ps, "fisher_eff_rank", np.exp(se))
            w.log_many(ps, "noise_scale", 50 * (1 + pp) + 5 * rng.standard_normal(k))
            late_rho = float(rho[-max(1, k // 3) :].mean())
        if scores:
            acc = {
                t: {"accuracy": float(0.6 + 0.03 * effect + 0.4 * late_rho + 0.01 * rng.standard_normal())}
                for t in tasks
            }
            if run_score:
                acc[""] = {"overall": float(np.mean([m["accuracy"] for m in acc.values()]))}
            w.log_scores(acc)
    return run_dir


def write_runs(
    root: Path,
    *,
    n_models: int = 2,
    n_seeds: int = 2,
    constructions: Sequence[str] = ("IMAX", "DMAX"),
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_steps: int = 200,
    probe_every: int | None = 10,
    scores: bool = True,
    run_score: bool = False,
) -> list[Path]:
    """Write ``len(constructions) * n_models * n_seeds`` runs below ``root``; returns their dirs.

    Runs are paired on (model, seed) across constructions, as the IMAX/DMAX comparison is.
    """
    out = []
    for n, (c, m, s) in enumerate(itertools.product(constructions, range(n_models), range(n_seeds))):
        effect = 1.0 if c == "IMAX" else -1.0 if c == "DMAX" else 0.0
        out.append(
            write_run(
                Path(root) / f"{c.lower()}-m{m}-s{s}",
                tasks=tasks,
                n_steps=n_steps,
                probe_every=probe_every,
                tags={"construction": c, "model": f"m{m}", "seed": s},
                seed=1000 + n,
                effect=effect,
                scores=scores,
                run_score=run_score,
            )
        )
    return out
