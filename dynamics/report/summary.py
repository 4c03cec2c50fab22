"""The report's key tables in the terminal (rich): runs, setup, findings, comparison, correlation, forecast."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table

from dynamics.report.context import ReportContext, build_context, renamed
from dynamics.report.findings import findings as make_findings
from dynamics.report.pages_overview import setup_lines
from dynamics.report.progress import StepProgress
from dynamics.report.tables import comparison_table, correlation_table, forecast_table, runs_table

__all__ = ["print_summary"]


def _rich_table(
    frame: pd.DataFrame, title: str, highlight: list[bool] | None = None, caption: str | None = None
) -> Table:
    table = Table(
        title=title, title_justify="left", title_style="bold", caption=caption, caption_justify="left"
    )
    for i, col in enumerate(frame.columns):
        table.add_column(str(col), justify="left" if i == 0 else "right", no_wrap=i > 0, overflow="fold")
    for i, row in enumerate(frame.astype(str).itertuples(index=False)):
        style = "green" if highlight and highlight[i] else None
        table.add_row(*row, style=style)
    return table


def print_summary(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    by: str | None = None,
    pair_on: Sequence[str] | str | None = None,
    target: str = "multitask_score",
    primary: Iterable[str] = (),
    max_rows: int = 15,
    console: Console | None = None,
    progress: bool = True,
    group: str | None = None,
    pair: Sequence[str] | str | None = None,
) -> ReportContext:
    """Print the report's key tables and findings to the terminal; returns the context used.

    Same arguments and defaults as :func:`dynamics.report.build_report` (``run_dirs`` may be a
    ``ReportResult.context`` to reuse its statistics); tables are the same selections as the PDF's
    (top ``max_rows`` rows). ``group`` and ``pair`` are the deprecated names of ``by`` and ``pair_on``.
    """
    by = renamed(by, group, "by", "group", "print_summary")
    pair_on = renamed(pair_on, pair, "pair_on", "pair", "print_summary")
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped / captured: do not squeeze the tables into 80 columns
            console = Console(width=160)
    bar = StepProgress(progress, total=5, desc="summary")
    try:
        ctx = (
            run_dirs
            if isinstance(run_dirs, ReportContext)
            else build_context(
                run_dirs, by=by, pair_on=pair_on, target=target, primary=tuple(primary), step=bar
            )
        )
        bar("writing findings")
        found = make_findings(ctx)
    finally:
        bar.close()

    console.rule(f"[bold]dynamics summary: {len(ctx.runset.runs)} run(s)")
    console.print(_rich_table(runs_table(ctx), "Runs"))
    console.print("[bold]Setup[/bold]")
    for line in setup_lines(ctx):
        console.print(f"  {line}", highlight=False)
    console.print()
    console.print("[bold]Key findings[/bold]")
    for line in found or ["No statistical findings (see the notes below)."]:
        console.print(f"  • {line}", highlight=False)
    console.print()

    notes = []
    if ctx.comparison.ok:
        table, sig, n_tested = comparison_table(ctx, max_rows=max_rows)
        console.print(
            _rich_table(
                table,
                f"Group comparison by {ctx.group}",
                sig,
                caption=f"{n_tested} signal features tested; green: p_holm < 0.05 in its family; p: exact for n <= 10",
            )
        )
    else:
        notes.append(f"Group comparison: {ctx.comparison.note}")
    if ctx.correlation.ok:
        table, sig, n_tested = correlation_table(ctx, max_rows=max_rows)
        console.print(
            _rich_table(
                table,
                f"Correlation with {ctx.target} (Spearman)",
                sig,
                caption=f"{n_tested} features; strongest |r| first; green: p_holm < 0.05",
            )
        )
    else:
        notes.append(f"Correlation: {ctx.correlation.note}")
    if ctx.forecast.ok:
        console.print(_rich_table(forecast_table(ctx), f"Early forecast of {ctx.target}"))
    from dynamics.report.findings import comparison_power, correlation_power

    for power in (comparison_power(ctx), correlation_power(ctx)):
        if power is not None:
            console.print(f"[dim]{power.sentence}[/dim]", highlight=False)
    else:
        notes.append(f"Forecast: {ctx.forecast.note}")
    for note in notes:
        console.print(f"[dim]{note}[/dim]", highlight=False)
    return ctx
