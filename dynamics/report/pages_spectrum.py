"""The Fisher-spectrum page: spectral entropy SE and dominant eigenvalue ratio rho over training.

SE = -sum_k p_k log p_k and rho = lambda_1 / sum_k lambda_k, with p_k = lambda_k / sum lambda, for the
eigenvalues lambda_k of the empirical Fisher on the probe batch. The IMAX paper reports lower SE and
higher rho for the better data construction, so the headline says which group has which.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from dynamics.report.context import ReportContext
from dynamics.report.findings import test_suffix
from dynamics.report.page import NoData, Page
from dynamics.report.pages_curves import group_legend
from dynamics.report.style import fmt, page_note, page_title

__all__ = ["FISHER"]

_PANELS = (  # the same panels as dynamics.plot.FISHER_PANELS
    ("fisher_se", "spectral entropy SE", "lower: gradient energy in fewer directions"),
    ("fisher_rho", "dominant eigenvalue ratio ρ", "higher: one direction dominates"),
)


def build_fisher(ctx: ReportContext) -> list[Figure]:
    panels = []
    for name, label, hint in _PANELS:
        rows = ctx.metric(name)
        rows = rows[rows["task"] == ""] if (rows["task"] == "").any() else rows
        if not rows.empty:
            panels.append((name, label, hint, rows))
    if not panels:
        raise NoData(
            "no 'fisher_se' or 'fisher_rho' rows in the run stores (no probe was recorded: probes off, failed, or none reached disk)"
        )
    level = {name: rows.groupby("group")["value"].mean() for name, _, _, rows in panels}

    if len(ctx.groups) >= 2 and len(level) == 2:
        low_se, high_rho = level["fisher_se"].idxmin(), level["fisher_rho"].idxmax()
        se_test = test_suffix(ctx, "fisher_se/all/mean")
        if low_se == high_rho:
            title = f"Observed: {low_se} has the lowest mean spectral entropy and the highest ρ{se_test}"
        else:
            title = f"Observed: lowest mean spectral entropy {low_se}, highest ρ {high_rho}{se_test}"
    elif len(ctx.groups) >= 2:
        name, label, _, _ = panels[0]
        best = level[name].idxmin() if name == "fisher_se" else level[name].idxmax()
        which = "lowest" if name == "fisher_se" else "highest"
        title = f"Observed: {best} has the {which} mean {label}{test_suffix(ctx, f'{name}/all/mean')}"
    else:
        parts = [f"{label.split()[-1]} averages {fmt(level[name].iloc[0])}" for name, label, _, _ in panels]
        title = "Fisher spectrum over training: " + ", ".join(parts)

    from dynamics.plot import fisher_curves

    fig = fisher_curves(ctx)
    page_title(
        fig,
        title,
        "Spectrum of the empirical Fisher on the probe batch, over steps"
        + (f", by {ctx.group}" if ctx.group else ""),
    )
    group_legend(fig, ctx)
    means = "; ".join(
        f"{name}: " + ", ".join(f"{g} {fmt(v)}" for g, v in level[name].reindex(ctx.groups).dropna().items())
        for name, _, _, _ in panels
    )
    page_note(fig, f"line: mean over runs, band: +-1 sd over runs. Mean over all probes: {means}.")
    return [fig]


FISHER = Page("fisher", "Fisher spectrum (SE, rho)", build_fisher)
