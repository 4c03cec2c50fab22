"""`dynamics reproduce imax-dmax --quick --arms IMAX,DMAX,DMAX-mixed,DMAX-3stage` end to end: its
artefacts, and the numbers results.md prints checked against the run stores, data.json,
baselines.json and pseudo.json it was read from; `dynamics summary` on it with no flags.

The expected values are recomputed here from the raw stored scores with pandas / scipy, not with
the helpers of ``results.py``; only the paired comparison rows go through ``dynamics.analysis``
(whose numerics are tested against scipy in tests/analysis).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
from typer.testing import CliRunner

from dynamics import load_runs
from dynamics.cli import app
from dynamics.experiments.imax_dmax.constructions import ARMS
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


RUN_SUFFIX = "d0-st0-i0"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("imax_quick") / "out"
    result = CliRunner().invoke(
        app,
        ["reproduce", "imax-dmax", "--quick", "--arms", ",".join(ARMS), "--out", str(out), "--no-progress"],
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


def test_artefacts_and_one_finished_run_per_model_arm_replicate(quick):
    out = quick["out"]
    expected = {f"{m}-{a}-{RUN_SUFFIX}" for m in QUICK.models for a in ARMS}
    assert {p.name for p in (out / "runs").iterdir()} == expected
    assert all((out / "runs" / r / "DONE").exists() for r in expected)
    assert set(quick["rs"].runs["construction"]) == set(ARMS)
    for name in ("config.json", "data.json", "baselines.json", "results.md", "report.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert (out / "pretrained" / f"{QUICK.models[0]}-st0-i0" / "DONE").exists()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", quick["text"])
    assert len(figures) >= 3
    for f in figures:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "quick" and cfg["fingerprint"] == QUICK.fingerprint()
    for run_dir in (out / "runs").iterdir():  # INTERFACES.md item 5: the CTR's MAE is lower-is-better
        meta = json.loads((run_dir / "run.json").read_text())["meta"]
        assert meta["score_ranges"] == {t: {"score": [0.0, 1.0]} for t in TASK_NAMES}


def test_results_open_with_what_the_run_can_support(quick):
    lines = quick["text"].splitlines()
    n_pairs = len(QUICK.models) * len(QUICK.replicates)
    assert "What this run can and cannot support" in lines[2]
    assert f"**{n_pairs} pair(s) per arm pair**" in lines[2]
    assert f"2/2^{n_pairs} = **{2 / 2**n_pairs:.3g}**" in lines[2]
    head = "\n".join(lines[:14])
    assert "Pretrained start (stage 0)" in head
    for a in ARMS:
        assert a in head
    for t in TASK_NAMES:
        assert f"learning check, {t}:" in head


def test_data_table_matches_the_builder(quick):
    data = quick["data"][RUN_SUFFIX]
    rows = {r["construction"]: r for r in quick["tables"]["Data"]}
    for c in ("IMAX", "DMAX", "DMAX-mixed"):
        assert int(rows[c]["images"]) == data[c]["images"]
        assert int(rows[c]["entries"]) == data[c]["entries"]
        assert num(rows[c]["tasks/image"]) == pytest.approx(data[c]["tasks_per_image"], abs=0.005)
    assert num(rows["IMAX"]["tasks/image"]) == pytest.approx(4.10, abs=0.1)
    assert num(rows["DMAX-mixed"]["tasks/image"]) == 1.0
    assert num(rows["DMAX-mixed"]["sources/task"]) == 7.0 and num(rows["DMAX"]["sources/task"]) == 1.0
    counts = {r[""]: r for r in quick["tables"]["Data#2"]}
    for t in TASK_NAMES:
        assert {int(counts[c][t]) for c in ("IMAX", "DMAX", "DMAX-mixed")} == {
            data["IMAX"]["entries_per_task"][t]
        }


def test_learning_check_is_the_stores_scores_against_the_baselines(quick):
    per_run, base = _task_scores(quick["sc"]), quick["baselines"][RUN_SUFFIX]
    rows = {r["task"]: r for r in quick["tables"]["Learning check per task"]}
    assert set(rows) == set(TASK_NAMES)
    for t in TASK_NAMES:
        maj = base["majority"][t]["score"]
        assert num(rows[t]["majority"]) == pytest.approx(maj, abs=ABS)
        for a in ARMS:
            v = per_run.loc[per_run["construction"] == a, t]
            mean, beat = rows[t][a].split(" (")
            assert num(mean) == pytest.approx(v.mean(), abs=ABS)
            assert ratio(beat.rstrip(")")) == (int((v >= maj + MARGIN).sum()), len(v))


def test_arm_pairs_are_the_stores_paired_differences(quick):
    per_run = _task_scores(quick["sc"])
    per_run["mts"] = per_run[list(TASK_NAMES)].mean(axis=1)
    wide = per_run.pivot_table(index=["model", "seed"], columns="construction", values="mts")
    rows = {
        r["difference"]: r
        for r in quick["tables"]["Multi-task score per arm pair (paired on model and replicate)"]
    }
    assert set(rows) == {"IMAX − DMAX", "IMAX − DMAX-mixed", "DMAX-mixed − DMAX", "DMAX-3stage − DMAX"}
    for key, r in rows.items():
        b, a = key.split(" − ")
        assert num(r["b"]) == pytest.approx(wide[b].mean(), abs=ABS)
        assert num(r["a"]) == pytest.approx(wide[a].mean(), abs=ABS)
        assert num(r["b − a"]) == pytest.approx((wide[b] - wide[a]).mean(), abs=ABS)
        assert int(r["pairs"]) == len(wide)
        assert float(r["smallest attainable p"]) == pytest.approx(2 / 2 ** len(wide), rel=1e-3)


def test_gap_closed_is_computed_from_the_stores(quick):
    per_run = _task_scores(quick["sc"])
    home = _task_scores(quick["sc"], "score_home")
    rows = {
        r["task"]: r for r in quick["tables"]["Gap closed by DMAX-3stage: (3stage − DMAX) / (IMAX − DMAX)"]
    }
    for t in TASK_NAMES:
        m = per_run.groupby("construction")[t].mean()
        for col, arm in (("IMAX", "IMAX"), ("DMAX", "DMAX"), ("DMAX-3stage", "DMAX-3stage")):
            assert num(rows[t][col]) == pytest.approx(m[arm], abs=ABS)
        gap = m["IMAX"] - m["DMAX"]
        cell = rows[t]["gap closed"]
        if abs(gap) < 0.01:
            assert cell == "n/a"
        else:
            assert num(cell) == pytest.approx((m["DMAX-3stage"] - m["DMAX"]) / gap, abs=0.0051)
        h = home.groupby("construction")[t].mean()
        if abs(h["IMAX"] - h["DMAX"]) >= 0.01:
            want = (h["DMAX-3stage"] - h["DMAX"]) / (h["IMAX"] - h["DMAX"])
            assert num(rows[t]["gap closed (home)"]) == pytest.approx(want, abs=0.0051)


def test_pseudo_table_is_the_runs_pseudo_json(quick):
    model = QUICK.models[0]
    st = json.loads((quick["out"] / "runs" / f"{model}-DMAX-3stage-{RUN_SUFFIX}" / "pseudo.json").read_text())
    title = "Pseudo-IMAX: density reached and pseudo-label accuracy against ground truth"
    (row,) = quick["tables"][title]
    reached, target = (num(x) for x in row["tasks/image reached / target"].split(" / "))
    assert reached == pytest.approx(st["tasks_per_image"], abs=0.005)
    assert target == pytest.approx(4.10, abs=0.01)
    assert (
        int(row["rule labels"]) == st["by_origin"]["rule"]
        and int(row["model labels"]) == st["by_origin"]["model"]
    )
    assert num(row["accuracy (all)"]) == pytest.approx(st["accuracy"], abs=ABS)
    assert st["pseudo_entries"] == st["by_origin"]["rule"] + st["by_origin"]["model"] > 0


def test_common_probe_signals_are_the_stored_rows(quick):
    m = quick["rs"].metrics
    tags = quick["rs"].runs.set_index("run_id")["construction"]
    rows = {
        r["feature"]: r
        for r in quick["tables"]["Fisher spectral entropy SE and dominant eigenvalue ratio rho"]
    }
    for name in ("fisher_se_common", "fisher_rho_common"):
        per_run = m[(m["name"] == name) & (m["task"] == "")].groupby("run_id")["value"].mean()
        per_arm = per_run.groupby(per_run.index.map(tags)).mean()
        for a in ARMS:
            assert num(rows[f"{name}/all/mean"][a]) == pytest.approx(per_arm[a], abs=5.01e-5)
    # The common batch holds the same examples in every arm: the first probe's loss per task is
    # taken at different parameters, but every arm probes the same number of examples per task.
    n = m[(m["name"] == "probe_loss_common")].groupby("run_id")["task"].nunique()
    assert (n == len(TASK_NAMES)).all()


@pytest.mark.skipif(
    not shutil.which("pdftotext"), reason="needs poppler-utils (apt-get install poppler-utils)"
)
def test_report_explains_the_stored_multitask_score(quick):
    text = subprocess.run(
        ["pdftotext", str(quick["out"] / "report.pdf"), "-"], capture_output=True, text=True, check=True
    ).stdout
    text = " ".join(text.split())
    assert "target: score/all/multitask_score" in text


def test_summary_runs_with_no_flags(quick):
    result = CliRunner().invoke(app, ["summary", str(quick["out"]), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "construction" in result.output
