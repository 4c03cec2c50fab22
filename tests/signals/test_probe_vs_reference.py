"""probe() against brute force: explicit per-example gradients, dense Fisher, explicit task vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamics import probe
from tests.reference import ref_grads, ref_signals
from tests.signals.signals_helpers import FAMILIES, build, chosen_params

RTOL = 1e-5  # Gram entries, task norms and cosines
SPEC_RTOL = 1e-6  # eigenvalues, SE, rho
EPS64 = float(torch.finfo(torch.float64).eps)


def _check_first_order(res, ref, task_ids):
    scale = np.abs(ref.gram).max()
    np.testing.assert_allclose(res.gram.numpy(), ref.gram, rtol=RTOL, atol=RTOL * 1e-4 * scale)
    np.testing.assert_allclose(res.task_grad_norm.numpy(), ref.task_norm, rtol=RTOL)
    np.testing.assert_allclose(res.task_cosine.numpy(), ref.task_cos, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(res.task_loss.numpy(), ref.task_loss, rtol=1e-10)
    assert res.conflict_rate == pytest.approx(ref.conflict_rate, nan_ok=True)
    assert res.noise_scale == pytest.approx(ref.noise_scale, rel=RTOL, nan_ok=True)
    assert res.fisher_trace == pytest.approx(ref.trace, rel=RTOL)


def _check_spectrum(res, ref):
    lam = res.fisher_eigvals.numpy()
    assert len(lam) == len(ref.eigvals)
    np.testing.assert_allclose(lam, ref.eigvals, rtol=SPEC_RTOL, atol=SPEC_RTOL * 1e-6 * ref.eigvals[0])
    assert res.fisher_se == pytest.approx(ref.se, rel=SPEC_RTOL)
    assert res.fisher_rho == pytest.approx(ref.rho, rel=SPEC_RTOL)
    assert res.fisher_eff_rank == pytest.approx(ref.eff_rank, rel=SPEC_RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_against_dense_fisher(family):
    """Subset of parameters (all of them for the small families): every signal, dense P x P Fisher."""
    model, batch, task_ids, kind = build(family)
    names, params = chosen_params(model, family, subset=True)
    G, losses, weights = ref_grads(model, batch, params, kind)
    assert G.shape[1] <= 2000  # the dense Fisher stays cheap
    assert np.abs(G).max() > 0
    ref = ref_signals(G, losses, weights, task_ids.numpy(), 3, EPS64 * G.shape[1] / G.shape[0])
    res = probe(model, batch, task_ids=task_ids, params=dict(zip(names, params, strict=True)))
    _check_first_order(res, ref, task_ids)
    _check_spectrum(res, ref)
    assert res.coverage["exact"] == []  # every path was the fast one


@pytest.mark.parametrize("method", ["ghost", "materialize", "exact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_params_every_method(family, method):
    """All trainable parameters, each Gram method; Fisher spectrum from the SVD of the explicit G."""
    model, batch, task_ids, kind = build(family)
    names, params = chosen_params(model, family, subset=False)
    G, losses, weights = ref_grads(model, batch, params, kind)
    ref = ref_signals(G, losses, weights, task_ids.numpy(), 3, EPS64, dense_fisher=False)
    res = probe(model, batch, task_ids=task_ids, method=method)
    _check_first_order(res, ref, task_ids)
    _check_spectrum(res, ref)
    if method == "exact":
        assert sorted(res.coverage["exact"]) == sorted(names)
    else:
        assert res.coverage["exact"] == []
    if method == "ghost":  # only bias sums are materialised when ghost products are forced
        assert all(n.endswith("bias") for n in res.coverage["materialized"])
    if method == "materialize":
        assert res.coverage["ghost"] == []


def test_float32_model_close_to_float64():
    """A float32 model gives the float64 Gram to float32 accuracy (the fast path upcasts, K is float64)."""
    m64, b64, task_ids, _ = build("llava", dtype=torch.float64)
    m32, b32, _, _ = build("llava", dtype=torch.float32)
    k64 = probe(m64, b64, task_ids=task_ids).gram.numpy()
    r32 = probe(m32, b32, task_ids=task_ids)
    assert r32.gram.dtype == torch.float64
    np.testing.assert_allclose(r32.gram.numpy(), k64, atol=1e-4 * np.abs(k64).max())


@pytest.mark.parametrize("family", ["llama_tied", "llama_untied"])
def test_direction_cosine_against_explicit_vectors(family):
    # untied: the embedding alone is factored over the table rows the batch looks up (the rest
    # of the direction must not count); tied: its factors mix with the output layer's
    model, batch, task_ids, kind = build(family)
    names, params = chosen_params(model, family, subset=False)
    G, losses, weights = ref_grads(model, batch, params, kind)
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    d = torch.cat([x.reshape(-1) for x in direction]).numpy()
    for method in ("ghost", "materialize", "exact"):
        res = probe(model, batch, task_ids=task_ids, direction=direction, method=method)
        for a in range(3):
            members = task_ids.numpy() == a
            g = (weights[members, None] / weights[members].sum() * G[members]).sum(0)
            expect = g @ d / (np.linalg.norm(g) * np.linalg.norm(d))
            assert res.direction_cosine[a].item() == pytest.approx(expect, rel=RTOL)
    by_name = dict(zip(names, direction, strict=True))
    res2 = probe(model, batch, task_ids=task_ids, direction=by_name)
    np.testing.assert_allclose(res2.direction_cosine.numpy(), res.direction_cosine.numpy(), rtol=1e-10)
