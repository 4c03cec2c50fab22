"""``results.md`` of the reproduction, with every number read back from the run stores.

Tables (all from ``load_runs`` of the finished runs, plus ``baselines.json`` / ``data.json``
written by the pipeline from the evaluation set and the builder):

1. data: images, entries and densities of IMAX and DMAX, entries per task;
2. multi-task score per model: IMAX and DMAX means over seeds, their difference (IMAX - DMAX) in
   points and relative to DMAX in percent (the paper's 3.20%-21.05% are relative gains);
3. per task: each construction's mean score, the trivial baselines (majority answer, and the
   image-blind best answer per question), and how many runs beat the majority baseline by at
   least ``MARGIN`` (the "models actually learn" check), and the same split by source: each
   task's home source (the one DMAX trains it on) versus the shifted others;
4. Fisher spectral entropy SE and dominant eigenvalue ratio rho, IMAX vs DMAX paired on
   (model, seed), from ``dynamics.analysis.compare``;
5. the Spearman correlation of those features with the multi-task score, from
   ``dynamics.analysis.correlate``.

The multi-task score is the mean over tasks of each task's normalised ``score`` metric (see
``metrics.py``); ``features(..., score_metrics=["score"])`` recomputes it from the stores.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.experiments.imax_dmax.metrics import HEADLINE
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES

MARGIN = 0.05  # "clear margin" over the majority baseline, in normalised score points
CONSTRUCTIONS = ("IMAX", "DMAX")
# Features the paper discusses: Fisher spectral entropy (lower under IMAX) and dominant eigenvalue
# ratio (higher under IMAX), over the whole run and in its last third.
SIGNAL_FEATURES = (
    "fisher_se/all/mean",
    "fisher_se/all/late",
    "fisher_rho/all/mean",
    "fisher_rho/all/late",
    "fisher_eff_rank/all/mean",
    "conflict_rate/all/mean",
    "grad_cosine/pairs/mean",
)


def _fmt(v: float, nd: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.1f}%"


def _beat_cells(r: pd.Series) -> list[str]:
    """ "k/n" per construction: runs beating the baseline out of runs with the score."""
    return [f"{int(r[f'beat_{c}'])}/{int(r[f'n_{c}'])}" for c in CONSTRUCTIONS]


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def run_scores(runset) -> pd.DataFrame:
    """One row per run: tags, per-task ``score`` and the stored multi-task score."""
    sc = runset.scores
    wide = sc[sc["metric"] == "score"].pivot_table(index="run_id", columns="task", values="value")
    wide = wide.rename(columns={"": "all"})
    mts = sc[(sc["task"] == "") & (sc["metric"] == "multitask_score")].set_index("run_id")["value"]
    tags = runset.runs.set_index("run_id")[["construction", "model", "seed"]]
    out = tags.join(wide).join(mts.rename("multitask_score"))
    return out.reset_index()


def multitask_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean multi-task score of IMAX and DMAX over seeds, difference and relative gain."""
    g = per_run.pivot_table(index="model", columns="construction", values="multitask_score", aggfunc="mean")
    n = per_run.pivot_table(index="model", columns="construction", values="multitask_score", aggfunc="count")
    g = g.reindex(columns=list(CONSTRUCTIONS))
    g["diff"] = g["IMAX"] - g["DMAX"]
    g["rel_pct"] = 100 * g["diff"] / g["DMAX"].where(g["DMAX"] != 0)
    g["n_seeds"] = n.min(axis=1)
    return g


def task_table(per_run: pd.DataFrame, baselines: dict) -> pd.DataFrame:
    """Per task: construction means, baselines, and runs beating the majority baseline by MARGIN."""
    rows = []
    for t in TASK_NAMES:
        maj = baselines["majority"][t]["score"]
        blind = baselines["blind"][t]["score"]
        vals = per_run[t].to_numpy(float)
        row = {"task": t, "headline": HEADLINE[t]}
        for c in CONSTRUCTIONS:
            v = per_run.loc[per_run["construction"] == c, t].to_numpy(float)
            row[c] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"beat_{c}"] = int(np.sum(v >= maj + MARGIN))
            row[f"n_{c}"] = int(np.isfinite(v).sum())
        row.update(
            majority=maj,
            blind=blind,
            worst_run=float(np.nanmin(vals)),
            beat=int(np.sum(vals >= maj + MARGIN)),
            n_runs=int(np.isfinite(vals).sum()),
        )
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def split_table(runset, baselines: dict) -> pd.DataFrame | None:
    """Per task and construction: mean ``score_home`` / ``score_shifted`` and the runs that beat
    the home split's majority baseline by ``MARGIN``; None for stores without the split."""
    sc = runset.scores
    sc = sc[sc["metric"].isin(["score_home", "score_shifted"])]
    if sc.empty or "majority_home" not in baselines:
        return None
    cons = runset.runs.set_index("run_id")["construction"]
    sc = sc.assign(construction=sc["run_id"].map(cons))
    rows = []
    for t in TASK_NAMES:
        row: dict = {"task": t}
        for split in ("home", "shifted"):
            row[f"majority_{split}"] = baselines[f"majority_{split}"].get(t, {}).get("score", float("nan"))
        for c in CONSTRUCTIONS:
            for split in ("home", "shifted"):
                v = sc.loc[
                    (sc["task"] == t) & (sc["construction"] == c) & (sc["metric"] == f"score_{split}"),
                    "value",
                ]
                row[f"{c}_{split}"] = float(v.mean()) if len(v) else float("nan")
                if split == "home":
                    row[f"beat_{c}"] = int((v.to_numpy(float) >= row["majority_home"] + MARGIN).sum())
                    row[f"n_{c}"] = len(v)
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def signal_tables(runset) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """(compare rows, correlate rows, note) for SIGNAL_FEATURES; None where not computable."""
    try:
        from dynamics.analysis import compare, correlate, features
    except ImportError as err:  # pragma: no cover - the analysis layer ships with the package
        return None, None, f"statistics layer unavailable ({err})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = features(runset, score_metrics=["score"])
    present = [f for f in SIGNAL_FEATURES if f in feats.columns and feats[f].notna().any()]
    if not present:
        return (
            None,
            None,
            "no Fisher / gradient signals in the stores (runs trained without the dynamics hooks)",
        )
    note = ""
    cmp_rows = cor_rows = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp_rows = compare(
                feats,
                by="construction",
                pair_on=["model", "seed"],
                groups=("DMAX", "IMAX"),
                features=["multitask_score", *present],
            )
    except ValueError as err:
        note += f"compare: {err}. "
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cor_rows = correlate(feats, target="multitask_score", features=present)
    except ValueError as err:
        note += f"correlate: {err}. "
    return cmp_rows, cor_rows, note.strip()


def write_results(
    out: Path, runset, preset_json: dict, data_stats: dict, baselines: dict, figures: list[str]
) -> Path:
    """Write ``out/results.md`` (see module docstring); returns its path."""
    per_run = run_scores(runset)
    lines = [
        f"# IMAX vs DMAX — `{preset_json['name']}` preset",
        "",
        f"Models: {', '.join(preset_json['models'])}; seeds: {', '.join(map(str, preset_json['seeds']))}; "
        f"source heterogeneity h = {preset_json['heterogeneity']:g}; {len(per_run)} runs. "
        "Every number below is read back from the run stores under `runs/` "
        "(scores.parquet, metrics/) and from `baselines.json` / `data.json` next to this file.",
        "",
        "## Data",
        "",
    ]
    rows = []
    for c in ("IMAX", "DMAX"):
        s = data_stats[c]
        rows.append(
            [
                c,
                str(s["images"]),
                str(s["entries"]),
                f"{s['tasks_per_image']:.2f}",
                f"{s['entries_per_image']:.2f}",
            ]
        )
    lines += [_table(["construction", "images", "entries", "tasks/image", "entries/image"], rows), ""]
    lines += [
        _table(
            ["", *TASK_NAMES],
            [[c, *(str(data_stats[c]["entries_per_task"][t]) for t in TASK_NAMES)] for c in ("IMAX", "DMAX")],
        ),
        "",
        f"Evaluation: {data_stats['eval']['images']} images x 7 tasks, shared by both constructions.",
        "",
        "## Multi-task score per model (mean over seeds)",
        "",
    ]
    mt = multitask_table(per_run)
    rows = [
        [
            m,
            _fmt(r["IMAX"]),
            _fmt(r["DMAX"]),
            f"{r['diff']:+.3f}",
            _pct(r["rel_pct"]),
            str(int(r["n_seeds"])),
        ]
        for m, r in mt.iterrows()
    ]
    mean = mt[["IMAX", "DMAX", "diff"]].mean()
    rows.append(
        [
            "**mean**",
            _fmt(mean["IMAX"]),
            _fmt(mean["DMAX"]),
            f"{mean['diff']:+.3f}",
            _pct(100 * mean["diff"] / mean["DMAX"] if mean["DMAX"] else float("nan")),
            "",
        ]
    )
    lines += [_table(["model", "IMAX", "DMAX", "IMAX − DMAX", "relative", "seeds"], rows), ""]
    wins = int((mt["diff"] > 0).sum())
    lines += [
        f"IMAX scores higher for {wins} of {len(mt)} models.",
        "",
        "## Per task vs trivial baselines",
        "",
    ]
    tt = task_table(per_run, baselines)
    rows = [
        [
            t,
            r["headline"],
            _fmt(r["IMAX"]),
            _fmt(r["DMAX"]),
            _fmt(r["majority"]),
            _fmt(r["blind"]),
            _fmt(r["worst_run"]),
            *_beat_cells(r),
        ]
        for t, r in tt.iterrows()
    ]
    lines += [
        _table(
            [
                "task",
                "headline",
                "IMAX",
                "DMAX",
                "majority",
                "blind",
                "worst run",
                f"IMAX runs ≥ majority + {MARGIN}",
                f"DMAX runs ≥ majority + {MARGIN}",
            ],
            rows,
        ),
        "",
        "Scores are normalised to [0, 1], higher is better (CTR: 1 − MAE/0.1). *majority*: the most "
        "frequent answer (mean ratio for the CTR); *blind*: the best constant answer per question "
        "(e.g. per REC object), what an image-blind model could reach. Both are computed on the "
        "evaluation set itself.",
        "",
    ]
    st = split_table(runset, baselines)
    if st is not None:
        n_home = data_stats["eval"]["images"] / len(TASK_NAMES)
        rows = [
            [
                t,
                _fmt(r["IMAX_home"]),
                _fmt(r["IMAX_shifted"]),
                _fmt(r["DMAX_home"]),
                _fmt(r["DMAX_shifted"]),
                _fmt(r["majority_home"]),
                _fmt(r["majority_shifted"]),
                *_beat_cells(r),
            ]
            for t, r in st.iterrows()
        ]
        lines += [
            "### By source: the task's home source vs the others",
            "",
            _table(
                [
                    "task",
                    "IMAX home",
                    "IMAX shifted",
                    "DMAX home",
                    "DMAX shifted",
                    "majority home",
                    "majority shifted",
                    f"IMAX runs ≥ majority home + {MARGIN}",
                    f"DMAX runs ≥ majority home + {MARGIN}",
                ],
                rows,
            ),
            "",
            "*home*: the evaluation images from the source DMAX trains that task on (about "
            f"{n_home:.0f} per task); *shifted*: the other sources, which DMAX never shows that task. "
            "Each majority baseline is computed on its own split. A DMAX model that learned a task "
            "within its source but not across sources is high at home and low when shifted.",
            "",
        ]
    lines += [
        "## Training dynamics: Fisher spectral entropy SE and dominant eigenvalue ratio rho",
        "",
    ]
    cmp_rows, cor_rows, note = signal_tables(runset)
    if cmp_rows is not None:
        rows = [
            [
                r["feature"],
                _fmt(r["mean_b"], 4),
                _fmt(r["mean_a"], 4),
                f"{r['diff']:+.4f}" if np.isfinite(r["diff"]) else "n/a",
                f"[{_fmt(r['diff_ci_low'], 4)}, {_fmt(r['diff_ci_high'], 4)}]",
                str(r["test"]),
                str(int(r["n_pairs"])) if np.isfinite(r["n_pairs"]) else "n/a",
                _fmt(r["p_value"], 3),
            ]
            for _, r in cmp_rows.iterrows()
        ]
        lines += [
            _table(["feature", "IMAX", "DMAX", "IMAX − DMAX", "95% CI", "test", "pairs", "p"], rows),
            "",
            "Paired on (model, seed); the first row tests the multi-task score itself (recomputed by "
            '`features(..., score_metrics=["score"])` from the stored task scores). The paper reports '
            "lower SE and higher rho under IMAX.",
            "",
        ]
    if cor_rows is not None:
        rows = [
            [
                r["feature"],
                str(int(r["n"])),
                _fmt(r["r"]),
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                _fmt(r["p_value"]),
            ]
            for _, r in cor_rows.iterrows()
        ]
        lines += [
            "### Correlation with the multi-task score (Spearman, all runs)",
            "",
            _table(["feature", "n", "r", "95% CI", "p"], rows),
            "",
        ]
    if note:
        lines += [f"_{note}_", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
