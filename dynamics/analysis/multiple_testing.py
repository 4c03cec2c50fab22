"""Multiple-comparison correction that leaves missing p-values missing.

Holm (1979) controls the family-wise error rate; Benjamini-Hochberg (1995) the false discovery
rate. Both are statsmodels' ``multipletests``; the family is every non-NaN p-value passed in.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from statsmodels.stats.multitest import multipletests

__all__ = ["adjust_pvalues"]

_METHODS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "bonferroni": "bonferroni"}


def adjust_pvalues(p: ArrayLike, method: str = "holm") -> np.ndarray:
    """Adjusted p-values (``"holm"``, ``"bh"`` or ``"bonferroni"``); NaN stays NaN and is not counted."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method=_METHODS[method])[1]
    return out
