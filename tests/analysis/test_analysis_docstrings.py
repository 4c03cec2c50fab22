"""The runnable examples in the analysis docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "dynamics.analysis.features",
    "dynamics.analysis.compare",
    "dynamics.analysis.correlate",
    "dynamics.analysis.mixed",
    "dynamics.analysis.forecast",
    "dynamics.analysis.scores",
    "dynamics.analysis.loss_curvature",
    "dynamics.analysis.attainable",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    # import_module, not attribute access: dynamics.analysis.features is also the function's name.
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
