"""Statistics on run collections: features per run, group comparisons, correlations, forecasts.

    from dynamics import load_runs
    from dynamics.analysis import features, compare, correlate, forecast

    runs = load_runs("out/")
    feats = features(runs)                                           # one row per run
    compare(feats, by="construction", pair_on=("model", "seed"))     # IMAX vs DMAX, per feature
    correlate(feats, target="multitask_score", control="model")      # which signals go with the score
    forecast(runs, fractions=(0.1, 0.25), group="model")             # early training -> final score
    attainability(compare(...)).sentence     # "With 2 pairs ... no finding can be significant ..."

Analysis side: pandas, scipy and statsmodels; never the trainer integrations or torch.
"""

from __future__ import annotations

from dynamics.analysis.attainable import Attainability, attainability, min_pvalue, runs_needed
from dynamics.analysis.compare import compare
from dynamics.analysis.correlate import correlate, partial_correlation
from dynamics.analysis.exact import EXACT_MAX_N
from dynamics.analysis.features import features
from dynamics.analysis.forecast import forecast
from dynamics.analysis.loss_curvature import loss_curvature
from dynamics.analysis.mixed import MixedResult, mixed_model
from dynamics.analysis.multiple_testing import adjust_pvalues
from dynamics.analysis.scores import delta_m, multitask_score

__all__ = [
    "features",
    "compare",
    "correlate",
    "partial_correlation",
    "mixed_model",
    "MixedResult",
    "forecast",
    "multitask_score",
    "delta_m",
    "loss_curvature",
    "adjust_pvalues",
    "attainability",
    "Attainability",
    "min_pvalue",
    "runs_needed",
    "EXACT_MAX_N",
]


def _callable_modules() -> None:
    """Make ``dynamics.analysis.features`` (and compare, correlate, forecast) the module again.

    ``from .features import features`` above binds the function over the submodule of the same
    name, so ``import dynamics.analysis.features as m`` used to give the function. The package
    attribute is now the module itself, made callable: ``features(runs)`` calls the function,
    ``features.score_labels`` is the module's helper, and ``import dynamics.analysis.features`` gives
    the module. (Static checkers still see the function, from the import above.)
    """
    import inspect
    import sys
    import types

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return self.__dict__[self.__name__.rsplit(".", 1)[1]](*args, **kwargs)

    for name in ("features", "compare", "correlate", "forecast"):
        module = sys.modules[f"{__name__}.{name}"]
        module.__class__ = CallableModule
        module.__signature__ = inspect.signature(getattr(module, name))  # type: ignore[attr-defined]
        globals()[name] = module


_callable_modules()
