"""Fixtures shared by the signal tests."""

from __future__ import annotations

import pytest

import dynamics.signals.backward as backward_mod


@pytest.fixture
def weighted_passes(monkeypatch):
    """Counts the example-axis check's weighted backward passes (each one draws the check weights)."""
    count = {"n": 0}
    real = backward_mod.check_weights

    def counting(n, like):
        count["n"] += 1
        return real(n, like)

    monkeypatch.setattr(backward_mod, "check_weights", counting)
    return count
