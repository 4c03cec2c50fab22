"""Public functions are importable without shadowing the modules of the same name."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest


@pytest.mark.parametrize("name", ["features", "compare", "correlate", "forecast"])
def test_the_module_is_the_module_and_still_calls_the_function(name):
    module = importlib.import_module(f"dynamics.analysis.{name}")
    exec(f"import dynamics.analysis.{name} as imported", globals())
    assert imported is module and isinstance(module, types.ModuleType)  # noqa: F821
    from dynamics import analysis

    assert getattr(analysis, name) is module
    function = module.__dict__[name]
    assert inspect.isfunction(function)
    assert inspect.signature(module) == inspect.signature(function)


def test_calling_the_package_attribute_calls_the_function():
    import pandas as pd

    from dynamics.analysis import compare

    feats = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 4, "x/all/mean": [1.0, 2, 3, 4, 2, 3, 4, 5]})
    assert compare(feats, by="g", n_boot=0).loc[0, "diff"] == pytest.approx(1.0)
