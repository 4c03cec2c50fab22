"""``results.md`` of the reproduction, with every number read back from the run stores.

Sections (from ``load_runs`` of the finished runs, plus ``baselines.json`` / ``data.json`` written
by the pipeline, the stage-0 ``pretrained/*/DONE`` files and the DMAX-3stage runs' ``pseudo.json``):

0. **What the run can and cannot support** (the first lines): pairs per arm pair, the smallest
   p-value the paired test can reach at that n (``min_p_signed_rank``), the per-task learning
   check, the pretrained start;
1. data: images, entries and densities of every construction (pseudo-IMAX: from the 3stage runs);
2. learning check per task and arm: runs beating their replicate's majority baseline by ``MARGIN``;
3. arm pairs (IMAX vs DMAX, IMAX vs DMAX-mixed, DMAX-mixed vs DMAX, DMAX-3stage vs DMAX): the
   multi-task score difference paired on (model, replicate) with its bootstrap CI and Wilcoxon p,
   from ``dynamics.analysis.compare``;
4. the gap closed by the strategy, ``(3stage - DMAX) / (IMAX - DMAX)``, per task and per source
   split (home: the task's DMAX source; shifted: the others), from the paired means;
5. pseudo-label accuracy against the phantoms' ground truth, and the density reached;
6. Fisher SE and rho on the common probe batch (and on each arm's own batch), per arm pair;
7. their Spearman correlation with the multi-task score within each arm (``correlate``).

The multi-task score is the mean over tasks of each task's normalised ``score`` metric (see
``metrics.py``); ``features(..., score_metrics=["score"])`` recomputes it from the stores.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.analysis.attainable import min_pvalue
from dynamics.experiments.imax_dmax.constructions import ARMS
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES

MARGIN = 0.05  # "clear margin" over the majority baseline, in normalised score points
# (a, b): rows report b - a, the question each pair answers.
ARM_PAIRS = (
    ("DMAX", "IMAX", "density and source coverage together (the paper's comparison)"),
    ("DMAX-mixed", "IMAX", "density alone (both see every source)"),
    ("DMAX", "DMAX-mixed", "source coverage alone (both one task per image)"),
    ("DMAX", "DMAX-3stage", "the paper's DMAX-based strategy"),
)
COMMON_FEATURES = (
    "fisher_se_common/all/mean",
    "fisher_se_common/all/late",
    "fisher_rho_common/all/mean",
    "fisher_rho_common/all/late",
)
OWN_FEATURES = ("fisher_se/all/mean", "fisher_rho/all/mean")
SIGNAL_FEATURES = COMMON_FEATURES + OWN_FEATURES


def min_p_signed_rank(n: int) -> float:
    """Smallest two-sided p of an exact paired sign-flip / Wilcoxon signed-rank test on ``n`` pairs:
    ``2 / 2^n`` (the statistics layer's own rule, :func:`dynamics.analysis.min_pvalue`)."""
    return min_pvalue("wilcoxon", n)


def min_p_permutation_corr(n: int) -> float:
    """Smallest two-sided p of an exact permutation test of a rank correlation over ``n`` runs:
    ``2 / n!`` (:func:`dynamics.analysis.min_pvalue`)."""
    return min_pvalue("spearman", n)


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def _sgn(v, nd: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.{nd}f}"


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


def split_scores(runset) -> pd.DataFrame:
    """One row per run and split (home / shifted): tags and per-task score on that split."""
    sc = runset.scores
    sc = sc[sc["metric"].isin(["score_home", "score_shifted"])]
    wide = sc.pivot_table(index=["run_id", "metric"], columns="task", values="value").reset_index()
    wide["split"] = wide["metric"].str.removeprefix("score_")
    tags = runset.runs[["run_id", "construction", "model", "seed"]]
    return wide.merge(tags, on="run_id")


def learning_table(per_run: pd.DataFrame, baselines: dict, arms: list[str]) -> pd.DataFrame:
    """Per task: each arm's mean score and its runs beating their own replicate's majority + MARGIN."""
    rows = []
    for t in TASK_NAMES:
        row: dict = {"task": t}
        majs = [baselines[s]["majority"][t]["score"] for s in sorted(set(per_run["seed"])) if s in baselines]
        row["majority"] = float(np.mean(majs)) if majs else float("nan")
        for a in arms:
            sub = per_run[per_run["construction"] == a]
            maj = sub["seed"].map(
                lambda s, t=t: baselines.get(s, {}).get("majority", {}).get(t, {}).get("score", np.nan)
            )
            v = sub[t].to_numpy(float)
            row[a] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"beat_{a}"] = int(np.sum(v >= maj.to_numpy(float) + MARGIN))
            row[f"n_{a}"] = int(np.isfinite(v).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def paired_means(df: pd.DataFrame, arms: list[str], cols: list[str]) -> pd.DataFrame:
    """Mean over the (model, seed) cells that every arm in ``arms`` has, per arm and column."""
    cells = None
    for a in arms:
        c = set(map(tuple, df.loc[df["construction"] == a, ["model", "seed"]].to_numpy()))
        cells = c if cells is None else cells & c
    keep = df[[tuple(x) in (cells or set()) for x in df[["model", "seed"]].to_numpy()]]
    return keep.groupby("construction")[cols].mean().reindex(arms)


def gap_closed(imax: float, dmax: float, three: float, min_gap: float = 0.01) -> float:
    """``(3stage - DMAX) / (IMAX - DMAX)``; NaN when |IMAX - DMAX| < ``min_gap`` (no gap to close)."""
    gap = imax - dmax
    return float("nan") if not np.isfinite(gap) or abs(gap) < min_gap else (three - dmax) / gap


def _features(runset):
    from dynamics.analysis import features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return features(runset, score_metrics=["score"])


def pair_table(feats: pd.DataFrame, features: list[str]) -> tuple[pd.DataFrame | None, str]:
    """``compare`` of every arm pair in ``ARM_PAIRS`` present in ``feats``, on ``features``."""
    from dynamics.analysis import compare

    present = set(feats["construction"])
    out, notes = [], []
    for a, b, _ in ARM_PAIRS:
        if a not in present or b not in present:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(
                    compare(
                        feats, by="construction", pair_on=["model", "seed"], groups=(a, b), features=features
                    )
                )
        except ValueError as err:
            notes.append(f"{b} vs {a}: {err}")
    return (pd.concat(out, ignore_index=True) if out else None), "; ".join(notes)


def pretrain_info(out: Path) -> list[dict]:
    info = []
    for done in sorted((out / "pretrained").glob("*/DONE")):
        try:
            info.append({"name": done.parent.name, **json.loads(done.read_text())})
        except (OSError, ValueError):
            continue
    return info


def pseudo_stats(runset) -> list[dict]:
    """The ``pseudo.json`` of every DMAX-3stage run, with its model and seed."""
    out = []
    for _, r in runset.runs[runset.runs["construction"] == "DMAX-3stage"].iterrows():
        f = Path(r["path"]) / "pseudo.json"
        if f.exists():
            out.append({"model": r["model"], "seed": r["seed"], **json.loads(f.read_text())})
    return out


def _support_lines(preset_json, per_run, lt, arms, out: Path) -> list[str]:
    n_pairs = per_run.groupby(["model", "seed"]).size().shape[0]
    p_min = min_p_signed_rank(n_pairs)
    runs_per_arm = int(per_run.groupby("construction").size().min()) if len(per_run) else 0
    lines = [
        "> **What this run can and cannot support.** "
        f"{len(preset_json['models'])} architecture(s) x {len(preset_json['seeds'])} seed replicate(s) "
        f"(data:style:init = {', '.join(preset_json['seeds'])}) = **{n_pairs} pair(s) per arm pair**. "
        f"The smallest two-sided p an exact paired signed-rank / sign-flip test can reach with {n_pairs} "
        f"pair(s) is 2/2^{n_pairs} = **{p_min:.3g}**"
        + ("; the statistics layer reports no p-value below 4 pairs" if n_pairs < 4 else "")
        + (
            ", so **no arm difference here can be significant at 0.05**"
            if p_min > 0.05
            else ", so a difference can reach p < 0.05 only if every pair agrees in sign (and more)"
        )
        + f". Within-arm correlations over {runs_per_arm} run(s) can reach at best "
        f"2/{runs_per_arm}! = {min_p_permutation_corr(runs_per_arm):.3g} (exact permutation test).",
    ]
    learned: list[str] = []
    not_learned: list[str] = []
    for t, r in lt.iterrows():
        cells = [f"{a} {int(r[f'beat_{a}'])}/{int(r[f'n_{a}'])}" for a in arms]
        ok = all(r[f"n_{a}"] and r[f"beat_{a}"] * 2 > r[f"n_{a}"] for a in arms)
        (learned if ok else not_learned).append(t)
        lines.append(f">   * learning check, {t}: " + ", ".join(cells))
    lines.append(
        f"> Runs beating their replicate's majority baseline by at least {MARGIN} per task and arm, above. "
        + (
            f"Tasks not learned by most runs of every arm: **{', '.join(not_learned)}**; their score "
            "differences say nothing about the constructions. "
            if not_learned
            else "Every task is learned by most runs of every arm. "
        )
    )
    pre = pretrain_info(out)
    pc = preset_json.get("pretrain", {})
    if pre and pc.get("n_images", 0) > 0:
        losses = [p["final_loss"] for p in pre if "final_loss" in p]
        lines.append(
            f"> **Pretrained start (stage 0):** every arm fine-tunes ({preset_json['train']['finetune']}) from the "
            f"same checkpoint per (architecture, style seed, init seed), trained on {pc['n_images']} captions of "
            f"phantoms from all sources for {pre[0]['steps']} steps ({len(pre)} checkpoint(s), final caption "
            f"loss {min(losses):.3f}-{max(losses):.3f}); the caption format is none of the seven tasks'."
        )
    else:
        lines.append(
            "> **No pretrained start**: these runs start from random weights (stage 0 switched off)."
        )
    lines.append(f"> Arms: {', '.join(arms)}.")
    return lines


def write_results(
    out: Path, runset, preset_json: dict, data_stats: dict, baselines: dict, figures: list[str]
) -> Path:
    """Write ``out/results.md`` (see module docstring); returns its path."""
    per_run = run_scores(runset)
    arms = [a for a in ARMS if a in set(per_run["construction"])]
    lt = learning_table(per_run, baselines, arms)
    lines = [f"# IMAX vs DMAX arms — `{preset_json['name']}` preset", ""]
    lines += _support_lines(preset_json, per_run, lt, arms, out)
    lines += [
        "",
        f"Models: {', '.join(preset_json['models'])}; source heterogeneity h = {preset_json['heterogeneity']:g}; "
        f"{len(per_run)} runs. Every number below is read back from the run stores under `runs/` "
        "(scores.parquet, metrics/), `pseudo.json` of the DMAX-3stage runs, and `baselines.json` / "
        "`data.json` next to this file.",
        "",
        "## Data",
        "",
    ]
    ps = pseudo_stats(runset)
    rows = []
    for label, st in data_stats.items():
        for c in ("IMAX", "DMAX", "DMAX-mixed"):
            if c in st:
                s = st[c]
                rows.append(
                    [label, c, str(s["images"]), str(s["entries"]), f"{s['tasks_per_image']:.2f}",
                     f"{s['entries_per_image']:.2f}", f"{np.mean([len(v) for v in s['sources_per_task'].values()]):.1f}"]
                )  # fmt: skip
    for p in ps:
        rows.append(
            [p["seed"], f"pseudo-IMAX ({p['model']})", "=DMAX", f"{p['real_entries']} + {p['pseudo_entries']}",
             f"{p['tasks_per_image']:.2f} (target {p['tasks_per_image_target']:.2f})", f"{p['entries_per_image']:.2f}", "="]
        )  # fmt: skip
    lines += [
        _table(
            [
                "replicate",
                "construction",
                "images",
                "entries",
                "tasks/image",
                "entries/image",
                "sources/task",
            ],
            rows,
        ),
        "",
    ]
    first = next(iter(data_stats.values()))
    lines += [
        _table(
            ["", *TASK_NAMES],
            [
                [c, *(str(first[c]["entries_per_task"][t]) for t in TASK_NAMES)]
                for c in ("IMAX", "DMAX", "DMAX-mixed")
                if c in first
            ],
        ),
        "",
        f"Entries per task (first replicate): identical across IMAX, DMAX and DMAX-mixed. Evaluation: "
        f"{first['eval']['images']} images x 7 tasks per replicate, shared by every arm.",
        "",
        "## Learning check per task",
        "",
    ]
    rows = [
        [t, _fmt(r["majority"]), *(f"{_fmt(r[a])} ({int(r[f'beat_{a}'])}/{int(r[f'n_{a}'])})" for a in arms)]
        for t, r in lt.iterrows()
    ]
    lines += [
        _table(["task", "majority", *arms], rows),
        "",
        f"Mean normalised score (runs ≥ their replicate's majority baseline + {MARGIN} / runs). Scores are "
        "normalised to [0, 1], higher is better (CTR: 1 − MAE/0.1).",
        "",
        "## Multi-task score per arm pair (paired on model and replicate)",
        "",
    ]
    feats = _features(runset)
    pt, note = pair_table(feats, ["multitask_score"])
    if pt is not None:
        what = {(a, b): w for a, b, w in ARM_PAIRS}
        rows = []
        for _, r in pt.iterrows():
            a, b = r["group_a"], r["group_b"]
            n = int(r["n_pairs"]) if np.isfinite(r["n_pairs"]) else 0
            rows.append(
                [f"{b} − {a}", what[(a, b)], _fmt(r["mean_b"]), _fmt(r["mean_a"]), _sgn(r["diff"]),
                 f"[{_fmt(r['diff_ci_low'])}, {_fmt(r['diff_ci_high'])}]", str(n), _fmt(r["p_value"]),
                 f"{min_p_signed_rank(n):.3g}"]
            )  # fmt: skip
        lines += [
            _table(
                [
                    "difference",
                    "isolates",
                    "b",
                    "a",
                    "b − a",
                    "95% CI",
                    "pairs",
                    "p (Wilcoxon)",
                    "smallest attainable p",
                ],
                rows,
            ),
            "",
            "CI: bootstrap over pairs (none below 4 pairs); p: exact Wilcoxon signed-rank (none below 4 pairs).",
            "",
        ]
    if note:
        lines += [f"_{note}_", ""]
    lines += _gap_section(runset, per_run, arms)
    lines += _pseudo_section(ps)
    lines += _signal_section(feats, arms)
    if figures:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _gap_section(runset, per_run, arms) -> list[str]:
    need = ["IMAX", "DMAX", "DMAX-3stage"]
    if not all(a in arms for a in need):
        return []
    lines = ["## Gap closed by DMAX-3stage: (3stage − DMAX) / (IMAX − DMAX)", ""]
    cols = [*TASK_NAMES, "multitask_score"]
    m = paired_means(per_run, need, cols)
    split = split_scores(runset)
    ms = {s: paired_means(split[split["split"] == s], need, list(TASK_NAMES)) for s in ("home", "shifted")}
    rows = []
    for t in cols:
        cells = [t, _fmt(m.loc["IMAX", t]), _fmt(m.loc["DMAX", t]), _fmt(m.loc["DMAX-3stage", t])]
        cells.append(_fmt(gap_closed(m.loc["IMAX", t], m.loc["DMAX", t], m.loc["DMAX-3stage", t]), 2))
        for s in ("home", "shifted"):
            if t in ms[s].columns:
                g = ms[s]
                cells.append(_fmt(gap_closed(g.loc["IMAX", t], g.loc["DMAX", t], g.loc["DMAX-3stage", t]), 2))
            else:
                cells.append("")
        rows.append(cells)
    lines += [
        _table(
            [
                "task",
                "IMAX",
                "DMAX",
                "DMAX-3stage",
                "gap closed",
                "gap closed (home)",
                "gap closed (shifted)",
            ],
            rows,
        ),
        "",
        "Means over the (model, replicate) cells all three arms have. 1 = the strategy reaches IMAX, 0 = no "
        "better than DMAX, < 0 = worse; n/a where |IMAX − DMAX| < 0.01 (no gap to close). *home*: evaluation "
        "images from the source DMAX trains that task on; *shifted*: the other sources.",
        "",
    ]
    return lines


def _pseudo_section(ps: list[dict]) -> list[str]:
    if not ps:
        return []
    rows = []
    for p in ps:
        acc = p["accuracy_by_origin"]
        rows.append(
            [p["model"], p["seed"], f"{p['tasks_per_image']:.2f} / {p['tasks_per_image_target']:.2f}",
             str(p["by_origin"]["rule"]), str(p["by_origin"]["model"]), f"{p['model_rejected']}/{p['model_asked']}",
             _fmt(acc["rule"]), _fmt(acc["model"]), _fmt(p["accuracy"])]
        )  # fmt: skip
    by_task = [
        [t, *(_fmt(p["accuracy_by_task"][t]) + f" ({p['entries_by_task'][t]})" for p in ps)]
        for t in TASK_NAMES
    ]
    return [
        "## Pseudo-IMAX: density reached and pseudo-label accuracy against ground truth",
        "",
        _table(
            [
                "model",
                "replicate",
                "tasks/image reached / target",
                "rule labels",
                "model labels",
                "model answers below threshold / asked",
                "accuracy (rule)",
                "accuracy (model)",
                "accuracy (all)",
            ],
            rows,
        ),  # fmt: skip
        "",
        _table(["task", *(f"{p['model']} {p['seed']}" for p in ps)], by_task),
        "",
        f"Accuracy per task (pseudo entries). Confidence threshold {ps[0]['threshold']:g}: the smallest "
        "token probability of a kept stage-1 answer. Right = the ground-truth answer (CTR within 0.02, REC IoU ≥ 0.5).",
        "",
    ]


def _signal_section(feats: pd.DataFrame, arms: list[str]) -> list[str]:
    present = [f for f in SIGNAL_FEATURES if f in feats.columns and feats[f].notna().any()]
    lines = ["## Fisher spectral entropy SE and dominant eigenvalue ratio rho", ""]
    if not present:
        return lines + ["_no Fisher signals in the stores (runs trained without the dynamics hooks)_", ""]
    means = feats.groupby("construction")[present].mean().reindex(arms)
    lines += [
        _table(["feature", *arms], [[f, *(_fmt(means.loc[a, f], 4) for a in arms)] for f in present]),
        "",
        "Mean over runs. `_common`: the common probe batch (the same task-stratified examples, fresh "
        "images from all sources, for every arm); without the suffix: each arm's own training batch. The "
        "paper reports lower SE and higher rho under IMAX.",
        "",
    ]
    pt, note = pair_table(feats, [f for f in present if f in COMMON_FEATURES])
    if pt is not None:
        rows = [
            [f"{r['group_b']} − {r['group_a']}", r["feature"], _sgn(r["diff"], 4),
             f"[{_fmt(r['diff_ci_low'], 4)}, {_fmt(r['diff_ci_high'], 4)}]", str(int(r["n_pairs"])), _fmt(r["p_value"])]
            for _, r in pt.iterrows()
        ]  # fmt: skip
        lines += [_table(["pair", "feature", "difference", "95% CI", "pairs", "p"], rows), ""]
    if note:
        lines += [f"_{note}_", ""]
    lines += ["### Within-arm Spearman correlation with the multi-task score", ""]
    from dynamics.analysis import correlate

    rows = []
    for a in arms:
        sub = feats[feats["construction"] == a]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cor = correlate(
                    sub, target="multitask_score", features=[f for f in present if f in COMMON_FEATURES]
                )
        except ValueError as err:
            rows.append([a, "—", str(len(sub)), "n/a", "", f"not computable: {err}"])
            continue
        for _, r in cor.iterrows():
            rows.append(
                [a, r["feature"], str(int(r["n"])), _fmt(r["r"]), f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                 _fmt(r.get("p_perm", float("nan")))]
            )  # fmt: skip
    lines += [
        _table(["arm", "feature", "runs", "r", "95% CI", "p (permutation)"], rows),
        "",
        "Across the runs of one arm (architectures and replicates), so the construction is held fixed.",
        "",
    ]
    return lines


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
