"""Edge cases: one-example task, absent task, n = 1, all-zero gradients, tidy rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynamics import probe
from dynamics.probing import DegenerateProbeWarning
from tests.reference import ref_grads, ref_signals
from tests.signals.signals_helpers import build

EPS64 = float(torch.finfo(torch.float64).eps)


def test_task_with_one_example_and_absent_task():
    model, batch, _, kind = build("llama_untied")
    task_ids = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0])  # task "c" has one example, "d" none
    tasks = ["a", "b", "c", "d"]
    params = [p for p in model.parameters() if p.requires_grad]
    G, losses, weights = ref_grads(model, batch, params, kind)
    ref = ref_signals(G, losses, weights, task_ids.numpy(), 4, EPS64, dense_fisher=False)
    res = probe(model, batch, task_ids=task_ids, tasks=tasks)
    assert res.missing_tasks == ["d"]
    assert res.task_counts.tolist() == [4, 3, 1, 0]
    np.testing.assert_allclose(res.task_grad_norm[:3].numpy(), ref.task_norm[:3], rtol=1e-8)
    np.testing.assert_allclose(res.task_cosine[:3, :3].numpy(), ref.task_cos[:3, :3], rtol=1e-8)
    assert res.task_grad_norm[2].item() == pytest.approx(np.linalg.norm(G[5]), rel=1e-8)
    assert torch.isfinite(res.task_cosine[:3, :3]).all()
    assert torch.isnan(res.task_cosine[3]).all() and torch.isnan(res.task_loss[3])
    assert res.conflict_rate == pytest.approx(ref.conflict_rate)
    rows = res.to_rows(5)
    assert all("d" not in (r[2], r[3]) for r in rows)
    assert all(math.isfinite(r[4]) for r in rows)
    assert {r[1] for r in rows if r[2] == "c"} == {"probe_loss", "grad_norm"}
    assert {(r[2], r[3]) for r in rows if r[1] == "grad_cosine"} == {("a", "b"), ("a", "c"), ("b", "c")}


def test_task_without_supervised_tokens_is_missing():
    model, batch, _, _ = build("llama_untied")
    batch["labels"][3] = -100
    task_ids = torch.tensor([0, 0, 1, 2, 0, 1, 1, 0])  # example 3 is task 2's only example
    res = probe(model, batch, task_ids=task_ids)
    assert res.missing_tasks == ["2"]
    assert torch.isfinite(res.task_grad_norm[:2]).all()
    assert res.gram[3].abs().max().item() == 0.0  # its per-example gradient is zero


def test_single_example():
    model, batch, _, kind = build("llava", n=1)
    task_ids = torch.tensor([0])
    params = [p for p in model.parameters() if p.requires_grad]
    G, _, _ = ref_grads(model, batch, params, kind)
    with pytest.warns(DegenerateProbeWarning, match="one example"):
        res = probe(model, batch, task_ids=task_ids)
    sq = float(G[0] @ G[0])
    assert res.gram.shape == (1, 1)
    assert res.gram.item() == pytest.approx(sq, rel=1e-8)
    np.testing.assert_allclose(res.fisher_eigvals.numpy(), [sq], rtol=1e-8)
    # one example: SE = 0 and rho = 1 hold by construction, not as a measurement (issue 11)
    assert math.isnan(res.fisher_se) and math.isnan(res.fisher_rho) and math.isnan(res.fisher_eff_rank)
    assert math.isnan(res.noise_scale) and math.isnan(res.conflict_rate)
    names = {r[1] for r in res.to_rows(0)}
    assert names == {"probe_loss", "grad_norm", "fisher_trace"}


def test_all_zero_gradients():
    """Parameters the loss does not reach (LLaVA's last CLIP layer; feature layer -2)."""
    model, batch, task_ids, _ = build("llava")
    params = {k: p for k, p in model.named_parameters() if "encoder.layers.1." in k or "post_layernorm" in k}
    res = probe(model, batch, task_ids=task_ids, params=params)
    assert res.gram.abs().max().item() == 0.0
    assert sorted(res.coverage["unused"]) == sorted(params)
    assert res.fisher_eigvals.numel() == 0 and res.fisher_trace == 0.0
    assert math.isnan(res.fisher_se) and math.isnan(res.fisher_rho) and math.isnan(res.noise_scale)
    assert (res.task_grad_norm == 0).all() and torch.isnan(res.task_cosine).all()
    assert math.isnan(res.conflict_rate)
    rows = res.to_rows(1)
    assert {r[1] for r in rows} == {"probe_loss", "grad_norm", "fisher_trace"}


def test_rows_match_result():
    model, batch, task_ids, _ = build("mlp")
    d = [torch.ones_like(p) for p in model.parameters()]
    res = probe(model, batch, task_ids=task_ids, tasks=["x", "y", "z"], direction=d)
    rows = res.to_rows(7)
    assert all(isinstance(r[0], int) and r[0] == 7 and isinstance(r[4], float) for r in rows)
    by = {(r[1], r[2], r[3]): r[4] for r in rows}
    assert len(by) == len(rows)
    assert by[("grad_cosine", "x", "z")] == pytest.approx(res.task_cosine[0, 2].item())
    assert ("grad_cosine", "z", "x") not in by
    assert by[("update_cosine", "y", "")] == pytest.approx(res.direction_cosine[1].item())
    assert by[("fisher_rho", "", "")] == pytest.approx(res.fisher_rho)
    assert by[("probe_loss", "z", "")] == pytest.approx(res.task_loss[2].item())
    expected = {"probe_loss", "grad_norm", "update_cosine", "grad_cosine", "conflict_rate", "fisher_se"}
    expected |= {"fisher_rho", "fisher_eff_rank", "fisher_trace", "noise_scale"}
    assert {r[1] for r in rows} == expected
