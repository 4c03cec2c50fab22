"""Reports on a set of runs: a multi-page PDF (plus PNG/SVG figures) and a terminal summary.

    from dynamics.report import build_report, print_summary
    result = build_report(["runs/"], "report.pdf", group="construction", figures_dir="figures/")
    print_summary(["runs/"], group="construction")

Numbers in the findings and tables come from :mod:`dynamics.analysis` unchanged.
"""

from __future__ import annotations

from dynamics.report.pdf import PAGES, ReportResult, build_report
from dynamics.report.summary import print_summary

__all__ = ["build_report", "print_summary", "ReportResult", "PAGES"]
