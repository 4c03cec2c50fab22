"""Every architecture of the IMAX/DMAX reproduction is probed correctly by the default fast path.

The zoo (LLaVA, PaliGemma, Qwen2-VL, Idefics3, SmolVLM, InternVL, Gemma 3, Mistral 3, LFM2-VL) feeds
images in every layout the fast path has to cope with: one image per row, patches flattened across
images (Qwen2-VL), all images in one sequence (Pixtral), NaFlex patch lists, broadcast position
embeddings, scaled embeddings, prefix-LM masks. For a float64 model at toy width and a batch of one
example per task (answers of different lengths, so padding varies), ``method="auto"`` must give the
brute-force Gram ``G G^T`` (a loop of per-example ``autograd.grad``) and agree with ``method="exact"``,
with no parameter on the exact path, and the steady-state probe (reused verdicts and row maps, no
weighted backward pass) must give the same Gram.
"""

from __future__ import annotations

import numpy as np
import pytest

from dynamics import probe
from dynamics.experiments.imax_dmax.constructions import build_bundle
from dynamics.experiments.imax_dmax.data import EntryDataset, VLMCollator
from dynamics.experiments.imax_dmax.tasks import TASK_NAMES
from dynamics.experiments.imax_dmax.tokenizer import build_tokenizer
from dynamics.experiments.imax_dmax.zoo import ARCHITECTURES, Dims, get_arch
from dynamics.integrations.probe_batch import split_task_ids
from dynamics.signals import axis_cache
from tests.reference import ref_grads

DIMS = Dims(hidden=32, intermediate=64, layers=1, vision_layers=1)


@pytest.fixture(scope="module")
def examples():
    tok = build_tokenizer()
    ds = EntryDataset(build_bundle(12, 4, seed=2).imax, tok)
    picks = [next(i for i, e in enumerate(ds.entries) if e.task == t) for t in TASK_NAMES]
    return tok, [ds[i] for i in picks]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_auto_matches_brute_force_and_exact(name, examples, weighted_passes):
    tok, items = examples
    arch = get_arch(name, size=48, dims=DIMS)
    model = arch.build(tok, seed=0).double()
    batch, task_ids = split_task_ids(VLMCollator(arch, tok)(items))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]

    axis_cache.clear(model)
    auto = probe(model, batch, task_ids=task_ids)
    assert weighted_passes["n"] == 1
    steady = probe(model, batch, task_ids=task_ids)  # verdicts and row maps reused: no weighted pass
    assert weighted_passes["n"] == 1
    exact = probe(model, batch, task_ids=task_ids, method="exact")
    G, _, _ = ref_grads(model, batch, params, "causal_lm")
    K = G @ G.T
    scale = np.abs(K).max()
    assert scale > 0
    for res in (auto, steady, exact):
        assert np.abs(res.gram.numpy() - K).max() <= 1e-9 * scale
    assert float((auto.gram - exact.gram).norm() / exact.gram.norm()) <= 1e-5
    # patches flattened across images (Qwen2-VL), one sequence of all images (Pixtral), features
    # concatenated across images (LFM2-VL's projector): row-mapped, none on the slow exact path
    assert auto.coverage["exact"] == [] and steady.coverage["exact"] == []
    assert steady.coverage == auto.coverage
    # a module re-run only for LFM2-VL's position table (interpolated image by image, copied into rows)
    assert set(auto.coverage["module"]) <= {"model.vision_tower.embeddings.position_embedding.weight"}
    # the image reaches the loss, and its tower's gradients are part of K
    vision = {n for n, p in model.named_parameters() if "vision" in n or "visual" in n}
    assert vision - set(auto.coverage["unused"])
