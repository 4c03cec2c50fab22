"""The PDF report on realistic run sets: pages, rendering, findings against the statistics layer."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dynamics import load_runs
from dynamics.report import PAGES, build_report
from dynamics.report.context import build_context
from dynamics.report.pages_geometry import cosine_matrix
from dynamics.report.pdf import render_pages
from tests.report.pdf_tools import needs_poppler, page_count, page_text, render, squash
from tests.report.synthetic_runs import write_run, write_runs

TITLES = {p.key: p.title for p in PAGES}
ALL_PAGES = ["Overview", *TITLES.values()]
PROBE_PAGES = [TITLES[k] for k in ("grad_norm", "cosine", "conflict", "fisher")]
NUMBER = r"(-?\d+(?:\.\d+)?(?:e[+-]\d+)?)"
PRIMARY = ["multitask_score", "fisher_se/all/mean", "fisher_rho/all/mean"]


def _close(text: str, value: float, *, p: bool = False) -> bool:
    """``text`` is ``value`` as the report prints it (3 significant digits; p-values 2)."""
    x = float(text)
    if p:
        return x == pytest.approx(value, rel=0.05, abs=0.005 if value >= 0.01 else 0)
    return x == pytest.approx(value, rel=6e-3, abs=1e-12)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """40 runs (IMAX/DMAX x 4 models x 5 seeds), short, with probes and scores, and their report."""
    tmp = tmp_path_factory.mktemp("report40")
    write_runs(tmp / "runs", n_models=4, n_seeds=5, n_steps=80, probe_every=8)
    result = build_report([tmp / "runs"], tmp / "out" / "report.pdf", primary=PRIMARY[1:], progress=False)
    return SimpleNamespace(root=tmp / "runs", tmp=tmp, result=result, pdf=tmp / "out" / "report.pdf")


@pytest.fixture(scope="module")
def stats(full):
    """The statistics layer called directly, the way the report is documented to call it."""
    from dynamics.analysis import compare, correlate, features, forecast

    runset = load_runs(full.root)
    feats = features(runset, phases=(1 / 3, 2 / 3))
    return SimpleNamespace(
        feats=feats,
        compare=compare(feats, by="construction", pair_on=("model", "seed")),
        primary=compare(feats, by="construction", pair_on=("model", "seed"), features=PRIMARY),
        correlate=correlate(feats, target="multitask_score", method="spearman", control="construction"),
        forecast=forecast(runset, target="multitask_score", fractions=(0.1, 0.25, 0.5), group="model"),
    )


def test_full_report_has_every_page(full):
    assert full.result.pages == ALL_PAGES
    assert full.result.skipped == {}


@needs_poppler
def test_pdf_page_count_and_no_blank_page(full):
    assert page_count(full.pdf) == len(full.result.pages)
    pages = render(full.pdf, full.tmp / "png")
    assert len(pages) == len(full.result.pages)
    for number, page in enumerate(pages, start=1):
        body = page[int(0.2 * page.shape[0]) :]  # below the headline band
        inked = float((body < 0.9).mean())
        assert page.std() > 0.05, f"page {number} is (nearly) uniform"
        assert inked > 0.02, f"page {number} has only {inked:.1%} inked pixels below its headline"


def _comparison_row(frame, feature):
    rows = frame[frame["feature"] == feature]
    assert len(rows) == 1, f"expected one comparison row for {feature}"
    return rows.iloc[0]


def test_findings_quote_the_comparison(full, stats):
    # Pre-specified family (score, SE, rho): Holm over 3 tests. diff = b - a, so b is named first.
    primary = stats.primary
    assert sorted(primary["feature"]) == sorted(PRIMARY)
    for feature, start in [
        ("multitask_score", "Final score multitask_score:"),
        *((f, f"{f}:") for f in PRIMARY[1:]),
    ]:
        sentence = next(f for f in full.result.findings if f.startswith(start))
        m = re.search(
            rf": observed (\S+) {NUMBER} vs (\S+) {NUMBER} \(difference {NUMBER}, 95% CI {NUMBER} to {NUMBER}; "
            rf"Wilcoxon signed-rank, n = (\d+) pairs; p = {NUMBER}, p_holm = {NUMBER}, Holm over the 3 "
            rf"pre-specified tests\): (significant|not significant)\.$",
            sentence,
        )
        assert m, sentence
        row = _comparison_row(primary, feature)
        assert (m.group(1), m.group(3)) == (str(row["group_b"]), str(row["group_a"]))
        numbers = [m.group(2), m.group(4), m.group(5), m.group(6), m.group(7)]
        for text, col in zip(
            numbers, ["mean_b", "mean_a", "diff", "diff_ci_low", "diff_ci_high"], strict=True
        ):
            assert _close(text, row[col]), (feature, col, text, row[col])
        assert int(m.group(8)) == row["n_pairs"] == 20
        assert _close(m.group(9), row["p_value"], p=True) and _close(m.group(10), row["p_holm"], p=True)
        assert (m.group(11) == "significant") == bool(row["p_holm"] < 0.05)

    # The exploratory family: every signal feature, Holm over all of them.
    count = next(f for f in full.result.findings if "training-signal features differ" in f)
    declared = set(stats.feats.attrs["feature_columns"])
    signals = stats.compare[stats.compare["feature"].isin(declared)]
    k, n = map(int, re.match(r"(\d+) of (\d+)", count).groups())
    assert k == signals.loc[signals["p_holm"] < 0.05, "feature"].nunique()
    assert n == signals["feature"].nunique()
    strongest = next(f for f in full.result.findings if f.startswith("Strongest other difference"))
    feature = strongest.split(": ")[1]
    row = _comparison_row(stats.compare, feature)
    assert feature not in PRIMARY and row["p_holm"] == signals["p_holm"].min()
    assert _close(re.search(rf"p_holm = {NUMBER}", strongest).group(1), row["p_holm"], p=True)


def test_findings_quote_the_correlation_and_forecast(full, stats):
    sentence = next(f for f in full.result.findings if "Spearman r =" in f)
    m = re.match(
        rf"Strongest observed association, (\S+) with multitask_score: Spearman r = {NUMBER} \(95% CI {NUMBER} "
        rf"to {NUMBER}; n = (\d+); p = {NUMBER}, p_holm = {NUMBER}; within each construction: r = {NUMBER}, "
        rf"p = {NUMBER}\)",
        sentence,
    )
    assert m, sentence
    cor = stats.correlate[stats.correlate["feature"].isin(set(stats.feats.attrs["feature_columns"]))]
    strongest = cor.loc[cor["r"].abs().idxmax()]
    assert m.group(1) == strongest["feature"]
    assert float(m.group(2)) == pytest.approx(strongest["r"], abs=0.006)
    assert float(m.group(3)) == pytest.approx(strongest["ci_low"], abs=0.006)
    assert float(m.group(4)) == pytest.approx(strongest["ci_high"], abs=0.006)
    assert int(m.group(5)) == strongest["n"]
    assert _close(m.group(6), strongest["p_value"], p=True) and _close(
        m.group(7), strongest["p_holm"], p=True
    )
    assert float(m.group(8)) == pytest.approx(strongest["partial_r"], abs=0.006)
    assert _close(m.group(9), strongest["partial_p"], p=True)

    sentence = next(f for f in full.result.findings if "forecast" in f)
    m = re.search(
        rf"first {NUMBER}% of training.*Spearman {NUMBER}, R² {NUMBER}, MAE {NUMBER} vs {NUMBER}", sentence
    )
    assert m, sentence
    fc = stats.forecast.set_index("fraction")
    row = fc.loc[min(fc.index, key=lambda f: abs(100 * f - float(m.group(1))))]
    assert float(m.group(2)) == pytest.approx(row["spearman"], abs=0.006)
    assert float(m.group(3)) == pytest.approx(row["r2"], abs=0.006)
    assert _close(m.group(4), row["mae"]) and _close(m.group(5), row["baseline_mae"])
    beats = "lower error than the baseline" in sentence
    assert beats == bool(row["mae"] < row["baseline_mae"])
    if beats:  # the earliest fraction that beats the baseline
        earlier = fc[fc.index < row.name]
        assert not (earlier["mae"] < earlier["baseline_mae"]).any()


@needs_poppler
def test_first_page_prints_the_findings(full):
    text = page_text(full.pdf, 1)
    assert "Key findings" in text and "40 run(s)" in text
    for sentence in full.result.findings:
        assert squash(sentence) in text, sentence


@needs_poppler
def test_losses_only_runs_leave_out_probe_and_score_pages(tmp_path):
    write_runs(tmp_path / "runs", n_models=2, n_seeds=2, n_steps=60, probe_every=None, scores=False)
    result = build_report(
        [tmp_path / "runs"], tmp_path / "r.pdf", figures_dir=tmp_path / "figs", progress=False
    )
    assert result.pages[:2] == ["Overview", TITLES["loss"]]
    assert set(PROBE_PAGES) <= set(result.skipped)
    for title in PROBE_PAGES:
        assert "no probe was recorded" in result.skipped[title] or "no '" in result.skipped[title]
    for title in (TITLES["correlation"], TITLES["forecast"]):
        assert "no final scores" in result.skipped[title]
    assert len(result.pages) + len(result.skipped) == len(ALL_PAGES)
    assert page_count(tmp_path / "r.pdf") == len(result.pages)
    text = page_text(tmp_path / "r.pdf", 1)
    assert "Pages left out" in text and "losses only" in text
    for title in result.skipped:
        assert title in text

    # --figures: every page written as PNG and SVG, named by its position and kind.
    figs = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert len(figs) == 2 * len(result.pages) == len(result.figures)
    assert figs[:2] == ["00_overview.png", "00_overview.svg"] and "01_loss.png" in figs
    for path in result.figures:
        if path.suffix == ".svg":
            assert ET.parse(path).getroot().tag.endswith("svg")
        else:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore:.*too few observations")
def test_single_run(tmp_path):
    write_run(
        tmp_path / "solo", n_steps=60, probe_every=6, tags={"construction": "IMAX", "model": "m0", "seed": 0}
    )
    result = build_report([tmp_path / "solo"], tmp_path / "r.pdf", progress=False)
    assert result.pages == ["Overview", TITLES["loss"], *PROBE_PAGES]
    assert set(result.skipped) == {TITLES["comparison"], TITLES["correlation"], TITLES["forecast"]}
    assert "no group" in result.skipped[TITLES["comparison"]]
    assert "too few runs" in result.skipped[TITLES["correlation"]]  # the statistics layer's own note


@pytest.mark.filterwarnings("ignore:.*too few observations")
def test_runs_with_different_task_sets(tmp_path):
    for i, (tasks, c) in enumerate([(("cls", "vqa", "seg"), "IMAX"), (("cls", "vqa", "det"), "DMAX")] * 2):
        tags = {"construction": c, "model": "m0", "seed": i // 2}
        write_run(tmp_path / f"run{i}", tasks=tasks, n_steps=60, probe_every=6, tags=tags, seed=i)
    ctx = build_context([tmp_path], statistics=False)
    assert ctx.tasks == ["cls", "vqa", "seg", "det"]
    pages, skipped, _ = render_pages(ctx)
    loss = next(fig for key, _, fig in pages if key == "loss")
    assert sorted(ax.get_title() for ax in loss.axes if ax.get_visible() and ax.get_title()) == [
        "cls",
        "det",
        "seg",
        "vqa",
    ]
    cos = ctx.metric("grad_cosine")
    mat = cosine_matrix(cos.groupby(["task", "task_b"], as_index=False)["value"].mean(), ctx.tasks)
    assert np.isnan(mat.loc["det", "seg"])  # no run has both
    assert not np.isnan(mat.loc["seg", "cls"]) and not np.isnan(mat.loc["det", "vqa"])
    result = build_report(ctx, tmp_path / "r.pdf", progress=False)  # the context's (plot-only) data
    assert result.pages == ["Overview", TITLES["loss"], *PROBE_PAGES]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"run_dirs": ["{tmp}/missing"]}, FileNotFoundError, "does not exist"),
        ({"run_dirs": ["{tmp}/empty"]}, ValueError, "not a run"),
        ({"out": "{tmp}"}, ValueError, "is a directory"),
        ({"out": "{tmp}/report.png"}, ValueError, "does not end in .pdf"),
        ({"by": "method"}, ValueError, "by='method' is not a tag of these runs"),
        (
            {"pair_on": "model,gpu"},
            ValueError,
            r"pair_on=\['model', 'gpu'\]: \['gpu'\] are not tags of these runs",
        ),
        ({"target": "score/cls/f1"}, ValueError, "not a score of these runs"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, kwargs, error, match):
    write_runs(tmp_path / "runs", n_models=1, n_seeds=1, n_steps=20, probe_every=None)
    (tmp_path / "empty").mkdir()
    args = {"run_dirs": [tmp_path / "runs"], "out": tmp_path / "r.pdf"}
    args.update(
        {
            k: [v.format(tmp=tmp_path) for v in val] if isinstance(val, list) else val
            for k, val in kwargs.items()
        }
    )
    if isinstance(args["out"], str):
        args["out"] = Path(args["out"].format(tmp=tmp_path))
    with pytest.raises(error, match=match):
        build_report(args.pop("run_dirs"), args.pop("out"), progress=False, **args)


@pytest.mark.filterwarnings("ignore:.*too few observations")
def test_progress_bar_reports_steps(tmp_path, capsys):
    write_runs(tmp_path / "runs", n_models=1, n_seeds=1, n_steps=20, probe_every=None, scores=False)
    build_report([tmp_path / "runs"], tmp_path / "r.pdf", progress=True)
    err = capsys.readouterr().err
    assert "step" in err and "%" in err


def test_run_level_score_is_a_target_under_its_features_name(tmp_path):
    # A run-level score (task "") is named "score/all/<metric>" by features(); the report must
    # accept it under that name and explain it, as the IMAX/DMAX reproduction asks it to.
    write_runs(tmp_path / "runs", n_models=2, n_seeds=3, n_steps=40, probe_every=8, run_score=True)
    sc = load_runs(tmp_path / "runs").scores
    overall = sc[sc["task"] == ""].set_index("run_id")["value"]
    per_task = sc[sc["task"] != ""].groupby("run_id")["value"].mean()
    assert overall.to_dict() == pytest.approx(per_task.to_dict())
    ctx = build_context([tmp_path / "runs"], target="score/all/overall")
    assert ctx.correlation.ok, ctx.correlation.note
    assert ctx.forecast.ok, ctx.forecast.note
    assert ctx.primary.ok and "score/all/overall" in set(ctx.primary.frame["feature"])
    with pytest.raises(ValueError, match="not a score of these runs"):
        build_context([tmp_path / "runs"], target="score//overall")


def test_the_reports_numbers_are_compares_numbers(full, stats):
    """The report's comparison and correlation frames are the statistics layer's, not a re-computation:
    the CI results.md quotes from compare() is the CI the report prints."""
    ctx = full.result.context
    for mine, direct in ((ctx.primary.frame, stats.primary), (ctx.comparison.frame, stats.compare)):
        cols = ["feature", "diff", "diff_ci_low", "diff_ci_high", "p_value", "p_holm", "p_min"]
        pd.testing.assert_frame_equal(mine[cols].reset_index(drop=True), direct[cols].reset_index(drop=True))
    cols = ["feature", "r", "ci_low", "ci_high", "p_value", "p_holm", "partial_r", "partial_p"]
    pd.testing.assert_frame_equal(ctx.correlation.frame[cols], stats.correlate[cols])


@pytest.mark.filterwarnings("ignore:.*too few observations")
def test_old_argument_names_still_work_with_a_deprecation_warning(tmp_path):
    write_runs(tmp_path / "runs", n_models=2, n_seeds=1, n_steps=20, probe_every=None)
    with pytest.warns(DeprecationWarning, match="group= is deprecated"):
        ctx = build_context([tmp_path / "runs"], group="construction", pair="model", statistics=False)
    assert ctx.by == "construction" and ctx.pair_on == ("model",)
    with pytest.raises(TypeError, match="pass by= only"):
        build_context([tmp_path / "runs"], by="construction", group="construction")
