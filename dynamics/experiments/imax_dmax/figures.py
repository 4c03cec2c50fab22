"""Figures of the reproduction (PNG), drawn from the run stores only.

* ``multitask_by_model.png``: multi-task score per model and arm (bars: replicate means; dots: replicates);
* ``task_scores.png``: per-task score by arm with the majority and blind baselines (first replicate's);
* ``fisher_curves.png``: Fisher spectral entropy SE and dominant eigenvalue ratio rho on the common
  probe batch over training, one thin line per run, arm means in bold (steps normalised to the
  run's length).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dynamics.experiments.imax_dmax.tasks import TASK_NAMES  # noqa: E402

COLORS = {"IMAX": "#1b7837", "DMAX": "#762a83", "DMAX-mixed": "#e08214", "DMAX-3stage": "#2166ac"}


def _arms(per_run: pd.DataFrame) -> list[str]:
    return [a for a in COLORS if a in set(per_run["construction"])]


def multitask_by_model(per_run: pd.DataFrame, path: Path) -> Path:
    models = sorted(per_run["model"].unique())
    x = np.arange(len(models))
    arms = _arms(per_run)
    w = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(models) * len(arms) / 2 + 1.5), 3.4))
    for k, c in enumerate(arms):
        sub = per_run[per_run["construction"] == c]
        means = [sub.loc[sub["model"] == m, "multitask_score"].mean() for m in models]
        off = (k - (len(arms) - 1) / 2) * w
        ax.bar(x + off, means, width=0.95 * w, color=COLORS[c], alpha=0.75, label=c)
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
    arms = _arms(per_run)
    w = 0.8 / len(arms)
    baselines = next(iter(baselines.values())) if "majority" not in baselines else baselines
    for k, c in enumerate(arms):
        sub = per_run[per_run["construction"] == c]
        ax.bar(
            x + (k - (len(arms) - 1) / 2) * w,
            [sub[t].mean() for t in TASK_NAMES],
            width=0.95 * w,
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
    m = m[m["name"].isin(["fisher_se_common", "fisher_rho_common"]) & (m["task"] == "")]
    if m.empty:
        return None
    tags = runset.runs.set_index("run_id")["construction"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    grid = np.linspace(0, 1, 21)
    for ax, name, label in zip(
        axes,
        ("fisher_se_common", "fisher_rho_common"),
        ("spectral entropy SE (common probe)", "dominant ratio rho (common probe)"),
        strict=True,
    ):
        curves: dict[str, list[np.ndarray]] = {a: [] for a in COLORS}
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
