"""`dynamics reproduce imax-dmax --quick` end to end: its artefacts, and every number results.md
prints checked against the run stores, data.json and baselines.json it was read from.

The expected values are recomputed here from the raw stored scores with pandas / scipy, not with
the helpers of ``results.py``; only the paired comparison rows go through ``dynamics.analysis``
(whose numerics are tested against scipy in tests/analysis).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from dynamics import load_runs
from dynamics.cli import app
from dynamics.experiments.imax_dmax.presets import QUICK
from dynamics.experiments.imax_dmax.results import MARGIN
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES

ABS = 5.01e-4  # results.md prints three decimals


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table of ``text`` as a list of row dicts, keyed by the heading above it
    (a second table under the same heading gets the key ``heading#2``)."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, lines = "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            key = heading if heading not in tables else f"{heading}#2"
            tables[key] = rows
            continue
        i += 1
    return tables


def num(cell: str) -> float:
    return float(cell.replace("**", "").replace("%", "").replace("−", "-"))


def ratio(cell: str) -> tuple[int, int]:
    a, b = cell.split("/")
    return int(a), int(b)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("imax_quick") / "out"
    result = CliRunner().invoke(
        app, ["reproduce", "imax-dmax", "--quick", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.strip().endswith("results.md")
    rs = load_runs(str(out / "runs"))
    tags = rs.runs.set_index("run_id")[["construction", "model", "seed"]]
    sc = rs.scores.join(tags, on="run_id")
    text = (out / "results.md").read_text()
    return dict(
        out=out,
        rs=rs,
        sc=sc,
        text=text,
        tables=md_tables(text),
        data=json.loads((out / "data.json").read_text()),
        baselines=json.loads((out / "baselines.json").read_text()),
    )


def _task_scores(sc: pd.DataFrame, metric: str = "score") -> pd.DataFrame:
    """One row per run: tags and the stored ``metric`` of each task."""
    part = sc[(sc["task"] != "") & (sc["metric"] == metric)]
    wide = part.pivot_table(index="run_id", columns="task", values="value")
    return part.drop_duplicates("run_id").set_index("run_id")[["construction", "model", "seed"]].join(wide)


def test_artefacts_and_one_finished_run_per_model_construction_seed(quick):
    out = quick["out"]
    expected = {f"{m}-{c}-s{s}" for m in QUICK.models for c in ("IMAX", "DMAX") for s in QUICK.seeds}
    assert {p.name for p in (out / "runs").iterdir()} == expected
    assert all((out / "runs" / r / "DONE").exists() for r in expected)
    assert sorted(rid.rsplit("-", 1)[0] for rid in quick["rs"].runs["run_id"]) == sorted(expected)
    for name in ("config.json", "data.json", "baselines.json", "results.md", "report.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", quick["text"])
    assert len(figures) >= 3
    for f in figures:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "quick" and cfg["fingerprint"] == QUICK.fingerprint()


@pytest.mark.skipif(
    not shutil.which("pdftotext"), reason="needs poppler-utils (apt-get install poppler-utils)"
)
def test_report_explains_the_stored_multitask_score(quick):
    # The report's correlation and forecast pages need the target; they were silently dropped when
    # the report did not accept the stored run-level score's name.
    text = subprocess.run(
        ["pdftotext", str(quick["out"] / "report.pdf"), "-"], capture_output=True, text=True, check=True
    ).stdout
    text = " ".join(text.split())
    assert "target: score/all/multitask_score" in text
    assert "against the final score score/all/multitask_score" in text  # the correlation page
    assert "Forecasting score/all/multitask_score from the signals" in text  # the forecast page


def test_data_table_matches_the_builder_and_paper_densities(quick):
    data, rows = quick["data"], quick["tables"]["Data"]
    by = {r["construction"]: r for r in rows}
    for c in ("IMAX", "DMAX"):
        assert int(by[c]["images"]) == data[c]["images"]
        assert int(by[c]["entries"]) == data[c]["entries"]
        assert num(by[c]["tasks/image"]) == pytest.approx(data[c]["tasks_per_image"], abs=0.005)
        assert num(by[c]["entries/image"]) == pytest.approx(data[c]["entries_per_image"], abs=0.005)
    assert num(by["IMAX"]["tasks/image"]) == pytest.approx(4.10, abs=0.1)
    assert num(by["IMAX"]["entries/image"]) == pytest.approx(7.46, abs=0.2)
    counts = {r[""]: r for r in quick["tables"]["Data#2"]}
    for t in TASK_NAMES:
        assert int(counts["IMAX"][t]) == int(counts["DMAX"][t]) == data["IMAX"]["entries_per_task"][t]


def test_multitask_table_is_the_stores_scores(quick):
    sc = quick["sc"]
    per_run = _task_scores(sc)
    stored = sc[(sc["task"] == "") & (sc["metric"] == "multitask_score")].set_index("run_id")["value"]
    # The stored multi-task score is the mean of the seven stored task scores.
    np.testing.assert_allclose(stored.sort_index(), per_run[list(TASK_NAMES)].mean(axis=1).sort_index())
    per_run["mts"] = stored
    means = per_run.groupby(["model", "construction"])["mts"].mean().unstack()
    rows = {r["model"]: r for r in quick["tables"]["Multi-task score per model (mean over seeds)"]}
    assert set(rows) == {*QUICK.models, "**mean**"}
    for m in QUICK.models:
        imax, dmax = means.loc[m, "IMAX"], means.loc[m, "DMAX"]
        assert num(rows[m]["IMAX"]) == pytest.approx(imax, abs=ABS)
        assert num(rows[m]["DMAX"]) == pytest.approx(dmax, abs=ABS)
        assert num(rows[m]["IMAX − DMAX"]) == pytest.approx(imax - dmax, abs=ABS)
        assert num(rows[m]["relative"]) == pytest.approx(100 * (imax - dmax) / dmax, abs=0.051)
    mean = rows["**mean**"]
    assert num(mean["IMAX"]) == pytest.approx(means["IMAX"].mean(), abs=ABS)
    assert num(mean["DMAX"]) == pytest.approx(means["DMAX"].mean(), abs=ABS)
    wins = int((means["IMAX"] > means["DMAX"]).sum())
    assert f"IMAX scores higher for {wins} of {len(QUICK.models)} models." in quick["text"]


def test_task_table_is_the_stores_scores_against_the_baselines(quick):
    per_run, base = _task_scores(quick["sc"]), quick["baselines"]
    rows = {r["task"]: r for r in quick["tables"]["Per task vs trivial baselines"]}
    assert set(rows) == set(TASK_NAMES)
    for t in TASK_NAMES:
        r, maj = rows[t], base["majority"][t]["score"]
        assert num(r["majority"]) == pytest.approx(maj, abs=ABS)
        assert num(r["blind"]) == pytest.approx(base["blind"][t]["score"], abs=ABS)
        assert num(r["worst run"]) == pytest.approx(per_run[t].min(), abs=ABS)
        for c in ("IMAX", "DMAX"):
            v = per_run.loc[per_run["construction"] == c, t]
            assert num(r[c]) == pytest.approx(v.mean(), abs=ABS)
            assert ratio(r[f"{c} runs ≥ majority + {MARGIN}"]) == (int((v >= maj + MARGIN).sum()), len(v))


def test_source_split_table_is_the_stores_scores(quick):
    sc, base = quick["sc"], quick["baselines"]
    rows = {r["task"]: r for r in quick["tables"]["By source: the task's home source vs the others"]}
    assert set(rows) == set(TASK_NAMES)
    for split in ("home", "shifted"):
        per_run = _task_scores(sc, f"score_{split}")
        for t in TASK_NAMES:
            r, maj = rows[t], base[f"majority_{split}"][t]["score"]
            assert num(r[f"majority {split}"]) == pytest.approx(maj, abs=ABS)
            for c in ("IMAX", "DMAX"):
                v = per_run.loc[per_run["construction"] == c, t]
                assert num(r[f"{c} {split}"]) == pytest.approx(v.mean(), abs=ABS)
                if split == "home":
                    beat = ratio(r[f"{c} runs ≥ majority home + {MARGIN}"])
                    assert beat == (int((v >= maj + MARGIN).sum()), len(v))


def test_split_scores_partition_the_evaluation_set(quick):
    # With balanced sources, the home split holds ~1/7 of each task's evaluation images, so the
    # task score is the entry-weighted mix of the two splits for the per-entry-mean metrics.
    per_run = {s: _task_scores(quick["sc"], s) for s in ("score", "score_home", "score_shifted")}
    n_eval = quick["data"]["eval"]["images"]
    n_home = int(np.ceil(n_eval / len(TASK_NAMES)))  # balanced: each source gets n/7 or n/7 + 1
    for t in ("multiclass", "vqa", "rec"):  # accuracies: means over entries
        mix = (
            per_run["score_home"][t] * n_home / n_eval
            + per_run["score_shifted"][t] * (n_eval - n_home) / n_eval
        )
        lo = (
            per_run["score_home"][t] * (n_home - 1) / n_eval
            + per_run["score_shifted"][t] * (n_eval - n_home + 1) / n_eval
        )
        full = per_run["score"][t]
        assert ((full - np.minimum(mix, lo) > -1e-9) & (full - np.maximum(mix, lo) < 1e-9)).all(), t


def test_dynamics_tables_are_the_analysis_of_the_stores(quick):
    from dynamics.analysis import compare, features

    feats = features(quick["rs"], score_metrics=["score"])
    title = "Training dynamics: Fisher spectral entropy SE and dominant eigenvalue ratio rho"
    rows = {r["feature"]: r for r in quick["tables"][title]}
    assert "multitask_score" in rows and "fisher_se/all/mean" in rows and "fisher_rho/all/late" in rows
    # The multitask row from the raw scores: paired IMAX - DMAX over (model, seed).
    per_run = _task_scores(quick["sc"])
    per_run["mts"] = per_run[list(TASK_NAMES)].mean(axis=1)
    wide = per_run.pivot_table(index=["model", "seed"], columns="construction", values="mts")
    r = rows["multitask_score"]
    assert num(r["IMAX"]) == pytest.approx(wide["IMAX"].mean(), abs=5.01e-5)
    assert num(r["DMAX"]) == pytest.approx(wide["DMAX"].mean(), abs=5.01e-5)
    assert num(r["IMAX − DMAX"]) == pytest.approx((wide["IMAX"] - wide["DMAX"]).mean(), abs=5.01e-5)
    assert int(r["pairs"]) == len(wide)
    with warnings.catch_warnings():  # two pairs: no p-values, which this test does not read
        warnings.simplefilter("ignore")
        cmp = compare(
            feats, by="construction", pair_on=["model", "seed"], groups=("DMAX", "IMAX"), features=list(rows)
        ).set_index("feature")
    for f, r in rows.items():
        assert num(r["IMAX"]) == pytest.approx(cmp.loc[f, "mean_b"], abs=5.01e-5), f
        assert num(r["DMAX"]) == pytest.approx(cmp.loc[f, "mean_a"], abs=5.01e-5), f
    # The Fisher SE mean of each run is the mean of its stored probe values.
    m = quick["rs"].metrics
    se = m[(m["name"] == "fisher_se") & (m["task"] == "")].groupby("run_id")["value"].mean()
    np.testing.assert_allclose(feats.set_index("run_id").loc[se.index, "fisher_se/all/mean"], se, rtol=1e-6)


def test_correlation_table_is_spearman_on_the_stores(quick):
    from dynamics.analysis import features

    title = "Correlation with the multi-task score (Spearman, all runs)"
    rows = quick["tables"][title]
    feats = features(quick["rs"], score_metrics=["score"]).set_index("run_id")
    per_run = _task_scores(quick["sc"])
    y = per_run[list(TASK_NAMES)].mean(axis=1)
    for r in rows:
        x = feats.loc[y.index, r["feature"]]
        ok = x.notna()
        assert int(r["n"]) == int(ok.sum())
        rho = stats.spearmanr(x[ok], y[ok]).statistic
        assert num(r["r"]) == pytest.approx(rho, abs=ABS), r["feature"]
