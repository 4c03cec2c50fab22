"""Layout of every report page: text inside the page, every axes labelled, no legend over data;
and, on 4 runs, no sentence or table quoting a p-value below what 4 runs can attain."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pdfplumber
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

from dynamics.report import build_report
from dynamics.report.pdf import render_pages
from tests.report.synthetic_runs import write_runs


@pytest.fixture(scope="module", params=["four_runs", "long_names"])
def report(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "four_runs":
        write_runs(tmp / "runs", n_models=2, n_seeds=1, n_steps=40, probe_every=5)
    else:  # long task names, six tasks: the pages must still keep their text inside
        tasks = ("classification_of_findings", "visual_question_answering", "report_generation", "grounding",
                 "calculation_of_ratio", "multilabel_detection")  # fmt: skip
        write_runs(tmp / "runs", n_models=2, n_seeds=2, n_steps=40, probe_every=5, tasks=tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = build_report([tmp / "runs"], tmp / "report.pdf", progress=False)
        pages, _, _ = render_pages(result.context)
    return SimpleNamespace(pdf=tmp / "report.pdf", result=result, figures=pages, name=request.param)


def test_every_text_box_stays_inside_the_page(report):
    with pdfplumber.open(report.pdf) as pdf:
        assert len(pdf.pages) == len(report.result.pages)
        for number, page in enumerate(pdf.pages, start=1):
            tol = 0.5
            outside = [
                c["text"]
                for c in page.chars
                if c["x0"] < -tol
                or c["x1"] > page.width + tol
                or c["top"] < -tol
                or c["bottom"] > page.height + tol
            ]
            assert not outside, (
                f"page {number} ({report.result.pages[number - 1]}): text off the page: {''.join(outside)[:80]!r}"
            )


def _data_boxes(ax, renderer):
    """Display-space boxes of what an axes plots: line points, bars, scatter points."""
    boxes = []
    for line in ax.get_lines():
        xy = line.get_xydata()
        if len(xy) and line.get_visible() and line.get_transform() == ax.transData:
            for x, y in ax.transData.transform(xy):
                boxes.append(Bbox([[x - 1, y - 1], [x + 1, y + 1]]))
    for patch in ax.patches:
        boxes.append(patch.get_window_extent(renderer))
    for coll in ax.collections:
        offsets = coll.get_offsets()
        if len(offsets) and coll.get_offset_transform() == ax.transData:
            for x, y in ax.transData.transform(offsets):
                boxes.append(Bbox([[x - 2, y - 2], [x + 2, y + 2]]))
    return boxes


def test_every_axes_is_labelled_and_no_legend_covers_data(report):
    for _key, title, fig in report.figures:
        FigureCanvasAgg(fig)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not ax.get_visible() or not ax.axison or hasattr(ax, "_colorbar"):
                continue
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel().strip(), f"{title}: an axes without an x label ({ax.get_title()!r})"
            assert ax.get_ylabel().strip(), f"{title}: an axes without a y label ({ax.get_title()!r})"
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            covered = [b for b in _data_boxes(ax, renderer) if box.overlaps(b)]
            assert not covered, f"{title}: the legend of {ax.get_title()!r} covers {len(covered)} data marks"


P_NUMBER = re.compile(r"\bp(?:_holm)? = (\d+(?:\.\d+)?(?:e[+-]\d+)?)")


def test_no_sentence_or_table_quotes_a_p_below_what_four_runs_can_attain(report):
    if report.name != "four_runs":
        pytest.skip("the four-run report is the small-sample case")
    floor = 2 / 24  # the smallest two-sided permutation p of a correlation over 4 runs
    quoted = [float(p) for s in report.result.findings for p in P_NUMBER.findall(s)]
    assert quoted and min(quoted) >= floor - 0.005, quoted
    assert any("no finding can be significant" in s for s in report.result.findings)
    with pdfplumber.open(report.pdf) as pdf:
        for page in pdf.pages:
            for p in P_NUMBER.findall(page.extract_text() or ""):
                assert float(p) >= floor - 0.005, p
            for table in page.extract_tables():
                header = table[0]
                for col, name in enumerate(header):
                    if name in ("p", "p (Holm)", "p within"):
                        for row in table[1:]:
                            if row[col] not in (None, "", "n/a"):
                                assert float(row[col]) >= floor - 0.005, (name, row)
