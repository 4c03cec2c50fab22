"""Figures of the reproduction (PNG), drawn from the run stores only.

* ``multitask_by_model.png``: multi-task score per model, IMAX vs DMAX (bars: seed means; dots: seeds);
* ``task_scores.png``: per-task score by construction with the majority and blind baselines;
* ``fisher_curves.png``: Fisher spectral entropy SE and dominant eigenvalue ratio rho over training,
  one thin line per run, construction means in bold (steps normalised to the run's length).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dynamics.experiments.imax_dmax.tasks import TASK_NAMES  # noqa: E402

COLORS = {"IMAX": "#1b7837", "DMAX": "#762a83"}


def multitask_by_model(per_run: pd.DataFrame, path: Path) -> Path:
    models = sorted(per_run["model"].unique())
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(models) + 1.5), 3.4))
    for k, c in enumerate(("IMAX", "DMAX")):
        sub = per_run[per_run["construction"] == c]
        means = [sub.loc[sub["model"] == m, "multitask_score"].mean() for m in models]
        off = (k - 0.5) * 0.38
        ax.bar(x + off, means, width=0.36, color=COLORS[c], alpha=0.75, label=c)
        for i, m in enumerate(models):
            v = sub.loc[sub["model"] == m, "multitask_score"].to_numpy()
            ax.scatter(np.full(len(v), x[i] + off), v, color="k", s=8, zorder=3)
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_ylabel("multi-task score")
    ax.set_title("Multi-task score per model")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def task_scores(per_run: pd.DataFrame, baselines: dict, path: Path) -> Path:
    x = np.arange(len(TASK_NAMES))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for k, c in enumerate(("IMAX", "DMAX")):
        sub = per_run[per_run["construction"] == c]
        ax.bar(
            x + (k - 0.5) * 0.38,
            [sub[t].mean() for t in TASK_NAMES],
            width=0.36,
            color=COLORS[c],
            alpha=0.75,
            label=c,
        )
    for kind, style in (("majority", "k_"), ("blind", "r_")):
        ax.plot(
            x,
            [baselines[kind][t]["score"] for t in TASK_NAMES],
            style,
            ms=22,
            mew=2,
            label=f"{kind} baseline",
        )
    ax.set_xticks(x, TASK_NAMES, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (normalised)")
    ax.set_title("Per-task scores (mean over models and seeds)")
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def fisher_curves(runset, path: Path) -> Path | None:
    m = runset.metrics
    m = m[m["name"].isin(["fisher_se", "fisher_rho"]) & (m["task"] == "")]
    if m.empty:
        return None
    tags = runset.runs.set_index("run_id")["construction"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    grid = np.linspace(0, 1, 21)
    for ax, name, label in zip(
        axes, ("fisher_se", "fisher_rho"), ("spectral entropy SE", "dominant ratio rho"), strict=True
    ):
        curves: dict[str, list[np.ndarray]] = {"IMAX": [], "DMAX": []}
        for rid, g in m[m["name"] == name].groupby("run_id"):
            g = g.sort_values("step")
            frac = g["step"].to_numpy(float) / max(g["step"].max(), 1)
            c = tags.get(rid, "")
            if c in curves and len(g) > 1:
                ax.plot(frac, g["value"], color=COLORS[c], alpha=0.2, lw=0.7)
                curves[c].append(np.interp(grid, frac, g["value"].to_numpy(float)))
        for c, cs in curves.items():
            if cs:
                ax.plot(grid, np.mean(cs, axis=0), color=COLORS[c], lw=2.2, label=c)
        ax.set_xlabel("fraction of training")
        ax.set_title(label)
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def draw_all(runset, per_run: pd.DataFrame, baselines: dict, out_dir: Path) -> list[Path]:
    """Every figure above in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        multitask_by_model(per_run, out_dir / "multitask_by_model.png"),
        task_scores(per_run, baselines, out_dir / "task_scores.png"),
        fisher_curves(runset, out_dir / "fisher_curves.png"),
    ]
    return [p for p in paths if p is not None]
