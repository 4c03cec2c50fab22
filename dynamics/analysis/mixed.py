"""Linear mixed-effects model ``target ~ feature + (1 | group)`` (statsmodels MixedLM).

    y_ij = beta_0 + beta_1 x_ij + u_j + e_ij,     u_j ~ N(0, tau^2),  e_ij ~ N(0, sigma^2)

for run ``i`` of group ``j`` (e.g. the model). The random intercept ``u_j`` absorbs what differs
between models (a larger model scores higher whatever its signals), so ``beta_1`` measures how the
score moves with the feature *within* a model. Fitted by REML (``statsmodels.formula.api.mixedlm``);
``p_value`` and the CI are statsmodels' Wald statistics for ``beta_1``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from dynamics.analysis._columns import require_columns
from dynamics.analysis._guards import MIN_N

__all__ = ["MixedResult", "mixed_model"]


@dataclass
class MixedResult:
    """Fixed-effect slope of ``feature`` in ``target ~ feature + (1 | group)``."""

    feature: str
    target: str
    group: str
    coef: float = np.nan
    se: float = np.nan
    p_value: float = np.nan
    ci_low: float = np.nan
    ci_high: float = np.nan
    group_var: float = np.nan
    converged: bool = False
    n: int = 0
    n_groups: int = 0
    note: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def mixed_model(
    feats: pd.DataFrame,
    target: str = "multitask_score",
    feature: str | None = None,
    group: str = "model",
    *,
    reml: bool = True,
    min_n: int = MIN_N,
) -> MixedResult:
    """Fit ``target ~ feature + (1 | group)`` on the runs where both are known.

    Args:
        feats: a features frame. target, feature: its columns. group: the grouping tag.
        reml: REML (default) or maximum likelihood.
        min_n: fewest runs for a fit; with fewer, or fewer than 2 groups, the result is NaN with a
            ``note``.

    Returns:
        :class:`MixedResult` with ``coef``, ``se``, ``p_value``, ``ci_low``, ``ci_high`` of the slope,
        the random-intercept variance ``group_var``, ``converged`` (False if statsmodels warned that
        the optimiser did not converge or the fit sits on the boundary), and the warnings it gave.

    Example:
        >>> import numpy as np, pandas as pd
        >>> from dynamics.analysis.mixed import mixed_model
        >>> rng = np.random.default_rng(0)
        >>> model = np.repeat([f"m{i}" for i in range(6)], 5)
        >>> x = rng.normal(size=30)
        >>> offset = np.repeat(rng.normal(scale=2.0, size=6), 5)
        >>> f = pd.DataFrame({"model": model, "fisher_rho/all/late": x,
        ...                   "multitask_score": 0.5 * x + offset + 0.1 * rng.normal(size=30)})
        >>> res = mixed_model(f, feature="fisher_rho/all/late", group="model")
        >>> print(round(res.coef, 1), res.p_value < 1e-6, res.n_groups)
        0.5 True 6
    """
    if feature is None:
        raise ValueError("name the feature column to model, e.g. feature='fisher_rho/all/late'")
    require_columns(feats, [target, feature, group], "mixed_model")
    res = MixedResult(feature=feature, target=target, group=group)
    data = pd.DataFrame(
        {
            "y": pd.to_numeric(feats[target], errors="coerce").to_numpy(dtype=float),
            "x": pd.to_numeric(feats[feature], errors="coerce").to_numpy(dtype=float),
            "g": feats[group].to_numpy(),
        }
    )
    data = data[np.isfinite(data["y"]) & np.isfinite(data["x"]) & data["g"].notna()]
    res.n = len(data)
    res.n_groups = int(data["g"].nunique())
    if res.n < min_n or res.n_groups < 2:
        res.note = f"too few runs for a mixed model ({res.n} runs in {res.n_groups} groups; need >= {min_n} and >= 2)"
        return res
    if data["x"].nunique() < 2:
        res.note = "no variation in the feature"
        return res
    if res.n_groups == res.n:
        res.note = "one run per group: the group intercept is not identified apart from the residual; use correlate()"
        return res
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm("y ~ x", data, groups=data["g"]).fit(reml=reml)
        except (np.linalg.LinAlgError, ValueError) as err:
            res.note = f"fit failed: {err}"
            return res
    res.warnings = sorted({str(w.message) for w in caught})
    ci = fit.conf_int().loc["x"]
    res.coef = float(fit.params["x"])
    res.se = float(fit.bse["x"])
    res.p_value = float(fit.pvalues["x"])
    res.ci_low, res.ci_high = float(ci.iloc[0]), float(ci.iloc[1])
    res.group_var = float(fit.cov_re.iloc[0, 0])
    bad = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    res.converged = bool(getattr(fit, "converged", True)) and not bad
    if bad and not res.note:
        res.note = "statsmodels warned: " + "; ".join(res.warnings)[:200]
    return res
