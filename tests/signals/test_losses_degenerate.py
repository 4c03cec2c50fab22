"""Degenerate probe batches (issue 11): one clear error or warning, never a degenerate value as data."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dynamics import probe
from dynamics.probing import DegenerateProbeError, DegenerateProbeWarning
from dynamics.signals.spectrum import fisher_eigvals, fisher_spectrum
from tests import tiny_models as tm
from tests.signals.signals_helpers import build

BLANK = {"fisher_se", "fisher_rho", "fisher_eff_rank", "noise_scale"}


def _probe_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = probe(*args, **kwargs)
    return res, [w for w in caught if issubclass(w.category, DegenerateProbeWarning)]


@pytest.mark.parametrize("family", ["llama_untied", "mlp"])
def test_one_example_warns_once_and_logs_no_spectrum(family):
    model, batch, _, _ = build(family, n=1)
    res, caught = _probe_warnings(model, batch, task_ids=[0])
    assert len(caught) == 1 and "one example" in str(caught[0].message)
    assert all(
        math.isnan(getattr(res, k)) for k in ("fisher_se", "fisher_rho", "fisher_eff_rank", "noise_scale")
    )
    names = {r[1] for r in res.to_rows(3)}
    assert names == {"probe_loss", "grad_norm", "fisher_trace"} and not names & BLANK
    assert res.task_grad_norm[0] > 0


def test_one_supervised_example_among_several_is_the_same_case():
    model, batch, _, _ = build("llama_untied", n=4)
    batch["labels"][1:] = -100
    res, caught = _probe_warnings(model, batch, task_ids=[0, 1, 0, 1])
    assert len(caught) == 1 and "only one example with a supervised label (of 4)" in str(caught[0].message)
    names = {r[1] for r in res.to_rows(0)}
    assert not names & BLANK and res.missing_tasks == ["1"]
    # two supervised examples: a real spectrum, no warning
    batch["labels"][2] = build("llama_untied", n=4)[1]["labels"][2]
    res, caught = _probe_warnings(model, batch, task_ids=[0, 1, 0, 1])
    assert not caught and math.isfinite(res.fisher_se) and "fisher_se" in {r[1] for r in res.to_rows(0)}


@pytest.mark.parametrize("family", ["llama_untied", "mlp", "t5"])
def test_all_labels_ignored_is_one_clear_error(family):
    if family == "t5":
        model, (batch, task_ids) = tm.tiny_t5(dtype=torch.float64), tm.t5_batch(n=4)
    else:
        model, batch, task_ids, _ = build(family, n=4)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(DegenerateProbeError, match="no example of the probe batch.*supervised label.*-100"):
        probe(model, batch, task_ids=task_ids)


def test_non_finite_loss_names_the_examples():
    model, batch, task_ids, _ = build("mlp")
    batch["x"][[2, 5], 0] = float("nan")
    with pytest.raises(DegenerateProbeError, match=r"loss is not finite.*example\(s\) 2, 5 of 8"):
        probe(model, batch, task_ids=task_ids)
    assert issubclass(DegenerateProbeError, ValueError)  # what callers (the recorder) already catch


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient for example 1 backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[1] = torch.where(grad[1] != 0, float("inf"), 0.0)  # only where example 1's loss reaches
        return grad


class BadBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(_InfGrad.apply(torch.tanh(self.fc(x))))


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_non_finite_gradient_is_one_clear_error(method):
    torch.manual_seed(0)
    model = BadBackward().double()
    batch, task_ids = tm.mlp_batch(dtype=torch.float64)
    with pytest.raises(DegenerateProbeError, match=r"gradient is not finite.*example\(s\) 1 of 8"):
        probe(model, (batch["x"], batch["labels"]), task_ids=task_ids, method=method)


def test_spectrum_refuses_a_non_finite_gram_instead_of_eigh_failing():
    K = torch.eye(3, dtype=torch.float64)
    K[0, 1] = K[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fisher_eigvals(K)
    with pytest.raises(ValueError, match="NaN or inf"):
        fisher_spectrum(K)
