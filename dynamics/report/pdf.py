"""Build the multi-page PDF report (and optionally each page as PNG and SVG).

Page order: overview (runs, setup, key findings) | per-task losses | per-task gradient norms |
task-cosine heatmaps (early / middle / late) | conflict rate | Fisher SE and rho | group comparison
table | feature-vs-score scatter plots | early forecast. A page without data is left out and its
reason is listed on the overview and in :attr:`ReportResult.skipped`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from dynamics.report import pages_curves, pages_geometry, pages_spectrum, pages_stats
from dynamics.report.context import ReportContext, build_context, renamed
from dynamics.report.findings import findings as make_findings
from dynamics.report.page import NoData, Page
from dynamics.report.pages_overview import build_overview
from dynamics.report.progress import StepProgress
from dynamics.report.style import apply_theme
from dynamics.store.reader import RunSet

__all__ = ["build_report", "render_pages", "ReportResult", "PAGES"]

PAGES: tuple[Page, ...] = (
    pages_curves.LOSS,
    pages_curves.GRAD_NORM,
    pages_geometry.COSINE,
    pages_geometry.CONFLICT,
    pages_spectrum.FISHER,
    pages_stats.COMPARISON,
    pages_stats.CORRELATION,
    pages_stats.FORECAST,
)
_CONTEXT_STEPS = 5  # load, features, compare, correlate, forecast


@dataclass
class ReportResult:
    """What :func:`build_report` wrote.

    Attributes:
        path: the PDF.
        pages: titles of the pages written, in order (the overview first); one entry per PDF page.
        skipped: page title -> why it was left out.
        findings: the key-findings sentences printed on the overview.
        figures: PNG and SVG files written to ``figures_dir``.
        seconds: wall-clock time to build.
        timings: seconds per step (loading, each statistic, each page, writing).
        context: the runs and statistics frames the report was drawn from (pass it to
            :func:`~dynamics.report.print_summary` to reuse them).
    """

    path: Path
    pages: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    context: ReportContext | None = field(default=None, repr=False)

    @property
    def n_pages(self) -> int:
        return len(self.pages)


def render_pages(
    ctx: ReportContext, *, title: str | None = None, progress=None
) -> tuple[list[tuple[str, str, Figure]], dict[str, str], list[str]]:
    """Draw every page for a context.

    Returns ([(key, page title, figure), ...] with the overview first, {skipped title: reason}, findings).
    """
    step = progress or (lambda label: None)
    drawn: list[tuple[str, str, Figure]] = []
    skipped: dict[str, str] = {}
    for page in PAGES:
        step(f"drawing {page.title.lower()}")
        try:
            figs = page.build(ctx)
        except NoData as why:
            skipped[page.title] = str(why)
            continue
        drawn += [(page.key, page.title, fig) for fig in figs]
    step("writing findings")
    found = make_findings(ctx)
    overview = build_overview(ctx, found, skipped, title=title)
    return [("overview", "Overview", overview), *drawn], skipped, found


def _output_path(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ValueError(
            f"out={str(path)!r} is a directory; give a file name such as {str(path / 'report.pdf')!r}"
        )
    if path.suffix.lower() != ".pdf":
        raise ValueError(f"out={str(path)!r} does not end in .pdf; the report is a PDF (e.g. 'report.pdf')")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_report(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str] | RunSet | ReportContext,
    out: str | os.PathLike[str],
    *,
    by: str | None = None,
    pair_on: Sequence[str] | str | None = None,
    target: str = "multitask_score",
    primary: Iterable[str] = (),
    figures_dir: str | os.PathLike[str] | None = None,
    title: str | None = None,
    progress: bool = True,
    group: str | None = None,
    pair: Sequence[str] | str | None = None,
) -> ReportResult:
    """Write a multi-page PDF report for a set of runs.

    Args:
        run_dirs: run directories, folders of runs or globs, a RunSet, or a ReportContext from
            :func:`~dynamics.report.context.build_context` / an earlier ``ReportResult.context``
            (its statistics are reused; ``by``, ``pair_on``, ``target`` and ``primary`` are then ignored).
        out: the PDF to write (parent folders are created).
        by: the tag whose groups are compared (default: the only varying tag that is not a
            replicate tag such as model or seed; see :func:`~dynamics.report.context.build_context`).
        pair_on: tags pairing runs across groups, list or ``"model,seed"`` (default: model, seed
            where present).
        target: the final score to explain: ``multitask_score`` or ``score/<task>/<metric>``.
        primary: pre-specified features tested with the target as their own Holm family.
        figures_dir: also write each page as PNG (150 dpi) and SVG there.
        title: the overview's headline.
        progress: show a progress bar.
        group, pair: deprecated names of ``by`` and ``pair_on`` (removed in the next release).

    Raises:
        FileNotFoundError / ValueError: bad paths, no runs, unknown group / pair tags or target.
    """
    start = time.perf_counter()
    by = renamed(by, group, "by", "group", "build_report")
    pair_on = renamed(pair_on, pair, "pair_on", "pair", "build_report")
    out_path = _output_path(out)
    bar = StepProgress(progress, total=_CONTEXT_STEPS + len(PAGES) + 3)
    try:
        # The theme lives only inside this block, so a notebook's own matplotlib settings survive.
        with mpl.rc_context():
            apply_theme()
            ctx = (
                run_dirs
                if isinstance(run_dirs, ReportContext)
                else build_context(
                    run_dirs, by=by, pair_on=pair_on, target=target, primary=tuple(primary), step=bar
                )
            )
            pages, skipped, found = render_pages(ctx, title=title, progress=bar)
            bar("writing PDF")
            meta = {"Title": title or "Training-dynamics report", "Creator": "dynamics report"}
            with PdfPages(out_path, metadata=meta) as pdf:
                for _, _, fig in pages:
                    pdf.savefig(fig)
            written: list[Path] = []
            if figures_dir is not None:
                bar("writing PNG and SVG figures")
                written = _export_figures(pages, Path(figures_dir))
    finally:
        bar.close()
    return ReportResult(
        path=out_path,
        pages=[t for _, t, _ in pages],
        skipped=skipped,
        findings=found,
        figures=written,
        seconds=time.perf_counter() - start,
        timings=dict(bar.timings),
        context=ctx,
    )


def _export_figures(pages: list[tuple[str, str, Figure]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    counts: dict[str, int] = {}
    for index, (key, _, fig) in enumerate(pages):
        counts[key] = counts.get(key, 0) + 1
        stem = f"{index:02d}_{key}" + (f"-{counts[key]}" if counts[key] > 1 else "")
        for ext in ("png", "svg"):
            path = folder / f"{stem}.{ext}"
            fig.savefig(path, dpi=150 if ext == "png" else None)
            written.append(path)
    return written
