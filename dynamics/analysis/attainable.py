"""The smallest p-value a test can reach with ``n`` observations, and what that means for a family.

An exact test on few observations has only so many outcomes, and its p-value cannot fall below
the probability of the most extreme one. For the two-sided exact tests of this layer (no ties; ties
only raise the floor):

* rank or permutation correlation (Spearman, Pearson, Kendall) over ``n`` runs: ``2 / n!``;
* correlation within groups of sizes ``n_g`` (stratified permutation): ``2 / prod_g n_g!``;
* Wilcoxon signed-rank or sign-flip permutation on ``n`` pairs: ``2 / 2^n``;
* Mann-Whitney U or a two-sample permutation test, groups ``n_a`` and ``n_b``:
  ``2 / C(n_a + n_b, n_a)``.

After a correction over ``m`` tests, Holm's smallest adjusted p is ``m p_min`` (the first step
multiplies by ``m``), so a rejection at level ``alpha`` needs ``p_min <= alpha / m``; with
Benjamini-Hochberg the best case (all ``m`` at ``p_min``) is ``p_min`` itself, needing
``p_min <= alpha``. :func:`attainability` turns this into numbers and one plain sentence, the one the
report prints and ``results.md`` quotes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["min_pvalue", "runs_needed", "Attainability", "attainability", "TEST_KINDS"]

TEST_KINDS = {
    "spearman": "correlation",
    "pearson": "correlation",
    "kendall": "correlation",
    "within": "within",
    "wilcoxon": "paired",
    "sign_flip": "paired",
    "paired_t": "paired",
    "mannwhitney": "unpaired",
    "welch": "unpaired",
    "permutation": "unpaired",
}
_TEST_WORDS = {
    "correlation": "a two-sided permutation test of a correlation",
    "within": "a two-sided within-group permutation test of a correlation",
    "paired": "a two-sided exact Wilcoxon signed-rank test",
    "unpaired": "a two-sided exact Mann-Whitney test",
}
_MAX_SEARCH = 200


def min_pvalue(test: str, n: int | Sequence[int]) -> float:
    """Smallest two-sided p attainable (formulas in the module docstring).

    ``n``: runs (correlation), pairs (paired tests), ``(n_a, n_b)`` (unpaired tests) or the group
    sizes (``test="within"``).
    """
    kind = TEST_KINDS.get(test)
    if kind is None:
        raise ValueError(f"test must be one of {sorted(TEST_KINDS)}, got {test!r}")
    sizes = [int(n)] if isinstance(n, (int, np.integer)) else [int(v) for v in n]
    if kind == "correlation":
        (k,) = sizes[:1] or [0]
        return 1.0 if k < 2 else min(1.0, 2.0 / math.factorial(k))
    if kind == "within":
        total = math.prod(math.factorial(max(s, 0)) for s in sizes)
        return min(1.0, 2.0 / total) if total > 1 else 1.0
    if kind == "paired":
        (k,) = sizes[:1] or [0]
        return 1.0 if k < 1 else min(1.0, 2.0 / 2.0**k)
    if len(sizes) != 2:
        raise ValueError(f"an unpaired test needs n = (n_a, n_b), got {n!r}")
    na, nb = sizes
    return 1.0 if na < 1 or nb < 1 else min(1.0, 2.0 / math.comb(na + nb, na))


def _threshold(alpha: float, family_size: int, correction: str) -> float:
    if correction == "holm" or correction == "bonferroni":
        return alpha / max(family_size, 1)
    if correction in ("bh", "none", None):
        return alpha
    raise ValueError(f"correction must be 'holm', 'bonferroni', 'bh' or 'none', got {correction!r}")


def runs_needed(
    test: str, *, alpha: float = 0.05, family_size: int = 1, correction: str = "holm"
) -> int | None:
    """Fewest observations (runs, pairs, or runs per group for a balanced unpaired test) at which
    the smallest attainable p reaches the (corrected) threshold; None beyond 200."""
    kind = TEST_KINDS.get(test)
    if kind is None:
        raise ValueError(f"test must be one of {sorted(TEST_KINDS)}, got {test!r}")
    limit = _threshold(alpha, family_size, correction)
    for k in range(1, _MAX_SEARCH + 1):
        n: int | tuple[int, ...]
        n = (k, k) if kind == "unpaired" else k
        if kind == "within":
            n = (k, k)  # two groups of k runs
        if min_pvalue(test, n) <= limit:
            return k
    return None


@dataclass(frozen=True)
class Attainability:
    """Whether any result of a family of tests can be significant, in numbers and in words.

    Attributes:
        test: the test (``"wilcoxon"``, ``"spearman"``, ...). n: the largest sample in the family
            (pairs, runs, or ``(n_a, n_b)``). family_size: tests corrected together. alpha,
            correction: the level and correction. min_p: smallest attainable p at ``n``.
        min_p_corrected: smallest attainable corrected p (Holm: ``min(1, m min_p)``).
        threshold: what ``min_p`` must reach (``alpha / m`` for Holm, ``alpha`` for BH).
        possible: ``min_p <= threshold``. n_needed: the sample needed for ``possible`` (None if
            already possible or beyond 200). unit: "pairs", "runs" or "runs per group".
        sentence: the statement in words.
    """

    test: str
    n: int | tuple[int, ...]
    family_size: int
    alpha: float
    correction: str
    min_p: float
    min_p_corrected: float
    threshold: float
    possible: bool
    n_needed: int | None
    unit: str
    sentence: str


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _unit(kind: str) -> str:
    return {"paired": "pairs", "unpaired": "runs per group", "within": "runs per group"}.get(kind, "runs")


def _sentence(test: str, n, m: int, alpha: float, correction: str, min_p: float, thr: float, needed) -> str:
    kind = TEST_KINDS[test]
    unit = _unit(kind)
    if kind == "unpaired":
        n_text = f"{n[0]} and {n[1]} runs"
    elif kind == "within":
        n_text = "groups of " + ", ".join(map(str, n)) + " runs"
    else:
        n_text = f"{n} {unit}"
    corr = {"holm": "Holm", "bonferroni": "Bonferroni", "bh": "Benjamini-Hochberg"}.get(correction, "")
    fam = f" after {corr} correction over {m} tests" if corr and m > 1 else ""
    base = f"With {n_text}, the smallest p-value {_TEST_WORDS[kind]} can reach is {_fmt_p(min_p)}"
    if min_p <= thr:
        return (
            f"{base}, below the threshold {_fmt_p(thr)}{fam}: a significant result is possible "
            f"at alpha = {alpha:g}."
        )
    need = f"at least {needed} {unit} would be needed" if needed else "far more runs would be needed"
    if min_p > alpha:
        why = f"above alpha = {alpha:g} even before any correction"
    else:
        why = f"above the threshold {_fmt_p(thr)} that a result needs{fam}"
    return f"{base}, {why}: no finding can be significant with this many runs, whatever the data ({need})."


def attainability(
    table: pd.DataFrame | None = None,
    *,
    test: str | None = None,
    n: int | Sequence[int] | None = None,
    family_size: int | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
) -> Attainability:
    """Can any test of this family be significant at this sample size? Numbers plus a sentence.

    Pass a table from :func:`dynamics.analysis.compare` or :func:`dynamics.analysis.correlate`
    (its ``test``/``method``, ``n``/``n_pairs``/``n_a``/``n_b`` columns and its number of
    p-values decide), or ``test``, ``n`` and ``family_size`` directly. The table's best case is used:
    its largest sample, so "cannot be significant" holds for every row.

    Example:
        >>> from dynamics.analysis import attainability
        >>> a = attainability(test="wilcoxon", n=2, family_size=557)
        >>> a.possible, a.min_p, a.n_needed
        (False, 0.5, 15)
        >>> a.sentence.split(":")[1].strip()
        'no finding can be significant with this many runs, whatever the data (at least 15 pairs would be needed).'
    """
    if table is not None:
        if table.empty:
            raise ValueError("table has no rows; pass a compare() or correlate() result")
        if "paired" in table.columns:  # a compare() table
            paired = table["paired"].astype(bool)
            if paired.any():
                test = test or "wilcoxon"
                n = int(table.loc[paired, "n_pairs"].max())
            else:
                test = test or "mannwhitney"
                i = (table["n_a"] + table["n_b"]).astype(float).idxmax()
                n = (int(table.loc[i, "n_a"]), int(table.loc[i, "n_b"]))
        else:  # a correlate() table
            test = test or str(table.attrs.get("method", "spearman"))
            n = int(table["n"].max())
        if family_size is None:
            p = table["p_value"].to_numpy(dtype=float) if "p_value" in table else np.array([])
            family_size = int(np.isfinite(p).sum()) or len(table)
    if test is None or n is None:
        raise ValueError("pass a compare()/correlate() table, or test= and n=")
    m = int(family_size or 1)
    p_min = min_pvalue(test, n)
    thr = _threshold(alpha, m, correction)
    possible = p_min <= thr
    corrected = min(1.0, m * p_min) if correction in ("holm", "bonferroni") else p_min
    needed = None if possible else runs_needed(test, alpha=alpha, family_size=m, correction=correction)
    n_out: int | tuple[int, ...] = n if isinstance(n, int) else tuple(int(v) for v in n)
    return Attainability(
        test=test,
        n=n_out,
        family_size=m,
        alpha=alpha,
        correction=correction,
        min_p=p_min,
        min_p_corrected=corrected,
        threshold=thr,
        possible=possible,
        n_needed=needed,
        unit=_unit(TEST_KINDS[test]),
        sentence=_sentence(test, n_out, m, alpha, correction, p_min, thr, needed),
    )
