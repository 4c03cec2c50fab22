"""The training side stays light: hooks and the store writer never pull in the analysis stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pandas", "scipy", "matplotlib", "seaborn", "statsmodels")


@pytest.mark.parametrize(
    ("statement", "baseline"),
    [
        ("import dynamics", "pass"),
        ("from dynamics import RunWriter", "pass"),
        ("from dynamics import probe", "pass"),
        ("from dynamics import LoopRecorder", "pass"),
        # transformers' Trainer imports scipy itself; what we must not add is anything beyond that.
        (
            "from dynamics import attach, DynamicsCallback",
            "from transformers import Trainer, TrainerCallback",
        ),
        ("from dynamics.lightning import DynamicsCallback", "import lightning.pytorch"),
    ],
)
def test_training_side_imports_no_analysis_stack(statement, baseline):
    code = (
        f"import sys; {baseline}; before = set(sys.modules); {statement}; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{statement!r} imported {out.stdout.strip()}"


def test_plain_import_does_not_load_torch_or_transformers():
    code = "import sys, dynamics; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_unknown_attribute_is_an_attribute_error():
    import dynamics

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dynamics.nope  # noqa: B018
