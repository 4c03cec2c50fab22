"""`dynamics report` and `dynamics summary` from the command line, and print_summary's tables."""

from __future__ import annotations

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dynamics.cli import app
from dynamics.report import print_summary
from tests.report.pdf_tools import needs_poppler, page_count
from tests.report.synthetic_runs import write_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "runs"
    write_runs(root, n_models=2, n_seeds=2, tasks=("cls", "vqa"), n_steps=40, probe_every=5)
    return root


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click: stderr mixed into output
        return result.output


@needs_poppler
def test_report_command_writes_the_pdf(runs, tmp_path):
    out = tmp_path / "r.pdf"
    result = runner.invoke(
        app, ["report", str(runs), "-o", str(out), "--no-progress", "--pair-on", "model,seed"]
    )
    assert result.exit_code == 0, result.output
    n = int(result.output.split("(")[1].split(" pages")[0])
    assert out.exists() and page_count(out) == n


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["{tmp}/nowhere"], "does not exist"),
        (["{runs}", "--by", "method"], "--by 'method' is not a tag of these runs"),
        (["{runs}", "--group", "method"], "--by 'method' is not a tag of these runs"),  # deprecated alias
        (["{runs}", "--pair-on", "model,gpu"], "--pair-on ['model', 'gpu']: ['gpu'] are not tags"),
        (["{runs}", "--target", "score/cls/f1"], "--target 'score/cls/f1' is not a score of these runs"),
    ],
)
def test_report_command_bad_input(runs, tmp_path, args, match):
    argv = [
        "report",
        *(a.format(tmp=tmp_path, runs=runs) for a in args),
        "-o",
        str(tmp_path / "r.pdf"),
        "--no-progress",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    err = _stderr(result)
    assert "error:" in err and match in err
    assert not (tmp_path / "r.pdf").exists()


def test_summary_command_prints_the_tables(runs):
    result = runner.invoke(app, ["summary", str(runs), "--no-progress", "--rows", "5"])
    assert result.exit_code == 0, result.output
    for heading in ("Runs", "Setup", "Key findings", "Group comparison by construction", "Correlation with"):
        assert heading in result.output


def test_print_summary_shows_the_findings_and_the_top_rows(runs):
    console = Console(record=True, width=250)
    ctx = print_summary([runs], console=console, progress=False, max_rows=4)
    text = " ".join(console.export_text().split())
    from dynamics.report.findings import findings
    from dynamics.report.tables import comparison_table

    for sentence in findings(ctx):
        assert " ".join(sentence.split()) in text
    table, _, _ = comparison_table(ctx, max_rows=4)
    assert len(table) == 4
    for feature in table["feature"]:
        assert feature in text


def test_summary_bad_path(tmp_path):
    result = runner.invoke(app, ["summary", str(tmp_path / "nothing"), "--no-progress"])
    assert result.exit_code == 2 and "does not exist" in _stderr(result)


def test_deprecated_flags_still_work_and_say_so(runs):
    result = runner.invoke(
        app, ["summary", str(runs), "--no-progress", "--group", "construction", "--rows", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "--group is deprecated; use --by" in _stderr(result)
