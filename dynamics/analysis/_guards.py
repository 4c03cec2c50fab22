"""Small-sample guards: when a test would give a meaningless p-value, say so once."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

MIN_N = 4
"""Fewest paired (or total) observations for which a p-value is reported at all."""

MIN_EFFECT_N = 4
"""Fewest pairs (or runs per group) for which an effect size (Cohen's d, rank-biserial) is reported."""


def warn_notes(notes: Sequence[str], what: str, nan_what: str = "p-values", stacklevel: int = 3) -> None:
    """One warning summarising how many rows carry a 'too few observations' note."""
    few = [n for n in notes if n and "too few" in n]
    if few:
        warnings.warn(
            f"{len(few)} of {len(notes)} {what} have too few observations; their {nan_what} "
            f"are NaN (see the 'note' column, e.g. {few[0]!r})",
            stacklevel=stacklevel,
        )
